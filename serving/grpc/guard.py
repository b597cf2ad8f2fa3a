"""The interceptor every gRPC call passes before its handler: parse errors, drain, reservations."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from serving.core.dataplane import RESERVATION, RESERVING, Admission
from serving.errors import ServingError
from serving.grpc.calls import CODES, log
from serving.metrics import Metrics

# Services that answer while the server drains (health says NOT_SERVING; discovery stays).
PROBE_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

# Stream methods that answer an undecodable message themselves (the stream goes on) instead
# of the guard ending the whole call.
SELF_CHECKED = frozenset({"PredictStream", "ModelStreamInfer"})


class _StatusToAGoneClient(logging.Filter):
    """grpc.aio logs a traceback at error level when a handler's status or response cannot be
    sent because the client has just gone (cancelled, or its deadline passed) and the server has
    not yet marked the call closed: a race inside gRPC (it ignores the same failure once it
    knows). Nothing is lost but an answer nobody waits for: one debug line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ == "ExecuteBatchError":
            log.debug("%s (the client had gone)", record.getMessage())
            return False
        return True


logging.getLogger("grpc._cython.cygrpc").addFilter(_StatusToAGoneClient())


def refusal(
    handler: grpc.RpcMethodHandler[Any, Any] | None,
    code: grpc.StatusCode,
    message: str,
    on_call: Callable[[], None] = lambda: None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that ends every call with `code` without reading its request. It takes the
    request as a stream whatever the method's kind (on the wire a unary request is a stream of
    one message), so that grpc.aio does not receive the message before the handler runs, as it
    would for a unary handler: a refused 3 MB request costs no 3 MB, and is never parsed."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        on_call()
        await context.abort(code, message)

    if handler is None or not (handler.response_streaming):
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


class Undecodable:
    """Stands in for a request whose bytes are not the message they should be. Streaming
    inference methods (SELF_CHECKED) get it as a message and answer it with an error."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class CallGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """What every call goes through before its handler, whatever its service:

    - a request that is not a valid protobuf message of its method's type (random bytes, a
      truncated message, invalid UTF-8 in a string) ends INVALID_ARGUMENT and is counted,
      instead of grpc.aio's UNKNOWN;
    - unary calls in flight are counted, so that shutdown can `drain`: from then on new calls
      are refused UNAVAILABLE here while the running ones finish. gRPC core would instead
      CANCEL the calls it has received but not yet handed to Python when the server stops
      (grpc/grpc#41785), so the server stops only once nothing is left in flight. Health
      checks keep their answers (NOT_SERVING) while draining.

    Every registered method is wrapped once; unknown methods pass through (UNIMPLEMENTED)."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        stop_streams: Callable[[], None] | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._metrics = metrics
        self._stop_streams = stop_streams  # drain makes every stream stop reading
        self._admission = admission
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}
        self.active = 0  # unary calls and inference streams in their handlers now
        self.draining = False
        self._idle: asyncio.Event | None = None

    async def drain(self, timeout: float) -> int:
        """Refuse new calls from now on; wait (at most `timeout` s) for the running ones to
        finish. Returns how many are still running."""
        self.draining = True
        if self._stop_streams is not None:
            self._stop_streams()
        if self.active:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        return self.active

    async def intercept_service(  # type: ignore[override]  # None: no such method
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        full = handler_call_details.method
        cached = self._wrapped.get(full)  # keys: registered methods only (bounded)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._guard(handler, full))
            self._wrapped[full] = cached
        if self._admission is not None:
            method = full.rpartition("/")[2]
            if method in RESERVING and not self.draining:
                try:
                    reservation = self._admission.reserve(method)
                except ServingError as exc:  # refused before a byte of the message is read
                    return refusal(
                        handler,
                        CODES[exc.kind],
                        exc.message,
                        functools.partial(self._count, method, CODES[exc.kind]),
                    )
                RESERVATION.set(reservation)  # this call's task: the handler's admit takes it
                task = asyncio.current_task()
                if task is not None:  # whatever ends the call, the reservation goes with it
                    task.add_done_callback(lambda _: reservation.release())
        return cached[1]

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self._metrics is not None:
            self._metrics.count_refused(method, code.name)

    def _guard(
        self, handler: grpc.RpcMethodHandler[Any, Any], full_method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        deserialize = handler.request_deserializer
        assert deserialize is not None
        service, _, method = full_method.lstrip("/").rpartition("/")
        probe = service in PROBE_SERVICES

        async def refuse_draining(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            self._count(method, grpc.StatusCode.UNAVAILABLE)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

        def parse(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as exc:  # DecodeError, or anything a parser raises on garbage
                return Undecodable(exc)

        async def refuse(context: grpc.aio.ServicerContext[Any, Any], bad: Undecodable) -> None:
            self._count(method, grpc.StatusCode.INVALID_ARGUMENT)
            log.debug("%s: undecodable request: %s", method, bad.error)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse the request: {bad.error}"
            )

        async def checked(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            async for request in requests:
                if isinstance(request, Undecodable) and method not in SELF_CHECKED:
                    await refuse(context, request)
                yield request

        def enter() -> None:
            self.active += 1

        def leave() -> None:
            self.active -= 1
            if not self.active and self._idle is not None:
                self._idle.set()

        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            inner_uu: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(context, request)
                if self.draining and not probe:
                    await refuse_draining(context)
                enter()
                try:
                    return await inner_uu(request, context)
                finally:
                    leave()

            return grpc.unary_unary_rpc_method_handler(unary_unary, parse, serialize)
        if handler.stream_unary is not None:
            inner_su: Any = handler.stream_unary

            async def stream_unary(
                requests: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                return await inner_su(checked(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, parse, serialize)
        # Streaming responses: health Watch and reflection (probes: not counted, a Watch lasts
        # as long as its client wants), and the inference streams, counted like unary calls
        # and refused while draining. The servicer is an async generator or a coroutine that
        # writes.
        inner: Any = handler.unary_stream or handler.stream_stream
        streaming_requests = handler.unary_stream is None

        def args(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return checked(request, context) if streaming_requests else request

        if inspect.isasyncgenfunction(inner):

            async def generate(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(context, request)
                async for response in inner(args(request, context), context):
                    yield response

            behaviour: Any = generate
        else:

            async def write(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(context, request)
                if probe:
                    return await inner(args(request, context), context)
                if self.draining:
                    await refuse_draining(context)
                enter()
                try:
                    return await inner(args(request, context), context)
                finally:
                    leave()

            behaviour = write
        if streaming_requests:
            return grpc.stream_stream_rpc_method_handler(behaviour, parse, serialize)
        return grpc.unary_stream_rpc_method_handler(behaviour, parse, serialize)
