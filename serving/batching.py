"""Dynamic batching: concurrent requests for one model coalesce into one ONNX Runtime run.

The first queued request, then everything else queued by the loop's next turn (and, with
`max_delay_s` > 0, what arrives within that delay), up to `max_batch_size` images, form one
batch; it runs, and each caller gets its slice. While one batch computes in a worker thread,
the next one fills, so batches grow with load and cost no waiting when idle.
Knows nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
RunFn = Callable[[F32], F32]
# A batch whose warm-up run took at most this long runs on the event loop's own thread: for a
# small CNN a hop to a worker thread and back (and the GIL hand-offs it brings) costs more than
# the run itself (bench/PROFILE.md). Longer runs go to the executor, so the loop never stalls
# for longer than this.
INLINE_BUDGET_S = 0.002
# Called once per batch run: (batch size, seconds queued per request, compute seconds).
Observer = Callable[[int, list[float], float], None]


class _Pending:
    __slots__ = ("enqueued", "future", "x")

    def __init__(self, x: F32, future: asyncio.Future[F32], enqueued: float) -> None:
        self.x = x
        self.future = future
        self.enqueued = enqueued


# One ONNX Runtime run of a batch: its callers, their output rows (or the error), when it
# started (perf_counter) and how long it ran.
_Run = tuple[list[_Pending], "F32 | Exception", float, float]


class Batcher:
    """Driven by callbacks on the event loop, with no task of its own: `submit` queues the
    request and, when the batcher is idle, schedules `_dispatch` for the loop's next turn (or
    after `max_delay_s`), by which time every request that arrived in this turn is queued too.
    A batch of at most `inline_max_images` images runs right there on the loop thread: ONNX
    Runtime releases the GIL while it computes, and for a small model a hop to a worker thread
    and back costs more than the run itself. Larger batches run in the executor, and the next
    ones fill meanwhile. A batch that is all there is to do (nothing else queued or running)
    gets `run`, all of ONNX Runtime's threads, and the other runs wait for it. When there is
    more, up to `max_runs` batches go at once, each with `run_parallel` (one thread), and
    what is queued is shared out among them rather than merged into one big batch: on 2 cores
    two one-thread runs of 32 images beat one two-thread run of 64 by half (bench/PROFILE.md)."""

    def __init__(
        self,
        run: RunFn,
        executor: Executor,
        *,
        max_batch_size: int,
        max_delay_s: float = 0.0,
        observer: Observer | None = None,
        inline_max_images: int = 0,
        run_inline: RunFn | None = None,
        max_runs: int = 1,
        run_parallel: RunFn | None = None,
    ) -> None:
        self._run = run
        self._run_inline = run_inline or run  # the same model, for the loop's own thread
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.inline_max_images = inline_max_images
        self.max_runs = max(1, max_runs)
        self._run_parallel = run_parallel or run
        self._exclusive: list[_Pending] | None = None  # a batch running on all the threads
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._running: list[list[_Pending]] = []  # the batches in the executor
        self._scheduled: asyncio.Handle | None = None  # the next _dispatch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def submit(self, x: F32) -> F32:
        """Queue `x` ([n, ...]) and wait for its output rows."""
        if self._closed:
            raise RuntimeError("batcher closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[F32] = loop.create_future()
        self._queue.append(_Pending(x, future, time.perf_counter()))
        self._queued_images += len(x)
        if self._free():
            if self._scheduled is None:
                self._schedule(loop)
            elif self.max_delay_s > 0 and self._queued_images >= self.max_batch_size:
                self._scheduled.cancel()  # full: no reason to wait out the delay
                self._scheduled = loop.call_soon(self._dispatch)
        return await future

    async def close(self) -> None:
        """Stop batching; callers still queued or running get an error."""
        self._closed = True
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        waiting = [p for batch in self._running for p in batch]
        waiting += self._queue
        self._queue.clear()
        self._queued_images = 0
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("model unloaded"))

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.max_delay_s > 0 and self._queued_images < self.max_batch_size:
            self._scheduled = loop.call_later(self.max_delay_s, self._dispatch)
        else:
            self._scheduled = loop.call_soon(self._dispatch)

    def _take_batch(self, limit: int) -> list[_Pending]:
        """Queued requests in order, up to `limit` images. Callers that gave up (cancelled,
        past their deadline) are dropped; the first one always goes, however large; one that
        does not fit leads the next batch."""
        queue, size = self._queue, 0
        batch: list[_Pending] = []
        while queue:
            p = queue[0]
            n = len(p.x)
            if not p.future.done():
                if batch and size + n > limit:
                    break
                batch.append(p)
                size += n
            queue.popleft()
            self._queued_images -= n
            if size >= limit:
                break
        return batch

    def _free(self) -> int:
        """How many more runs may start now."""
        return 0 if self._exclusive is not None else self.max_runs - len(self._running)

    def _share(self) -> int:
        """How many images the next batch takes: everything (up to max_batch_size) when it
        can run on the loop or only one run is free; else an even share per free run."""
        free = self._free()
        queued = self._queued_images
        if free <= 1 or queued <= self.inline_max_images:
            return self.max_batch_size
        return min(self.max_batch_size, -(-queued // free))

    def _dispatch(self) -> None:
        self._scheduled = None
        loop = self._loop
        if self._closed or loop is None:
            return
        while self._queue and self._free():
            batch = self._take_batch(self._share())
            if not batch:
                return
            x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
            if len(x) <= self.inline_max_images:
                self._complete(self._work(batch, x, self._run_inline))
                continue
            run = self._run
            if self.max_runs > 1:
                if self._running or self._queue:
                    run = self._run_parallel
                else:
                    self._exclusive = batch
            self._running.append(batch)
            try:
                future = self._executor.submit(self._work, batch, x, run)
            except RuntimeError:  # the executor is shut down: the server is stopping
                self._running.remove(batch)
                self._exclusive = None
                self._complete([(batch, RuntimeError("model unloaded"), 0.0, 0.0)])
                return

            def done(f: Future[list[_Run]], batch: list[_Pending] = batch) -> None:
                with contextlib.suppress(RuntimeError):  # (worker thread) the loop is closed
                    loop.call_soon_threadsafe(self._finished, batch, f)

            future.add_done_callback(done)

    def _finished(self, batch: list[_Pending], f: Future[list[_Run]]) -> None:
        if self._closed or not any(b is batch for b in self._running):
            return  # close() has answered every caller
        self._running = [b for b in self._running if b is not batch]
        if self._exclusive is batch:
            self._exclusive = None
        if f.cancelled():
            self._complete([(batch, RuntimeError("model unloaded"), 0.0, 0.0)])
        elif (exc := f.exception()) is not None:
            self._complete(
                [(batch, exc if isinstance(exc, Exception) else RuntimeError(exc), 0.0, 0.0)]
            )
        else:
            self._complete(f.result())
        if self._queue and self._scheduled is None and self._loop is not None:
            self._schedule(self._loop)

    def _work(self, batch: list[_Pending], x: F32, run: RunFn) -> list[_Run]:
        """Run a batch (in the executor, or inline); no asyncio here."""
        started = time.perf_counter()
        try:
            return [(batch, run(x), started, time.perf_counter() - started)]
        except Exception as exc:
            if len(batch) == 1:
                return [(batch, exc, started, 0.0)]
        # One caller's input may be what failed: each runs alone, so only it fails.
        runs: list[_Run] = []
        for p in batch:
            started = time.perf_counter()
            try:
                runs.append(([p], run(p.x), started, time.perf_counter() - started))
            except Exception as exc:
                runs.append(([p], exc, started, 0.0))
        return runs

    def _complete(self, runs: list[_Run]) -> None:
        """On the loop: answer each caller, and feed the observer once per successful run."""
        for batch, y, started, seconds in runs:
            if isinstance(y, Exception):
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(y)
                continue
            if self._observer is not None:
                self._observer(len(y), [started - p.enqueued for p in batch], seconds)
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_result(y)
                continue
            offset = 0
            for p in batch:
                n = len(p.x)
                if not p.future.done():
                    p.future.set_result(y[offset : offset + n])
                offset += n


async def run_unbatched(
    run: RunFn,
    executor: Executor,
    x: F32,
    observer: Observer | None = None,
    *,
    inline: bool = False,
) -> F32:
    started = time.perf_counter()
    y = run(x) if inline else await asyncio.get_running_loop().run_in_executor(executor, run, x)
    if observer is not None:
        observer(len(x), [0.0], time.perf_counter() - started)
    return y
