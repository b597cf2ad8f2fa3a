"""serving.memory: the cgroup's memory limit (fake cgroup folders), the admission budget derived
from it, glibc's arenas and malloc_trim (for real, in this process and in child processes), and
IdleTrimmer on a real event loop."""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

from harness import ROOT
from serving import memory
from serving.config import MiB
from serving.memory import (
    DEFAULT_RESERVE,
    MIN_BUDGET,
    NO_LIMIT_BUDGET,
    GiB,
    IdleTrimmer,
    default_inflight_budget_bytes,
    memory_limit,
    trim,
)

GLIBC = platform.libc_ver()[0] == "glibc"
V1_NONE = "9223372036854771712\n"  # what cgroup v1 reports without a limit


def fake_cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"memory.max": "1073741824\n"}, GiB),  # cgroup v2, limits.memory: 1Gi
        ({"memory.max": "max\n"}, None),
        ({"memory/memory.limit_in_bytes": "536870912\n"}, 512 * MiB),  # cgroup v1
        ({"memory/memory.limit_in_bytes": V1_NONE}, None),
        ({"memory/memory.limit_in_bytes": f"{1 << 60}\n"}, None),
        ({"memory.max": "garbage", "memory/memory.limit_in_bytes": "268435456"}, 256 * MiB),
        ({"memory.max": "0\n"}, None),
        ({}, None),
    ],
)
def test_memory_limit_reads_the_container_limit(
    tmp_path: Path, files: dict[str, str], limit: int | None
) -> None:
    assert memory_limit(fake_cgroup(tmp_path, files)) == limit


def test_memory_limit_prefers_v2_and_survives_unreadable_files(tmp_path: Path) -> None:
    both = fake_cgroup(
        tmp_path / "both",
        {"memory.max": "2147483648\n", "memory/memory.limit_in_bytes": "268435456\n"},
    )
    assert memory_limit(both) == 2 * GiB
    unreadable = tmp_path / "unreadable"
    (unreadable / "memory.max").mkdir(parents=True)  # reading it raises IsADirectoryError
    (unreadable / "memory" / "memory.limit_in_bytes").mkdir(parents=True)
    assert memory_limit(unreadable) is None
    (unreadable / "memory.max").rmdir()
    (unreadable / "memory.max").write_bytes(b"\xff\xfe")  # not text
    assert memory_limit(unreadable) is None


def test_memory_limit_of_this_machine_is_an_int_or_none() -> None:
    limit = memory_limit()
    assert limit is None or 0 < limit < 1 << 60


