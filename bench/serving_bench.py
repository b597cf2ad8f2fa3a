"""Serving benchmark: cnnserve over gRPC against its two limits, measured in one run.

    make bench                                   # or: .venv/bin/python bench/serving_bench.py
    .venv/bin/python bench/serving_bench.py --models models --model mnist --duration 5
    .venv/bin/python bench/serving_bench.py --smoke --out /tmp/bench   # seconds, for the tests

What runs, one after the other (never two at once, so each has the machine to itself):
1. start-up: `python -m serving` over a repository of the one model, timed from process start
   to the health service's SERVING (polled), and its resident memory (VmRSS) once idle;
2. unary calls: the server over the whole models folder, loaded by `h2load` (nghttp2's native
   HTTP/2 load generator, so the client is not the bottleneck) posting pre-encoded gRPC frames
   to our `cnnserve.v1.CnnServe/Predict` and to the Open Inference Protocol's
   `inference.GRPCInferenceService/ModelInfer`: batch 1 at concurrency 1, 4, 16, 64 and batch 32
   at concurrency 1, 4 (concurrency C = C connections with one request in flight each);
3. streams: Triton's `perf_analyzer` (native, C++) on `ModelStreamInfer` with `--streaming`,
   batch 1 and 8 over 1, 16 and 64 streams, one message in flight on each (perf_analyzer opens
   one stream per worker thread and starts min(concurrency, --max-threads) threads, so
   --max-threads is set to the concurrency; the server's cnnserve_inflight_streams gauge,
   sampled during each run, is reported beside it), and the same tool on unary `ModelInfer` at
   the same points, so that streams are compared with unary calls by one load generator;
4. a do-nothing grpc.aio server (bench/echo_server.py) answering the same requests with the
   same response bytes, under the same load from the same tool (h2load for h2load's rows,
   perf_analyzer unary and streaming for perf_analyzer's): the floor of the Python gRPC stack;
5. REST: KServe v2 `POST /v2/models/{name}/infer` on the same server's HTTP/1.1 port, loaded by
   `h2load --h1` (keep-alive, one connection per request in flight) at the points of the gRPC
   h2load rows, with Triton's binary tensor extension (the FP32 tensor's raw bytes after a JSON
   header, as tritonclient.http sends it) and, at batch 1, JSON tensors; against h2load's gRPC
   ModelInfer row at the same point and an aiohttp route of the echo server (the HTTP floor);
6. ONNX Runtime in this process on the same model file, at each batch size: one session with
   the server's thread settings, one single-threaded session per core side by side, and at
   batch 1 one single-threaded session alone; the best is the ceiling the ratios are taken
   against;
7. a real Triton Inference Server (bench/triton_peer.py: Triton 2.51 from the pinned
   nvidia-pytriton wheel, set up once into ~/.cache/cnnserve/triton, the same ONNX file in
   ONNX Runtime inside a Python-backend model, one single-threaded instance per core, dynamic
   batching), its answer checked against ours, under the same perf_analyzer right after ours at
   the issue's points: unary gRPC batch 1 at concurrency 16 and batch 32 at 4, batch 1 over 16
   streams, and KServe v2 over HTTP (`-i http`, binary tensors; our `rest pa` rows) at batch 1
   and 32; our rows get `vs Triton`. On by default (`--no-triton` skips it; with --smoke only
   where it is set up already); where it cannot be set up or started, the benchmark says why
   and goes on without it.

h2load does not read grpc-status trailers, so every run is checked against the server's own
count: `cnnserve_requests_total{code="OK"}` (of the run's method and protocol, grpc or http) must
grow by exactly the number of requests sent, or the benchmark fails; a REST run must also get a
200 for each request and answers of exactly the size of the answer checked before (the same
probabilities as the gRPC answer to the same input); a perf_analyzer run must leave no other
code than OK and at least as many OK answers as it reports (it sends more than it measures). Server CPU comes from
/proc/<pid>/stat (utime + stime, all threads), the load generator's from its rusage. Outputs
(bench/results/ by default): results.csv, report.md, report.png, the server logs, h2load's
per-request logs and perf_analyzer's outputs; `--publish` copies the report and the plot to
bench/REPORT.md and bench/report.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`python bench/serving_bench.py`, as documented):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import bench's siblings

import argparse
import datetime
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from bench import triton_peer
from bench.loadgen import (
    APIS,
    BENCH,
    MODEL_INFER,
    MODEL_STREAM_INFER,
    V2,
    BenchError,
    Call,
    PerfAnalyzer,
    RestAnswer,
    grpc_frame,
    real_response,
    real_rest_response,
    real_stream_response,
    request_bytes,
    rest_request,
    setup_perf_analyzer,
    start_echo,
)
from bench.measure import Options, Runner, in_process, measure_startup, start_server, wait_quiet
from bench.report import (
    ECHO_TARGETS,
    HTTP_PA_TARGETS,
    PA_TARGETS,
    REST_KINDS,
    REST_TARGETS,
    TRITON_PEERS,
    TRITON_POINTS,
    TRITON_TARGETS,
    Point,
    Report,
    add_ratios,
    loadavg,
    ordered,
    plot,
    write_csv,
    write_report,
)
from harness import ROOT, Child, NoModel, ProcessFailed, free_port, newest_version, pick_model
from harness.process import STEAL_WARNING, add_max_steal, cpu_times, stolen_share, too_stolen
from serving import config
from serving.core.runtime import ModelRuntime, RuntimeOptions
from serving.pb.inference import grpc_predict_v2_pb2 as v2


def publish(out: Path, dest: Path, stolen: float, max_steal: float) -> tuple[bool, str]:
    """Copy the run's report.md and report.png into `dest`, unless more than `max_steal` of the
    CPU time was stolen during it; whether it did, and what was done in a line."""
    if why := too_stolen(stolen, max_steal):
        return False, f"not published: {why}; the report stays in {out}"
    shutil.copy(out / "report.md", dest / "REPORT.md")
    if (out / "report.png").exists():
        shutil.copy(out / "report.png", dest / "report.png")
    return True, f"published {dest / 'REPORT.md'} and {dest / 'report.png'}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except (NoModel, ProcessFailed) as exc:  # harness's, said as the benchmark's failure
        raise BenchError(str(exc)) from None


def start_triton(
    install: triton_peer.TritonInstall,
    *,
    model_path: Path,
    model: str,
    version: str,
    ours: str,
    request: bytes,
    out: Path,
    instances: int,
    report: Report,
) -> tuple[triton_peer.TritonServer | None, str]:
    """Triton over a repository of the same ONNX file (bench/triton_peer.py), ready, and its
    gRPC answer to `request` checked against our server's (at `ours`): the same argmax, values
    within 1e-5. (None, why) when it cannot be started or answers otherwise."""
    repository = out / "triton-repository"
    shutil.rmtree(repository, ignore_errors=True)
    server: triton_peer.TritonServer | None = None
    try:
        triton_peer.write_repository(
            model_path, repository, model, version=version, instances=instances
        )
        server = triton_peer.TritonServer(install, repository, out / "logs" / "triton.log")
        ready = server.start().wait_ready(model)
        got, want = (
            np.frombuffer(
                v2.ModelInferResponse.FromString(
                    real_response(target, MODEL_INFER, request)
                ).raw_output_contents[0],
                dtype="<f4",
            )
            for target in (server.grpc_target, ours)
        )
        if (
            got.shape != want.shape
            or not np.array_equal(got.reshape(2, -1).argmax(1), want.reshape(2, -1).argmax(1))
            or float(np.max(np.abs(got - want))) >= 1e-5
        ):
            raise triton_peer.TritonError(f"its answer differs from ours: {got} against {want}")
    except (triton_peer.TritonError, BenchError, OSError) as exc:
        if server is not None:
            server.stop()
        return None, f"Triton did not start or answer right: {exc}"
    config = (repository / model / "config.pbtxt").read_text()
    count = re.search(r"count: (\d+)", config)
    report.settings["triton"] = (
        f"Triton {server.version()} from the nvidia-pytriton=={triton_peer.PYTRITON_VERSION} "
        "wheel (bench/triton_peer.py), no ONNX Runtime backend there: the same ONNX file in "
        f"ONNX Runtime inside a Python-backend model, {count.group(1) if count else '?'} model "
        "instances (one backend stub process each, ONNX Runtime single-threaded in each, every "
        "request of an execute() call in one run), dynamic batching (max batch "
        f"{triton_peer.MAX_BATCH_SIZE}, no delay); ready in {ready:.1f} s, idle "
        f"{server.memory_mb():.0f} MB RSS over its {len(server.tree())} processes; its answer "
        "checked against ours before the runs. Its CPU: Triton's process and its stubs."
    )
    print(f"Triton {server.version()}: gRPC {server.grpc_target}, HTTP {server.http_target}",
          flush=True)  # fmt: skip
    return server, ""


def run(argv: Sequence[str] | None) -> int:
    default_models = (
        Path("/tmp/shared-models") if Path("/tmp/shared-models").is_dir() else Path("models")
    )
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models",
        type=Path,
        default=default_models,
        help=f"model repository to serve (default {default_models})",
    )
    p.add_argument("--model", help="model to load (default: mnist when present, else the first)")
    p.add_argument("--apis", default="cnnserve,v2", help="comma-separated: cnnserve, v2")
    p.add_argument(
        "--duration",
        type=float,
        default=4.0,
        help="seconds per measured point (the default run takes about 4.5 minutes)",
    )
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per point")
    p.add_argument("--batch1", default="1,4,16,64", help="concurrencies at batch 1")
    p.add_argument("--batch32", default="1,4", help="concurrencies at batch 32")
    p.add_argument(
        "--stream-batches",
        default="1,8",
        help="batch sizes of perf_analyzer's rows (streams and unary; empty: none)",
    )
    p.add_argument(
        "--streams",
        default="1,16,64",
        help="perf_analyzer's concurrencies: streams (one message in flight on each), and "
        "unary calls in flight",
    )
    p.add_argument(
        "--no-perf-analyzer", action="store_true", help="skip perf_analyzer's rows (streams)"
    )
    p.add_argument(
        "--triton",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a real Triton (bench/triton_peer.py, set up once into ~/.cache/cnnserve/triton) "
        "under the same perf_analyzer at the issue's points, for the `vs Triton` ratios "
        "(default: on; with --smoke only where it is set up already); if it cannot be set up "
        "or started, the benchmark says why and goes on without it",
    )
    p.add_argument(
        "--triton-instances", type=int, default=0, help="Triton's model instances (0: a core each)"
    )
    p.add_argument("--startups", type=int, default=3, help="start-up measurements")
    p.add_argument("--server-args", default="", help="extra flags for python -m serving")
    p.add_argument(
        "--rest",
        default="binary,json",
        help="REST rows (h2load --h1, the batch sizes and concurrencies of the gRPC rows): "
        "binary (Triton's binary tensor extension), json (JSON tensors, batch 1 only); empty: none",
    )
    p.add_argument("--no-echo", action="store_true", help="skip the echo server")
    p.add_argument(
        "--workers-compare",
        type=int,
        default=2,
        metavar="N",
        help="also measure our API with --workers N (0: skip)",
    )
    p.add_argument("--no-in-process", action="store_true", help="skip in-process ORT")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="also measure the server with these extra flags, point by point beside the "
        "default one (an A/B in one run), e.g. runs2='--concurrent-runs 2'",
    )
    p.add_argument(
        "--server-root",
        type=Path,
        default=ROOT,
        help="folder whose serving/ package runs (A/B against another checkout)",
    )
    p.add_argument("--out", type=Path, default=BENCH / "results")
    p.add_argument(
        "--publish",
        action="store_true",
        help="copy report.md and report.png to bench/REPORT.md and bench/report.png (not when "
        "more than --max-steal of the CPU time was stolen during the run)",
    )
    add_max_steal(p)
    p.add_argument(
        "--quiet-load",
        type=float,
        default=1.5,
        help="wait for the 1-minute load average to fall below this ...",
    )
    p.add_argument(
        "--quiet-wait", type=float, default=0.0, help="... for at most this many seconds"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a few short points only: checks the tooling, measures nothing",
    )
    args = p.parse_args(argv)  # fmt: skip

    if shutil.which("h2load") is None:
        raise BenchError("h2load not found: apt-get install nghttp2-client")
    if args.smoke:
        args.duration, args.warmup, args.startups, args.workers_compare = 0.3, 0.0, 1, 0
        args.batch1, args.batch32 = "1,4", "1"
        args.stream_batches, args.streams = "1", "4"
    apis = [a for a in args.apis.split(",") if a]
    if unknown := set(apis) - set(APIS):
        raise BenchError(f"unknown API(s) {sorted(unknown)}; choose from {', '.join(APIS)}")
    if not apis:
        raise BenchError("--apis: at least one gRPC API (the REST rows are compared with it)")
    rest_kinds = [k for k in args.rest.split(",") if k]
    if unknown := set(rest_kinds) - set(REST_KINDS):
        raise BenchError(f"--rest: unknown {sorted(unknown)}; choose from {', '.join(REST_KINDS)}")
    models: Path = args.models.resolve()
    model = pick_model(models, args.model)
    model_path = newest_version(models, model)
    server_args = args.server_args.split()
    settings = config.load([*server_args, "--model-repository", str(models)], environ=os.environ)
    rt_options = RuntimeOptions(
        provider=settings.provider,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        spinning=settings.ort_spinning,
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(Options(args.duration, args.warmup, out))
    batches = {1: [int(c) for c in args.batch1.split(",") if c],
               32: [int(c) for c in args.batch32.split(",") if c]}  # fmt: skip
    pa_batches = [int(b) for b in args.stream_batches.split(",") if b]
    pa_concurrency = [int(c) for c in args.streams.split(",") if c]
    pa: PerfAnalyzer | None = None
    pa_skipped = ""
    if pa_batches and pa_concurrency and not args.no_perf_analyzer:
        pa, pa_skipped = setup_perf_analyzer()
        if pa is None:
            print(f"WARNING: no perf_analyzer rows (streams): {pa_skipped}", flush=True)
    if pa is None:
        pa_batches = []
    triton_install: triton_peer.TritonInstall | None = None
    triton_skipped = ""
    if args.triton is None:
        args.triton = not args.smoke or triton_peer.is_set_up()
    if args.triton and pa is None:
        triton_skipped = "it is measured with perf_analyzer, which is not here"
    elif args.triton:
        try:
            triton_install = triton_peer.setup()
        except triton_peer.TritonError as exc:
            triton_skipped = f"Triton could not be set up: {exc}"
    if triton_skipped:
        print(f"WARNING: no Triton rows: {triton_skipped}", flush=True)
    wait_quiet(args.quiet_load, args.quiet_wait)
    bench_started = time.perf_counter()

    probe = ModelRuntime(model_path, RuntimeOptions(warmup_batch_sizes=()))
    h, w, c = probe.info.input_shape
    input_name = probe.info.input_name
    del probe
    rng = np.random.default_rng(0)
    inputs = {b: rng.random((b, h, w, c), dtype=np.float32) for b in batches if batches[b]}
    zeros = {b: np.zeros((b, h, w, c), dtype=np.float32) for b in pa_batches}
    version = model_path.parent.name
    cpu_model = Path("/proc/cpuinfo").read_text()
    machine = next((ln.split(":", 1)[1].strip() for ln in cpu_model.splitlines()
                    if ln.startswith("model name")), "?")  # fmt: skip
    report = Report(
        started=datetime.datetime.now().isoformat(timespec="seconds"),
        settings={
            "machine": f"{os.cpu_count()} CPUs ({machine})",
            "model": model, "models": str(models), "input_shape": f"{h}x{w}x{c}",
            "request_bytes": ", ".join(f"batch {b}: {n:,} B" for b, n in sorted(
                {**{b: x.nbytes for b, x in inputs.items()},
                 **{b: x.nbytes for b, x in zeros.items()}}.items())),
            "perf_analyzer": pa.version if pa else "",
            "server_args": args.server_args, "intra_op_threads": settings.intra_op_threads,
            "inter_op_threads": settings.inter_op_threads, "batching": "on" if settings.batching else "off",
            "max_batch_size": settings.max_batch_size, "max_queue_delay_ms": settings.max_queue_delay_ms,
            "duration": args.duration,
            "models_served": ", ".join(sorted(q.name for q in models.iterdir() if q.is_dir())),
        },
        loadavg_start=loadavg(),
    )  # fmt: skip
    cpu_start = cpu_times()
    logs = runner.logs
    print(f"model {model} ({model_path}); results in {out}; load average {loadavg()}", flush=True)

    # 1. start-up and idle memory with one model
    if args.startups:
        measure_startup(
            models,
            model,
            server_args,
            repeats=args.startups,
            logs=logs,
            report=report,
            root=args.server_root.resolve(),
        )

    # 2. the server, its worker-process variant and the echo floor, all started at once and
    # measured point by point, one right after the other: a ratio compares figures taken
    # seconds apart, so a machine whose load drifts skews it less.
    responses: dict[tuple[str, int], bytes] = {}
    payloads: dict[tuple[str, int], Path] = {}
    started: list[Child] = []
    http_port = free_port() if rest_kinds or triton_install else 0
    triton: triton_peer.TritonServer | None = None
    try:
        server = start_server(
            models, server_args, logs / "server.log", args.server_root.resolve(),
            http_port=http_port,
        )  # fmt: skip
        proc, port, metrics_port = server.running, server.port, server.metrics_port
        started.append(proc)
        server.wait_health(timeout=120, interval=0.005)
        time.sleep(1.0)
        report.idle_rss_mb = proc.memory_mb()
        for api in apis:
            for batch, x in inputs.items():
                body = request_bytes(api, model, input_name, x)
                payloads[api, batch] = out / f"payload-{api}-b{batch}.bin"
                payloads[api, batch].write_bytes(grpc_frame(body))
                responses[api, batch] = real_response(f"127.0.0.1:{port}", APIS[api], body)
        # target -> (process, what h2load sends it per batch, metrics port)
        targets_at: dict[str, tuple[Child, dict[int, Call], int | None]] = {
            api: (
                proc,
                {b: Call(f"http://127.0.0.1:{port}{APIS[api]}", payloads[api, b]) for b in inputs},
                metrics_port,
            )
            for api in apis
        }
        first = apis[0]
        rest_answers: dict[tuple[str, int], RestAnswer] = {}
        rest_calls: dict[tuple[str, int], Call] = {}
        rest_sizes: list[str] = []
        for batch, x in inputs.items():
            if not rest_kinds:
                break
            infer = v2.ModelInferResponse.FromString(real_response(
                f"127.0.0.1:{port}", MODEL_INFER, request_bytes("v2", model, input_name, x)))  # fmt: skip
            expected = np.frombuffer(infer.raw_output_contents[0], dtype="<f4")
            for kind in rest_kinds:
                if kind == "json" and batch != 1:
                    continue
                body, headers = rest_request(kind, input_name, x)
                file = out / f"payload-rest-{kind}-b{batch}.bin"
                file.write_bytes(body)
                url = f"http://127.0.0.1:{http_port}/v2/models/{model}/infer"
                answer = real_rest_response(url, body, headers, expected)
                rest_answers[kind, batch] = answer
                rest_calls[kind, batch] = Call(url, file, headers, True, len(answer.body))
                rest_sizes.append(f"{kind} batch {batch}: {len(body):,} B")
        for kind in rest_kinds:
            calls = {b: c for (k, b), c in rest_calls.items() if k == kind}
            targets_at[REST_KINDS[kind]] = (proc, calls, metrics_port)
        report.settings["rest_request_bytes"] = ", ".join(rest_sizes)
        extra: list[tuple[str, list[str], int, str]] = []  # name, flags, health checks, note
        if args.workers_compare > 1:
            n = args.workers_compare
            extra.append((f"w{n}", ["--workers", str(n)], 4 * n,
                          f"the same server with --workers {n} (processes sharing the port via "
                          "SO_REUSEPORT; h2load's connections spread over them; CPU and memory "
                          "summed over the processes)"))  # fmt: skip
        for variant in args.variant:
            name, _, flags = variant.partition("=")
            extra.append((name, flags.split(), 1, f"the same server with `{flags}`"))
        for name, flags, checks, note in extra:
            variant_server = start_server(
                models,
                [*server_args, *flags],
                logs / f"server-{name}.log",
                args.server_root.resolve(),
            )
            v_proc, v_port = variant_server.running, variant_server.port
            v_metrics = variant_server.metrics_port
            started.append(v_proc)
            for _ in range(checks):  # fresh connections: with workers, each gets some
                variant_server.wait_health(timeout=120, interval=0.005)
            targets_at[f"{first}-{name}"] = (
                v_proc,
                {b: Call(f"http://127.0.0.1:{v_port}{APIS[first]}", payloads[first, b])
                 for b in inputs},
                v_metrics,
            )  # fmt: skip
            report.notes.append(f"{first}-{name}: {note}")
        target = f"127.0.0.1:{port}"
        pa_unary: dict[str, bytes] = {}
        pa_infer: dict[int, bytes] = {}
        pa_stream: dict[int, bytes] = {}
        if pa is not None:  # what perf_analyzer asks before and while it measures
            pa_unary = {
                V2 + "ServerMetadata": real_response(
                    target, V2 + "ServerMetadata", v2.ServerMetadataRequest().SerializeToString()
                ),
                V2 + "ModelMetadata": real_response(
                    target, V2 + "ModelMetadata",
                    v2.ModelMetadataRequest(name=model, version=version).SerializeToString(),
                ),
                V2 + "ModelConfig": real_response(
                    target, V2 + "ModelConfig",
                    v2.ModelConfigRequest(name=model, version=version).SerializeToString(),
                ),
                V2 + "ModelStatistics": real_response(
                    target, V2 + "ModelStatistics",
                    v2.ModelStatisticsRequest(name=model, version=version).SerializeToString(),
                ),
            }  # fmt: skip
            for batch, x in zeros.items():
                body = request_bytes("v2", model, input_name, x, version=version)
                pa_infer[batch] = real_response(target, MODEL_INFER, body)
                pa_stream[batch] = real_stream_response(target, MODEL_STREAM_INFER, body)
        echo_ports: dict[int, int] = {}
        echo_procs: dict[int, Child] = {}
        # echo target -> what h2load sends it per batch
        echo_calls: dict[str, dict[int, Call]] = {"echo": {}, "echo parse": {}}
        parse_procs: dict[int, Child] = {}  # the parsing echo, per batch (h2load rows only)
        echo_calls.update({REST_TARGETS[REST_KINDS[k]][1]: {} for k in rest_kinds})
        if not args.no_echo:
            for batch in sorted(set(inputs) | set(pa_batches)):
                unary = {**pa_unary, MODEL_INFER: pa_infer[batch]} if batch in pa_infer else {}
                if first == "v2" and batch in inputs:  # h2load posts to ModelInfer too
                    unary.pop(MODEL_INFER, None)
                # one path per kind of REST body, each answered with the real server's answer
                http = {f"/{kind}/v2/models/{model}/infer": answer
                        for (kind, b), answer in rest_answers.items() if b == batch}  # fmt: skip
                echo_http_port = free_port() if http else 0
                echo, echo_port = start_echo(
                    logs,
                    f"b{batch}",
                    response=responses[first, batch] if batch in inputs else None,
                    unary=unary,
                    streams={MODEL_STREAM_INFER: pa_stream[batch]} if batch in pa_stream else {},
                    http=http,
                    http_port=echo_http_port,
                )
                started.append(echo)
                echo_procs[batch] = echo
                echo_ports[batch] = echo_port
                if batch in inputs:
                    url = f"http://127.0.0.1:{echo_port}{APIS[first]}"
                    echo_calls["echo"][batch] = Call(url, payloads[first, batch])
                    parser, parse_port = start_echo(
                        logs,
                        f"b{batch}-parse",
                        unary={APIS[first]: responses[first, batch]},
                        parse=True,
                    )
                    started.append(parser)
                    parse_procs[batch] = parser
                    url = f"http://127.0.0.1:{parse_port}{APIS[first]}"
                    echo_calls["echo parse"][batch] = Call(url, payloads[first, batch])
                for kind in rest_kinds:
                    if (kind, batch) in rest_calls:
                        call = rest_calls[kind, batch]
                        url = f"http://127.0.0.1:{echo_http_port}/{kind}/v2/models/{model}/infer"
                        echo_calls[REST_TARGETS[REST_KINDS[kind]][1]][batch] = Call(
                            url, call.payload, call.headers, True, call.answer_bytes
                        )
            report.notes.append(
                f"echo: bench/echo_server.py answering the {first} request (h2load) and "
                "perf_analyzer's ModelInfer and ModelStreamInfer requests, and its metadata, "
                "config and statistics calls, with the real server's response bytes for each "
                "(same payload both ways), no parsing (a stream's answer gets its request's id "
                "spliced in); one process per batch size. `echo parse`: the same server with "
                "--parse, which parses each request into its message and builds its answer as "
                "a message serialized per call (the floor of a server that reads what it is "
                "sent); h2load's rows only"
            )
        for batch, concs in batches.items():
            for conc in concs:
                for target, (t_proc, calls, t_metrics) in targets_at.items():
                    if batch in calls:
                        report.points.append(
                            runner.load(
                                target,
                                call=calls[batch],
                                batch=batch,
                                concurrency=conc,
                                proc=t_proc,
                                metrics_port=t_metrics,
                            )
                        )
                for echo_target, calls in echo_calls.items():
                    if batch in calls and not args.no_echo:
                        report.points.append(
                            runner.load(
                                echo_target,
                                call=calls[batch],
                                batch=batch,
                                concurrency=conc,
                                proc=(
                                    parse_procs[batch]
                                    if echo_target == "echo parse"
                                    else echo_procs[batch]
                                ),
                                metrics_port=None,
                            )
                        )
        if triton_install is not None:
            x = np.random.default_rng(1).random((2, h, w, c), dtype=np.float32)
            triton, triton_skipped = start_triton(
                triton_install, model_path=model_path, model=model, version=version,
                ours=f"127.0.0.1:{port}",
                request=request_bytes("v2", model, input_name, x, version=version),
                out=out, instances=args.triton_instances, report=report,
            )  # fmt: skip
        pa_targets = [*PA_TARGETS] + ([] if args.no_echo else [e for _, e in PA_TARGETS.values()])

        def pa_point(target: str, batch: int, conc: int) -> Point | None:
            """One perf_analyzer point on the target's server; a Triton point that fails is
            said and left out (None), one of ours fails the benchmark."""
            assert pa is not None
            t_proc: Child | triton_peer.TritonServer
            t_port, t_proc, t_metrics = (
                (echo_ports[batch], echo_procs[batch], None) if target in ECHO_TARGETS
                else (http_port, proc, metrics_port) if target in HTTP_PA_TARGETS
                else (port, proc, metrics_port)
            )  # fmt: skip
            if target in TRITON_TARGETS:
                if triton is None:
                    return None
                t_port = triton.http_port if target in HTTP_PA_TARGETS else triton.grpc_port
                t_proc, t_metrics = triton, None
            for attempt in (1, 2):  # a Triton point that fails is tried once more
                try:
                    point = runner.load_pa(
                        target, pa=pa, port=t_port, model=model, version=version, batch=batch,
                        concurrency=conc, proc=t_proc, metrics_port=t_metrics,
                    )  # fmt: skip
                    report.points.append(point)
                    return point
                except (BenchError, triton_peer.TritonError) as exc:
                    if target not in TRITON_TARGETS:
                        raise
                    why = str(exc).strip()[-1500:]
                    print(f"WARNING: {target} batch {batch} at {conc}, try {attempt}: {why}",
                          flush=True)  # fmt: skip
            report.notes.append(f"{target} batch {batch} at {conc} failed twice: {why}")
            return None

        if pa is not None:
            measured: set[tuple[str, int, int]] = set()
            for batch in pa_batches:
                for conc in pa_concurrency:
                    for pa_target in pa_targets:
                        pa_point(pa_target, batch, conc)
                        measured.add((pa_target, batch, conc))
                        if (pa_target, batch, conc) in TRITON_POINTS:  # Triton right after
                            pa_point(TRITON_PEERS[pa_target], batch, conc)
            if triton is not None:  # the Triton points the grid above left out: ours, Triton's
                for ours, batch, conc in TRITON_POINTS:
                    if (ours, batch, conc) not in measured:
                        pa_point(ours, batch, conc)
                        pa_point(TRITON_PEERS[ours], batch, conc)
        elif pa_skipped:
            report.notes.append(f"no perf_analyzer rows (streams): {pa_skipped}")
        if triton_skipped:
            report.notes.append(f"no Triton rows: {triton_skipped}")
        report.load_rss_mb = max(
            p.rss_mb_max
            for p in report.points
            if p.target in apis or p.target in PA_TARGETS or p.target in REST_TARGETS
        )
        report.load_hwm_mb = proc.memory_mb("VmHWM")
    finally:
        for started_proc in started:
            started_proc.stop()
        if triton is not None:
            triton.stop()

    # 4. ONNX Runtime alone (and the model's INT8 twin, `<model>_int8`, when there is one)
    int8_path = None
    if (models / f"{model}_int8").is_dir():
        int8_path = newest_version(models, f"{model}_int8")
        report.notes.append(
            f"`in-process int8 1t`: the INT8 twin {int8_path} on one thread, beside the FP32 "
            "model's `in-process 1t`"
        )
    if not args.no_in_process:
        seconds = max(args.duration, 0.2)
        cores = os.cpu_count() or 1
        for batch in sorted(set(inputs) | set(pa_batches)):
            x = inputs[batch] if batch in inputs else rng.random((batch, h, w, c), dtype=np.float32)
            for sessions in sorted({1, cores}):
                report.points.append(
                    in_process(model_path, rt_options, x, sessions=sessions, seconds=seconds)
                )
            if batch == 1 or int8_path is not None:  # streaming's yardstick, INT8's
                report.points.append(in_process(model_path, rt_options, x, sessions=1,
                                                seconds=seconds, single_threaded=True))  # fmt: skip
            if int8_path is not None:  # the INT8 twin make train writes, the same way
                report.points.append(in_process(int8_path, rt_options, x, sessions=1,
                                                seconds=seconds, single_threaded=True,
                                                name="in-process int8 1t"))  # fmt: skip

    report.loadavg_end = loadavg()
    report.stolen = stolen_share(cpu_start, cpu_times())
    if report.stolen > STEAL_WARNING:
        warning = (
            f"{report.stolen:.0%} of the CPU time during the run was stolen by the hypervisor: "
            "the figures are lower than this machine's own, and not by the same amount for "
            "every server; take it again on a quiet host before comparing with other runs"
        )
        print(f"warning: {warning}", flush=True)
        report.notes.append(warning)
    report.notes.append(
        f"the whole benchmark took {time.perf_counter() - bench_started:.0f} s "
        f"({args.duration} s per point)"
    )
    report.points = ordered(report.points)
    add_ratios(report.points)
    write_csv(report.points, out / "results.csv")
    (out / "results.json").write_text(json.dumps(asdict(report), indent=1, default=str))
    given = list(argv if argv is not None else sys.argv[1:])
    command = " ".join([".venv/bin/python bench/serving_bench.py", *given])
    try:
        plot(report.points, out / "report.png")
    except ImportError:
        report.notes.append("no plot: matplotlib is not installed")
    markdown = write_report(report, apis, command, out / "report.md")
    print("\n" + markdown)
    if args.publish:
        published, said = publish(out, BENCH, report.stolen, args.max_steal)
        print(said)
        if not published:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
