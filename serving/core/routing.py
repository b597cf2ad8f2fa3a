"""Which version answers a call that names none, under each model's rollout policy
(core/rollout.py), and the copies of its images sent to the other version for comparison.

- No policy file: the newest ready version answers (the repository's rule).
- `shadow`: `stable` answers every call; once it has, a copy of the images goes to `candidate`
  through the candidate's batcher, off the answer's path, and the two answers are compared.
- `canary`: `canary_percent` of the calls are answered by `candidate` (per call, or by a hash
  of the client's key when the call carries one: a key stays on its side, and a key in the
  canary at 10 % is still in it at 20 %); a copy of those goes to `stable` for comparison.
- A call that names a version gets that version: no policy, no copy.

Copies are the first thing dropped under load, before anything real waits or is refused: none
is made while real images wait in either version's batcher, while admission holds more than
half its budget, or past `COPY_IMAGES` images in flight per model; they hold no admission
ticket. When the candidate breaks a bound of the policy the server rolls it back itself (it
gets no more traffic; the state says why) until the file changes.

Policies are read in two steps around the repository's scan: `read` (before: the versions a new
policy names stay loaded, `pinned`), then `apply` (after: a policy naming a version that failed
to load is refused too). A refused file is logged once, naming the file and the problem, and
the last good policy stays in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from serving.core import rollout
from serving.core.admission import Admission
from serving.core.agreement import CANDIDATE, STABLE, Agreement
from serving.core.explanations import as_pixels
from serving.core.repository import MODEL_FILE, ModelRepository, ServedVersion, State
from serving.core.rollout import CANARY, SHADOW, Policy, PolicyError

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
ROLLED_BACK = "rolled_back"
STATES = ("none", "stable", SHADOW, CANARY, ROLLED_BACK)
COPY_IMAGES = 64  # images of copies in flight per model, at most
BUDGET_SHARE = 0.5  # no copies while admission holds more than this share of its budget


class Listener(Protocol):
    """What the router reports as it goes (the Prometheus metrics implement it)."""

    def rollout_state(self, model: str, policy: Policy | None, state: str) -> None: ...

    def rollout_call(
        self, model: str, version: int, role: str, ok: bool, seconds: float
    ) -> None: ...

    def rollout_compared(
        self, model: str, stable: int, candidate: int, *, images: int, agreed: int, abs_diff: float
    ) -> None: ...

    def rollout_shed(self, model: str, reason: str) -> None: ...

    def rollout_rolled_back(self, model: str, bound: str) -> None: ...


@dataclass
class Rollout:
    """One model's policy in force, its state and what it measured since it took effect."""

    policy: Policy
    path: Path
    state: str
    agreement: Agreement | None
    reason: str = ""  # rolled back: the bound broken, in words
    since: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Route:
    """The version that answers a call, its role, and the version that gets a copy."""

    served: ServedVersion
    role: str = ""  # STABLE or CANDIDATE when a policy chose it
    copy_to: ServedVersion | None = None
    rollout: Rollout | None = None


@dataclass(frozen=True)
class RolloutStatus:
    """What the protocols report of one model's rollout."""

    model: str
    path: str
    state: str  # one of STATES
    policy: Policy | None
    reason: str  # rolled back: why
    file_error: str  # the file's last refusal, while the last good policy stays
    agreement: Agreement | None
    roles: dict[int, str]
    since: float
    class_names: tuple[str, ...] = ()  # the stable version's, to name the disagreements' classes


def in_canary(model: str, percent: float, key: str, rng: random.Random) -> bool:
    """Whether a call goes to the candidate: by chance, or by the hash of its client's key."""
    if percent <= 0:
        return False
    if percent >= 100:
        return True
    if key:
        digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % 10_000 < percent * 100
    return rng.random() * 100 < percent


