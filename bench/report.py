"""The serving benchmark's results: its points, their ratios, and the tables, plot and
report.md written from them."""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from bench.loadgen import APIS

# perf_analyzer's rows: target -> (streaming, the echo target it is compared with)
PA_TARGETS = {"v2 pa": (False, "echo pa"), "v2 stream": (True, "echo stream")}
# REST rows (KServe v2 over HTTP/1.1, h2load --h1): target -> (body kind, its echo target)
REST_TARGETS = {"rest": ("binary", "echo http"), "rest json": ("json", "echo http json")}
REST_KINDS = {kind: target for target, (kind, _) in REST_TARGETS.items()}
H1 = "h2load --h1"  # the REST rows' load generator, as named in the table
# `echo parse`: the echo server with --parse (it reads each request and builds its answer)
ECHO_TARGETS = ("echo", "echo parse", "echo pa", "echo stream", "echo http", "echo http json")
# perf_analyzer's rows against a real Triton (bench/triton_peer.py): our target -> Triton's, at
# the same points under the same perf_analyzer; `rest pa` and `triton http` are `-i http`
TRITON_PEERS = {"v2 pa": "triton pa", "v2 stream": "triton stream", "rest pa": "triton http"}
TRITON_TARGETS = tuple(TRITON_PEERS.values())
HTTP_PA_TARGETS = ("rest pa", "triton http")
# (our target, batch, concurrency) measured against Triton (the issue's points)
TRITON_POINTS = (
    ("v2 pa", 1, 16), ("v2 pa", 32, 4), ("v2 stream", 1, 16), ("rest pa", 1, 16),
    ("rest pa", 32, 4),
)  # fmt: skip


@dataclass
class Point:
    # cnnserve | v2 | <api>-<variant> | echo (h2load, unary); v2 pa | echo pa (perf_analyzer,
    # unary); v2 stream | echo stream (perf_analyzer, ModelStreamInfer); in-process (ORT's
    # threads) | in-process 1t (one single-threaded session) | in-process xN (N such sessions);
    # rest pa (perf_analyzer -i http); triton pa | triton stream | triton http (a real Triton)
    target: str
    batch: int
    concurrency: int  # requests in flight (for streams: streams, one message in flight on each)
    loadgen: str = "-"  # h2load | perf_analyzer | - (in-process)
    streams: float = math.nan  # most streams open at once during the run (the server's gauge)
    connections: float = math.nan  # most TCP connections to the target during the run
    requests: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    mean_batch: float = math.nan  # images per ONNX Runtime run, from the server's histogram
    server_cpu_us_per_image: float = math.nan
    server_cores: float = math.nan  # average CPU cores the server (or in-process ORT) used
    loadgen_cores: float = math.nan
    loadgen_cpu_us_per_request: float = math.nan
    rss_mb_max: float = math.nan
    vs_in_process: float = math.nan
    vs_echo: float = math.nan
    vs_unary: float = math.nan  # stream rows: over perf_analyzer's unary row at the same point
    vs_grpc: float = math.nan  # REST rows: over h2load's gRPC v2 (else cnnserve) row, same point
    vs_triton: float = math.nan  # our perf_analyzer rows: over Triton's row at the same point


@dataclass
class Report:
    started: str
    settings: dict[str, object]
    points: list[Point] = field(default_factory=list)
    startup_s: list[float] = field(default_factory=list)
    idle_rss_one_model_mb: float = math.nan
    idle_rss_mb: float = math.nan
    load_rss_mb: float = math.nan
    load_hwm_mb: float = math.nan
    loadavg_start: str = ""
    loadavg_end: str = ""
    stolen: float = math.nan  # share of the run's CPU time the hypervisor gave elsewhere
    notes: list[str] = field(default_factory=list)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan


def _is_echo(p: Point) -> bool:
    return p.target in ECHO_TARGETS


def _mode(p: Point) -> str:
    return "stream" if p.target.endswith("stream") else "unary"


