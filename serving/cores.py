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


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by its cgroup's CPU limit."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cpu_quota()
    return max(1, min(cores or 1, quota or cores or 1))
