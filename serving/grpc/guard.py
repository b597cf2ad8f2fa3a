"""The one wrapper every gRPC call passes: token, reservation, parse errors, drain, status, metrics.

The server registers no interceptor: `Guard` is its only method lookup (a generic handler that
grpc.aio asks synchronously, in the call's own task), and each registered method is wrapped
once, at start-up, in one coroutine that does what an interceptor and a decorator did before
(bench/PROFILE.md has the figures). Per call it

- refuses a call without the bearer token (when one is configured) UNAUTHENTICATED, unread;
- reserves the request's share of the data budget before its message is read (inference
  methods), refusing it unread when the budget is taken;
- answers a message that is not a valid protobuf message of its method's type (random bytes, a
  truncated message, invalid UTF-8 in a string) INVALID_ARGUMENT instead of grpc.aio's UNKNOWN;
- refuses new calls UNAVAILABLE while the server drains, and counts the calls in their handlers
  so that shutdown waits for them: gRPC core would otherwise CANCEL the calls it has received
  but not yet handed to Python when the server stops (grpc/grpc#41785). Health checks keep
  answering (NOT_SERVING) while draining;
- for our two APIs' unary methods: maps a handler's exception to its status (a ServingError by
  `CODES`, anything else INTERNAL with a traceback in the log), and counts and times the call
  under the model the handler resolved (`metrics.Call`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from serving import tokens
from serving.core.dataplane import RESERVATION, RESERVING, Admission
from serving.errors import Kind, ServingError, as_refusal
from serving.metrics import Call, Metrics

log = logging.getLogger("serving.grpc")

# Services that answer while the server drains and without the token: probes and discovery.
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
UNKNOWN_METHOD = "_unknown"  # the metrics label of a refused call to a method that does not exist

CODES: dict[Kind, grpc.StatusCode] = {
    Kind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.INTERNAL: grpc.StatusCode.INTERNAL,
}

Ctx = grpc.aio.ServicerContext
Handler = grpc.RpcMethodHandler


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


def failure(exc: Exception, method: str, model: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a handler's exception is answered with, logged as it deserves: a
    ServingError is an expected refusal (one debug line), anything else a bug (a traceback).
    Unary calls abort with it, stream messages answer with it."""
    refused = as_refusal(exc)
    if refused is not None:
        code = CODES[refused.kind]
        log.debug("%s %s: %s %s", method, model, code.name, refused.message)
        return code, refused.message
    log.exception("%s %s failed", method, model)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}"


def refusal(
    handler: Handler[Any, Any] | None,
    code: grpc.StatusCode,
    message: str,
    on_call: Callable[[], None] = lambda: None,
) -> Handler[Any, Any]:
    """A handler that ends every call with `code` without reading its request. It takes the
    request as a stream whatever the method's kind (on the wire a unary request is a stream of
    one message), so that grpc.aio does not receive the message before the handler runs, as it
    would for a unary handler: a refused 3 MB request costs no 3 MB, and is never parsed."""

    async def refuse(requests: Any, context: Ctx[Any, Any]) -> None:
        on_call()
        await context.abort(code, message)

    if handler is None or not handler.response_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


class Undecodable:
    """Stands in for a request whose bytes are not the message they should be. Streaming
    inference methods (SELF_CHECKED) get it as a message and answer it with an error."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class _Registrar:
    """Stands in for the server when a generated `add_*_to_server` registers a servicer: keeps
    the method handlers it hands over, by full method name."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler[Any, Any]] = {}

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """The same handlers again, as a generic handler: the registered ones suffice."""


@dataclass(frozen=True)
class _Method:
    service: str
    name: str  # the method's short name: its metrics label
    handler: Handler[Any, Any]  # the original (what a refusal needs to know of its kind)
    guarded: Handler[Any, Any]  # what the server runs

    @property
    def probe(self) -> bool:
        return self.service in PROBE_SERVICES