def ordered(points: list[Point]) -> list[Point]:
    """Table order: h2load's rows (our APIs, the variants, echo; REST, its echo),
    perf_analyzer's (unary, then streams, then HTTP; ours, then echo, then Triton), in-process; then batch and concurrency (the runs themselves are
    interleaved point by point)."""

    def rank(p: Point) -> tuple[int, str, int, int]:
        if p.target.startswith("in-process"):
            kind, name = 9, ""
        elif p.loadgen == "perf_analyzer":  # ours, echo, Triton; gRPC unary, streams, HTTP
            kind = 7 if p.target in TRITON_TARGETS else 5 + _is_echo(p)
            name = "2" if p.target in HTTP_PA_TARGETS else {"unary": "0", "stream": "1"}[_mode(p)]
        elif p.loadgen == H1:
            kind, name = 3 + _is_echo(p), p.target
        elif _is_echo(p):
            kind, name = 2, ""
        elif p.target in APIS:
            kind, name = 0, {"cnnserve": "0", "v2": "1"}[p.target]
        else:
            kind, name = 1, p.target
        return (kind, name, p.batch, p.concurrency)

    return sorted(points, key=rank)


def echo_of(p: Point) -> str | None:
    """The echo target a row is compared with: the same load generator, protocol, kind of
    call and payloads."""
    if _is_echo(p) or p.target.startswith("in-process"):
        return None
    if p.target in PA_TARGETS:
        return PA_TARGETS[p.target][1]
    if p.target in REST_TARGETS:
        return REST_TARGETS[p.target][1]
    return "echo" if p.loadgen == "h2load" else None


def add_ratios(points: list[Point]) -> None:
    ceiling: dict[int, float] = {}
    for p in points:
        if p.target.startswith("in-process"):
            ceiling[p.batch] = max(ceiling.get(p.batch, 0.0), p.images_per_s)
    echo = {(p.target, p.batch, p.concurrency): p.images_per_s for p in points if _is_echo(p)}
    unary = {(p.batch, p.concurrency): p.images_per_s for p in points if p.target == "v2 pa"}
    grpc_api = "v2" if any(p.target == "v2" for p in points) else "cnnserve"
    grpc = {(p.batch, p.concurrency): p.images_per_s for p in points if p.target == grpc_api}
    triton = {(p.target, p.batch, p.concurrency): p.images_per_s for p in points
              if p.target in TRITON_TARGETS and p.images_per_s}  # fmt: skip
    for p in points:
        if p.target.startswith("in-process"):
            continue
        if p.batch in ceiling:
            p.vs_in_process = p.images_per_s / ceiling[p.batch]
        key = (echo_of(p), p.batch, p.concurrency)
        if key in echo:
            p.vs_echo = p.images_per_s / echo[key]
        if p.target == "v2 stream" and (p.batch, p.concurrency) in unary:
            p.vs_unary = p.images_per_s / unary[p.batch, p.concurrency]
        if p.target in REST_TARGETS and (p.batch, p.concurrency) in grpc:
            p.vs_grpc = p.images_per_s / grpc[p.batch, p.concurrency]
        peer = (TRITON_PEERS.get(p.target), p.batch, p.concurrency)
        if peer in triton:
            p.vs_triton = p.images_per_s / triton[peer]


def write_csv(points: list[Point], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f.name for f in fields(Point)])
        for p in points:
            writer.writerow(
                [round(v, 4) if isinstance(v, float) else v for v in asdict(p).values()]
            )


def _fmt(value: float, spec: str, suffix: str = "") -> str:
    return "-" if math.isnan(value) else format(value, spec) + suffix


def markdown_table(points: list[Point]) -> str:
    head = (
        "| target | load gen. | batch | conc. | streams | conn. | images/s | p50 ms | p99 ms | "
        "mean server batch | server CPU µs/image | server cores | load-gen. cores | "
        "load-gen. CPU µs/request | vs in-process | vs echo | vs unary | vs gRPC | vs Triton |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
        "|---:|\n"
    )
    rows = []
    for p in points:
        conc = f"{p.concurrency} sess." if p.target.startswith("in-process") else str(p.concurrency)
        rows.append(
            f"| {p.target} | {p.loadgen} | {p.batch} | {conc} | {_fmt(p.streams, '.0f')} | "
            f"{_fmt(p.connections, '.0f')} | {p.images_per_s:,.0f} | {_fmt(p.p50_ms, '.2f')} | "
            f"{_fmt(p.p99_ms, '.2f')} | {_fmt(p.mean_batch, '.1f')} | "
            f"{_fmt(p.server_cpu_us_per_image, '.0f')} | {_fmt(p.server_cores, '.2f')} | "
            f"{_fmt(p.loadgen_cores, '.2f')} | {_fmt(p.loadgen_cpu_us_per_request, '.0f')} | "
            f"{_fmt(p.vs_in_process * 100, '.0f', '%')} | {_fmt(p.vs_echo * 100, '.0f', '%')} | "
            f"{_fmt(p.vs_unary, '.2f', 'x')} | {_fmt(p.vs_grpc, '.2f', 'x')} | "
            f"{_fmt(p.vs_triton, '.2f', 'x')} |"
        )
    return head + "\n".join(rows) + "\n"


