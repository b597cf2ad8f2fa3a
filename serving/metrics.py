"""Prometheus collectors and the /metrics HTTP endpoint on its own port.

Label values are bounded: model names come from the repository (an unknown name is
counted as "_unknown"), methods from the proto services, codes from grpc.StatusCode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
    values,
)
from prometheus_client import (
    gc_collector as _gc,
)
from prometheus_client import (
    platform_collector as _platform,
)
from prometheus_client import (
    process_collector as _process,
)

from serving.core.batching import Observer

if TYPE_CHECKING:
    from serving.core.dataplane import DataPlane, Route, ServedVersion
    from serving.core.rollout import Policy

log = logging.getLogger(__name__)

PREFIX = "cnnserve"
# 50 us .. 10 s: sub-millisecond resolution for batch-1 calls, seconds for big batches.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNKNOWN_MODEL = "_unknown"
STATES = ("LOADING", "READY", "FAILED", "UNLOADED")
ROLLOUT_STATES = ("none", "stable", "shadow", "canary", "rolled_back")

# No `<name>_created` series beside every counter and histogram: one more series per labelled
# child that nothing here reads (Prometheus handles counter resets without them).
disable_created_metrics()  # type: ignore[no-untyped-call]


class InFlight:
    """A count changed only on the event loop's thread and read by the /metrics thread."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1

    def get(self) -> float:
        return float(self.value)