def test_budget_leaves_the_reserve_and_takes_a_fraction_of_the_rest(tmp_path: Path) -> None:
    one_gib = default_inflight_budget_bytes(GiB)
    assert one_gib == int((GiB - DEFAULT_RESERVE) * memory.BUDGET_FRACTION)
    assert DEFAULT_RESERVE + one_gib < GiB  # room left for what a held request costs beyond
    assert default_inflight_budget_bytes(4 * GiB) > one_gib
    assert default_inflight_budget_bytes(GiB, reserve=512 * MiB) < one_gib
    # A limit at or below the reserve still admits a few requests.
    assert default_inflight_budget_bytes(300 * MiB) == MIN_BUDGET
    assert default_inflight_budget_bytes(DEFAULT_RESERVE // 2) == MIN_BUDGET
    # No limit given: the cgroup's.
    v2 = fake_cgroup(tmp_path / "v2", {"memory.max": f"{2 * GiB}\n"})
    assert default_inflight_budget_bytes(cgroup=v2) == default_inflight_budget_bytes(2 * GiB)
    none = fake_cgroup(tmp_path / "none", {"memory/memory.limit_in_bytes": V1_NONE})
    assert default_inflight_budget_bytes(cgroup=none) == NO_LIMIT_BUDGET
    assert default_inflight_budget_bytes(cgroup=tmp_path / "missing") == NO_LIMIT_BUDGET


def test_trim_returns_whether_it_ran() -> None:
    blocks = [bytearray(64 * 1024) for _ in range(256)]  # 16 MiB on the heap, then freed
    del blocks
    assert trim() is GLIBC


def test_trim_first_frees_what_only_the_cyclic_collector_can() -> None:
    """A burst's failed calls leave their frames in reference cycles (grpc.aio's aborts); the
    heap under them can be given back only once they are collected."""

    class Holder:
        pass

    held = Holder()
    held.itself = held  # type: ignore[attr-defined]
    held.data = bytearray(8 * MiB)  # type: ignore[attr-defined]
    ref = weakref.ref(held)
    del held
    gc.disable()
    try:
        assert ref() is not None  # only the collector can free it
        trim()
        assert ref() is None
    finally:
        gc.enable()


# A child process: 8 threads that each allocate while all are alive, then glibc's own count of
# its arenas (malloc_info's <heap nr=...> entries).
ARENAS_CHILD = """
import ctypes, os, sys, tempfile, threading
sys.path.insert(0, sys.argv[1])
from serving import memory
if sys.argv[2] == "configure":
    memory.configure_malloc()
barrier = threading.Barrier(8)
kept = []
def work():
    kept.append([bytes(2000) for _ in range(100)])  # above pymalloc's 512 bytes: malloc's
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = tempfile.mktemp()
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, f)
libc.fclose(f)
print(open(path).read().count("<heap nr="))
os.unlink(path)
"""


def arenas_in_child(mode: str, env: dict[str, str]) -> int:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", ARENAS_CHILD, str(ROOT), mode],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(done.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="mallopt and malloc_info are glibc's")
def test_configure_malloc_caps_the_arenas_unless_the_environment_says() -> None:
    default = arenas_in_child("plain", {})
    capped = arenas_in_child("configure", {})
    assert capped <= memory.ARENAS < default
    # MALLOC_ARENA_MAX set: glibc follows it, configure_malloc leaves it be.
    assert arenas_in_child("configure", {"MALLOC_ARENA_MAX": "4"}) == min(4, default)


# ------------------------------------------------------------------ IdleTrimmer, real loop


class Recorder:
    """The real trim(), recording when and on which thread each call ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    def __call__(self) -> bool:
        self.calls.append((time.monotonic(), threading.current_thread().name))
        return trim()


QUIET = 0.1


async def settle(trimmer: IdleTrimmer, seconds: float = 4 * QUIET) -> None:
    await asyncio.sleep(seconds)
    if trimmer._task is not None:
        await trimmer._task


async def test_one_trim_after_a_burst_off_the_loop_thread() -> None:
    rec = Recorder()
    trimmer = IdleTrimmer(threshold=32 * MiB, quiet_s=QUIET, trim=rec)
    for held in (8 * MiB, 40 * MiB, 90 * MiB, 50 * MiB, 3 * MiB):
        trimmer.note(held)
    idle_at = time.monotonic()
    trimmer.note(0)
    trimmer.note(0)  # a second report of "nothing held" sets no second timer
    await settle(trimmer, 6 * QUIET)
    assert len(rec.calls) == 1 and trimmer.trims == 1
    ran_at, thread = rec.calls[0]
    assert ran_at - idle_at >= QUIET
    assert thread != threading.current_thread().name  # asyncio.to_thread, not the loop
    # A second burst after it: one more.
    trimmer.note(64 * MiB)
    trimmer.note(0)
    await settle(trimmer)
    assert trimmer.trims == 2
    await trimmer.close()


async def test_the_real_trim_runs_by_default() -> None:
    trimmer = IdleTrimmer(threshold=1, quiet_s=QUIET)
    trimmer.note(10)
    trimmer.note(0)
    await settle(trimmer)
    assert trimmer.trims == 1
    await trimmer.close()


async def test_no_trim_below_the_threshold() -> None:
    rec = Recorder()
    trimmer = IdleTrimmer(threshold=32 * MiB, quiet_s=QUIET, trim=rec)
    for _ in range(100):  # steady small traffic
        trimmer.note(4 * MiB)
        trimmer.note(0)
    await settle(trimmer)
    assert rec.calls == [] and trimmer.trims == 0
    await trimmer.close()


async def test_refusals_after_a_trim_bring_one_more_once_quiet() -> None:
    """A burst refused unread holds nothing in the budget, but gRPC received (and freed) its
    bytes: refusals after the first trim lead to another one once they stop."""
    rec = Recorder()
    trimmer = IdleTrimmer(threshold=32 * MiB, quiet_s=QUIET, trim=rec)
    trimmer.note(64 * MiB)
    trimmer.note(0)
    await settle(trimmer)
    assert trimmer.trims == 1
    for _ in range(5):  # the rest of the burst: refused, never held
        trimmer.stir()
        await asyncio.sleep(0.2 * QUIET)
    assert trimmer.trims == 1  # not while they go on
    await settle(trimmer)
    assert trimmer.trims == 2
    await settle(trimmer)
    assert trimmer.trims == 2  # and then no more
    await trimmer.close()


async def test_new_requests_postpone_the_trim_until_quiet() -> None:
    rec = Recorder()
    trimmer = IdleTrimmer(threshold=32 * MiB, quiet_s=QUIET, trim=rec)
    trimmer.note(64 * MiB)
    trimmer.note(0)
    await asyncio.sleep(0.6 * QUIET)
    trimmer.note(1 * MiB)  # a small request in the quiet period
    trimmer.note(0)
    last_request = time.monotonic()
    await settle(trimmer, 5 * QUIET)
    assert len(rec.calls) == 1
    assert rec.calls[0][0] - last_request >= QUIET * 0.99
    await trimmer.close()


async def test_busy_when_the_timer_fires_waits_for_the_next_idle() -> None:
    rec = Recorder()
    trimmer = IdleTrimmer(threshold=32 * MiB, quiet_s=QUIET, trim=rec)
    trimmer.note(64 * MiB)
    trimmer.note(0)
    trimmer.note(8 * MiB)  # still held when the timer fires
    await asyncio.sleep(3 * QUIET)
    assert rec.calls == []
    trimmer.note(0)
    await settle(trimmer)
    assert len(rec.calls) == 1
    await trimmer.close()


async def test_close_cancels_a_pending_trim() -> None:
    rec = Recorder()
    trimmer = IdleTrimmer(threshold=1, quiet_s=QUIET, trim=rec)
    trimmer.note(10)
    trimmer.note(0)
    await trimmer.close()
    await asyncio.sleep(3 * QUIET)
    assert rec.calls == []


async def test_note_allocates_nothing_on_the_hot_path() -> None:
    trimmer = IdleTrimmer(threshold=1 << 62, quiet_s=QUIET)
    held = [i * 4096 + 1 for i in range(2000)]  # growing: each one is a new peak
    note = trimmer.note
    for h in held[:10]:  # warm the interpreter's caches
        note(h)
        note(0)
    before = sys.getallocatedblocks()
    for h in held:
        note(h)
        note(0)
    assert sys.getallocatedblocks() - before < 20
    await trimmer.close()
