"""Dynamic batching: concurrent requests for one model coalesce into one ONNX Runtime run.

A collector task takes the first queued request, then everything else already queued (and,
with `max_delay_s` > 0, what arrives within that delay) up to `max_batch_size` images, runs
the batch in a worker thread, and hands each caller its slice. While one batch computes,
the next one fills, so batches grow with load and cost no waiting when idle.
Knows nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
RunFn = Callable[[F32], F32]
# Called once per batch run: (batch size, seconds queued per request, compute seconds).
Observer = Callable[[int, list[float], float], None]


@dataclass
class _Pending:
    x: F32
    future: asyncio.Future[F32]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        run: RunFn,
        executor: Executor,
        *,
        max_batch_size: int,
        max_delay_s: float = 0.0,
        observer: Observer | None = None,
    ) -> None:
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._observer = observer
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="batcher")

    async def submit(self, x: F32) -> F32:
        """Queue `x` ([n, ...]) and wait for its output rows."""
        if self._closed:
            raise RuntimeError("batcher closed")
        self.start()
        future: asyncio.Future[F32] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(x, future))
        return await future

    async def close(self) -> None:
        """Stop collecting once the queue is drained; callers still waiting get an error."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("model unloaded"))

    async def _take_batch(self) -> list[_Pending]:
        first = await self._queue.get()
        batch, size = [first], len(first.x)
        deadline = time.perf_counter() + self.max_delay_s
        while size < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                nxt = self._queue.get_nowait()
            if size + len(nxt.x) > self.max_batch_size:
                # Does not fit: it leads the next batch (it may run alone if it is large).
                self._requeue_front(nxt)
                break
            batch.append(nxt)
            size += len(nxt.x)
        return batch

    def _requeue_front(self, item: _Pending) -> None:
        # asyncio.Queue has no push-front; its deque is the documented-stable `_queue`.
        self._queue._queue.appendleft(item)  # type: ignore[attr-defined]
        self._queue._unfinished_tasks += 1  # type: ignore[attr-defined]

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [p for p in await self._take_batch() if not p.future.done()]
            if not batch:
                continue  # every caller gave up (cancelled or past its deadline)
            started = time.perf_counter()
            waits = [started - p.enqueued for p in batch]
            x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
            try:
                y = await loop.run_in_executor(self._executor, self._run, x)
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(RuntimeError("model unloaded"))
                raise
            except Exception as exc:
                if len(batch) == 1:
                    if not batch[0].future.done():
                        batch[0].future.set_exception(exc)
                else:
                    # One caller's input may be what failed: each runs alone, so only it fails.
                    await self._run_each(batch)
                continue
            if self._observer is not None:
                self._observer(len(x), waits, time.perf_counter() - started)
            offset = 0
            for p in batch:
                n = len(p.x)
                if not p.future.done():
                    p.future.set_result(y[offset : offset + n])
                offset += n

    async def _run_each(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        for p in batch:
            if p.future.done():
                continue
            started = time.perf_counter()
            try:
                y = await loop.run_in_executor(self._executor, self._run, p.x)
            except asyncio.CancelledError:
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(RuntimeError("model unloaded"))
                raise
            except Exception as exc:
                if not p.future.done():
                    p.future.set_exception(exc)
                continue
            if self._observer is not None:
                self._observer(len(p.x), [started - p.enqueued], time.perf_counter() - started)
            if not p.future.done():
                p.future.set_result(y)


async def run_unbatched(
    run: RunFn, executor: Executor, x: F32, observer: Observer | None = None
) -> F32:
    started = time.perf_counter()
    y = await asyncio.get_running_loop().run_in_executor(executor, run, x)
    if observer is not None:
        observer(len(x), [0.0], time.perf_counter() - started)
    return y
