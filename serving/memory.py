"""How much memory this process may use, and giving freed memory back to the system.

A burst of large requests used to grow the server without bound and, once it was over, leave
it several times its idle size: glibc's malloc keeps freed memory in its heaps (one arena per
thread by default, up to eight per core) instead of returning it. This module reads the
container's memory limit (to size the admission budget for request data), caps glibc's
arenas, and trims its heaps once the server has gone quiet after holding a lot.
Standard library and ctypes only, like `serving.cores`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import os
from collections.abc import Callable
from pathlib import Path

from serving.config import MiB

log = logging.getLogger(__name__)

GiB = 1024 * MiB
CGROUP = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number
# (9223372036854771712); nothing real is that large.
NO_LIMIT_FROM = 1 << 60
# What an idle server needs besides request data: Python, gRPC, ONNX Runtime and its warmed-up
# sessions, with room for more or bigger models than ours (figures: bench/PROFILE.md, "Figures
# behind the code").
DEFAULT_RESERVE = 256 * MiB
# The budget counts what admitted requests hold, as the data plane estimates it. Beside it the
# process also holds what the budget cannot see: the messages gRPC has received of calls not yet
# admitted or refused, responses on their way out, and the allocator's free but unreturned
# memory. So only half of what the reserve leaves is given to the budget.
BUDGET_FRACTION = 0.5
NO_LIMIT_BUDGET = 512 * MiB  # without a memory limit there is nothing to derive it from
MIN_BUDGET = 64 * MiB  # enough for a few of the largest requests (1,024 MNIST-sized float32 images)
M_ARENA_MAX = -8  # mallopt's parameter number in glibc's malloc.h
ARENAS = 2  # the main heap and one for every other thread


def memory_limit(cgroup: Path = CGROUP) -> int | None:
    """The memory limit of this process's cgroup in bytes (a container's `limits.memory`), or
    None when there is none or it cannot be read."""
    try:  # cgroup v2: "max" or a number of bytes
        text = (cgroup / "memory.max").read_text().strip()
        return None if text == "max" else _limit(int(text))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a huge number is none
        return _limit(int((cgroup / "memory" / "memory.limit_in_bytes").read_text()))
    except (OSError, ValueError):
        return None


def _limit(value: int) -> int | None:
    return value if 0 < value < NO_LIMIT_FROM else None


def default_inflight_budget_bytes(
    limit: int | None = None, reserve: int = DEFAULT_RESERVE, *, cgroup: Path = CGROUP
) -> int:
    """The default budget for request data held at once (queued and running): half of what
    `limit` (by default this cgroup's memory limit) leaves after a reserve for the models,
    runtime and Python, the other half being for what the budget does not count (see
    BUDGET_FRACTION); NO_LIMIT_BUDGET without a limit; never below MIN_BUDGET."""
    if limit is None:
        limit = memory_limit(cgroup)
    if limit is None:
        return NO_LIMIT_BUDGET
    return max(MIN_BUDGET, int((limit - reserve) * BUDGET_FRACTION))


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library of this process when it is glibc (mallopt and malloc_trim are glibc's)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(None)
    except (AttributeError, ValueError, OSError):  # not glibc, or no confstr at all
        return None
    if not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def configure_malloc() -> None:
    """Cap glibc at ARENAS malloc arenas, unless MALLOC_ARENA_MAX says otherwise. By default
    every thread that allocates (gRPC's, ONNX Runtime's, the executor's) may get an arena of
    its own, each keeping what it freed; few arenas keep freed memory where it is reused and
    trimmed. Call it at start-up, before those threads exist. A no-op on other C libraries."""
    libc = _glibc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return
    if libc.mallopt(M_ARENA_MAX, ARENAS) != 1:
        log.warning("mallopt(M_ARENA_MAX, %d) failed", ARENAS)


def resident_bytes() -> int:
    """This process's resident memory (VmRSS), 0 where /proc cannot tell."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def trim() -> bool:
    """Give glibc's free heap memory back to the system (`malloc_trim(0)`); True when it ran
    (on glibc), False elsewhere. Can take milliseconds on a large heap: not on the event loop.

    A full garbage collection first: a call that ended in an exception (every refusal does)
    leaves its frames, and with them its request's bytes, in a reference cycle that only the
    cyclic collector frees, and the oldest generation is collected rarely. Until then the
    heap under them cannot be given back."""
    freed = gc.collect()
    if freed:
        log.debug("the collector freed %d objects held in reference cycles", freed)
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class IdleTrimmer:
    """Trims the heap once after a burst: when the bytes of request data held drop to 0, having
    been at least `threshold` since the last trim, and then `quiet_s` pass without a new
    request, `trim` runs once in a thread (never on the event loop).

    The data plane calls `note(held_bytes)` whenever what it holds changes; on the hot path
    that is an assignment and a comparison or two, with nothing allocated. Its timer lives on
    the running event loop (`loop.call_later`), so `note` must be called from the loop thread."""

    def __init__(
        self,
        threshold: int = 32 * MiB,
        quiet_s: float = 1.0,
        trim: Callable[[], bool] = trim,
    ) -> None:
        self.threshold = threshold
        self.quiet_s = quiet_s
        self.trims = 0  # trims that have run
        self._trim = trim
        self._held = 0
        self._peak = 0  # the most held since the last trim
        self._stirred = False  # a request came since the timer was set
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def note(self, held_bytes: int) -> None:
        self._held = held_bytes
        if held_bytes:
            self._stirred = True
            self._peak = max(self._peak, held_bytes)
        elif self._peak >= self.threshold and self._timer is None:
            self._arm(asyncio.get_running_loop())

    def stir(self) -> None:
        """A request was refused unread: a burst is on, whose bytes gRPC received and freed
        without the budget seeing them. Trim once it has been quiet, even if nothing was held."""
        self._stirred = True
        self._peak = max(self._peak, self.threshold)
        if not self._held and self._timer is None:
            self._arm(asyncio.get_running_loop())

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stirred = False
        self._timer = loop.call_later(self.quiet_s, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._held:  # busy again: the next note(0) sets the timer again
            return
        if self._stirred or (self._task is not None and not self._task.done()):
            self._arm(loop)  # not quiet for quiet_s yet, or a trim is still running
            return
        self._peak = 0
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        debug = log.isEnabledFor(logging.DEBUG)  # /proc is read only for the debug line
        before = resident_bytes() if debug else 0
        try:
            await asyncio.to_thread(self._trim)
        except Exception:
            log.exception("malloc_trim failed")
        self.trims += 1
        if debug:
            log.debug(
                "quiet after a burst: heap trimmed, resident %.0f -> %.0f MiB",
                before / MiB,
                resident_bytes() / MiB,
            )

    async def close(self) -> None:
        """Cancel a pending trim and wait for one that is running."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
