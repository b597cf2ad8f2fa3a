"""Connection floods against a real server whose process may hold 2,048 open files, as in a
small container: 2,500 slowloris connections, idle keep-alive connections, half-open TLS
handshakes on both ports. The server keeps serving both protocols, loads a new model version,
closes what it must within its timeouts, and logs a few lines about it, not one per connection.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import selectors
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import ServerProcess, scrape, write_tiny_model
from harness.tls import ServerCertificate, server_certificate
from serving.client import Client
from serving.connections import RESERVED_FILES
from serving.rest import codec as rc

pytestmark = pytest.mark.slow

OPEN_FILES = 2048  # the server's open-file limit
FLOOD = 2500  # connections of each flood: more than the server could hold
HEAD_S = 2.0  # --http-header-timeout-s and --handshake-timeout-s of these servers
SLACK_S = 1.5  # what a loaded 2-core machine adds to a timer
WATCH_S = 20.0  # how long a flood's sockets are read at most
X = np.random.default_rng(0).random((2, 4, 4, 1), dtype=np.float32)
SLOW_HEAD = b"GET /v2/health/ready HTTP/1.1\r\nHost: attacker\r\n"  # and never the end
FULL_REQUEST = b"GET /v2/health/live HTTP/1.1\r\nHost: idler\r\n\r\n"
# A TLS handshake record announcing 512 bytes of ClientHello, of which 4 come.
HALF_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC])
# Log lines that would be about connections, accepting, or running out of descriptors.
NOISE = ("serving.connections", "accept", "Too many open files", "Errno 24", "Traceback")


@pytest.fixture(autouse=True)
def room_for_the_flood() -> None:
    """This process opens the floods' sockets (two floods at once, for TLS): raise its own soft
    open-file limit if it must (the hard one bounds it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * FLOOD + 512
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"the open-file limit {hard} is below the {need} the floods need")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_tiny_model(tmp_path / "models" / "tiny" / "1" / "model.onnx")
    return tmp_path / "models"


