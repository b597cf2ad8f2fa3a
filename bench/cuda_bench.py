"""CUDA against CPU, in one run on one machine: in-process ONNX Runtime, then the server.

    make bench-cuda   (on a machine with a GPU and onnxruntime-gpu installed)

In-process: images/s and p50 of `session.run` at each batch size, per provider. Server: the
same model behind `python -m serving --provider cuda|cpu`, driven by gRPC clients in threads of
this process (large batches only: at a few requests per millisecond a Python client is not the
bottleneck, which is what the h2load runs of `make bench` are for at batch 1).
Writes cuda.md and cuda.csv to --out.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from harness import serve_newest
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}


def in_process(model: Path, provider: str, batch: int, seconds: float) -> dict[str, object]:
    session = ort.InferenceSession(str(model), providers=PROVIDERS[provider])
    h, w, c = (int(d) for d in session.get_inputs()[0].shape[1:])
    x = np.random.default_rng(0).random((batch, h, w, c), dtype=np.float32)
    for _ in range(5):
        session.run(None, {"image": x})
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        session.run(None, {"image": x})
        times.append(time.perf_counter() - t)
    return {
        "target": f"in-process {provider}",
        "provider": session.get_providers()[0],
        "batch": batch,
        "concurrency": 1,
        "images_s": batch * len(times) / sum(times),
        "p50_ms": 1e3 * statistics.median(times),
        "p99_ms": 1e3 * float(np.percentile(times, 99)),
    }


def over_grpc(
    target: str, model: str, shape: Sequence[int], *, batch: int, concurrency: int, seconds: float
) -> dict[str, object]:

    x = np.random.default_rng(1).integers(0, 256, (batch, *shape), dtype=np.uint8)
    request = pb.PredictRequest(
        model=model, images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=x.shape, data=x.tobytes())
    )
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stop = threading.Event()

    def caller(i: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.CnnServeStub(channel)
            for _ in range(3):
                stub.Predict(request, timeout=30)
            while not stop.is_set():
                t = time.perf_counter()
                stub.Predict(request, timeout=30)
                latencies[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    flat = [v for per in latencies for v in per]
    return {
        "target": "server",
        "batch": batch,
        "concurrency": concurrency,
        "images_s": batch * len(flat) / seconds,
        "p50_ms": 1e3 * statistics.median(flat),
        "p99_ms": 1e3 * float(np.percentile(flat, 99)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="mnist")
    p.add_argument("--seconds", type=float, default=3.0, help="per measured point")
    p.add_argument("--batches", default="1,32,256,1024", help="in-process batch sizes")
    p.add_argument("--server-points", default="32x1,32x8,256x1,256x8", help="BATCHxCONCURRENCY")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--providers", default="cpu,cuda", help="cpu first: the ratios are to it")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="also measure the CUDA server with these extra flags, e.g. runs2=--concurrent-runs 2",
    )
    args = p.parse_args(argv)
    providers = args.providers.split(",")
    if "cuda" in providers and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"no CUDA here: onnxruntime offers {ort.get_available_providers()}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    files: list[Path] = []
    servers = [(p, ["--provider", p]) for p in providers]
    for variant in args.variant:
        name, _, flags = variant.partition("=")
        servers.append((f"cuda-{name}", ["--provider", "cuda", *flags.split()]))
    for label, flags in servers:
        with serve_newest(args.models, args.model, flags, args.out / f"cuda-{label}.log") as (
            server,
            model_file,
        ):
            files.append(model_file)
            shape = list(ort.InferenceSession(str(model_file)).get_inputs()[0].shape[1:])
            for point in args.server_points.split(","):
                batch, conc = (int(v) for v in point.split("x"))
                row = over_grpc(
                    server.target,
                    args.model,
                    shape,
                    batch=batch,
                    concurrency=conc,
                    seconds=args.seconds,
                )
                row["target"] = f"server {label}"
                rows.append(row)
                print(row, flush=True)
    for provider in providers:
        for batch in (int(b) for b in args.batches.split(",")):
            row = in_process(files[0], provider, batch, args.seconds)
            rows.append(row)
            print(row, flush=True)
    for row in rows:  # each figure against the CPU one of the same kind and point
        kind = str(row["target"]).rsplit(" ", 1)[0]
        base = next(
            r
            for r in rows
            if r["target"] == f"{kind} cpu"
            and (r["batch"], r["concurrency"]) == (row["batch"], row["concurrency"])
        )
        row["vs_cpu"] = float(row["images_s"]) / float(base["images_s"])  # type: ignore[arg-type]
    fields = ["target", "batch", "concurrency", "images_s", "p50_ms", "p99_ms", "vs_cpu"]
    with (args.out / "cuda.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"CUDA against CPU on {os.cpu_count()} CPUs, onnxruntime {ort.__version__}, model "
        f"{args.model}, {args.seconds:g} s per point.",
        "",
        "| target | batch | conc. | images/s | p50 ms | p99 ms | vs CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['batch']} | {r['concurrency']} | {float(r['images_s']):,.0f} "  # type: ignore[arg-type]
            f"| {float(r['p50_ms']):.2f} | {float(r['p99_ms']):.2f} | {float(r['vs_cpu']):.2f}x |"  # type: ignore[arg-type]
        )
    (args.out / "cuda.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
