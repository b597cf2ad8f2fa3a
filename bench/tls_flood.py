"""What a TLS connection on the REST port costs the server: CPU per connection taken in, memory
per connection held, and how long a real HTTPS client waits behind a flood of them.

    .venv/bin/python -m bench.tls_flood [--connections 1500] [--root OTHER_CHECKOUT]

The flood is of half-open handshakes (a ClientHello record announced, 4 bytes of it sent): each
connection is accepted, gets its TLS state and waits for the rest until the handshake deadline
(--handshake-timeout-s, 10 s here, so that all are held while measured). `--root` runs another
checkout's server with this script, for an A/B. Figures go to bench/REST.md; a benchmark, not a
test.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import tempfile
import time
from pathlib import Path

from harness import ROOT, ServerProcess, write_tiny_model
from harness.process import cpu_seconds, proc_status_kib
from harness.tls import server_certificate

HALF_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC])


def https_health(port: int, ca: Path) -> float:
    """Seconds for one HTTPS GET of /v2/health/ready on a new connection (ValueError unless
    it answers 200)."""
    context = ssl.create_default_context(cafile=str(ca))
    started = time.perf_counter()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=60) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        head = tls.recv(64)
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(f"/v2/health/ready answered {head[:40]!r}")
    return time.perf_counter() - started


def flood_once(proc: ServerProcess, connections: int, ca: Path) -> dict[str, float]:
    pid = proc.running.pid
    for _ in range(3):
        https_health(proc.http_port, ca)  # warm: the TLS context, the handler
    rss_before = proc_status_kib(pid, "VmRSS") or 0
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    socks = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", proc.http_port), timeout=30)
        sock.sendall(HALF_HELLO)
        socks.append(sock)
    behind = https_health(proc.http_port, ca)  # queued behind every one of them
    taken = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    rss = (proc_status_kib(pid, "VmRSS") or 0) - rss_before
    for sock in socks:
        sock.close()
    return {
        "cpu_us_per_connection": cpu / connections * 1e6,
        "rss_kib_per_connection": rss / connections,
        "health_behind_flood_s": behind,
        "all_taken_s": taken,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1500, help="half-open handshakes")
    parser.add_argument("--turns", type=int, default=3, help="floods, one after the other")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose server runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_tiny_model(folder / "models" / "tiny" / "1" / "model.onnx")
        tls = server_certificate(folder)
        server_args = [*tls.args(), "--handshake-timeout-s", "10", "--http-header-timeout-s", "10"]
        proc = ServerProcess(folder / "models", server_args, http=True, root=args.root)
        proc.credentials = None  # health over gRPC needs TLS credentials: wait for REST instead
        proc.start(wait_ready=False)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    https_health(proc.http_port, tls.ca)
                    break
                except (OSError, ValueError):  # not listening, or not ready yet
                    proc.running.check_alive()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            print(f"server: {args.root}; {args.connections} half-open TLS connections a turn")
            for turn in range(1, args.turns + 1):
                figures = flood_once(proc, args.connections, tls.ca)
                print(
                    f"turn {turn}: {figures['cpu_us_per_connection']:.0f} µs of server CPU and "
                    f"{figures['rss_kib_per_connection']:.0f} KiB of RSS a connection; HTTPS "
                    f"health behind the flood {figures['health_behind_flood_s'] * 1000:.0f} ms "
                    f"(all taken in {figures['all_taken_s']:.2f} s)",
                    flush=True,
                )
                time.sleep(11)  # the handshake deadline closes the last turn's leftovers
        finally:
            proc.stop()


if __name__ == "__main__":
    main()
