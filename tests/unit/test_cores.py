"""serving.cores: the container's CPU quota (fake cgroup folders) and the cores this process may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving import cores
from serving.cores import available_cores, cpu_quota, worker_cpu_sets


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2, limits.cpu: 2
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 cores: rounded up
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_cpu_quota_reads_the_container_limit(
    tmp_path: Path, files: dict[str, str], cores: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == cores


def test_available_cores_is_within_the_affinity() -> None:
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("affinity", "quota", "workers", "expected"),
    [
        ({0, 1}, None, 2, [[0], [1]]),
        ({0, 1, 2, 3}, None, 2, [[0, 1], [2, 3]]),
        ({0, 1, 2, 3, 4}, None, 2, [[0, 1], [2, 3]]),  # a core left over stays unused
        ({4, 5, 6, 7}, 4, 4, [[4], [5], [6], [7]]),
        ({0, 1}, None, 3, None),  # fewer cores than workers: they share
        ({0, 1, 2, 3}, 2, 2, None),  # a CPU limit caps time, not which cores: nothing to pin
        ({0, 1}, None, 1, None),
    ],
)
def test_workers_get_cores_of_their_own_where_the_cores_can_be_cut(
    monkeypatch: pytest.MonkeyPatch,
    affinity: set[int],
    quota: int | None,
    workers: int,
    expected: list[list[int]] | None,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity)
    monkeypatch.setattr(cores, "cpu_quota", lambda: quota)
    assert worker_cpu_sets(workers) == expected
