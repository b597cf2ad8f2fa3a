"""Which asyncio HTTP library the REST API runs on, chosen by measurement (see bench/REST.md).

    PYTHONPATH=$PWD .venv/bin/python bench/rest_libs.py                # every candidate
    PYTHONPATH=$PWD .venv/bin/python bench/rest_libs.py --requests 5000 --libs aiohttp

Each candidate serves the same two routes from a process of its own, on an asyncio loop beside
a grpc.aio server (as the real server would run it):
- `GET /v2/health/ready`: an empty 200, the cheapest answer a library can give;
- `POST /v2/models/m/infer` ("POST json"): a KServe v2 JSON request of one 28x28x1 image (784
  numbers), read whole and parsed with `json.loads`, answered with a JSON body of 10
  probabilities, the same work in every library, so the difference is the library's own;
- the same route with a 100,352-byte body ("POST 100KB", a batch of 32 float32 images as raw
  bytes, Triton's binary extension's size), read whole and answered with the same JSON.

`h2load --h1` (nghttp2's native load generator, HTTP/1.1 with keep-alive) sends `--requests`
requests over 16 connections after a warm-up; server CPU comes from /proc/<pid>/stat (utime +
stime, all threads) over the measured run. Candidates: aiohttp's web server; uvicorn (httptools
parser) with a bare ASGI app; uvicorn with Starlette. The libraries need not be installed in
.venv: `pip install --target DIR ...` and `--path DIR` puts them on the servers' path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import free_port
from harness.process import cpu_seconds

LIBS = ("aiohttp", "uvicorn-asgi", "uvicorn-starlette")
ANSWER = json.dumps(
    {
        "model_name": "m",
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10}
        ],
    }
).encode()


BINARY_BYTES = 32 * 28 * 28 * 1 * 4  # batch 32 of float32, as Triton's binary extension sends


def infer_body() -> bytes:
    data = [(i * 37) % 256 for i in range(784)]
    inputs = [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28, 1], "data": data}]
    return json.dumps({"inputs": inputs}).encode()


def work(body: bytes) -> bytes:
    if body[:1] != b"{":  # the binary route: a JSON header, then raw tensor bytes
        if len(body) != BINARY_BYTES:
            raise ValueError("bad request")
        return ANSWER
    request = json.loads(body)
    if len(request["inputs"][0]["data"]) != 784:
        raise ValueError("bad request")
    return ANSWER


async def with_grpc(serve: Any) -> None:
    """A grpc.aio server on the same loop, as in the real server (no calls reach it)."""
    import grpc

    server = grpc.aio.server()
    server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await serve()


def run_aiohttp(port: int) -> None:
    from aiohttp import web

    async def ready(request: web.Request) -> web.Response:
        return web.Response()

    async def infer(request: web.Request) -> web.Response:
        return web.Response(body=work(await request.read()), content_type="application/json")

    app = web.Application()
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_post("/v2/models/{name}/infer", infer)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(with_grpc(serve))


def run_uvicorn(port: int, starlette: bool) -> None:
    import uvicorn

    app: Any
    if starlette:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        async def ready(request: Request) -> Response:
            return Response()

        async def infer(request: Request) -> Response:
            return Response(work(await request.body()), media_type="application/json")

        app = Starlette(
            routes=[
                Route("/v2/health/ready", ready),
                Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            ]
        )
    else:

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            body = b""
            if scope["method"] == "POST":
                more = True
                while more:
                    message = await receive()
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                out = work(body)
                headers = [(b"content-type", b"application/json")]
            else:
                out, headers = b"", []
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": out})

    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, access_log=False, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    asyncio.run(with_grpc(server.serve))


def h2load(url: str, requests: int, body: Path | None) -> tuple[float, int]:
    cmd = ["h2load", "--h1", "-n", str(requests), "-c", "16", "-t", "1"]
    if body is not None:
        cmd += ["-d", str(body), "-H", "content-type: application/json"]
    done = subprocess.run([*cmd, url], capture_output=True, text=True, check=True)
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", done.stdout)
    ok = re.search(r"status codes: (\d+) 2xx", done.stdout)
    if rate is None or ok is None:
        raise SystemExit(f"cannot read h2load's output:\n{done.stdout}")
    return float(rate.group(1)), int(ok.group(1))


def measure(lib: str, requests: int, path: str, body_file: Path) -> list[dict[str, Any]]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", lib, "--port", str(port)], env=env
    )
    rows = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"{lib} did not start") from None
                time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        binary = body_file.with_suffix(".bin")
        for route, url, body in (
            ("GET ready", f"{base}/v2/health/ready", None),
            ("POST json", f"{base}/v2/models/m/infer", body_file),
            ("POST 100KB", f"{base}/v2/models/m/infer", binary),
        ):
            h2load(url, max(1000, requests // 10), body)  # warm-up
            before = cpu_seconds(proc.pid)
            rate, ok = h2load(url, requests, body)
            cpu = cpu_seconds(proc.pid) - before
            rows.append(
                {
                    "library": lib,
                    "route": route,
                    "req_per_s": rate,
                    "ok": ok,
                    "cpu_us_per_request": cpu / requests * 1e6,
                }
            )
            print(
                f"{lib:18s} {route:11s} {rate:9.0f} req/s  {cpu / requests * 1e6:6.0f} us CPU "
                f"a request  ({ok} of {requests} 2xx)",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=1, help="each library this many times, in turn")
    p.add_argument("--path", default="", help="extra sys.path folder holding the libraries")
    p.add_argument("--serve", choices=LIBS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve == "aiohttp":
        run_aiohttp(a.port)
        return
    if a.serve is not None:
        run_uvicorn(a.port, a.serve == "uvicorn-starlette")
        return
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "infer.json"
        body.write_bytes(infer_body())
        body.with_suffix(".bin").write_bytes(b"\x00" * BINARY_BYTES)
        for _ in range(a.rounds):
            for lib in a.libs:
                measure(lib, a.requests, a.path, body)


if __name__ == "__main__":
    main()
