"""Assembles the grpc.aio server: servicers, health, reflection, limits, reload, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import _async as reflection_async  # its aio servicer
from grpc_reflection.v1alpha import reflection

from serving.config import MiB, Settings, read_auth_token
from serving.connections import Budget, Share, open_file_limit
from serving.core import images
from serving.core.admission import Admission
from serving.core.batching import Observer
from serving.core.dataplane import DataPlane, Limits
from serving.core.repository import BatchingOptions, ModelRepository, State
from serving.core.routing import Router
from serving.core.run_process import RunProcess
from serving.core.runtime import RuntimeOptions, default_concurrent_runs, default_intra_op_threads
from serving.core.statistics import Statistics
from serving.cores import available_cores
from serving.grpc.cnnserve import CnnServeServicer
from serving.grpc.guard import Guard
from serving.grpc.inference import GRPCInferenceServiceServicer
from serving.grpc.inference_messages import server_version
from serving.grpc.streams import Streams
from serving.memory import IdleTrimmer, default_inflight_budget_bytes
from serving.metrics import Metrics
from serving.pb.cnnserve.v1 import cnnserve_pb2
from serving.pb.inference import grpc_predict_v2_pb2
from serving.rest.app import RestApi, RestLimits, RestServer, ssl_context

log = logging.getLogger(__name__)

# Always SERVING while the process runs: for liveness probes, which must not restart a server
# that is alive but has no model ready (readiness keeps traffic away from it instead).
LIVENESS_SERVICE = "liveness"
SERVICE_NAMES = [
    cnnserve_pb2.DESCRIPTOR.services_by_name["CnnServe"].full_name,
    grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def warmup_sizes(settings: Settings) -> tuple[int, ...]:
    """Every batch size the batcher can form (all of them up to 64, then powers of two)."""
    if not settings.warmup:
        return ()
    if not settings.batching:
        return (1,)
    top = settings.max_batch_size
    if top <= 64:
        return tuple(range(1, top + 1))
    sizes = {1 << i for i in range(top.bit_length()) if 1 << i <= top}
    return tuple(sorted(sizes | {top}))


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.stats = Statistics()
        self.health = HealthServicer()
        runs = settings.concurrent_runs or default_concurrent_runs(settings.provider)
        cores = available_cores()
        runtime_options = RuntimeOptions(
            provider=settings.provider,
            intra_op_threads=settings.intra_op_threads or default_intra_op_threads(runs),
            inter_op_threads=settings.inter_op_threads,
            warmup_batch_sizes=warmup_sizes(settings),
            spinning=settings.ort_spinning,
            cuda_fixed_batch=settings.max_batch_size,
        )
        self.executor = ThreadPoolExecutor(
            max_workers=max(2, cores, runs), thread_name_prefix="ort"
        )
        self.runs: RunProcess | None = None
        if settings.run_process == "on" or (
            settings.run_process == "auto"
            and settings.provider == "cpu"
            and settings.batching
            and runs > 1
            and cores > 1
        ):
            self.runs = RunProcess(runtime_options, self.metrics.run_process_changed)
        self.repository = ModelRepository(
            settings.model_repository,
            runtime_options=runtime_options,
            batching=BatchingOptions(
                enabled=settings.batching,
                max_batch_size=settings.max_batch_size,
                max_delay_s=settings.max_queue_delay_ms / 1000.0,
                max_runs=runs,
                # One core: a worker thread could only take turns with the loop's, at the
                # price of the hand-offs.
                inline=cores == 1 and runs == 1,
            ),
            executor=self.executor,
            max_versions=settings.max_versions,
            observer_for=self._observer_for,
            on_state=self._on_state,
            runs=self.runs,
            pinned=self._pinned,
        )
        images.configure(settings.max_image_pixels)  # Pillow's bomb check, the same limit
        self.trimmer = IdleTrimmer()  # gives a burst's memory back once the server is quiet
        self.admission = Admission(
            settings.max_inflight_mb * MiB or default_inflight_budget_bytes(),
            settings.max_queue_images,
            on_reject=self._on_reject,
            on_change=self._on_held,
        )
        self.metrics.watch_admission(self.admission.budget_bytes)
        # Each model's rollout policy: which version answers, and the copies for comparison.
        self.router = Router(self.repository, self.admission, self.metrics)
        self.plane = DataPlane(
            self.repository,
            Limits(
                settings.max_request_batch,
                settings.max_image_pixels,
                settings.max_feature_map_bytes,
                settings.max_explain_images,
            ),
            self.stats,
            self.admission,
            on_explain=self.metrics.count_explanation,
            router=self.router,
        )
        self.streams = Streams(settings.max_stream_inflight)
        self.guard = Guard(self.metrics, self.admission, stop_streams=self.streams.stop_reading)
        self.grpc_server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self.http: RestServer | None = None
        self.budget = Budget.of(
            settings.max_connections, settings.http_port != 0, open_file_limit()
        )
        self.http_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._health_tasks: set[asyncio.Task[None]] = set()

    def _pinned(self, model: str) -> tuple[int, ...]:
        """The versions the model's rollout policy names (the router is made after the
        repository, which asks for them)."""
        return self.router.pinned(model)

    def _on_reject(self, model: str, reason: str) -> None:
        self.metrics.reject(model, reason)
        self.trimmer.stir()

    def _on_held(self, held: int) -> None:
        self.metrics.set_held_bytes(held)
        self.trimmer.note(held)

    # ------------------------------------------------------------ health

    def _on_state(self, name: str, version: int, state: State, seconds: float) -> None:
        self.metrics.set_state(name, version, state.value, seconds, time.time())
        self._set_health(name, SERVING if self.repository.is_ready(name) else NOT_SERVING)
        self._refresh_overall()

    def _set_health(self, service: str, status: int) -> None:
        task = asyncio.get_running_loop().create_task(self.health.set(service, status))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    def _observer_for(self, model: str, version: int, provider: str) -> Observer:
        """Each batch run feeds the data plane's statistics, then the Prometheus metrics."""
        return self.stats.observer(
            model, version, self.metrics.observer_for(model, version, provider)
        )

    def is_ready(self) -> bool:
        """Ready for inferencing: the repository was scanned, at least one model is ready, and
        the server is not shutting down. The overall health status and the Open Inference
        Protocol's ServerReady both answer this."""
        return (
            self.repository.scanned_once
            and any(self.repository.is_ready(n) for n in self.repository.model_names())
            and not self._stopping.is_set()
        )

    def _refresh_overall(self) -> None:
        status = SERVING if self.is_ready() else NOT_SERVING
        for service in ["", *SERVICE_NAMES]:
            self._set_health(service, status)

    # ------------------------------------------------------------ lifecycle

    def _options(self) -> list[tuple[str, int]]:
        """The gRPC core options of the server.

        grpc.aio's `maximum_concurrent_rpcs` is left unset, on purpose: past it gRPC answers
        RESOURCE_EXHAUSTED, which clients do not retry and which means "message too large"
        here; it counts every call the server has begun, health checks included (a client's
        health Watch lasts as long as its channel, and a refused probe gets a pod restarted
        under load) and half-sent requests too (so slow clients could lock everyone else out).
        Overload is refused by the data plane instead, by what requests cost (UNAVAILABLE,
        which clients retry with backoff), and what one connection may hold is bounded here."""
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 1 if s.reuse_port else 0),
        ]
        if s.max_connection_age_s > 0:
            options += [
                ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(s.grace_seconds * 1000)),
            ]
        # Idle and slow clients: a connection that never finishes its handshake, one that holds
        # no call, and one whose peer vanished while calls were open are all closed in bounded
        # time; one connection holds at most max_concurrent_streams calls.
        if s.max_connection_idle_s > 0:
            options.append(("grpc.max_connection_idle_ms", int(s.max_connection_idle_s * 1000)))
        if s.handshake_timeout_s > 0:
            options.append(("grpc.server_handshake_timeout_ms", int(s.handshake_timeout_s * 1000)))
        if s.max_concurrent_streams > 0:
            options.append(("grpc.max_concurrent_streams", s.max_concurrent_streams))
        # Its share of the process's connection budget: gRPC core closes a connection beyond
        # it as soon as it is accepted (serving.connections).
        options.append(("grpc.max_allowed_incoming_connections", self.budget.grpc))
        options.append(("grpc.http2.bdp_probe", 1 if s.http2_bdp_probe else 0))
        if s.keepalive_time_s > 0:
            options += [
                ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
                # The deadline this gRPC core enforces on the ping's answer (60 s by default;
                # keepalive_timeout_ms alone did not close a peer that never answered).
                ("grpc.http2.ping_timeout_ms", int(s.keepalive_timeout_s * 1000)),
                # Keep pinging a quiet connection with calls open, however long it stays quiet
                # (recent gRPC cores never cap a server's pings; older ones stopped after 2).
                ("grpc.http2.max_pings_without_data", 0),
            ]
        options.append(
            ("grpc.http2.min_ping_interval_without_data_ms", int(s.min_ping_interval_s * 1000))
        )
        return options

    @property
    def transport(self) -> str:
        s = self.settings
        if s.tls_cert is None:
            return "plaintext"
        return "mutual TLS" if s.tls_client_ca is not None else "TLS"

    def _credentials(self) -> grpc.ServerCredentials | None:
        """TLS when a certificate is configured; mutual TLS (a client certificate signed by
        --tls-client-ca is required) when a client CA is too."""
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        client_ca = s.tls_client_ca.read_bytes() if s.tls_client_ca is not None else None
        return grpc.ssl_server_credentials(
            [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    async def start(self) -> None:
        s = self.settings
        if self.runs is not None:  # starts (imports, a second or less) while gRPC and REST do
            self.runs.start_soon(asyncio.get_running_loop())
        token = read_auth_token(s)  # read once: what the log says is what the guard checks
        server = grpc.aio.server(
            options=self._options(),
            maximum_concurrent_rpcs=None,  # no: see _options
        )
        # No interceptor: the guard is the server's only method lookup, and wraps each method
        # once (serving/grpc/guard.py).
        guard = self.guard
        guard.require_token(token)
        from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc

        guard.add(
            cnnserve_pb2_grpc.add_CnnServeServicer_to_server,
            CnnServeServicer(self.plane, self.metrics, self.streams),
            counted=True,
        )
        from serving.pb.inference import grpc_predict_v2_pb2_grpc

        guard.add(
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            GRPCInferenceServiceServicer(self.plane, self.metrics, self.is_ready, self.streams),
            counted=True,
        )
        guard.add(health_pb2_grpc.add_HealthServicer_to_server, self.health, counted=False)
        from grpc_reflection.v1alpha import reflection_pb2_grpc

        guard.add(
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
            reflection_async.ReflectionServicer(
                [
                    *SERVICE_NAMES,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ]
            ),
            counted=False,
        )
        server.add_generic_rpc_handlers((guard,))
        address = f"{s.host}:{s.port}" if ":" not in s.host else f"[{s.host}]:{s.port}"
        credentials = self._credentials()
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self._refresh_overall()
        self._set_health(LIVENESS_SERVICE, SERVING)
        await server.start()
        self.grpc_server = server
        self.metrics.connection_limit.labels("grpc").set(self.budget.grpc)
        if s.metrics_port:
            self.metrics_port = self.metrics.serve(s.metrics_port, s.host)
        if s.http_port:
            await self._start_http(token)
        log.info(
            "listening on %s:%d (gRPC, %s, token auth %s)%s; repository %s; provider %s; "
            "batching %s (max %d, delay %.2f ms); %d concurrent runs per model; request data "
            "budget %d MiB, up to %d images queued per model, %d messages in flight per stream;"
            " connections %s",
            s.host,
            self.port,
            self.transport,
            "on" if token is not None else "off",
            f" and {self.http_port} (HTTP/1.1 REST)" if self.http is not None else "",
            s.model_repository,
            s.provider,
            "on" if s.batching else "off",
            s.max_batch_size,
            s.max_queue_delay_ms,
            self.repository.batching.max_runs,
            self.admission.budget_bytes // MiB,
            self.admission.max_queue_images,
            self.streams.max_inflight,
            f"{self.budget.grpc} gRPC"
            + (f" + {self.budget.http} REST" if self.http is not None else ""),
            extra={
                "event": "server_started",
                "port": self.port,
                "metrics_port": self.metrics_port,
                "http_port": self.http_port,
            },
        )
        await self._scan()  # each load waits for the run process to be up
        self._refresh_overall()
        if s.poll_seconds > 0:
            self._tasks.append(asyncio.get_running_loop().create_task(self._poll(), name="poll"))

    async def _start_http(self, token: str | None) -> None:
        """The REST API on this loop, over the same data plane, limits, token and TLS."""
        s = self.settings
        api = RestApi(
            self.plane,
            self.metrics,
            ready=self.is_ready,
            admission=self.admission,
            limits=RestLimits(s.max_message_bytes, s.http_read_timeout_s),
            token=token,
            version=server_version(),
        )
        share = Share("REST", self.budget.http)
        self.metrics.watch_connections("http", share.limit, share.get)
        self.http = RestServer(
            api,
            s.grace_seconds,
            s.max_connection_idle_s,
            head_timeout_s=s.http_header_timeout_s,
            share=share,
            on_closed=lambda reason: self.metrics.close_connection("http", reason),
        )
        context = None
        if s.tls_cert is not None and s.tls_key is not None:
            context = ssl_context(s.tls_cert, s.tls_key, s.tls_client_ca)
        self.http_port = await self.http.start(s.host, s.http_port, context, s.reuse_port)

    async def _scan(self) -> None:
        """The rollout policies are read first (the versions they name stay loaded), the
        versions loaded, then the policies take effect (or are refused); when one did, the
        versions only the old one kept are let go."""
        await self.router.read()
        await self.repository.scan()
        if self.router.apply():
            await self.repository.scan()  # what only the old policy kept loaded goes now

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            try:
                await self._scan()
            except Exception:
                log.exception("repository scan failed")
            self._refresh_overall()

    async def reload(self) -> None:
        log.info("reloading the model repository and its rollout policies")
        await self._scan()
        self._refresh_overall()

    async def stop(self) -> None:
        """Refuse new calls, let in-flight ones finish within the grace period, free everything."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        log.info(
            "shutting down: draining in-flight calls (grace %.1fs)",
            self.settings.grace_seconds,
            extra={"event": "server_stopping"},
        )
        started = time.perf_counter()
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        http_stopped = None
        if self.http is not None:  # drains beside gRPC, within the same grace period
            http_stopped = asyncio.get_running_loop().create_task(
                self.http.stop(self.settings.grace_seconds)
            )
        if self.grpc_server is not None:
            # New calls are refused (UNAVAILABLE) while the running ones finish, and only then
            # does gRPC stop: calls it holds but has not handed over would end CANCELLED.
            grace = self.settings.grace_seconds
            left = await self.guard.drain(grace)
            if left:
                log.warning("%d calls still running after the grace period", left)
            await self.grpc_server.stop(max(0.0, grace - (time.perf_counter() - started)))
        if http_stopped is not None:
            await http_stopped
        await self.router.close()
        await self.repository.close()
        if self.runs is not None:
            await asyncio.to_thread(self.runs.stop)
        await self.trimmer.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
        seconds = time.perf_counter() - started
        log.info("stopped in %.2fs", seconds, extra={"event": "server_stopped", "seconds": seconds})

    async def wait(self) -> None:
        await self._stopping.wait()


async def serve(settings: Settings) -> int:
    server = Server(settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    def on_reload() -> None:
        task = loop.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    await server.start()
    await stop_requested.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(sig)
    await server.stop()
    return 0