def _find(points: list[Point], target: str, batch: int, conc: int) -> Point | None:
    return next(
        (p for p in points if p.target == target and p.batch == batch and p.concurrency == conc),
        None,
    )


def targets(report: Report, apis: Sequence[str]) -> list[str]:
    """The issue's targets, each as one line: met or not, with the figures of this one run."""
    lines: list[str] = []
    pts = report.points

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    served = [*apis, *sorted({p.target for p in pts if p.loadgen == "h2load"
                               and p.target not in apis and not _is_echo(p)})]  # fmt: skip
    best32 = max((p.images_per_s for p in pts
                  if p.target.startswith("in-process") and p.batch == 32), default=math.nan)  # fmt: skip
    for api in served:
        p = _find(pts, api, 32, 4)
        if p is not None:
            lines.append(
                f"- {api}, unary batch 32 at concurrency 4 ≥ 80% of in-process ONNX Runtime's "
                f"best ({best32:,.0f} images/s): {p.images_per_s:,.0f} images/s = "
                f"{p.vs_in_process:.0%} — {mark(p.vs_in_process >= 0.80)}"
            )
    stream = _find(pts, "v2 stream", 1, 16)
    if stream is not None:
        unary = _find(pts, "v2 pa", 1, 16)
        single = _find(pts, "in-process 1t", 1, 1)
        x_unary = stream.images_per_s / unary.images_per_s if unary else math.nan
        of_single = stream.images_per_s / single.images_per_s if single else math.nan
        ok = x_unary >= 3.0 and of_single >= 0.30 and stream.p99_ms <= 5.0
        lines.append(
            f"- batch 1 over 16 streams (ModelStreamInfer, perf_analyzer; {stream.streams:.0f} "
            "streams seen open) ≥ 3.0x our unary batch 1 at concurrency 16, ≥ 30% of one "
            f"single-threaded in-process session, p99 ≤ 5 ms: {stream.images_per_s:,.0f} "
            f"images/s = {x_unary:.2f}x unary ModelInfer under the same load generator "
            f"({unary.images_per_s if unary else math.nan:,.0f} images/s), "
            f"{of_single:.0%} of one single-threaded session "
            f"({single.images_per_s if single else math.nan:,.0f} images/s), p99 "
            f"{stream.p99_ms:.2f} ms — {mark(ok)}"
        )
        h2 = [(api, q) for api in apis if (q := _find(pts, api, 1, 16)) is not None]
        if h2:
            lines.append(
                "  - against h2load's unary rows at concurrency 16 instead (another load "
                "generator, for reference): "
                + ", ".join(
                    f"{api} {q.images_per_s:,.0f} images/s ({stream.images_per_s / q.images_per_s:.2f}x)"
                    for api, q in h2
                )
            )
    for api in served:
        p = _find(pts, api, 1, 16)
        e = _find(pts, "echo", 1, 16)
        if p is not None and e is not None:
            lines.append(
                f"- {api}, unary batch 1 at concurrency 16 ≥ 70% of the echo server's (h2load "
                f"both): {p.images_per_s:,.0f} against {e.images_per_s:,.0f} images/s = "
                f"{p.vs_echo:.0%} — {mark(p.vs_echo >= 0.70)}"
            )
    floor = _find(pts, "echo parse", 1, 16)
    for api in served:
        p = _find(pts, api, 1, 16)
        if p is not None and floor is not None:
            ratio = p.server_cpu_us_per_image / floor.server_cpu_us_per_image
            lines.append(
                f"- {api}, unary batch 1 at concurrency 16: server CPU per call ≤ 1.4x the parsing "
                f"echo's (h2load both): {p.server_cpu_us_per_image:,.0f} against "
                f"{floor.server_cpu_us_per_image:,.0f} µs = {ratio:.2f}x — {mark(ratio <= 1.4)}"
            )
    p, e = _find(pts, "v2 pa", 1, 16), _find(pts, "echo pa", 1, 16)
    if p is not None and e is not None:
        lines.append(
            "- v2, unary batch 1 at concurrency 16 ≥ 70% of the echo server's (perf_analyzer "
            f"both): {p.images_per_s:,.0f} against {e.images_per_s:,.0f} images/s = "
            f"{p.vs_echo:.0%} — {mark(p.vs_echo >= 0.70)}"
        )
    for ours, batch, conc in TRITON_POINTS:
        goal = TRITON_GOALS.get((ours, batch, conc))
        p = _find(pts, ours, batch, conc)
        if goal is None or p is None or math.isnan(p.vs_triton):
            continue
        lines.append(
            f"- {_describe(ours, batch, conc)} ≥ {goal:.1f}x Triton's (perf_analyzer both): "
            f"{p.images_per_s:,.0f} images/s = {p.vs_triton:.2f}x — {mark(p.vs_triton >= goal)}"
        )
    if report.startup_s:
        s = statistics.median(report.startup_s)
        lines.append(
            f"- ready ≤ 2 s after process start (one model): median {s:.2f} s "
            f"(max {max(report.startup_s):.2f}) — {mark(s <= 2)}"
        )
    if not math.isnan(report.idle_rss_one_model_mb):
        lines.append(
            f"- idle RSS ≤ 200 MB (one model): {report.idle_rss_one_model_mb:.0f} MB — "
            f"{mark(report.idle_rss_one_model_mb <= 200)}"
        )
    return lines


