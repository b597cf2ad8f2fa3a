"""Reliability under overload (issue 13), on real servers over loopback: the client's retries
(gRPC's own, from the service config), idle and slow clients against the server's connection
limits, and replicas behind client-side round_robin, the way a client uses a Kubernetes
headless Service (one address per pod, here 127.0.0.2, .3, ... on one port)."""

from __future__ import annotations

import json
import resource
import signal
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from harness import ServerProcess, free_port
from serving.client import DEFAULT_RETRY, SERVICE_CONFIG, Client, RetryPolicy, service_config
from serving.config import Settings
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc
from tests.helpers import ESTABLISHED, LISTEN, ipv4_of, metric, tcp_sockets, wait_for

pytestmark = pytest.mark.slow

TINY = np.zeros((1, 4, 4, 1), np.uint8)  # one image for the tiny 4x4 model


def predicts(proc: ServerProcess, code: str, host: str = "127.0.0.1") -> float:
    return metric(proc, "cnnserve_requests_total", host, method="Predict", code=code)


def broken_model(repo: Path, name: str) -> None:
    """A model whose only version cannot load: the server answers UNAVAILABLE ("no version
    ready yet") for it, every time."""
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.onnx").write_bytes(b"not an onnx file")


# ------------------------------------------------------------------ the service config


