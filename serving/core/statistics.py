"""What the protocols report of the repository: each model's versions (`ModelCatalog`) and the
per-version request and execution counters (`Statistics`), kept apart from the data plane's
request path so that each stays one small module."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from serving.core.batching import Observer
from serving.core.repository import ServedVersion, VersionStatus
from serving.core.routing import RolloutStatus


@dataclass(frozen=True)
class ModelCatalog:
    """One model's versions as the repository holds them, for listings."""

    name: str
    statuses: list[VersionStatus]
    ready_versions: list[int]
    precision: str = ""  # the default version's ("fp32" | "int8"); empty when none is ready
    stable: int = 0  # the rollout policy's stable version; 0: none (the newest answers)
    rollout: RolloutStatus | None = None  # the policy in force, its state, each version's role

    @property
    def default_version(self) -> int:
        if self.stable:
            return self.stable if self.stable in self.ready_versions else 0
        return max(self.ready_versions) if self.ready_versions else 0

    def role(self, version: int) -> str:
        return self.rollout.roles.get(version, "") if self.rollout is not None else ""


@dataclass
class Duration:
    """How often something happened, and how long it took in all."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, times: int = 1) -> None:
        self.count += times
        self.ns += round(seconds * 1e9) * times


@dataclass
class VersionStats:
    """Cumulative counts of one model version, as the server measured them (both APIs)."""

    inference_count: int = 0  # images of successful requests
    execution_count: int = 0  # ONNX Runtime runs, after dynamic batching
    last_inference_ms: int = 0  # Unix time of the last answered request, in ms
    success: Duration = field(default_factory=Duration)  # requests, time in the data plane
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)  # per request: wait in the batcher
    compute_infer: Duration = field(default_factory=Duration)  # per request: its batch's run
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> runs


class Statistics:
    """Per-version request and execution counters, kept on the event loop (no locks needed)."""

    def __init__(self) -> None:
        self._by_version: dict[tuple[str, int], VersionStats] = {}

    def get(self, name: str, version: int) -> VersionStats:
        stats = self._by_version.get((name, version))
        if stats is None:  # not setdefault: that would build a VersionStats on every call
            stats = self._by_version[name, version] = VersionStats()
        return stats

    def observer(self, name: str, version: int, then: Observer | None = None) -> Observer:
        """The batcher's per-run callback for this version (chained before `then`)."""
        stats = self.get(name, version)

        def observe(size: int, waits: list[float], seconds: float) -> None:
            stats.execution_count += 1
            stats.batches.setdefault(size, Duration()).add(seconds)
            # Every request of the batch waited for, and is charged, the whole run.
            stats.compute_infer.add(seconds, len(waits))
            for wait in waits:
                stats.queue.add(wait)
            if then is not None:
                then(size, waits, seconds)

        return observe

    def finished(self, served: ServedVersion, images: int, seconds: float, ok: bool) -> None:
        stats = self.get(served.name, served.version)
        stats.last_inference_ms = time.time_ns() // 1_000_000
        if ok:
            stats.inference_count += images
            stats.success.add(seconds)
        else:
            stats.fail.add(seconds)