class Guard(grpc.GenericRpcHandler):
    """The server's method lookup and the wrapper of every method (see the module's doc).

    `add(add_to_server, servicer, counted=...)` registers a servicer through its generated
    `add_*_to_server`; `counted` servicers (our APIs) have handlers that take the call's labels
    as a third argument and are counted per call; the others (health, reflection) are called as
    gRPC calls them."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        admission: Admission | None = None,
        *,
        stop_streams: Callable[[], None] | None = None,
    ) -> None:
        self._metrics = metrics
        self._admission = admission
        self._token: bytes | None = None
        self._stop_streams = stop_streams  # drain makes every stream stop reading
        self._methods: dict[str, _Method] = {}
        self.active = 0  # unary calls and inference streams in their handlers now
        self.draining = False
        self._idle: asyncio.Event | None = None

    def add(
        self, add_to_server: Callable[[Any, Any], None], servicer: Any, *, counted: bool
    ) -> None:
        registrar = _Registrar()
        add_to_server(servicer, registrar)
        for full, handler in registrar.handlers.items():
            service, _, name = full.lstrip("/").rpartition("/")
            guarded = self._guard(handler, service, name, counted)
            self._methods[full] = _Method(service, name, handler, guarded)

    def require_token(self, token: str | None) -> None:
        """From now on every call but probes must carry `authorization: Bearer <token>`
        (None: no token, every call is let in)."""
        if token is not None and not token:
            raise ValueError("an empty token would let every caller in")
        self._token = token.encode("ascii") if token else None

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

    # Per call, before its message is read ---------------------------------------------------

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler[Any, Any] | None:
        method = self._methods.get(handler_call_details.method)
        if self._token is not None and (method is None or not method.probe):
            refused = self._unauthenticated(handler_call_details, method)
            if refused is not None:
                return refused
        if method is None:
            return None  # UNIMPLEMENTED
        if self._admission is not None and method.name in RESERVING and not self.draining:
            try:
                reservation = self._admission.reserve(method.name)
            except ServingError as exc:  # refused before a byte of the message is read
                code = CODES[exc.kind]
                count = functools.partial(self._count_refused, method.name, code)
                return refusal(method.handler, code, exc.message, count)
            RESERVATION.set(reservation)  # this call's task: the handler's admit takes it
            task = asyncio.current_task()
            if task is not None:  # whatever ends the call, the reservation goes with it
                task.add_done_callback(lambda _: reservation.release())
        return method.guarded

    def _unauthenticated(
        self, details: grpc.HandlerCallDetails, method: _Method | None
    ) -> Handler[Any, Any] | None:
        """A refusal for a call without the right token, or None when it has it. compare_digest
        (in `tokens.matches`) takes as long wherever the first difference is."""
        assert self._token is not None
        sent = None
        for key, value in details.invocation_metadata or ():
            if key == tokens.HEADER:
                sent = value
                break
        if tokens.matches(sent, self._token):
            return None
        message = (
            "invalid bearer token"
            if sent is not None
            else "missing `authorization: Bearer <token>`"
        )
        log.debug("%s refused: %s", details.method, message)
        # A method that exists keeps its name as the metrics label; any other is "_unknown"
        # (label values stay bounded whatever a caller sends).
        name = method.name if method is not None else UNKNOWN_METHOD
        count = functools.partial(self._count_refused, name, grpc.StatusCode.UNAUTHENTICATED)
        return refusal(
            method.handler if method else None, grpc.StatusCode.UNAUTHENTICATED, message, count
        )

    def _count_refused(self, method: str, code: grpc.StatusCode) -> None:
        if self._metrics is not None:
            self._metrics.count_refused(method, code.name)

    # Around each call's handler -----------------------------------------------------------

    def _enter(self) -> None:
        self.active += 1

    def _leave(self) -> None:
        self.active -= 1
        if not self.active and self._idle is not None:
            self._idle.set()

    def _guard(
        self, handler: Handler[Any, Any], service: str, method: str, counted: bool
    ) -> Handler[Any, Any]:
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer
        probe = service in PROBE_SERVICES

        async def refuse_draining(context: Ctx[Any, Any]) -> None:
            self._count_refused(method, grpc.StatusCode.UNAVAILABLE)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

        def parse(data: bytes) -> Any:
            try:
                return deserialize(data)  # type: ignore[misc]
            except Exception as exc:  # DecodeError, or anything a parser raises on garbage
                return Undecodable(exc)

        async def refuse(context: Ctx[Any, Any], bad: Undecodable) -> None:
            self._count_refused(method, grpc.StatusCode.INVALID_ARGUMENT)
            log.debug("%s: undecodable request: %s", method, bad.error)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse the request: {bad.error}"
            )

        async def checked(requests: AsyncIterator[Any], context: Ctx[Any, Any]) -> Any:
            async for request in requests:
                if type(request) is Undecodable and method not in SELF_CHECKED:
                    await refuse(context, request)
                yield request

        if handler.unary_unary is not None:
            inner_uu: Any = handler.unary_unary
            if counted:
                return grpc.unary_unary_rpc_method_handler(
                    self._counted(inner_uu, method, refuse, refuse_draining), parse, serialize
                )

            async def unary_unary(request: Any, context: Ctx[Any, Any]) -> Any:
                if type(request) is Undecodable:
                    await refuse(context, request)
                if self.draining and not probe:
                    await refuse_draining(context)
                self._enter()
                try:
                    return await inner_uu(request, context)
                finally:
                    self._leave()

            return grpc.unary_unary_rpc_method_handler(unary_unary, parse, serialize)
        if handler.stream_unary is not None:
            inner_su: Any = handler.stream_unary

            async def stream_unary(requests: Any, context: Ctx[Any, Any]) -> Any:
                return await inner_su(checked(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, parse, serialize)
        # Streaming responses: health Watch and reflection (probes: not counted, a Watch lasts
        # as long as its client wants), and the inference streams, counted like unary calls
        # and refused while draining. The servicer is an async generator or a coroutine that
        # writes.
        inner: Any = handler.unary_stream or handler.stream_stream
        streaming_requests = handler.unary_stream is None

        def args(request: Any, context: Ctx[Any, Any]) -> Any:
            return checked(request, context) if streaming_requests else request

        behaviour: Any
        if inspect.isasyncgenfunction(inner):

            async def generate(request: Any, context: Ctx[Any, Any]) -> Any:
                if type(request) is Undecodable:
                    await refuse(context, request)
                async for response in inner(args(request, context), context):
                    yield response

            behaviour = generate
        else:

            async def write(request: Any, context: Ctx[Any, Any]) -> Any:
                if type(request) is Undecodable:
                    await refuse(context, request)
                if probe:
                    return await inner(args(request, context), context)
                if self.draining:
                    await refuse_draining(context)
                self._enter()
                try:
                    return await inner(args(request, context), context)
                finally:
                    self._leave()

            behaviour = write
        if streaming_requests:
            return grpc.stream_stream_rpc_method_handler(behaviour, parse, serialize)
        return grpc.unary_stream_rpc_method_handler(behaviour, parse, serialize)

    def _counted(
        self,
        handler: Callable[[Any, Ctx[Any, Any], Call], Awaitable[Any]],
        method: str,
        refuse: Callable[[Ctx[Any, Any], Undecodable], Awaitable[None]],
        refuse_draining: Callable[[Ctx[Any, Any]], Awaitable[None]],
    ) -> Callable[[Any, Ctx[Any, Any]], Awaitable[Any]]:
        """One of our APIs' unary methods: everything above, plus its status from what the
        handler raised and its count and time under the model the handler resolved."""
        metrics = self._metrics
        inflight = metrics.inflight_for(method) if metrics is not None else None

        async def unary(request: Any, context: Ctx[Any, Any]) -> Any:
            if type(request) is Undecodable:
                await refuse(context, request)
            if self.draining:
                del request  # (see the abort below)
                await refuse_draining(context)
            self.active += 1
            call = Call()
            code = grpc.StatusCode.OK
            started = time.perf_counter()
            if inflight is not None:
                inflight.inc()
            counted = False
            try:
                try:
                    return await handler(request, context, call)
                except asyncio.CancelledError:
                    remaining = context.time_remaining()
                    expired = remaining is not None and remaining <= 0
                    code = (
                        grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                    )
                    raise
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    code, message = failure(exc, method, call.model)
                # grpc.aio keeps an abort's exception in a reference cycle with the frames it
                # passed, freed only by the cyclic collector: the abort is raised outside the
                # except block (inside it, it would carry the handler's exception and its
                # frames as context) and this frame lets go of the request first, so that no
                # request's bytes wait for the collector. Counted before the status leaves:
                # whoever reads /metrics after the answer finds the call there.
                del request
                counted = True
                self._count_call(inflight, call, method, code, started)
                await context.abort(code, message)
                raise AssertionError("unreachable: abort raises")
            finally:
                if not counted:
                    self._count_call(inflight, call, method, code, started)
                self._leave()

        return unary

    def _count_call(
        self, inflight: Any, call: Call, method: str, code: grpc.StatusCode, started: float
    ) -> None:
        if self._metrics is not None:
            inflight.dec()
            elapsed = time.perf_counter() - started
            self._metrics.count_call(call.model, call.version, method, code.name, elapsed)