class Metrics:
    """All collectors, in a registry of their own (so tests can run several servers)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        _process.ProcessCollector(registry=r)
        _platform.PlatformCollector(registry=r)
        _gc.GCCollector(registry=r)
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by model, version, method, status code (gRPC's names, HTTP "
            "answers mapped to them) and protocol (grpc or http).",
            ["model", "version", "method", "code", "protocol"],
            registry=r,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Whole request time in the server, from decode to encoded response.",
            ["model", "method", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            f"{PREFIX}_queue_duration_seconds",
            "Time a request waited in the batcher before its batch ran.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            f"{PREFIX}_compute_duration_seconds",
            "ONNX Runtime time per batch run.",
            ["model", "version", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Images per ONNX Runtime run (after dynamic batching).",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            f"{PREFIX}_inflight_requests",
            "RPCs being handled right now.",
            ["method"],
            registry=r,
            multiprocess_mode="livesum",  # with --workers: summed over the live workers
        )
        self.streams = Gauge(
            f"{PREFIX}_inflight_streams",
            "Inference streams (PredictStream, ModelStreamInfer) open right now; their messages "
            "in flight count in cnnserve_inflight_requests.",
            ["method"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            f"{PREFIX}_rejected",
            "Requests refused (UNAVAILABLE) before decoding because the server was full: reason "
            "memory (--max-inflight-mb) or queue (--max-queue-images).",
            ["model", "reason"],
            registry=r,
        )
        self.held_bytes = Gauge(
            f"{PREFIX}_inflight_bytes",
            "Request data held now (queued and running), as admission control counts it.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.budget_bytes = Gauge(
            f"{PREFIX}_inflight_budget_bytes",
            "The budget for request data held at once (--max-inflight-mb).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_state = Gauge(
            f"{PREFIX}_model_state",
            "1 for the state each model version is in (LOADING, READY, FAILED, UNLOADED).",
            ["model", "version", "state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.load_seconds = Gauge(
            f"{PREFIX}_model_load_duration_seconds",
            "Seconds the last load (session + warm-up) of a version took.",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.last_load = Gauge(
            f"{PREFIX}_model_last_load_timestamp_seconds",
            "Unix time of the last load attempt of a version.",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "1 per loaded version, labelled with the execution provider that runs it.",
            ["model", "version", "provider"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.connections = Gauge(
            f"{PREFIX}_connections",
            "Connections open now on the REST port (the gRPC port's are held inside gRPC core, "
            "which does not report them).",
            ["protocol"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.run_process_up = Gauge(
            f"{PREFIX}_run_process_up",
            "1 while a run process takes the batched runs (--run-process), 0 while they run in "
            "the server's own threads (none configured, or one that exited and is not back).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.run_process_restarts = Counter(
            f"{PREFIX}_run_process_restarts",
            "Run processes that exited (killed, out of memory) and were replaced.",
            registry=r,
        )
        self.connection_limit = Gauge(
            f"{PREFIX}_connection_limit",
            "Each port's share of the process's connection budget (--max-connections).",
            ["protocol"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_closed = Counter(
            f"{PREFIX}_connections_closed",
            "Connections the server closed or could not accept to protect itself: reason limit "
            "(beyond the port's share), header_timeout (no complete request head in time), "
            "handshake (TLS handshake failed or too late), accept_error (accept() failed, out "
            "of file descriptors).",
            ["protocol", "reason"],
            registry=r,
        )
        self.explanations = Counter(
            f"{PREFIX}_explanations",
            "Explanations answered (Explain, over gRPC and REST), by model and method "
            "(occlusion, grad_cam).",
            ["model", "method"],
            registry=r,
        )
        self.rollout_calls = Counter(
            f"{PREFIX}_rollout_calls",
            "Calls a rollout counted per version: answered for real or as a copy for comparison "
            "(role stable or candidate; outcome ok or error).",
            ["model", "version", "role", "outcome"],
            registry=r,
        )
        self.rollout_seconds = Histogram(
            f"{PREFIX}_rollout_call_duration_seconds",
            "Time each version of a rollout took per call (answers and copies), by role.",
            ["model", "version", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        pair = ["model", "stable", "candidate"]
        self.rollout_compared_images = Counter(
            f"{PREFIX}_rollout_compared_images",
            "Images both versions of a rollout answered (shadow copies, canary copies).",
            pair,
            registry=r,
        )
        self.rollout_agreed_images = Counter(
            f"{PREFIX}_rollout_agreed_images",
            "Of the compared images, those both versions gave the same best class.",
            pair,
            registry=r,
        )
        self.rollout_abs_diff = Counter(
            f"{PREFIX}_rollout_abs_diff",
            "Sum over compared images of the mean absolute difference of the two versions' "
            "probabilities (divided by the compared images: the mean).",
            pair,
            registry=r,
        )
        self.rollout_shed_copies = Counter(
            f"{PREFIX}_rollout_shed",
            "Copies for comparison dropped because the server was loaded: reason queue (real "
            "images waiting), memory (over half the request data budget held), copies (64 "
            "images of copies already in flight).",
            ["model", "reason"],
            registry=r,
        )
        self.rollout_rollbacks = Counter(
            f"{PREFIX}_rollout_rollbacks",
            "Candidates the server rolled back itself, by the bound broken (min_agreement, "
            "max_error_rate, max_p99_ratio).",
            ["model", "bound"],
            registry=r,
        )
        self.rollout_roles = Gauge(
            f"{PREFIX}_rollout_role",
            "1 per version holding a rollout role (stable, candidate, rolled_back).",
            ["model", "version", "role"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_states = Gauge(
            f"{PREFIX}_rollout_state",
            "1 for each model's rollout state (none, stable, shadow, canary, rolled_back).",
            ["model", "state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_canary_percent = Gauge(
            f"{PREFIX}_rollout_canary_percent",
            "The share of calls a canary policy sends to the candidate (0 otherwise).",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # Labelled children of the per-call series, looked up once: `.labels()` costs several
        # times the update itself. Keys are as bounded as the series are.
        self._call_children: dict[tuple[str, str, str, str, str], tuple[Counter, Histogram]] = {}
        self._refused_children: dict[tuple[str, str, str], Counter] = {}
        self._inflight_counts: dict[str, InFlight | Gauge] = {}
        self._stream_counts: dict[str, InFlight | Gauge] = {}
        self._held = InFlight()
        # Worker processes (--workers) write their values to files that one /metrics sums.
        self.multiprocess = bool(getattr(values.ValueClass, "_multiprocess", False))

    def inflight_for(self, method: str) -> InFlight | Gauge:
        """The in-flight count of one method: a plain counter on the event loop, which the
        gauge reads at scrape time (no lock per call); in a worker process the gauge itself,
        whose file the supervisor's /metrics reads."""
        return self._count_of(self.inflight, self._inflight_counts, method)

    def streams_for(self, method: str) -> InFlight | Gauge:
        """The open-streams count of one streaming method (as `inflight_for`)."""
        return self._count_of(self.streams, self._stream_counts, method)

    def _count_of(
        self, gauge: Gauge, counts: dict[str, InFlight | Gauge], method: str
    ) -> InFlight | Gauge:
        count = counts.get(method)
        if count is None:
            if self.multiprocess:
                count = gauge.labels(method)
            else:
                count = InFlight()
                gauge.labels(method).set_function(count.get)
            counts[method] = count
        return count

    def count_refused(self, method: str, code: str, protocol: str = "grpc") -> None:
        """A request refused before it was read (no model known, no time worth observing):
        cheap, as refusing must be while a flood is refused."""
        key = (method, code, protocol)
        child = self._refused_children.get(key)
        if child is None:
            child = self._refused_children[key] = self.requests.labels(
                UNKNOWN_MODEL, "", method, code, protocol
            )
        child.inc()

    def watch_connections(self, protocol: str, limit: int, held: Callable[[], float]) -> None:
        """A port's share, and its open connections read at scrape time (`held`; in a worker
        process a gauge has no function, so only the share is exported there)."""
        self.connection_limit.labels(protocol).set(limit)
        if not self.multiprocess:
            self.connections.labels(protocol).set_function(held)

    def close_connection(self, protocol: str, reason: str) -> None:
        self.connections_closed.labels(protocol, reason).inc()

    def count_explanation(self, model: str, method: str) -> None:
        self.explanations.labels(model, method).inc()

    def reject(self, model: str, reason: str) -> None:
        self.rejected.labels(model, reason).inc()

    def run_process_changed(self, up: bool, restarted: bool) -> None:
        self.run_process_up.set(1 if up else 0)
        if restarted:
            self.run_process_restarts.inc()

    def set_held_bytes(self, held: int) -> None:
        """Called on every admission change: a plain store, read at scrape time (in a worker
        process, the gauge's file, which the supervisor reads)."""
        if self.multiprocess:
            self.held_bytes.set(held)
        else:
            self._held.value = held

    def watch_admission(self, budget_bytes: int) -> None:
        self.budget_bytes.set(budget_bytes)
        if not self.multiprocess:
            self.held_bytes.set_function(self._held.get)

    def count_call(
        self,
        model: str,
        version: str,
        method: str,
        code: str,
        seconds: float,
        *,
        protocol: str = "grpc",
    ) -> None:
        """One answered request: its status code counted, its time observed."""
        key = (model, version, method, code, protocol)
        children = self._call_children.get(key)
        if children is None:
            children = (
                self.requests.labels(*key),
                self.request_seconds.labels(model, method, protocol),
            )
            self._call_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observer_for(self, model: str, version: int, provider: str) -> Observer:
        v = str(version)
        batch = self.batch_size.labels(model, v)
        compute = self.compute_seconds.labels(model, v, provider)
        queue = self.queue_seconds.labels(model, v)
        self.model_info.labels(model, v, provider).set(1)

        def observe(size: int, waits: list[float], seconds: float) -> None:
            batch.observe(size)
            compute.observe(seconds)
            for w in waits:
                queue.observe(w)

        return observe

    def set_state(self, model: str, version: int, state: str, seconds: float, now: float) -> None:
        v = str(version)
        for s in STATES:
            self.model_state.labels(model, v, s).set(1 if s == state else 0)
        if state in ("READY", "FAILED"):
            self.load_seconds.labels(model, v).set(seconds)
            self.last_load.labels(model, v).set(now)
        if state in ("UNLOADED", "FAILED"):
            for labels in list(
                self.model_info._metrics
            ):  # drop the provider series of this version
                if labels[:2] == (model, v):
                    if self.multiprocess:  # its file keeps the last value: make it 0 first
                        self.model_info.labels(*labels).set(0)
                    self.model_info.remove(*labels)

    # Rollouts (serving.core.routing.Listener) -------------------------------------------

    def rollout_state(self, model: str, policy: Policy | None, state: str) -> None:
        for s in ROLLOUT_STATES:
            self.rollout_states.labels(model, s).set(1 if s == state else 0)
        for labels in list(self.rollout_roles._metrics):
            if labels[0] == model:
                if self.multiprocess:  # its file keeps the last value: make it 0 first
                    self.rollout_roles.labels(*labels).set(0)
                self.rollout_roles.remove(*labels)
        percent = 0.0
        if policy is not None:
            self.rollout_roles.labels(model, str(policy.stable), "stable").set(1)
            if policy.candidate is not None:
                role = "rolled_back" if state == "rolled_back" else "candidate"
                self.rollout_roles.labels(model, str(policy.candidate), role).set(1)
                if state == "canary":
                    percent = policy.canary_percent
        self.rollout_canary_percent.labels(model).set(percent)

    def rollout_call(self, model: str, version: int, role: str, ok: bool, seconds: float) -> None:
        v = str(version)
        self.rollout_calls.labels(model, v, role, "ok" if ok else "error").inc()
        if ok:
            self.rollout_seconds.labels(model, v, role).observe(seconds)

    def rollout_compared(
        self, model: str, stable: int, candidate: int, *, images: int, agreed: int, abs_diff: float
    ) -> None:
        pair = (model, str(stable), str(candidate))
        self.rollout_compared_images.labels(*pair).inc(images)
        self.rollout_agreed_images.labels(*pair).inc(agreed)
        self.rollout_abs_diff.labels(*pair).inc(abs_diff)

    def rollout_shed(self, model: str, reason: str) -> None:
        self.rollout_shed_copies.labels(model, reason).inc()

    def rollout_rolled_back(self, model: str, bound: str) -> None:
        self.rollout_rollbacks.labels(model, bound).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics endpoint in a thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()


class Call:
    """A call's metric labels, filled in by its handler as it learns them (the model it resolved),
    whichever protocol it came by; for an inference, the rollout's route too."""

    __slots__ = ("model", "route", "version")

    def __init__(self) -> None:
        self.model = UNKNOWN_MODEL
        self.version = ""
        self.route: Route | None = None

    def resolve(self, plane: DataPlane, model: str, version: int) -> ServedVersion:
        """The version to run, remembered as this call's metric labels."""
        served = plane.resolve(model, version)
        self.model, self.version = served.name, str(served.version)
        return served

    def route_to(
        self, plane: DataPlane, model: str, version: int, client: str = ""
    ) -> ServedVersion:
        """The version to run an inference on, as the model's rollout policy routes it
        (`client`: the caller's key, for a sticky canary); its route is kept for `predict`."""
        self.route = plane.route(model, version, client)
        served = self.route.served
        self.model, self.version = served.name, str(served.version)
        return served
