"""What every RPC handler shares: status mapping, metrics, logging. No model logic."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from serving.errors import Kind, ServingError
from serving.metrics import UNKNOWN_MODEL, Metrics

log = logging.getLogger("serving.api")

CODES: dict[Kind, grpc.StatusCode] = {
    Kind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Kind.INTERNAL: grpc.StatusCode.INTERNAL,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Call:
    """Labels a handler fills in as it learns them (the model it resolved)."""

    __slots__ = ("model", "version")

    def __init__(self) -> None:
        self.model = UNKNOWN_MODEL
        self.version = ""


Handler = Callable[[Any, Req, grpc.aio.ServicerContext, Call], Awaitable[Resp]]


def rpc(method: str) -> Callable[[Handler[Req, Resp]], Callable[..., Awaitable[Resp]]]:
    """Wrap a servicer method: map ServingError to its status, count and time the call."""

    def wrap(handler: Handler[Req, Resp]) -> Callable[..., Awaitable[Resp]]:
        @functools.wraps(handler)
        async def run(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
            metrics: Metrics = self.metrics
            call = Call()
            code = grpc.StatusCode.OK
            started = time.perf_counter()
            inflight = metrics.inflight.labels(method)
            inflight.inc()
            try:
                return await handler(self, request, context, call)
            except ServingError as exc:
                code = CODES[exc.kind]
                log.debug("%s %s: %s %s", method, call.model, code.name, exc.message)
                await context.abort(code, exc.message)
                raise  # unreachable: abort raises
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                code = grpc.StatusCode.INTERNAL
                log.exception("%s %s failed", method, call.model)
                await context.abort(
                    code, f"internal error in {method}: {type(exc).__name__}: {exc}"
                )
                raise
            finally:
                inflight.dec()
                elapsed = time.perf_counter() - started
                metrics.requests.labels(call.model, call.version, method, code.name).inc()
                metrics.request_seconds.labels(call.model, method).observe(elapsed)

        return run

    return wrap