@contextmanager
def open_file_limit(limit: int) -> Iterator[None]:
    """Processes started inside inherit a soft open-file limit of `limit`; this one gets its
    own back after (only the soft limit is lowered: the hard one could not be raised again)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def limited_server(repo: Path, tls: ServerCertificate | None = None) -> Iterator[ServerProcess]:
    args = ["--http-header-timeout-s", str(HEAD_S), "--handshake-timeout-s", str(HEAD_S)]
    credentials = None
    if tls is not None:
        args += tls.args()
        credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca.read_bytes())
    proc = ServerProcess(repo, args, http=True, credentials=credentials)
    with open_file_limit(OPEN_FILES):
        proc.start(wait_ready=False)
    try:
        proc.wait_health()
        assert proc.proc is not None
        limit = resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE)[0]
        assert limit == OPEN_FILES
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, proc.logs()


# ------------------------------------------------------------------ the floods


@dataclass
class Flood:
    """Sockets that connected, each with when it did, and when each was seen closed (by a
    thread that reads them all while the test checks the server)."""

    socks: list[socket.socket]
    opened: list[float]
    closed: dict[int, float]
    watcher: threading.Thread | None = None

    def watch_until(self, until: float) -> Flood:
        self.watcher = threading.Thread(target=self.watch, args=(until,), daemon=True)
        self.watcher.start()
        return self

    def join(self) -> None:
        if self.watcher is not None:
            self.watcher.join()

    @property
    def last_closed(self) -> float:
        return max(self.closed.values())

    def close(self) -> None:
        self.join()
        for sock in self.socks:
            sock.close()

    def watch(self, until: float) -> None:
        """Read every socket until it is closed (EOF or reset) or `until` passes."""
        with selectors.DefaultSelector() as sel:
            for i, sock in enumerate(self.socks):
                if i not in self.closed:
                    sock.setblocking(False)
                    sel.register(sock, selectors.EVENT_READ, i)
            while sel.get_map() and time.monotonic() < until:
                for key, _ in sel.select(timeout=0.1):
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:  # answers (the keep-alive flood's) are read and dropped
                        self.closed[key.data] = time.monotonic()
                        sel.unregister(key.fileobj)

    def lifetimes(self) -> list[float]:
        return [self.closed[i] - self.opened[i] for i in sorted(self.closed)]


def flood(port: int, first: bytes) -> Flood:
    """FLOOD connections to `port`, each sending `first` (nothing when empty)."""
    out = Flood([], [], {})
    for i in range(FLOOD):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        out.socks.append(sock)
        out.opened.append(time.monotonic())
        if first:
            try:
                sock.sendall(first)
            except OSError:  # refused at once: reset before this could write
                out.closed[i] = time.monotonic()
    return out


# ------------------------------------------------------------------ what must keep working


def reference(model: Path) -> np.ndarray:
    return ort.InferenceSession(str(model)).run(None, {"image": X})[0]  # type: ignore[no-any-return]


def timed(what: Callable[[], object]) -> float:
    started = time.monotonic()
    what()
    return time.monotonic() - started


def grpc_health(channel: grpc.Channel) -> None:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def rest_call(
    proc: ServerProcess, ca: Path | None, method: str, path: str, body: bytes | None = None
) -> tuple[int, bytes]:
    host, port = "127.0.0.1", proc.http_port
    # A new connection waits behind the flood's backlog (1-3 s on a quiet 2-core machine, over
    # 5 s on a loaded one): the floods' own watch bounds it.
    conn: http.client.HTTPConnection
    if ca is None:
        conn = http.client.HTTPConnection(host, port, timeout=WATCH_S)
    else:
        context = ssl.create_default_context(cafile=str(ca))
        conn = http.client.HTTPSConnection(host, port, timeout=WATCH_S, context=context)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def rest_infer(proc: ServerProcess, ca: Path | None) -> np.ndarray:
    tensor = {"name": "image", "datatype": "FP32", "shape": list(X.shape)}
    body = rc.dumps({"inputs": [{**tensor, "data": X.ravel().tolist()}]})
    status, answer = rest_call(proc, ca, "POST", "/v2/models/tiny/infer", body)
    assert status == 200, answer
    out = json.loads(answer)["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def check_serving(  # noqa: PLR0917
    proc: ServerProcess,
    repo: Path,
    client: Client,
    ca: Path | None,
    bound: float,
    fresh_grpc: bool = True,
) -> dict[str, float]:
    """Health on both ports, Predict and REST infer answered right, a new version loaded; the
    seconds each took."""
    took: dict[str, float] = {}
    with proc.channel() as channel:  # a new connection, unless the gRPC port is the one flooded
        if fresh_grpc:
            took["gRPC health, new connection"] = timed(lambda: grpc_health(channel))
    took["gRPC health"] = timed(lambda: client.health() == "SERVING" or pytest.fail("gRPC"))
    took["REST health"] = timed(
        lambda: rest_call(proc, ca, "GET", "/v2/health/ready")[0] == 200 or pytest.fail("REST")
    )
    v1 = reference(repo / "tiny" / "1" / "model.onnx")
    got = client.predict("tiny", X)
    assert got.version == 1 and got.probabilities is not None
    np.testing.assert_allclose(got.probabilities, v1, atol=1e-6)
    np.testing.assert_allclose(rest_infer(proc, ca), v1, atol=1e-6)
    # A new version is read from the repository and loads.
    started = time.monotonic()
    write_tiny_model(repo / "tiny" / "2" / "model.onnx", seed=2)
    proc.signal(signal.SIGHUP)
    while (got := client.predict("tiny", X)).version != 2:
        assert time.monotonic() - started < 10, proc.logs()
        time.sleep(0.05)
    took["new version loaded"] = time.monotonic() - started
    assert got.probabilities is not None
    np.testing.assert_allclose(got.probabilities, reference(repo / "tiny/2/model.onnx"), atol=1e-6)
    for what, seconds in took.items():
        if "gRPC health" in what:  # a new REST connection waits behind the flood's backlog
            assert seconds < bound, (what, seconds)
    return took


def health_bound(proc: ServerProcess) -> float:
    """1 s, as the issue asks, or ten times what a health check over a new connection takes
    on this machine before any flood, when that is more (a machine shared with other work)."""
    with proc.channel() as channel:
        timed(lambda: grpc_health(channel))  # the channel's own start-up, not counted
    with proc.channel() as channel:
        quiet = timed(lambda: grpc_health(channel))
    return max(1.0, 10 * quiet)


def closed_by(attack: Flood, took: dict[str, float]) -> float:
    """When the last connection of `attack` must have been closed: the head deadline after
    the server took the last one in. It takes them in in order, and the REST health check's
    connection came after them all: how long it waited is how long taking them in took."""
    return max(attack.opened) + took["REST health"] + HEAD_S + SLACK_S


def noise(proc: ServerProcess) -> list[str]:
    return [line for line in proc.logs().splitlines() if any(n in line for n in NOISE)]


def closed(proc: ServerProcess, protocol: str = "http") -> dict[str, float]:
    found = scrape(proc.metrics_port)
    reasons = ("limit", "evicted", "header_timeout", "handshake", "accept_error")
    return {
        r: found.total("cnnserve_connections_closed_total", protocol=protocol, reason=r)
        for r in reasons
    }


def report(name: str, attack: Flood, took: dict[str, float], proc: ServerProcess) -> None:
    lives = attack.lifetimes()
    print(
        f"\n{name}: {len(attack.closed)}/{FLOOD} closed, longest held {max(lives):.2f} s; "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in took.items())
        + f"; closed by reason {closed(proc)}; {len(noise(proc))} log lines about it"
    )


# ------------------------------------------------------------------ the tests


def test_slowloris_on_the_rest_port(repo: Path) -> None:
    with limited_server(repo) as proc, Client(proc.target, timeout=10) as client:
        assert client.predict("tiny", X).version == 1
        bound = health_bound(proc)
        budget = (OPEN_FILES - RESERVED_FILES) // 2
        assert f"connections {budget} gRPC + {budget} REST" in proc.logs()
        attack = flood(proc.http_port, SLOW_HEAD).watch_until(time.monotonic() + WATCH_S)
        try:
            took = check_serving(proc, repo, client, None, bound)
            attack.join()
            report("slowloris", attack, took, proc)
            # Each slow connection is closed by its head deadline, or sooner, to make room.
            assert len(attack.closed) == FLOOD
            assert attack.last_closed < closed_by(attack, took)
        finally:
            attack.close()
        counted = closed(proc)
        assert counted["header_timeout"] >= 1 and counted["evicted"] >= FLOOD - budget
        assert len(noise(proc)) <= 3, noise(proc)


def test_idle_keep_alive_connections(repo: Path) -> None:
    """Connections that asked once and stay open: a full share makes room by closing the
    oldest idle ones; the rest are the keep-alive timeout's (120 s by default)."""
    with limited_server(repo) as proc, Client(proc.target, timeout=10) as client:
        assert client.predict("tiny", X).version == 1
        bound = health_bound(proc)
        attack = flood(proc.http_port, FULL_REQUEST).watch_until(time.monotonic() + 3 * HEAD_S)
        try:
            took = check_serving(proc, repo, client, None, bound)
            attack.join()
            budget = (OPEN_FILES - RESERVED_FILES) // 2
            held = scrape(proc.metrics_port).total("cnnserve_connections", protocol="http")
            report("idle keep-alive", attack, took, proc)
            assert held <= budget
            assert FLOOD - len(attack.closed) <= budget  # the others were closed for room
        finally:
            attack.close()
        assert len(noise(proc)) <= 3, noise(proc)