class Router:
    def __init__(
        self,
        repository: ModelRepository,
        admission: Admission | None = None,
        listener: Listener | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.repository = repository
        self.admission = admission
        self.listener = listener
        self._rng = rng or random.Random()
        self._rollouts: dict[str, Rollout] = {}
        # Read from disk, applied after the versions load: a policy, None (no file), or why
        # the file is refused. None as a whole: the repository could not be read.
        self._pending: dict[str, Policy | PolicyError | None] | None = None
        self._errors: dict[str, str] = {}
        self._copies: dict[str, int] = {}  # images of copies in flight, per model
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ the files

    def _path(self, name: str) -> Path:
        return self.repository.root / name / rollout.POLICY_FILE

    def _read_all(self) -> dict[str, Policy | PolicyError | None] | None:
        try:
            folders = [
                p
                for p in self.repository.root.iterdir()
                if p.is_dir() and not p.name.startswith(".")
            ]
        except OSError:
            return None  # the repository's scan logs it; every policy stays as it is
        found: dict[str, Policy | PolicyError | None] = {}
        for folder in folders:
            try:
                found[folder.name] = rollout.read(
                    folder, rollout.versions_on_disk(folder, MODEL_FILE)
                )
            except PolicyError as exc:
                found[folder.name] = exc
        return found

    async def read(self) -> None:
        """Read every model's policy file (off the loop); they take effect in `apply`."""
        self._pending = await asyncio.to_thread(self._read_all)

    def pinned(self, name: str) -> tuple[int, ...]:
        """Versions to keep loaded whatever --max-versions says, in the order to load them:
        those the policy just read and the one in force name, stable first."""
        pins: list[int] = []
        pending = (self._pending or {}).get(name)
        current = self._rollouts.get(name)
        for policy in (pending, current.policy if current is not None else None):
            if isinstance(policy, Policy):
                pins += [v for v in (policy.stable, policy.candidate) if v is not None]
        return tuple(dict.fromkeys(pins))

    def apply(self) -> bool:
        """After the repository's scan: what `read` found takes effect, model by model.
        Whether a policy changed (versions the old one kept loaded may go now)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        before = {name: r.policy for name, r in self._rollouts.items()}
        for name in sorted(set(self._rollouts) | set(pending)):
            found = pending.get(name)
            if isinstance(found, PolicyError):
                self._refuse(name, str(found))
            elif found is None:
                self._errors.pop(name, None)
                if self._rollouts.pop(name, None) is not None:
                    log.info(
                        "model %s: no %s any more: the newest ready version answers",
                        name,
                        self._path(name),
                        extra={"event": "rollout_removed", "model": name},
                    )
                    self._report(name, None, "none")
            else:
                failed = self._failed(name, found)
                if failed:
                    self._refuse(name, failed)
                else:
                    self._errors.pop(name, None)
                    self._take(name, found)
        return before != {name: r.policy for name, r in self._rollouts.items()}

    def _failed(self, name: str, policy: Policy) -> str:
        statuses = {s.version: s for s in self.repository.statuses().get(name, [])}
        for key, v in (("stable", policy.stable), ("candidate", policy.candidate)):
            status = statuses.get(v) if v is not None else None
            if status is not None and status.state is State.FAILED:
                return f"{key}: version {v} failed to load ({status.reason})"
        return ""

    def _take(self, name: str, policy: Policy) -> None:
        current = self._rollouts.get(name)
        if current is not None and current.policy == policy:
            return  # the same policy read again: its state and measurements go on
        state = "stable" if policy.candidate is None else policy.mode
        agreement = None if policy.candidate is None else Agreement(policy.stable, policy.candidate)
        self._rollouts[name] = Rollout(policy, self._path(name), state, agreement)
        log.info(
            "model %s: rollout policy in force from %s: %s",
            name,
            self._path(name),
            policy.describe(),
            extra={"event": "rollout_policy", "model": name, "state": state},
        )
        self._report(name, policy, state)

    def _refuse(self, name: str, why: str) -> None:
        if self._errors.get(name) == why:
            return  # logged when it was first found
        self._errors[name] = why
        current = self._rollouts.get(name)
        keeps = (
            f"the last good policy stays in force ({current.policy.describe()})"
            if current is not None
            else "no policy is in force: the newest ready version answers"
        )
        log.error(
            "model %s: rollout policy %s refused: %s; %s",
            name,
            self._path(name),
            why,
            keeps,
            extra={"event": "rollout_refused", "model": name, "reason": why},
        )

    def _report(self, name: str, policy: Policy | None, state: str) -> None:
        if self.listener is not None:
            self.listener.rollout_state(name, policy, state)

    # ------------------------------------------------------------ calls

    def default_version(self, name: str) -> int:
        """The version a call without one gets, other than inference (metadata, summaries,
        explanations): the policy's stable, or 0 for the newest."""
        current = self._rollouts.get(name)
        if current is None or not self.repository.is_ready(name, current.policy.stable):
            return 0  # no policy, or its stable is gone from disk: the newest answers
        return current.policy.stable

    def route(self, name: str, version: int = 0, client: str = "") -> Route:
        """The version that answers an inference call, and the one that gets its copy."""
        current = self._rollouts.get(name) if version == 0 else None
        if current is None:
            return Route(self.repository.get(name, version))
        policy = current.policy
        if not self.repository.is_ready(name, policy.stable):
            return Route(self.repository.get(name))  # its stable is gone: the newest answers
        stable = self.repository.get(name, policy.stable)
        candidate = None
        if current.state in (SHADOW, CANARY) and policy.candidate is not None:
            candidate = self._ready(name, policy.candidate)
        if candidate is None:
            return Route(stable, STABLE, None, current)
        if current.state == SHADOW:
            return Route(stable, STABLE, candidate, current)
        if in_canary(name, policy.canary_percent, client, self._rng):
            return Route(candidate, CANDIDATE, stable, current)
        return Route(stable, STABLE, None, current)

    def _ready(self, name: str, version: int) -> ServedVersion | None:
        if not self.repository.is_ready(name, version):
            return None
        return self.repository.get(name, version)

    def failed(self, route: Route, seconds: float) -> None:
        """The answering version failed the call (not the caller's input)."""
        current = route.rollout
        if current is None or current.agreement is None or not self._live(route):
            return
        self._count(route.served, route.role, current, ok=False, seconds=seconds)
        self._judge(route.served.name, current)

    def answered(
        self,
        route: Route,
        x: F32,
        pixels: npt.NDArray[np.generic],
        out: F32,
        *,
        seconds: float,
    ) -> None:
        """The answering version answered: counted, and a copy sent for comparison unless the
        server is loaded."""
        current = route.rollout
        if current is None or current.agreement is None or not self._live(route):
            return
        served = route.served
        self._count(served, route.role, current, ok=True, seconds=seconds)
        target = route.copy_to
        if target is None:
            self._judge(served.name, current)
            return
        reason = self._shed(route, len(x))
        if reason:
            current.agreement.shed += 1
            if self.listener is not None:
                self.listener.rollout_shed(served.name, reason)
            return
        self._copies[served.name] = self._copies.get(served.name, 0) + len(x)
        task = asyncio.get_running_loop().create_task(self._compare(route, x, pixels, out))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _live(self, route: Route) -> bool:
        """Whether the call's policy is still the one in force, and not rolled back."""
        current = route.rollout
        return (
            current is not None
            and self._rollouts.get(route.served.name) is current
            and current.state in (SHADOW, CANARY)
        )

    def _shed(self, route: Route, images: int) -> str:
        """Why a copy must not be made now ("" when it may)."""
        name = route.served.name
        if self._copies.get(name, 0) + images > COPY_IMAGES:
            return "copies"
        for version in (route.served, route.copy_to):
            if (
                version is not None
                and version.batcher is not None
                and version.batcher.queued_images
            ):
                return "queue"
        a = self.admission
        if a is not None and a.held_bytes > BUDGET_SHARE * a.budget_bytes:
            return "memory"
        return ""

    def _count(
        self, served: ServedVersion, role: str, current: Rollout, *, ok: bool, seconds: float
    ) -> None:
        assert current.agreement is not None
        current.agreement.tally(role).add(ok, seconds)
        if self.listener is not None:
            self.listener.rollout_call(served.name, served.version, role, ok, seconds)

    async def _compare(
        self, route: Route, x: F32, pixels: npt.NDArray[np.generic], out: F32
    ) -> None:
        target = route.copy_to
        current = route.rollout
        assert target is not None and current is not None and current.agreement is not None
        role = STABLE if route.role == CANDIDATE else CANDIDATE
        name = target.name
        started = time.perf_counter()
        try:
            other = await target.infer(x)
        except Exception:
            if self._live(route):  # not a version unloaded with its policy
                self._count(target, role, current, ok=False, seconds=0.0)
                self._judge(name, current)
            return
        finally:
            self._copies[name] -= len(x)
        if not self._live(route):
            return
        self._count(target, role, current, ok=True, seconds=time.perf_counter() - started)
        stable_out, candidate_out = (out, other) if role == CANDIDATE else (other, out)
        info = target.runtime.info
        n, agreed, diff = current.agreement.compare(
            stable_out,
            candidate_out,
            lambda i: as_pixels(pixels[i], info.input_scale, info.input_offset).copy(),
        )
        policy = current.policy
        assert policy.candidate is not None
        if self.listener is not None:
            self.listener.rollout_compared(
                name, policy.stable, policy.candidate, images=n, agreed=agreed, abs_diff=diff
            )
        self._judge(name, current)

    def _judge(self, name: str, current: Rollout) -> None:
        assert current.agreement is not None
        broken = current.agreement.breach(current.policy.bounds)
        if broken is None or current.state == ROLLED_BACK:
            return
        bound, why = broken
        current.state = ROLLED_BACK
        current.reason = why
        log.warning(
            "model %s: candidate v%s rolled back automatically: %s; stable v%d answers every "
            "call until %s changes",
            name,
            current.policy.candidate,
            why,
            current.policy.stable,
            current.path,
            extra={"event": "rollout_rolled_back", "model": name, "bound": bound},
        )
        if self.listener is not None:
            self.listener.rollout_rolled_back(name, bound)
        self._report(name, current.policy, ROLLED_BACK)

    # ------------------------------------------------------------ what the protocols report

    def roles(self, name: str) -> dict[int, str]:
        """version -> role: `stable` answers calls without a version (with no policy, the
        newest ready one), `candidate` is being tried, `rolled_back` was stopped."""
        current = self._rollouts.get(name)
        if current is None:
            ready = self.repository.ready_versions(name)
            return {max(ready): STABLE} if ready else {}
        policy = current.policy
        roles = {policy.stable: STABLE}
        if policy.candidate is not None:
            roles[policy.candidate] = ROLLED_BACK if current.state == ROLLED_BACK else CANDIDATE
        return roles

    def status(self, name: str) -> RolloutStatus:
        current = self._rollouts.get(name)
        path = str(self._path(name))
        error = self._errors.get(name, "")
        if current is None:
            return RolloutStatus(name, path, "none", None, "", error, None, self.roles(name), 0.0)
        return RolloutStatus(
            name,
            path,
            current.state,
            current.policy,
            current.reason,
            error,
            current.agreement,
            self.roles(name),
            current.since,
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
