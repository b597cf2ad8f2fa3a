"""The REST API on aiohttp: the KServe v2 REST protocol, our /v1 routes and /openapi.json.

Same process and event loop as the gRPC server, and the same data plane: handlers validate ->
decode (serving.rest.codec) -> call the data plane -> encode, as the gRPC servicers do. What
every request goes through, in one middleware: the drain, the bearer token (health and the
OpenAPI document stay open), the admission reservation before the body is read (from its
Content-Length), the body's size and time limits, errors as JSON `{"error": "..."}` with the
status the KServe spec and HTTP give, and the metrics (protocol="http", gRPC's code names).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from serving import tokens
from serving.connections import Share
from serving.core.dataplane import RESERVATION, RESERVING, Admission, DataPlane
from serving.errors import Kind, ServingError, Unavailable, as_refusal
from serving.grpc import inference_messages as v2_messages
from serving.metrics import Call, Metrics
from serving.rest import codec as rc
from serving.rest.site import BudgetedSite

log = logging.getLogger("serving.rest.app")

# Triton's binary tensor extension is REST's own (gRPC's tensors are always raw bytes).
EXTENSIONS = [*v2_messages.EXTENSIONS, "binary_tensor_data"]
STATUS: dict[Kind, int] = {
    Kind.INVALID_ARGUMENT: 400,
    Kind.NOT_FOUND: 404,
    Kind.UNAVAILABLE: 503,
    Kind.RESOURCE_EXHAUSTED: 413,
    Kind.FAILED_PRECONDITION: 409,
    Kind.INTERNAL: 500,
}
# HTTP answers that are not a data-plane refusal, in gRPC's code names for the metrics.
CODE_NAMES = {
    200: "OK",
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
RETRY_AFTER_S = "1"
# Routes anyone may call without the token: probes, the API's description, the page's files
# (the page's own calls to the API send the token it is given).
OPEN_ROUTES = frozenset({"ServerLive", "ServerReady", "OpenAPI", "Page"})
NOT_COUNTED = frozenset({"OpenAPI", "Page"})  # like reflection over gRPC
# The browser page (serving/web): static files, no build step, nothing from the network.
PAGE_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
PAGE_POLICY = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'"


def _describe(exc: web.HTTPException, request: web.Request) -> str:
    if exc.status == 404:
        return f"no route {request.method} {request.path} (the routes: /openapi.json)"
    if exc.status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    return exc.reason


class _MalformedRequests(logging.Filter):
    """aiohttp answers a request it cannot parse (a bad request line or header) with 400 itself
    and logs the parser's traceback at error level: one line per bad request, at debug level,
    instead (a client could otherwise fill the logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.debug("malformed HTTP request answered 400 by aiohttp: %s", str(exc).strip())
            return False
        return True


logging.getLogger("aiohttp.server").addFilter(_MalformedRequests())


def openapi_document() -> bytes:
    return resources.files("serving.rest").joinpath("openapi.json").read_bytes()


def page_files() -> dict[str, bytes]:
    """The page's files by name, read once (they ship in the package: serving/web)."""
    folder = resources.files("serving.web")
    return {
        f.name: f.read_bytes()
        for f in folder.iterdir()
        if f.is_file() and any(f.name.endswith(ext) for ext in PAGE_TYPES)
    }


class HttpError(Exception):
    """An answer other than 200, with its JSON error message."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close  # the connection cannot be reused (a body left unread)


@dataclass(frozen=True)
class RestLimits:
    max_body_bytes: int
    read_timeout_s: float


class RestApi:
    def __init__(
        self,
        plane: DataPlane,
        metrics: Metrics,
        *,
        ready: Callable[[], bool],
        admission: Admission,
        limits: RestLimits,
        token: str | None,
        version: str,
    ) -> None:
        self.plane = plane
        self.metrics = metrics
        self._ready = ready
        self.admission = admission
        self.limits = limits
        self._token = None if token is None else token.encode("ascii")
        self._version = version
        self.draining = False
        self.active = 0
        self._openapi = openapi_document()
        self._page = page_files()

    # ------------------------------------------------------------ assembly

    def app(self) -> web.Application:
        # The size limit is checked here first (from Content-Length, or as the body arrives);
        # aiohttp's own limit is the same, for the multipart reader.
        app = web.Application(
            middlewares=[self._middleware], client_max_size=self.limits.max_body_bytes
        )
        add = app.router.add_route
        add("GET", "/v2/health/live", self.live, name="ServerLive")
        add("GET", "/v2/health/ready", self.server_ready, name="ServerReady")
        add("GET", "/v2", self.server_metadata, name="ServerMetadata")
        # Before /v2/models/{model}, which would take "stats" for a model's name (as Triton's does).
        add("GET", "/v2/models/stats", self.statistics, name="ModelStatisticsAll")
        for base, suffix in (("/v2/models/{model}", ""), ("/v2/models/{model}/versions/{v}", "V")):
            add("GET", base, self.model_metadata, name="ModelMetadata" + suffix)
            add("GET", base + "/ready", self.model_ready, name="ModelReady" + suffix)
            add("POST", base + "/infer", self.infer, name="ModelInfer" + suffix)
            add("GET", base + "/config", self.model_config, name="ModelConfig" + suffix)
            add("GET", base + "/stats", self.statistics, name="ModelStatistics" + suffix)
        add("GET", "/v1/models", self.list_models, name="ListModels")
        add("GET", "/v1/models/{model}/summary", self.summary, name="GetParameterSummary")
        add("POST", "/v1/models/{model}/classify", self.classify, name="Classify")
        add("POST", "/v1/models/{model}/feature-maps", self.feature_maps, name="GetFeatureMaps")
        add("GET", "/v1/models/{model}/filters", self.filters, name="GetFilters")
        add("POST", "/v1/models/{model}/explain", self.explain, name="Explain")
        add("GET", "/v1/models/{model}/rollout", self.rollout, name="GetRollout")
        add("GET", "/", self.page, name="Page")
        add("GET", "/page/{file}", self.page, name="PageFile")
        add("GET", "/openapi.json", self.openapi, name="OpenAPI")
        return app

    # ------------------------------------------------------------ what every request goes through

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.name
        method = (route or "_unknown").removesuffix("V").removesuffix("File").removesuffix("All")
        labels = Call()
        request["labels"] = labels
        started = time.perf_counter()
        status = 500
        reservation = None
        token = None
        try:
            try:
                if route is None:  # aiohttp's 404 or 405: let it raise, answered below
                    await handler(request)
                if self.draining and method not in OPEN_ROUTES:
                    raise HttpError(503, "the server is shutting down", close=True)
                if self._token is not None and method not in OPEN_ROUTES:
                    self._authenticate(request)
                if method in RESERVING:
                    reservation = self._reserve(request, method)
                    token = RESERVATION.set(reservation)
                self.active += 1
                try:
                    response = await handler(request)
                finally:
                    self.active -= 1
                status = response.status
                return response
            except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, too large
                raise HttpError(exc.status, _describe(exc, request), exc.status == 413) from None
            except ServingError as exc:
                raise self._refusal(exc) from None
            except HttpError:
                raise
            except asyncio.CancelledError:  # the client went away
                status = 499
                raise
            except Exception as exc:
                refused = as_refusal(exc)
                if refused is not None:
                    raise self._refusal(refused) from None
                log.exception("%s %s failed", request.method, request.path)
                raise HttpError(
                    500, f"internal error in {method}: {type(exc).__name__}: {exc}"
                ) from None
        except HttpError as err:
            status = err.status
            return self._error(err, method, labels)
        finally:
            if token is not None:
                RESERVATION.reset(token)
            if reservation is not None:
                reservation.release()
            if method not in NOT_COUNTED:
                code = "CANCELLED" if status == 499 else CODE_NAMES.get(status, "UNKNOWN")
                self.metrics.count_call(
                    labels.model,
                    labels.version,
                    method,
                    code,
                    time.perf_counter() - started,
                    protocol="http",
                )
            log.debug(
                "%s %s %s %d %.2f ms",
                request.remote,
                request.method,
                request.path_qs,
                status,
                (time.perf_counter() - started) * 1000,
            )

    def _refusal(self, exc: ServingError) -> HttpError:
        return HttpError(STATUS[exc.kind], exc.message)

    def _error(self, err: HttpError, method: str, labels: Call) -> web.Response:
        if err.status < 500 or err.status == 503:
            log.debug("%s %s: %d %s", method, labels.model, err.status, err.message)
        headers = {"Retry-After": RETRY_AFTER_S} if err.status == 503 else {}
        if err.status == 401:
            headers["WWW-Authenticate"] = tokens.SCHEME
        response = web.Response(
            status=err.status, body=rc.error_body(err.message), headers=headers,
            content_type=rc.JSON,
        )  # fmt: skip
        if err.close:
            response.force_close()
        return response

    def _authenticate(self, request: web.Request) -> None:
        assert self._token is not None
        header = request.headers.get(tokens.HEADER)
        if header is None:
            raise HttpError(401, "missing `Authorization: Bearer <token>`")
        if not tokens.matches(header, self._token):
            raise HttpError(401, "invalid bearer token")

    def _reserve(self, request: web.Request, method: str) -> Any:
        """Before a byte of the body is read: its declared size checked, and what it will cost
        held against the request data budget (the method's measured average, at least twice
        the body: its bytes and what they are decoded into), or 503."""
        length = request.content_length
        limit = self.limits.max_body_bytes
        if length is not None and length > limit:
            raise HttpError(
                413,
                f"request body of {length:,} bytes is over the limit of {limit:,} "
                "(--max-message-mb)",
                close=True,
            )
        return self.admission.reserve(f"http:{method}", 2 * (length or 0))

    async def _body(self, request: web.Request) -> bytes:
        """The whole body, within the size limit and the read timeout."""
        limit = self.limits.max_body_bytes
        chunks = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.read_timeout_s):
                async for chunk in request.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        raise HttpError(
                            413,
                            f"request body over the limit of {limit:,} bytes (--max-message-mb)",
                            close=True,
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise HttpError(
                408,
                f"the request body did not arrive within {self.limits.read_timeout_s:g} s "
                f"({size:,} bytes came)",
                close=True,
            ) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _resolve(self, request: web.Request, version_text: str | None = None) -> Any:
        """The version a request names: in its path (/versions/{v}), or `version_text` (our
        /v1 routes take it as a query parameter); remembered as the request's metric labels."""
        text = request.match_info.get("v", "") if version_text is None else version_text
        version = rc.parse_version(text)
        labels: Call = request["labels"]
        return labels.resolve(self.plane, request.match_info["model"], version)

    def _route(self, request: web.Request, version_text: str, client_key: str) -> Any:
        """An inference's version, as the model's rollout policy routes it (`_resolve`'s)."""
        labels: Call = request["labels"]
        model = request.match_info["model"]
        return labels.route_to(self.plane, model, rc.parse_version(version_text), client_key)

    @staticmethod
    def _json(obj: Any) -> web.Response:
        return web.Response(body=rc.dumps(obj), content_type=rc.JSON)

    # ------------------------------------------------------------ KServe v2

    async def live(self, request: web.Request) -> web.Response:
        return web.Response()

    async def server_ready(self, request: web.Request) -> web.Response:
        if not self._ready():
            raise HttpError(503, "not ready: no model is ready, or the server is shutting down")
        return web.Response()

    async def server_metadata(self, request: web.Request) -> web.Response:
        return self._json(rc.server_metadata(v2_messages.SERVER_NAME, self._version, EXTENSIONS))

    async def model_metadata(self, request: web.Request) -> web.Response:
        served = self._resolve(request)
        return self._json(rc.model_metadata(served, self.plane.ready_versions(served.name)))

    async def model_config(self, request: web.Request) -> web.Response:
        served = self._resolve(request)
        plane = self.plane
        config = rc.model_config(
            served, plane.batching, plane.max_versions, plane.limits.max_request_batch
        )
        return self._json(config)

    async def statistics(self, request: web.Request) -> web.Response:
        model = request.match_info.get("model", "")
        text = request.match_info.get("v")
        counted = self.plane.statistics(model, None if text is None else rc.parse_version(text))
        if model:
            request["labels"].model = model
        return self._json(rc.model_statistics(counted))

    async def model_ready(self, request: web.Request) -> web.Response:
        served = self._resolve(request)  # 404 for an unknown model, 503 while it loads
        if not self.plane.is_ready(served.name, served.version):
            raise Unavailable(f"model {served.name!r} v{served.version} is not ready")
        return web.Response()

    async def infer(self, request: web.Request) -> web.Response:
        self._resolve(request)  # an unknown model or version is refused before the body is read
        body = await self._body(request)
        parsed = rc.parse_infer(body, request.headers.get(rc.HEADER_LENGTH))
        served = self._route(request, request.match_info.get("v", ""), parsed.client_key)
        rc.check_names(parsed, served)
        # Held against the budget from its shape, before its data is decoded.
        with self.plane.admit(served, *rc.infer_extent(parsed)):
            pixels = rc.decode_input(parsed)
            labels: Call = request["labels"]
            prediction = await self.plane.predict(served, pixels, parsed.top, labels.route)
            out, headers = rc.infer_response(served, parsed, prediction)
        return web.Response(body=out, headers=headers)

    # ------------------------------------------------------------ our own API

    async def list_models(self, request: web.Request) -> web.Response:
        return self._json(rc.models_json(self.plane.catalog()))

    async def summary(self, request: web.Request) -> web.Response:
        served = self._resolve(request, request.query.get("version", ""))
        return self._json(rc.summary_json(served, await self.plane.summary(served)))

    async def classify(self, request: web.Request) -> web.Response:
        key = request.query.get("client_key", "")
        served = self._route(request, request.query.get("version", ""), key)
        top = rc.parse_top_k(request.query.get("top_k"))
        if request.content_type.startswith("multipart/"):
            items = await self._form_images(request)
        else:
            body = await self._body(request)
            if not body:
                raise HttpError(400, "no image in the request body (send the file's bytes)")
            items = [body]
        with self.plane.admit_images(served, len(items), sum(len(i) for i in items)):
            # Decoding images is CPU work: keep it off the event loop.
            batch = await asyncio.to_thread(self.plane.decode_images, served, list(items))
            route = request["labels"].route
            prediction = await self.plane.predict(served, batch, top, route)
            return self._json(rc.classify_json(served, prediction))

    async def rollout(self, request: web.Request) -> web.Response:
        status = self.plane.rollout(request.match_info["model"])
        request["labels"].model = status.model
        return self._json(rc.rollout_json(status))

    async def feature_maps(self, request: web.Request) -> web.Response:
        served = self._resolve(request, request.query.get("version", ""))
        top = rc.parse_top_k(request.query.get("top_k"))
        layers = rc.parse_layers(request.query.get("layers"))
        body = await self._body(request)
        if not body:
            raise HttpError(400, "no image in the request body (send the file's bytes)")
        maps = await self.plane.feature_maps(served, body, layers, top, len(body))
        return self._json(rc.feature_maps_json(served, maps))

    async def explain(self, request: web.Request) -> web.Response:
        served = self._resolve(request, request.query.get("version", ""))
        options = rc.parse_explain_query(request.query)
        tensor = request.content_type == rc.JSON
        image: Any
        if request.content_type.startswith("multipart/"):
            found = await self._form_images(request)
            if len(found) != 1:
                raise HttpError(400, f"the form has {len(found)} files; explain takes one image")
            image = found[0]
        else:
            image = await self._body(request)
            if not image:
                raise HttpError(400, "no image in the request body (send the file's bytes)")
            if tensor:
                image = rc.parse_explain_tensor(image)
        size = image.nbytes if tensor else len(image)
        explanation = await self.plane.explain(
            served, image, tensor=tensor, request_bytes=size, **options
        )
        return self._json(rc.explain_json(served, explanation))

    async def filters(self, request: web.Request) -> web.Response:
        served = self._resolve(request, request.query.get("version", ""))
        found = await self.plane.filters(served, request.query.get("layer", ""))
        return self._json(rc.filters_json(served, found))

    async def page(self, request: web.Request) -> web.Response:
        name = request.match_info.get("file", "index.html")
        body = self._page.get(name)
        if body is None:
            raise HttpError(
                404, f"no page file {name!r}; the page's files: {', '.join(sorted(self._page))}"
            )
        kind = PAGE_TYPES[name[name.rindex(".") :]]
        headers = {"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"}
        return web.Response(body=body, content_type=kind, charset="utf-8", headers=headers)

    async def _form_images(self, request: web.Request) -> list[bytes]:
        """Every file of a multipart form, in order, within the size limit and read timeout."""
        limit = self.limits.max_body_bytes
        found: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.read_timeout_s):
                reader = await request.multipart()
                while (part := await reader.next()) is not None:
                    if not isinstance(part, BodyPartReader) or part.filename is None:
                        continue  # a plain form field, or a nested multipart: no image
                    data = bytearray()
                    while chunk := await part.read_chunk():
                        size += len(chunk)
                        if size > limit:
                            raise HttpError(
                                413, f"form over the limit of {limit:,} bytes", close=True
                            )
                        data += chunk
                    found.append(bytes(data))
        except TimeoutError:
            raise HttpError(
                408, f"the form did not arrive within {self.limits.read_timeout_s:g} s", True
            ) from None
        except (ValueError, AssertionError, HttpProcessingError) as exc:  # a malformed form
            raise HttpError(400, f"malformed multipart form: {exc}") from None
        if not found:
            raise HttpError(400, "the form has no file part (send the image as a file field)")
        return found

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type=rc.JSON)


