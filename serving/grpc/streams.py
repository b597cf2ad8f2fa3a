"""Streaming inference (PredictStream, ModelStreamInfer): one answer per request message.

A stream is read by one task and answered, in order, by the handler: each message becomes a
task of its own as soon as it is read, so that the messages of one stream (and of every other
stream) meet in the batcher and run together. At most `max_inflight` messages of a stream are
being answered at once; beyond that the reader waits, gRPC stops asking for more, and HTTP/2
flow control holds the client back: no buffer grows without bound.

A message that fails (a bad tensor, an unknown model, a refusal for overload, bytes that are
not a message) gets an error answer of its own and the stream goes on. The stream ends when the
client closes its side (after the last answer), cancels, or passes its deadline (every message
in flight is cancelled with it), or when the server drains: reading stops, the messages already
read are answered, and the stream closes with OK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from serving.grpc.guard import Undecodable, failure
from serving.metrics import Call, Metrics

log = logging.getLogger("serving.grpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Streams:
    """The server's open streams, so that shutdown can stop them reading."""

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max(1, max_inflight)
        self._readers: set[asyncio.Task[None]] = set()

    def stop_reading(self) -> None:
        """Drain: every stream stops reading; what it has read is still answered."""
        for reader in list(self._readers):
            reader.cancel()

    def _add(self, reader: asyncio.Task[None]) -> None:
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)


@dataclass(frozen=True)
class StreamMethod(Generic[Req, Resp]):
    """What a stream method supplies: its name (the metrics' method label), how to answer one
    message (request, its index on the stream, the call's labels; raising ServingError when it
    fails), and how to say that one message failed: (the request or None when it could not be
    parsed, its index, code, message)."""

    method: str
    answer: Callable[[Req, int, Call], Awaitable[Resp]]
    error: Callable[[Req | None, int, grpc.StatusCode, str], Resp]


async def serve_stream(
    requests: AsyncIterator[Any],
    context: grpc.aio.ServicerContext[Any, Any],
    protocol: StreamMethod[Req, Resp],
    streams: Streams,
    metrics: Metrics,
) -> None:
    """Read `requests`, answer each through `protocol`, write the answers in order."""
    loop = asyncio.get_running_loop()
    method = protocol.method
    slots = asyncio.Semaphore(streams.max_inflight)
    answers: asyncio.Queue[asyncio.Task[Resp] | None] = asyncio.Queue()
    inflight = metrics.inflight_for(method)
    open_streams = metrics.streams_for(method)

    async def one(request: Any, index: int) -> Resp:
        call = Call()
        code = grpc.StatusCode.OK
        started = time.perf_counter()
        inflight.inc()
        try:
            if isinstance(request, Undecodable):
                code = grpc.StatusCode.INVALID_ARGUMENT
                return protocol.error(
                    None, index, code, f"cannot parse the request: {request.error}"
                )
            try:
                return await protocol.answer(request, index, call)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code, message = failure(exc, method, call.model)
                return protocol.error(request, index, code, message)
        finally:
            inflight.dec()
            metrics.count_call(
                call.model, call.version, method, code.name, time.perf_counter() - started
            )

    async def read() -> None:
        index = 0
        try:
            async for request in requests:
                await slots.acquire()
                answers.put_nowait(loop.create_task(one(request, index)))
                index += 1
        finally:  # the client's end of the stream, or a drain: the writer stops after the rest
            answers.put_nowait(None)

    reader = loop.create_task(read())
    streams._add(reader)
    open_streams.inc()
    try:
        while (task := await answers.get()) is not None:
            response = await task
            await context.write(response)
            slots.release()
        if not reader.cancelled() and (exc := reader.exception()) is not None:
            raise exc
    finally:
        open_streams.dec()
        reader.cancel()
        while not answers.empty():  # a cancel or a deadline: nothing is left running
            left = answers.get_nowait()
            if left is not None:
                left.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
