"""How many cores this process may use: CPU affinity and the cgroup's CPU limit.

os.cpu_count() and ONNX Runtime's default thread pool count the machine's cores, which in a
container with a CPU limit is the node's: 64 threads in a pod limited to 2 cores. No imports
beyond the standard library, so the `--workers` supervisor can use it without ONNX Runtime.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPU limit of this process's cgroup in whole cores, rounded up (a container's
    `limits.cpu`), or None when there is none."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 is none
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else max(1, math.ceil(quota_us / period_us))


CPUS_ENV = "CNNSERVE_CPUS"  # a worker's own cores, set by the `--workers` supervisor


def worker_cpu_sets(workers: int) -> list[list[int]] | None:
    """The cores of each of `workers` processes: this process's CPU affinity cut into equal
    runs of neighbouring cores, or None when it cannot be cut (fewer cores than workers, or a
    cgroup CPU limit tighter than the affinity: the limit caps time, not which cores, so there
    is nothing to pin to). A worker on cores of its own runs its batches on its own thread when
    it has one core, and never takes turns for the GIL with a run thread."""
    if not hasattr(os, "sched_getaffinity") or workers < 2:
        return None
    cores = sorted(os.sched_getaffinity(0))
    quota = cpu_quota()
    if len(cores) < workers or (quota is not None and quota < len(cores)):
        return None
    share = len(cores) // workers
    return [cores[i * share : (i + 1) * share] for i in range(workers)]


def pin_from_environment() -> None:
    """Keep this process to the cores its supervisor gave it (`CPUS_ENV`), before any thread
    pool is sized from `available_cores`."""
    value = os.environ.get(CPUS_ENV)
    if value and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in value.split(",")})


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by its cgroup's CPU limit."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cpu_quota()
    return max(1, min(cores or 1, quota or cores or 1))