def test_half_open_tls_handshakes_on_both_ports(repo: Path, tmp_path: Path) -> None:
    """On the REST port a handshake must end within the head deadline, and a full share makes
    room; on the gRPC port gRPC core refuses beyond the share and closes handshakes at
    --handshake-timeout-s: a channel that was open keeps working meanwhile, and a new one
    gets in once those handshakes are closed."""
    tls = server_certificate(tmp_path)
    with (
        limited_server(repo, tls) as proc,
        Client(proc.target, timeout=10, root_certificates=tls.ca) as client,
    ):
        assert client.predict("tiny", X).version == 1
        bound = health_bound(proc)
        rest_attack = flood(proc.http_port, HALF_HELLO).watch_until(time.monotonic() + WATCH_S)
        grpc_attack = flood(proc.port, HALF_HELLO).watch_until(time.monotonic() + WATCH_S)
        try:
            took = check_serving(proc, repo, client, tls.ca, bound, fresh_grpc=False)
            rest_attack.join()
            grpc_attack.join()
            with proc.channel() as channel:
                took["gRPC health, new connection after"] = timed(lambda: grpc_health(channel))
            report("half-open TLS, REST port", rest_attack, took, proc)
            print(
                f"half-open TLS, gRPC port: {len(grpc_attack.closed)}/{FLOOD} closed, longest "
                f"held {max(grpc_attack.lifetimes()):.2f} s"
            )
            for attack in (rest_attack, grpc_attack):
                assert len(attack.closed) == FLOOD
                assert attack.last_closed < closed_by(attack, took)
        finally:
            rest_attack.close()
            grpc_attack.close()
        assert closed(proc)["handshake"] + closed(proc)["evicted"] >= 1
        assert len(noise(proc)) <= 3, noise(proc)
    assert os.path.exists(tls.cert)