# the issue's targets against Triton: our rate over Triton's at least this
TRITON_GOALS = {("v2 pa", 1, 16): 0.8, ("v2 pa", 32, 4): 1.0, ("v2 stream", 1, 16): 1.2}


def _describe(target: str, batch: int, conc: int) -> str:
    if target.endswith("stream"):
        return f"batch {batch} over {conc} streams (ModelStreamInfer)"
    kind = "REST (-i http)" if target in HTTP_PA_TARGETS else "unary gRPC"
    return f"{kind} batch {batch} at concurrency {conc}"


def triton_lines(report: Report) -> list[str]:
    """Each point measured against Triton, ours beside Triton's, in words."""
    lines = []
    for ours, batch, conc in TRITON_POINTS:
        p = _find(report.points, ours, batch, conc)
        t = _find(report.points, TRITON_PEERS[ours], batch, conc)
        if p is None or t is None:
            continue
        lines.append(
            f"- {_describe(ours, batch, conc)}: cnnserve {p.images_per_s:,.0f} images/s "
            f"({_fmt(p.server_cpu_us_per_image, '.0f')} µs CPU an image, "
            f"{_fmt(p.server_cores, '.2f')} cores, mean batch {_fmt(p.mean_batch, '.1f')}, p99 "
            f"{_fmt(p.p99_ms, '.2f')} ms); Triton {t.images_per_s:,.0f} images/s "
            f"({_fmt(t.server_cpu_us_per_image, '.0f')} µs, {_fmt(t.server_cores, '.2f')} cores, "
            f"mean batch {_fmt(t.mean_batch, '.1f')}, p99 {_fmt(t.p99_ms, '.2f')} ms) = "
            f"{_fmt(p.vs_triton, '.2f', 'x')}"
        )
    return lines


