"""`--workers N`: N server processes on one gRPC port, and one /metrics over all of them.

The process the user started becomes a supervisor. It picks the port, starts N workers
(`python -m serving` with the same settings, `--workers 1 --reuse-port`), each with its own
event loop, ONNX Runtime sessions and batcher; the kernel spreads new connections over them
(SO_REUSEPORT), and every call of a connection stays with its worker. The workers write their
metrics to files (prometheus_client's multiprocess mode) which the supervisor's /metrics sums.

Signals: SIGTERM and SIGINT stop the workers (each drains its calls as a single server does),
SIGHUP makes each rescan the repository. A worker that exits on its own is replaced (its live
gauges dropped from /metrics, its counts kept); a crash loop, more than MAX_RESTARTS exits
within RESTART_WINDOW_S, takes the others down and the supervisor exits 1, for the
orchestrator to restart it whole.

What stays per worker: health answers (each for itself: the overall status is the same rule in
every worker), the Open Inference Protocol's ModelStatistics (counts of the worker the call
reached) and the process_* series (the supervisor's /metrics has none of the workers').
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from types import FrameType

from serving.config import Settings
from serving.cores import CPUS_ENV, available_cores, worker_cpu_sets

log = logging.getLogger(__name__)
MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextlib.contextmanager
def reserved_port(host: str, port: int) -> Iterator[int]:
    """Hold `port` (0: a free one) for as long as the workers live: bound with SO_REUSEPORT so
    that they can bind it too, never listening, so it takes no connections. Closing it between
    choosing the port and the workers' binding would let another process take it meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        yield int(s.getsockname()[1])


def worker_command(settings: Settings, argv: Sequence[str], port: int) -> list[str]:
    """The command line of one worker: the user's flags, then ours (the last of a flag wins).
    Unless set, the cores are shared out: cores // workers intra-op threads and concurrent runs
    each (oversubscribed threads lose: bench/PROFILE.md); `worker_env` pins each worker to its
    share where the cores can be cut."""
    cmd = [
        sys.executable, "-m", "serving", *argv,
        "--workers", "1", "--reuse-port", "--port", str(port), "--metrics-port", "0",
    ]  # fmt: skip
    share = str(max(1, available_cores() // settings.workers))
    if settings.intra_op_threads == 0:
        cmd += ["--intra-op-threads", share]
    if settings.concurrent_runs == 0:
        cmd += ["--concurrent-runs", share]
    if settings.max_connections:  # the server's budget; each worker's open-file limit is its own
        cmd += ["--max-connections", str(max(1, settings.max_connections // settings.workers))]
    return cmd


def worker_env(env: dict[str, str], cpu_sets: list[list[int]] | None, i: int) -> dict[str, str]:
    """Worker `i`'s environment: its cores, when they are its own."""
    if cpu_sets is None:
        return env
    return {**env, CPUS_ENV: ",".join(map(str, cpu_sets[i]))}


def _drop_live_gauges(pid: int, metrics_dir: str) -> None:
    """A dead worker's live gauges (in flight, model state) leave the summed /metrics; its
    counters stay, they counted what happened."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    with reserved_port(settings.host, settings.port) as port:
        return _supervise(settings, argv, port)


def _supervise(settings: Settings, argv: Sequence[str], port: int) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="cnnserve-metrics-")
    env = {**os.environ, MULTIPROC_ENV: metrics_dir}
    httpd = None
    if settings.metrics_port:
        os.environ[MULTIPROC_ENV] = metrics_dir  # before prometheus_client is imported
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        httpd, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=registry)

    procs: list[subprocess.Popen[bytes]] = []
    cpu_sets = worker_cpu_sets(settings.workers)
    stopping = False
    code = 0

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            sig = signal.SIGTERM
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    log.info(
        "starting %d workers on %s:%d (SO_REUSEPORT), %s; metrics of all of them on port %d",
        settings.workers,
        settings.host,
        port,
        "sharing the cores"
        if cpu_sets is None
        else "on cores " + " | ".join(",".join(map(str, s)) for s in cpu_sets),
        settings.metrics_port,
        extra={"event": "workers_starting", "workers": settings.workers, "port": port},
    )
    try:
        for i in range(settings.workers):
            procs.append(
                subprocess.Popen(
                    worker_command(settings, argv, port), env=worker_env(env, cpu_sets, i)
                )
            )
        if stopping:  # a signal came while they were starting
            forward(signal.SIGTERM, None)
        stop_started: float | None = None
        exits: deque[float] = deque()
        while True:
            for i, dead in enumerate(procs):
                if stopping or dead.poll() is None:
                    continue
                now = time.monotonic()
                exits.append(now)
                while now - exits[0] > RESTART_WINDOW_S:
                    exits.popleft()
                extra = {"event": "worker_exited", "pid": dead.pid, "code": dead.returncode}
                if len(exits) > MAX_RESTARTS:
                    log.error(
                        "worker %d exited with %s, %d exits in %.0f s: stopping the others",
                        dead.pid,
                        dead.returncode,
                        len(exits),
                        RESTART_WINDOW_S,
                        extra=extra,
                    )
                    code = 1
                    forward(signal.SIGTERM, None)
                    break
                log.error(
                    "worker %d exited with %s: starting another",
                    dead.pid,
                    dead.returncode,
                    extra=extra,
                )
                _drop_live_gauges(dead.pid, metrics_dir)
                procs[i] = subprocess.Popen(
                    worker_command(settings, argv, port), env=worker_env(env, cpu_sets, i)
                )
            if all(p.poll() is not None for p in procs):
                break
            if stopping and stop_started is None:
                stop_started = time.monotonic()
            if stop_started is not None and time.monotonic() - stop_started > (
                settings.grace_seconds + 10
            ):
                for p in procs:
                    if p.poll() is None:
                        log.warning("worker %d did not stop: killing it", p.pid)
                        p.kill()
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    # -SIGTERM: a worker stopped while it was still starting, before its own handler was set.
    if any(p.returncode not in (0, -signal.SIGTERM) for p in procs):
        code = 1
    log.info("all workers stopped", extra={"event": "workers_stopped"})
    return code
