"""Bearer-token authentication of gRPC calls: a grpc.aio server interceptor.

Every call must carry the metadata `authorization: Bearer <token>`; a call without it, or with
another token, ends UNAUTHENTICATED before its request is even parsed. Health checks and
reflection stay open, so that load balancers, Kubernetes probes and grpcurl work without the
secret. Tokens are compared in constant time. Rejected calls are counted in
cnnserve_requests_total with code="UNAUTHENTICATED" (model "_unknown": the request is never read).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from serving import tokens
from serving.grpc.guard import PROBE_SERVICES, refusal
from serving.metrics import Metrics

log = logging.getLogger(__name__)

# Services a caller may use without the token: probes and service discovery.
OPEN_SERVICES = PROBE_SERVICES
UNKNOWN_METHOD = "_unknown"

# The next interceptor, or the server's lookup of the method's handler (None: no such method).
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Any]]


def service_and_method(full_method: str) -> tuple[str, str]:
    """ "/pkg.Service/Method" -> ("pkg.Service", "Method")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def authorization(metadata: Any) -> str | bytes | None:
    """The call's `authorization` metadata value, if it sent one."""
    for key, value in metadata or ():
        if key == tokens.HEADER:
            return value  # type: ignore[no-any-return]
    return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str, metrics: Metrics | None = None) -> None:
        if not token:
            raise ValueError("an empty token would let every caller in")
        self._token = token.encode("ascii")
        self._metrics = metrics

    def allowed(self, details: grpc.HandlerCallDetails) -> bool:
        service, _ = service_and_method(details.method)
        if service in OPEN_SERVICES:
            return True
        return tokens.matches(authorization(details.invocation_metadata), self._token)

    async def intercept_service(  # type: ignore[override]  # None: no such method
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if self.allowed(handler_call_details):
            return handler
        # A method that exists keeps its name as the metrics label; any other is "_unknown"
        # (label values stay bounded whatever a caller sends).
        method = service_and_method(handler_call_details.method)[1] if handler else UNKNOWN_METHOD
        sent = authorization(handler_call_details.invocation_metadata) is not None
        message = "invalid bearer token" if sent else "missing `authorization: Bearer <token>`"
        log.debug("%s refused: %s", handler_call_details.method, message)
        return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, message, self._count(method))

    def _count(self, method: str) -> Callable[[], None]:
        def count() -> None:
            if self._metrics is not None:
                self._metrics.count_refused(method, "UNAUTHENTICATED")

        return count