def test_service_config_has_the_retry_policy_and_round_robin() -> None:
    config = json.loads(SERVICE_CONFIG)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert {n["service"] for n in method["name"]} == {
        pb.DESCRIPTOR.services_by_name["CnnServe"].full_name,
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    }
    assert method["retryPolicy"] == {
        "maxAttempts": 5,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    assert config["retryThrottling"] == {"maxTokens": 100, "tokenRatio": 0.1}
    assert "healthCheckConfig" not in config
    checked = json.loads(service_config(health_check=True))
    assert checked["healthCheckConfig"] == {"serviceName": ""}
    assert json.loads(service_config(None)) == {"loadBalancingConfig": [{"round_robin": {}}]}
    slow = RetryPolicy(initial_backoff_s=0.25, max_backoff_s=2.5, throttle_max_tokens=0)
    assert (
        json.loads(service_config(slow))["methodConfig"][0]["retryPolicy"]["maxBackoff"] == "2.5s"
    )
    assert "retryThrottling" not in json.loads(service_config(slow))
    for bad in (
        {"max_attempts": 6},  # gRPC caps attempts at 5
        {"retryable_codes": ("UNAVAILBLE",)},
        {"retryable_codes": ()},
        {"initial_backoff_s": 0.0},
    ):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ retries


def test_a_call_refused_for_overload_is_retried_until_admitted(trained_repo: Path) -> None:
    """Admission control refuses a small call UNAVAILABLE while a large one holds the memory
    budget; the retrying client tries again after its backoff and is answered once the large
    call is done. The server counts the refusals and the answer: more than one attempt.

    What the large call holds shrinks as its parts are answered, so a small call that arrives
    near its end may be let in at once (and answered with it): the pair is repeated until a
    refusal is seen (almost always the first time)."""
    heavy_images = np.zeros((4096, 28, 28, 1), np.uint8)  # ~32 MB against a 1 MiB budget
    heavy = pb.PredictRequest(
        model="fashion",
        images=pb.Tensor(
            dtype=pb.DATA_TYPE_UINT8, shape=heavy_images.shape, data=heavy_images.tobytes()
        ),
        omit_probabilities=True,
    )
    small = np.zeros((1, 28, 28, 1), np.uint8)
    patient = RetryPolicy(initial_backoff_s=0.2, max_backoff_s=2.0)  # ~3 s of attempts
    args = ["--max-inflight-mb", "1", "--max-request-batch", "4096"]
    options = [("grpc.max_send_message_length", 16 << 20)]
    rounds: list[tuple[float, float]] = []  # (refusals, seconds) of the small call
    with (
        ServerProcess(trained_repo, args) as proc,
        grpc.insecure_channel(proc.target, options=options) as raw,
        Client(proc.target, retry=patient) as client,
    ):
        assert client.predict("fashion", small).version == 1
        stub = pb_grpc.CnnServeStub(raw)
        while len(rounds) < 5 and not any(refusals for refusals, _ in rounds):
            refused_before = metric(proc, "cnnserve_rejected_total", reason="memory")
            done: list[str] = []
            thread = threading.Thread(
                target=lambda done=done: done.append(stub.Predict(heavy, timeout=60).model)
            )
            thread.start()
            wait_for(
                "the large call to hold the budget",
                lambda: metric(proc, "cnnserve_inflight_bytes") > 1 << 20,
                interval=0.02,
            )
            started = time.perf_counter()
            result = client.predict("fashion", small)  # refused at first, then admitted
            elapsed = time.perf_counter() - started
            thread.join(60)
            assert done == ["fashion"]
            assert result.version == 1 and len(result.labels) == 1
            refused = metric(proc, "cnnserve_rejected_total", reason="memory") - refused_before
            rounds.append((refused, elapsed))
        unavailable, answered = predicts(proc, "UNAVAILABLE"), predicts(proc, "OK")
    print(f"\nthe small call, per round: {rounds} (refusals, seconds to its answer)")
    assert rounds[-1][0] >= 1, (rounds, proc.logs())
    assert unavailable == sum(refusals for refusals, _ in rounds)
    assert answered == 1 + 2 * len(rounds)  # each large call and each small one, answered


def test_retries_stop_at_max_attempts_and_skip_codes_that_are_not_retryable(
    tiny_repo: Path,
) -> None:
    broken_model(tiny_repo, "broken")
    with ServerProcess(tiny_repo) as proc, Client(proc.target) as client:
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as refused:
            client.predict("broken", TINY)
        elapsed = time.perf_counter() - started
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert predicts(proc, "UNAVAILABLE") == DEFAULT_RETRY.max_attempts
        # Backoffs of about 0.1 + 0.2 + 0.4 + 0.8 s (each within +-20 %) between the attempts.
        assert 1.0 < elapsed < 15, elapsed

        # 313,600 bytes: over gRPC's default 256 KiB retry buffer, retried all the same.
        large = np.zeros((400, 28, 28, 1), np.uint8)
        with pytest.raises(grpc.RpcError):
            client.predict("broken", large)
        assert predicts(proc, "UNAVAILABLE") == 2 * DEFAULT_RETRY.max_attempts

        with pytest.raises(grpc.RpcError) as invalid:
            client.predict("tiny", np.zeros((1, 5, 5, 1), np.uint8))  # the wrong shape
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert predicts(proc, "INVALID_ARGUMENT") == 1  # never repeated
        assert client.predict("tiny", TINY).version == 1

        with Client(proc.target, retry=None) as once, pytest.raises(grpc.RpcError):
            once.predict("broken", TINY)
        assert predicts(proc, "UNAVAILABLE") == 2 * DEFAULT_RETRY.max_attempts + 1


# ------------------------------------------------------------------ raw HTTP/2 clients

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GOAWAY = 7


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
    return head + payload


# Our SETTINGS (none changed) and the acknowledgement of the server's.
HELLO = PREFACE + frame(4, 0, 0) + frame(4, 1, 0)


def half_sent_call(stream: int = 1, announced: int = 1 << 20, sent: int = 1000) -> bytes:
    """HEADERS of a Predict call, then the start of a gRPC message that announces `announced`
    bytes of which only `sent` come: a client that never finishes sending."""

    def literal(name: bytes, value: bytes) -> bytes:  # HPACK, literal without indexing
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    block = b"".join(
        literal(n, v)
        for n, v in (
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/cnnserve.v1.CnnServe/Predict"),
            (b":authority", b"cnnserve"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        )
    )
    message = b"\x00" + announced.to_bytes(4, "big") + bytes(sent)
    return frame(1, 0x4, stream, block) + frame(0, 0, stream, message)  # END_HEADERS only


@dataclass
class Closed:
    after_s: float | None  # None: still open when we stopped waiting
    frames: list[int]  # the types of the frames the server sent


def wait_closed(sock: socket.socket, timeout: float) -> Closed:
    """Read (and never answer) what the server sends until it closes the connection."""
    started = time.monotonic()
    frames: list[int] = []
    buffer = b""
    sock.settimeout(0.1)
    while time.monotonic() - started < timeout:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return Closed(time.monotonic() - started, frames)
        if not data:
            return Closed(time.monotonic() - started, frames)
        buffer += data
        while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
            frames.append(buffer[3])
            buffer = buffer[9 + int.from_bytes(buffer[:3], "big") :]
    return Closed(None, frames)


def server_settings(port: int) -> dict[int, int]:
    """The parameters of the server's first SETTINGS frame (RFC 9113 6.5.1)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(HELLO)
        data = b""
        while len(data) < 9 or len(data) < 9 + int.from_bytes(data[:3], "big"):
            data += sock.recv(65536)
    assert data[3] == 4, data[:9]  # SETTINGS
    payload = data[9 : 9 + int.from_bytes(data[:3], "big")]
    return {
        int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
        for i in range(0, len(payload), 6)
    }


def raise_open_files(needed: int) -> None:
    """Raise this process's open-file limit (the server subprocess inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def server_connections(port: int) -> int:
    """ESTABLISHED TCP connections whose local port is `port` (the server's side)."""
    return len(tcp_sockets(port, ESTABLISHED))


def latencies_ms(client: Client, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        assert client.predict("tiny", TINY).version == 1
        out.append((time.perf_counter() - started) * 1000)
    return out


def summary(values: Sequence[float]) -> str:
    q = np.percentile(np.asarray(values), [50, 99])
    return f"p50 {q[0]:.2f} ms, p99 {q[1]:.2f} ms, max {max(values):.2f} ms"


def vm_rss_mb(proc: ServerProcess) -> float:
    assert proc.proc is not None
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------ idle and slow clients

IDLE = 2000  # half connect and say nothing, half send the HTTP/2 preface and settings
SLOW = 200  # each starts a Predict call and never finishes sending it


def test_idle_and_slow_connections_do_not_starve_a_normal_client(tiny_repo: Path) -> None:
    raise_open_files(2 * (IDLE + SLOW) + 1024)  # both ends of each connection live here
    # gRPC's handshake timeout (120 s) instead of ours (10 s), so that the silent connections
    # are all still there while we measure, however slow the machine.
    proc = ServerProcess(tiny_repo, ["--handshake-timeout-s", "120"]).start()
    socks: list[socket.socket] = []
    try:
        with Client(proc.target) as client:
            latencies_ms(client, 50)  # warm
            baseline = latencies_ms(client, 300)
            rss_before = vm_rss_mb(proc)
            before = server_connections(proc.port)
            for i in range(IDLE + SLOW):
                sock = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
                socks.append(sock)
                if i >= IDLE:
                    sock.sendall(HELLO + half_sent_call())
                elif i % 2:
                    sock.sendall(HELLO)
            wait_for(
                "the server to accept every connection",
                lambda: server_connections(proc.port) >= before + IDLE + SLOW,
                interval=0.02,
            )
            loaded = latencies_ms(client, 300)
            with Client(proc.target) as fresh:  # a new connection is still taken in
                fresh_ms = latencies_ms(fresh, 50)
            rss_after = vm_rss_mb(proc)
            # The half-sent calls never reach a handler: nothing is held for them there.
            assert metric(proc, "cnnserve_inflight_requests", method="Predict") == 0
            assert predicts(proc, "OK") == 50 + 300 + 300 + 50
    finally:
        for sock in socks:
            sock.close()
        code = proc.stop()
    print(
        f"\nnormal client alone: {summary(baseline)}"
        f"\nwith {IDLE} idle and {SLOW} half-sent connections open: {summary(loaded)}"
        f"\na new client meanwhile: {summary(fresh_ms)}"
        f"\nserver RSS {rss_before:.0f} -> {rss_after:.0f} MiB "
        f"({(rss_after - rss_before) * 1024 / (IDLE + SLOW):.1f} KiB a connection)"
    )
    assert code == 0, proc.logs()
    assert statistics.median(loaded) < 1000, summary(loaded)  # a sanity bound, not a target
    assert "Traceback" not in proc.logs()


def test_silent_idle_and_unresponsive_connections_are_closed(tiny_repo: Path) -> None:
    """A connection that never says anything is dropped at the handshake timeout; one that
    says hello and holds no call at the idle timeout; one that holds a half-sent call and does
    not answer pings when the keepalive ping goes unanswered. Clients that behave reconnect."""
    args = ["--handshake-timeout-s", "1", "--max-connection-idle-s", "1"]
    args += ["--keepalive-time-s", "1", "--keepalive-timeout-s", "1"]
    with ServerProcess(tiny_repo, args) as proc, Client(proc.target) as client:
        assert client.predict("tiny", TINY).version == 1
        silent = socket.create_connection(("127.0.0.1", proc.port))
        idle = socket.create_connection(("127.0.0.1", proc.port))
        idle.sendall(HELLO)
        slow = socket.create_connection(("127.0.0.1", proc.port))
        slow.sendall(HELLO + half_sent_call())
        with silent, idle, slow:
            for name, sock in (("silent", silent), ("idle", idle), ("slow", slow)):
                closed = wait_closed(sock, 20)
                assert closed.after_s is not None, f"{name}: still open ({closed.frames})"
                assert GOAWAY in closed.frames, (name, closed.frames)
        time.sleep(1.5)  # our client's own connection has been idle: closed, then re-made
        assert client.predict("tiny", TINY).version == 1
    assert proc.proc is not None and proc.proc.returncode == 0


def test_connections_past_max_connections_are_closed_at_once(tiny_repo: Path) -> None:
    with ServerProcess(tiny_repo, ["--max-connections", "4"]) as proc:
        streams = Settings().max_concurrent_streams
        assert server_settings(proc.port)[3] == streams  # SETTINGS_MAX_CONCURRENT_STREAMS
        # Open connections until one is refused: at most 4 are held (fewer when a connection of
        # the start-up probes has not been noticed closed yet), and the next is closed at once,
        # before the server has sent it anything.
        held: list[socket.socket] = []
        for _ in range(6):
            sock = socket.create_connection(("127.0.0.1", proc.port))
            sock.sendall(HELLO)
            sock.settimeout(5)
            try:
                head = sock.recv(9)
            except TimeoutError:
                head = b"?"
            if head == b"":  # closed without a frame
                sock.close()
                break
            assert len(head) == 9 and head[3] == 4, head  # SETTINGS: accepted
            held.append(sock)
        else:
            raise AssertionError("6 connections held under --max-connections 4")
        assert 1 <= len(held) <= 4
        held.pop().close()
        time.sleep(0.3)
        with Client(proc.target, timeout=10) as client:
            assert client.predict("tiny", TINY).version == 1
        for sock in held:
            sock.close()


# ------------------------------------------------------------------ replicas (headless Service)

AGE_S = 2.0  # --max-connection-age-s of the replicas: connections recycled all along


@dataclass
class Replica(ServerProcess):
    """One server bound to its own loopback address, as one pod behind a headless Service."""

    host: str = "127.0.0.1"

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def predicts(self, code: str = "OK") -> float:
        return predicts(self, code, self.host)


def replica(
    repo: Path, host: str, port: int, metrics_port: int, log_dir: Path, *args: str
) -> Replica:
    return Replica(
        repo,
        ["--host", host, "--max-connection-age-s", str(AGE_S), "--grace-seconds", "5", *args],
        port=port,
        metrics_port=metrics_port,
        log_path=log_dir / f"replica-{host}.log",
        host=host,
    )


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses with a socket listening on `port` (gRPC listens on IPv4-mapped IPv6
    addresses: the last 32 bits of the IPv6 ones)."""
    return {ipv4_of(address) for address in tcp_sockets(port, LISTEN)}


@contextmanager
def replicas(
    repo: Path, hosts: Sequence[str], tmp_path: Path
) -> Iterator[tuple[dict[str, Replica], int, int]]:
    port, metrics_port = free_port(), free_port()
    with ExitStack() as stack:
        started: dict[str, Replica] = {}
        for host in hosts:
            started[host] = replica(repo, host, port, metrics_port, tmp_path)
            stack.callback(started[host].stop)
            started[host].start()
        yield started, port, metrics_port


def ipv4_target(hosts: Sequence[str], port: int) -> str:
    return "ipv4:" + ",".join(f"{h}:{port}" for h in hosts)


def test_health_checked_round_robin_skips_a_replica_that_is_not_serving(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """A replica whose model cannot load (NOT_SERVING): with health checking the client sends
    it nothing; without, the calls it refuses (UNAVAILABLE) are retried on the good one."""
    bad_repo = tmp_path / "bad"
    broken_model(bad_repo, "tiny")
    with replicas(tiny_repo, ["127.0.0.2"], tmp_path) as (started, port, metrics_port):
        bad = replica(bad_repo, "127.0.0.3", port, metrics_port, tmp_path)
        with bad.start(wait_ready=False):
            wait_for("the bad replica's refusal", lambda: "refused" in bad.logs(), interval=0.02)
            good = started["127.0.0.2"]
            target = ipv4_target(["127.0.0.2", "127.0.0.3"], port)
            with Client(target, health_check=True) as checked:
                for _ in range(40):
                    assert checked.predict("tiny", TINY).version == 1
            assert good.predicts() == 40 and bad.predicts("UNAVAILABLE") == 0
            with Client(target) as unchecked:
                for _ in range(40):
                    assert unchecked.predict("tiny", TINY).version == 1
            assert good.predicts() == 80 and bad.predicts("UNAVAILABLE") > 0


def test_round_robin_over_replicas_spreads_calls_and_rides_out_restarts(
    tiny_repo: Path, tmp_path: Path
) -> None:
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    late = "127.0.0.5"  # in the target list from the start, down at first: skipped
    with replicas(tiny_repo, hosts, tmp_path) as (started, port, metrics_port):
        # Each binds its own address only: nothing listens on 127.0.0.1 at that port.
        assert listening_addresses(port) == set(hosts)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

        with Client(ipv4_target([*hosts, late], port), timeout=10) as client:
            wait_for(
                "every replica to take calls",
                lambda: (
                    client.predict("tiny", TINY) and all(r.predicts() > 0 for r in started.values())
                ),
                interval=0.02,
            )
            before = {h: r.predicts() for h, r in started.items()}
            for _ in range(300):
                assert client.predict("tiny", TINY).version == 1
            spread = {h: r.predicts() - before[h] for h, r in started.items()}
            assert sum(spread.values()) == 300
            assert all(80 <= n <= 120 for n in spread.values()), spread  # within +-20 %

            # Under load from 4 threads: one replica stops (SIGTERM), a new one starts.
            stop = threading.Event()
            answered: Counter[str] = Counter()
            failures: list[str] = []

            lock = threading.Lock()

            def hammer() -> None:
                while not stop.is_set():
                    try:
                        client.predict("tiny", TINY)
                        with lock:
                            answered["OK"] += 1
                    except grpc.RpcError as err:
                        failures.append(f"{err.code().name}: {err.details()}")

            threads = [threading.Thread(target=hammer) for _ in range(4)]
            for t in threads:
                t.start()
            try:
                time.sleep(1.0)
                leaving = started["127.0.0.3"]
                leaving.signal(signal.SIGTERM)
                assert leaving.proc is not None and leaving.proc.wait(30) == 0
                time.sleep(1.0)
                newcomer = replica(tiny_repo, late, port, metrics_port, tmp_path)
                try:
                    newcomer.start()
                    ready = time.monotonic()
                    wait_for(
                        "the new replica to take calls",
                        lambda: newcomer.predicts() > 0,
                        timeout=4 * AGE_S,
                        interval=0.02,
                    )
                    took = time.monotonic() - ready
                    time.sleep(1.0)
                    stop.set()
                    for t in threads:
                        t.join(30)
                    after = {h: started[h].predicts() for h in ("127.0.0.2", "127.0.0.4")}
                    late_calls = newcomer.predicts()
                finally:
                    assert newcomer.stop() == 0, newcomer.logs()
            finally:
                stop.set()
                for t in threads:
                    t.join(30)
    print(
        f"\nspread of 300 calls: {spread}; under load {answered['OK']} calls answered, "
        f"{len(failures)} failed; the new replica took calls {took:.2f} s after it was "
        f"SERVING and answered {late_calls:.0f}; the others {after}"
    )
    # The one failure gRPC itself can cause: a call its core accepted in the last moment before
    # the draining replica's server stops (after every call in Python was answered) ends
    # CANCELLED, which is not safe to retry (grpc/grpc#41785). Seen once in ~7,500 calls.
    unexplained = [f for f in failures if f != "CANCELLED: CANCELLED"]
    assert unexplained == [] and len(failures) <= max(1, answered["OK"] // 1000), failures[:5]
    assert answered["OK"] > 100
    assert took < 2 * AGE_S, took
    for proc in started.values():
        assert proc.proc is not None and proc.stop() == 0, proc.logs()