class RestServer:
    """The REST API's listening socket on the server's loop: start, drain, stop. Connections
    are taken within `share` (the port's part of the process's connection budget) and each
    must deliver its request head within `head_timeout_s` (serving.rest.site)."""

    def __init__(
        self,
        api: RestApi,
        grace_s: float,
        idle_s: float,
        *,
        head_timeout_s: float,
        share: Share,
        on_closed: Callable[[str], None],
    ) -> None:
        self.api = api
        self.port = 0
        self.share = share
        self._head_timeout_s = head_timeout_s
        self._on_closed = on_closed
        self._handler_args: dict[str, Any] = {
            "access_log": None,  # the middleware logs each request at debug level
            "keepalive_timeout": idle_s or 3600.0,
        }
        self._runner = web.AppRunner(
            api.app(), shutdown_timeout=grace_s, handle_signals=False, **self._handler_args
        )

    async def start(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None, reuse_port: bool
    ) -> int:
        await self._runner.setup()
        site = BudgetedSite(
            self._runner,
            host,
            port,
            ssl_context=ssl_context,
            reuse_port=reuse_port,
            share=self.share,
            head_timeout_s=self._head_timeout_s,
            handler_args=self._handler_args,
            on_closed=self._on_closed,
        )
        await site.start()
        self.port = site.port
        return self.port

    async def stop(self, grace_s: float) -> None:
        """New requests are answered 503 while the running ones finish within `grace_s`."""
        self.api.draining = True
        deadline = time.monotonic() + grace_s
        while self.api.active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self._runner.cleanup()


def ssl_context(cert: Any, key: Any, client_ca: Any) -> ssl.SSLContext:
    """The same certificate (and client CA, for mutual TLS) as the gRPC port's."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        context.load_verify_locations(str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
