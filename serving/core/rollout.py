"""A model's rollout policy, `<repository>/<model>/rollout.yaml`: which version answers
(`stable`), which one is being tried (`candidate`) and how (`shadow` or `canary`), and the bounds
past which the candidate is rolled back by the server itself.

This module only reads, checks, writes and describes the file (the CLI writes it, the server
reads it); what the server does with a policy is core/routing.py's job. A file that does not
parse, names a version that is not on disk, or has a share outside 0-100 is a `PolicyError`
whose message says what is wrong, so that the log line can name the file and the problem.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

POLICY_FILE = "rollout.yaml"
SHADOW = "shadow"
CANARY = "canary"
MODES = (SHADOW, CANARY)
KEYS = ("stable", "candidate", "mode", "canary_percent", "rollback")
BOUND_KEYS = ("after", "min_agreement", "max_error_rate", "max_p99_ratio")


class PolicyError(ValueError):
    """A policy that is refused; the message says why (the caller adds the file's path)."""


@dataclass(frozen=True)
class Bounds:
    """When the server stops sending the candidate traffic on its own. Nothing is judged before
    `after` compared images (and candidate calls): a handful of calls says nothing."""

    after: int = 200
    min_agreement: float | None = None  # top-1 agreement with stable, 0..1
    max_error_rate: float | None = None  # the candidate's failed calls / its calls, 0..1
    max_p99_ratio: float | None = None  # the candidate's p99 latency / stable's

    @property
    def any(self) -> bool:
        return any(
            v is not None for v in (self.min_agreement, self.max_error_rate, self.max_p99_ratio)
        )


@dataclass(frozen=True)
class Policy:
    stable: int
    candidate: int | None = None
    mode: str = SHADOW
    canary_percent: float = 0.0
    bounds: Bounds = field(default_factory=Bounds)

    @property
    def versions(self) -> frozenset[int]:
        """The versions the policy names: they stay loaded whatever --max-versions says."""
        return frozenset(v for v in (self.stable, self.candidate) if v is not None)

    def describe(self) -> str:
        if self.candidate is None:
            return f"stable v{self.stable}"
        how = f"canary {self.canary_percent:g}%" if self.mode == CANARY else "shadow"
        return f"stable v{self.stable}, candidate v{self.candidate} ({how})"


def _version(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PolicyError(f"{key}: expected a version number >= 1, got {value!r}")
    return value


def _number(value: Any, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyError(f"{key}: expected a number, got {value!r}")
    if not low <= value <= high:
        raise PolicyError(f"{key}: {value:g} is out of range {low:g}-{high:g}")
    return float(value)


def _unknown(found: dict[Any, Any], allowed: tuple[str, ...], where: str) -> None:
    extra = [str(k) for k in found if k not in allowed]
    if extra:
        raise PolicyError(
            f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(extra)}{where}; "
            f"allowed: {', '.join(allowed)}"
        )


def _bounds(value: Any) -> Bounds:
    if value is None:
        return Bounds()
    if not isinstance(value, dict):
        raise PolicyError(f"rollback: expected a mapping of bounds, got {value!r}")
    _unknown(value, BOUND_KEYS, " under rollback")
    after = value.get("after", Bounds.after)
    if isinstance(after, bool) or not isinstance(after, int) or after < 1:
        raise PolicyError(f"rollback.after: expected a whole number >= 1, got {after!r}")

    def optional(key: str, low: float, high: float) -> float | None:
        got = value.get(key)
        return None if got is None else _number(got, f"rollback.{key}", low, high)

    ratio = optional("max_p99_ratio", 0.0, math.inf)
    if ratio is not None and ratio <= 0:
        raise PolicyError(f"rollback.max_p99_ratio: expected a number > 0, got {ratio:g}")
    return Bounds(
        after=after,
        min_agreement=optional("min_agreement", 0.0, 1.0),
        max_error_rate=optional("max_error_rate", 0.0, 1.0),
        max_p99_ratio=ratio,
    )


def parse(text: str, on_disk: Collection[int] | None = None) -> Policy:
    """The policy in `text`; `on_disk`: the versions that exist, which the policy must name."""
    try:
        found = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(found, dict):
        raise PolicyError(f"expected a mapping with at least `stable: <version>`, got {found!r}")
    _unknown(found, KEYS, "")
    if "stable" not in found:
        raise PolicyError("no `stable` version")
    stable = _version(found["stable"], "stable")
    candidate = found.get("candidate")
    if candidate is not None:
        candidate = _version(candidate, "candidate")
        if candidate == stable:
            raise PolicyError(f"candidate is the stable version, v{stable}")
    mode = found.get("mode", SHADOW)
    if mode not in MODES:
        raise PolicyError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    percent = _number(found.get("canary_percent", 0), "canary_percent", 0.0, 100.0)
    if on_disk is not None:
        for key, v in (("stable", stable), ("candidate", candidate)):
            if v is not None and v not in on_disk:
                have = ", ".join(str(x) for x in sorted(on_disk)) or "none"
                raise PolicyError(f"{key}: unknown version {v} (versions on disk: {have})")
    return Policy(stable, candidate, mode, percent, _bounds(found.get("rollback")))


def render(policy: Policy) -> str:
    """The file's text: what `parse` reads back as `policy`."""
    data: dict[str, Any] = {"stable": policy.stable}
    if policy.candidate is not None:
        data["candidate"] = policy.candidate
        data["mode"] = policy.mode
        data["canary_percent"] = policy.canary_percent
        b = policy.bounds
        bounds = {k: getattr(b, k) for k in BOUND_KEYS if getattr(b, k) is not None}
        if b.any:
            data["rollback"] = bounds
    head = (
        "# cnnserve rollout policy (written by `cnnserve-client rollout`); the server reloads it\n"
        "# on its next repository scan (--poll-seconds) or on SIGHUP.\n"
    )
    return head + yaml.safe_dump(data, sort_keys=False)


def read(folder: Path, on_disk: Collection[int] | None = None) -> Policy | None:
    """The policy of a model folder, None when it has no file."""
    path = folder / POLICY_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot be read: {exc}") from None
    return parse(text, on_disk)


def write(folder: Path, policy: Policy) -> Path:
    """Write the policy so that a reader sees the old file or the new one, never a part of
    one: a temporary file in the same folder, flushed to disk, renamed over the old."""
    path = folder / POLICY_FILE
    text = render(policy)
    parse(text)  # what is written must read back
    fd, tmp = tempfile.mkstemp(prefix=".rollout-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def versions_on_disk(folder: Path, model_file: str) -> set[int]:
    """The version folders of a model that hold a model file (what the repository would load)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return set()
    return {
        int(e.name)
        for e in entries
        if e.name.isdigit() and int(e.name) > 0 and (e / model_file).is_file()
    }