def rest_lines(report: Report) -> list[str]:
    """Each REST row's ratios in words: against gRPC, its echo floor and ONNX Runtime."""
    lines = []
    for p in report.points:
        if p.target not in REST_TARGETS:
            continue
        kind = REST_TARGETS[p.target][0]
        lines.append(
            f"- {kind}, batch {p.batch} at concurrency {p.concurrency}: "
            f"{p.images_per_s:,.0f} images/s = {_fmt(p.vs_grpc, '.2f', 'x')} gRPC ModelInfer, "
            f"{_fmt(p.vs_echo * 100, '.0f', '%')} of `{REST_TARGETS[p.target][1]}`, "
            f"{_fmt(p.vs_in_process * 100, '.0f', '%')} of in-process ONNX Runtime; "
            f"server {_fmt(p.server_cpu_us_per_image, '.0f')} µs CPU an image, p99 "
            f"{_fmt(p.p99_ms, '.2f')} ms"
        )
    return lines


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({p.batch for p in points})
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 4 * len(batches)), squeeze=False)
    styles = {"cnnserve": "o-", "v2": "s-", "echo": "^--", "v2 pa": "s:", "echo pa": "^:",
              "v2 stream": "D-", "echo stream": "v--", "rest": "P-", "echo http": "<--",
              "rest json": "X-", "echo http json": ">--", "rest pa": "P:",
              "triton pa": "*-", "triton stream": "*--", "triton http": "*:"}  # fmt: skip
    styles.update({p.target: "d-." for p in points if "-w" in p.target})
    colors = {t: f"C{i % 10}" for i, t in enumerate(styles)}  # one colour per target throughout
    for row, batch in zip(axes, batches, strict=True):
        for target, style in styles.items():
            series = sorted(
                (p for p in points if p.target == target and p.batch == batch),
                key=lambda p: p.concurrency,
            )
            if not series:
                continue
            conc = [p.concurrency for p in series]
            row[0].plot(conc, [p.images_per_s for p in series], style, label=target,
                        color=colors[target])  # fmt: skip
            row[1].plot(conc, [p.p99_ms for p in series], style, label=target,
                        color=colors[target])  # fmt: skip
        for p in points:
            if p.target.startswith("in-process") and p.batch == batch:
                row[0].axhline(p.images_per_s, linestyle=":", color="grey")
                row[0].annotate(
                    f"{p.target} ({p.images_per_s:,.0f})",
                    (1, p.images_per_s),
                    fontsize=8,
                    color="grey",
                    va="bottom",
                )
        for ax, ylabel in zip(row, ["images/s", "p99 latency (ms)"], strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency (requests in flight; streams: one message each)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"batch {batch}: {ylabel.split(' ')[0]}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        row[0].set_ylim(bottom=0)
        row[1].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: Report, apis: Sequence[str], command: str, path: Path) -> str:
    pts = report.points

    def cores(tool: str) -> str:
        values = [
            p.loadgen_cores for p in pts if p.loadgen == tool and not math.isnan(p.loadgen_cores)
        ]
        return f"{min(values):.2f}..{max(values):.2f}" if values else "-"

    s = report.settings
    rest = rest_lines(report)
    if rest:
        rest = ["## REST (KServe v2 over HTTP/1.1)", "", *rest, ""]
    against = triton_lines(report)
    if against:
        against = ["## Against Triton", "", str(s.get("triton", "")), "", *against, ""]
    text = [
        "# Serving benchmark",
        "",
        f"Run {report.started} on {s['machine']}; load average at start {report.loadavg_start}, "
        f"at end {report.loadavg_end} (the end figure counts this benchmark's own processes); "
        f"CPU time stolen by the hypervisor during the run: {report.stolen:.1%} (/proc/stat). "
        f"Command: `{command}`",
        "",
        f"Model `{s['model']}` ({s['input_shape']}, float32 requests of {s['request_bytes']}) from "
        f"`{s['models']}`; server flags: `{s['server_args'] or '(defaults)'}` "
        f"(intra-op threads {s['intra_op_threads']}, inter-op {s['inter_op_threads']}, batching "
        f"{s['batching']}, max batch {s['max_batch_size']}, max delay {s['max_queue_delay_ms']} ms).",
        "",
        "Load, closed loop, the targets one right after the other at each point:",
        "",
        f"- **h2load** (unary; `cnnserve`, `v2`, their variants, `echo`): one connection per "
        f"request in flight, {s['duration']} s per point after a warm-up; latencies are h2load's "
        "per-request times, end of response included; every run checked against the server's "
        '`cnnserve_requests_total{code="OK"}` (exactly the requests sent). Inputs: uniform '
        "random pixels in [0, 1).",
        f"- **perf_analyzer** {s.get('perf_analyzer', '')} (`v2 pa`, `echo pa`: unary ModelInfer, "
        "synchronous, one thread per call in flight; `v2 stream`, `echo stream`: ModelStreamInfer "
        "with `--streaming --max-threads N` at concurrency N, which is N streams with one message "
        "in flight on each): three measurement windows of "
        f"{s['duration']}/3 s, figures perf_analyzer's own over them (p50/p99 from its per-request "
        "times); zero inputs (its random FP32 bytes include NaN, which the server refuses). "
        "`streams`: the most streams open at once during the run, from the server's "
        '`cnnserve_inflight_streams{method="ModelStreamInfer"}` gauge (the echo server\'s own '
        "count for echo), sampled during the run (once a second); `conn.`: the most TCP connections open to the "
        "target (perf_analyzer's gRPC client puts up to 6 of its clients on one connection; "
        "h2load's rows: its `-c`). Server and load-generator CPU: over the whole perf_analyzer "
        "run, divided by the images (calls) the server counted in it, and cores = that CPU per "
        "image at the windows' rate. Checked: no code but OK in the server's counts, and at least "
        "as many OK answers as perf_analyzer measured.",
        "",
        f"- **h2load --h1** (REST: `rest`, `rest json`, `echo http`, `echo http json`): KServe "
        "v2 `POST /v2/models/{name}/infer` to the same server's REST port (aiohttp, same process "
        "and data plane), HTTP/1.1 keep-alive, one connection per request in flight like the "
        "gRPC rows, same points. `rest`: Triton's binary tensor extension as tritonclient.http "
        "sends it (`application/octet-stream`, `Inference-Header-Content-Length`, a JSON header "
        "then the FP32 tensor's raw bytes, the same bytes as the gRPC rows' tensors; the output "
        "asked back as raw bytes, `binary_data_output`); `rest json`: the tensor as JSON "
        f"numbers, answered as JSON (batch 1 only). Bodies: {s.get('rest_request_bytes') or '-'}. "
        "Checked like the gRPC rows: the server's "
        '`cnnserve_requests_total{method="ModelInfer",code="OK",protocol="http"}` grows by '
        "exactly the requests sent and nothing else moves, h2load counts a 200 for each, and the "
        "answers' bodies add up to exactly the requests times the size of the answer checked "
        "before the run (the same probabilities as the gRPC answer to the same input).",
        "",
        markdown_table(pts),
        "`vs in-process`: images/s over the best in-process ORT figure at the same batch size "
        "(the best of one session with ONNX Runtime's default threads, one single-threaded "
        "session (`in-process 1t`, batch 1), and one single-threaded session per core side by "
        "side). `vs echo`: over the do-nothing grpc.aio server at the same batch and concurrency, "
        "under the same load generator and the same kind of call (h2load unary against h2load "
        "unary, perf_analyzer unary against perf_analyzer unary, streams against streams). "
        "`vs unary`: a stream row over perf_analyzer's unary `v2 pa` row at the same batch and "
        "concurrency. `vs gRPC`: a REST row over h2load's gRPC `v2` (ModelInfer) row at the same "
        "batch and concurrency: the same server, request and answer over HTTP/1.1 and aiohttp "
        "instead of HTTP/2 and grpc.aio. A REST row's `vs echo` is over `echo http` (`echo http "
        "json` for `rest json`): bench/echo_server.py's aiohttp route, on the event loop of its "
        "grpc.aio server as in the real server, reading the whole body and answering with the "
        "real server's answer bytes and headers, under the same h2load --h1 load: the floor of "
        "aiohttp and the loopback on this machine. `server CPU`: the server process's utime + "
        "stime over the run, all threads; for in-process rows, this process's ORT threads. "
        "`vs Triton`: one of our perf_analyzer rows over a real Triton's row at the same point "
        "under the same perf_analyzer (`triton pa`, `triton stream`, `triton http`: see Against "
        "Triton); `rest pa`, `triton http`: perf_analyzer `-i http` (binary tensors), checked "
        "like the gRPC rows (our server's counts with protocol http; Triton's "
        "nv_inference_request_success and _failure, its mean batch from nv_inference_count over "
        "nv_inference_exec_count; Triton's CPU summed over its process and its backend stubs).",
        "",
        *rest,
        *against,
        "## Targets",
        "",
        *targets(report, apis),
        "",
        "## Start-up, memory, load generators",
        "",
        f"- start-up to SERVING, one model, {len(report.startup_s)} starts: "
        + ", ".join(f"{v:.2f} s" for v in report.startup_s),
        f"- VmRSS: one model idle {report.idle_rss_one_model_mb:.0f} MB; the benchmark server "
        f"({s['models_served']}) idle {report.idle_rss_mb:.0f} MB, under load up to "
        f"{report.load_rss_mb:.0f} MB (VmHWM {report.load_hwm_mb:.0f} MB)",
        f"- h2load used {cores('h2load')} CPU cores (one thread; {cores(H1)} with --h1), "
        "perf_analyzer "
        f"{cores('perf_analyzer')} (a thread per call in flight or per stream); their CPU per "
        f"request is in the table. On this {os.cpu_count()}-core machine they share the CPUs "
        "with the server.",
        *[f"- {n}" for n in report.notes],
        "",
        "![throughput and p99 against concurrency](report.png)",
        "",
    ]
    body = "\n".join(text)
    path.write_text(body)
    return body
