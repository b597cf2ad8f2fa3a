"""The decorator every unary RPC handler wears: status mapping, metrics, labels. No model logic."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from serving.errors import Kind, as_refusal
from serving.metrics import Call, Metrics

log = logging.getLogger("serving.grpc")

CODES: dict[Kind, grpc.StatusCode] = {
    Kind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.INTERNAL: grpc.StatusCode.INTERNAL,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")


Handler = Callable[[Any, Req, grpc.aio.ServicerContext, Call], Awaitable[Resp]]


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


def rpc(method: str) -> Callable[[Handler[Req, Resp]], Callable[..., Awaitable[Resp]]]:
    """Wrap a servicer method: map ServingError to its status, count and time the call."""

    def wrap(handler: Handler[Req, Resp]) -> Callable[..., Awaitable[Resp]]:
        @functools.wraps(handler)
        async def run(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
            metrics: Metrics = self.metrics
            call = Call()
            code = grpc.StatusCode.OK
            started = time.perf_counter()
            inflight = metrics.inflight_for(method)
            inflight.inc()
            counted = False

            def count(code: grpc.StatusCode) -> None:
                nonlocal counted
                if not counted:
                    counted = True
                    inflight.dec()
                    elapsed = time.perf_counter() - started
                    metrics.count_call(call.model, call.version, method, code.name, elapsed)

            try:
                return await handler(self, request, context, call)
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                code, message = failure(exc, method, call.model)
                # Counted before the status leaves: whoever reads /metrics after the answer
                # finds the call there.
                count(code)
                await context.abort(code, message)
                raise  # unreachable: abort raises
            finally:
                count(code)

        return run

    return wrap
