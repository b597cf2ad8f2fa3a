"""`make dashboard-snapshot`: a picture of the Grafana dashboard's key panels from a real run.

Starts the server over a model folder, sends about 20 s of mixed traffic from a changing number
of concurrent clients (good Predict calls of 1..8 images, plus calls that fail on purpose: an
unknown model -> NOT_FOUND, images of the wrong shape -> INVALID_ARGUMENT), scrapes /metrics
every second, and draws request rate, errors by code, p50/p95/p99 latency, queue vs compute time,
batch size and in-flight requests with matplotlib, computed the way Prometheus computes
`rate()` and `histogram_quantile()` (deploy/grafana/dashboards/cnnserve.json has the queries).

    python scripts/dashboard_snapshot.py --models-dir models --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from harness import ServerProcess
from harness.scrape import Scrape
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent

Labels = tuple[tuple[str, str], ...]
Sample = dict[tuple[str, Labels], float]


# ------------------------------------------------------------------ load


@dataclass(frozen=True)
class Model:
    name: str
    shape: tuple[int, int, int]  # H, W, C


def concurrency_at(fraction: float, top: int) -> int:
    """A load that changes, so the panels show something: 1 client, ramp up, peak, settle."""
    for until, share in ((0.2, 0.125), (0.45, 0.5), (0.75, 1.0), (1.01, 0.25)):
        if fraction < until:
            return max(1, round(top * share))
    return 1


def error_share_at(fraction: float) -> float:
    """A few percent of calls fail on purpose, with a burst in the middle of the run."""
    return 0.3 if 0.55 <= fraction < 0.65 else 0.05


class Load:
    def __init__(self, target: str, models: list[Model], seconds: float, clients: int) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.CnnServeStub(self.channel)  # type: ignore[no-untyped-call]
        self.models, self.seconds, self.clients = models, seconds, clients
        self.codes: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.started = 0.0

    def _call(self, rng: np.random.Generator, fraction: float) -> str:
        model = self.models[int(rng.integers(len(self.models)))]
        n = int(rng.integers(1, 9))
        shape = model.shape
        name = model.name
        if rng.random() < error_share_at(fraction):
            if rng.random() < 0.5:
                name = "no-such-model"
            else:
                shape = (shape[0] + 4, shape[1], shape[2])
        images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        tensor = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=images.shape, data=images.tobytes())
        try:
            self.stub.Predict(pb.PredictRequest(model=name, images=tensor, top_k=3), timeout=30)
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return "OK"

    def _client(self, index: int) -> None:
        rng = np.random.default_rng(index)
        while (elapsed := time.monotonic() - self.started) < self.seconds:
            fraction = elapsed / self.seconds
            if index >= concurrency_at(fraction, self.clients):
                time.sleep(0.05)  # this client is idle in this phase of the load
                continue
            code = self._call(rng, fraction)
            with self.lock:
                self.codes[code] += 1

    def run(self) -> dict[str, int]:
        self.started = time.monotonic()
        threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(self.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.channel.close()
        return dict(self.codes)


def discover(target: str) -> list[Model]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.CnnServeStub(channel)  # type: ignore[no-untyped-call]
        names = [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]
        models = []
        for name in names:
            try:
                meta = stub.GetModelMetadata(pb.GetModelMetadataRequest(model=name), timeout=10)
            except grpc.RpcError:
                continue  # no version ready (refused or still loading)
            h, w, c = (int(d) for d in meta.inputs[0].shape[1:])
            models.append(Model(name, (h, w, c)))
    if not models:
        raise SystemExit("no model is ready in the repository")
    return models


# ------------------------------------------------------------------ scraping


class Scraper:
    def __init__(self, url: str, interval: float) -> None:
        self.url, self.interval = url, interval
        self.samples: list[tuple[float, Sample]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = 0.0

    def scrape(self) -> None:
        with urllib.request.urlopen(self.url, timeout=5) as resp:
            scraped = Scrape.parse(resp.read().decode())
        sample: Sample = {
            (s.name, tuple(sorted(s.labels.items()))): float(s.value) for s in scraped.samples
        }
        self.samples.append((time.monotonic() - self.t0, sample))

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.scrape()
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.scrape()


def summed(sample: Sample, name: str, by: tuple[str, ...] = ()) -> dict[tuple[str, ...], float]:
    """`sum by (<by>) (<name>)` over one scrape."""
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for (n, labels), value in sample.items():
        if n == name:
            d = dict(labels)
            out[tuple(d.get(k, "") for k in by)] += value
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative bucket counts {le: count}."""
    les = sorted(buckets)
    if not les or buckets[les[-1]] <= 0:
        return math.nan
    rank = q * buckets[les[-1]]
    prev_le, prev_count = 0.0, 0.0
    for le in les:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


@dataclass
class Series:
    t: list[float]
    values: dict[str, list[float]]


@dataclass(frozen=True)
class Window:
    """Two scrapes `window` apart: what rate() and increase() see."""

    a: Sample
    b: Sample
    seconds: float

    def increase(self, name: str, by: tuple[str, ...] = ()) -> dict[tuple[str, ...], float]:
        before, after = summed(self.a, name, by), summed(self.b, name, by)
        return {k: max(0.0, v - before.get(k, 0.0)) for k, v in after.items()}

    def quantile(self, q: float, histogram: str) -> float:
        """histogram_quantile(q, sum by (le) (rate(<histogram>_bucket[window])))."""
        increase = self.increase(f"{histogram}_bucket", ("le",))
        return histogram_quantile(q, {float(k[0]): v for k, v in increase.items()})


def panel_values(w: Window) -> dict[str, dict[str, float]]:
    """What each panel plots at the end of one window."""
    row: dict[str, dict[str, float]] = defaultdict(dict)
    calls = w.increase("cnnserve_requests_total", ("model", "method", "code"))
    for (model, method, code), n in calls.items():
        key = f"{model} {method}"
        row["requests"][key] = row["requests"].get(key, 0.0) + n / w.seconds
        if code != "OK":
            row["errors"][code] = row["errors"].get(code, 0.0) + n / w.seconds
    for q in (0.5, 0.95, 0.99):
        ms = w.quantile(q, "cnnserve_request_duration_seconds") * 1000
        row["latency"][f"p{round(q * 100)}"] = ms
    for part in ("queue", "compute"):
        for q in (0.5, 0.99):
            ms = w.quantile(q, f"cnnserve_{part}_duration_seconds") * 1000
            row["queue_compute"][f"{part} p{round(q * 100)}"] = ms
    runs = sum(w.increase("cnnserve_batch_size_count").values())
    images = sum(w.increase("cnnserve_batch_size_sum").values())
    row["batch"]["mean"] = images / runs if runs else math.nan
    row["batch"]["p95"] = w.quantile(0.95, "cnnserve_batch_size")
    for (method,), v in summed(w.b, "cnnserve_inflight_requests", ("method",)).items():
        row["inflight"][method] = v
    return row


def rates(samples: list[tuple[float, Sample]], window: int) -> dict[str, Series]:
    """One point per scrape for every panel, rates over `window` scrapes."""
    names = ("requests", "errors", "latency", "queue_compute", "batch", "inflight")
    panels = {k: Series([], defaultdict(list)) for k in names}
    rows = [
        (t1, panel_values(Window(a, b, t1 - t0)))
        for (t0, a), (t1, b) in zip(samples, samples[window:], strict=False)
    ]
    for panel, series in panels.items():
        keys = sorted({k for _, row in rows for k in row[panel]})
        missing = 0.0 if panel in ("requests", "errors") else math.nan
        for t, row in rows:
            series.t.append(t)
            for key in keys:
                series.values[key].append(row[panel].get(key, missing))
    return panels


# ------------------------------------------------------------------ drawing


def draw(panels: dict[str, Series], out: Path, title: str, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = [
        ("requests", "Request rate", "requests / s", False),
        ("errors", "Errors by gRPC code", "requests / s", False),
        ("latency", "Latency p50 / p95 / p99", "ms", False),
        ("queue_compute", "Queue vs compute time", "ms (log scale)", True),
        ("batch", "Batch size", "images per ONNX Runtime run", False),
        ("inflight", "In-flight requests", "RPCs", False),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    styles = {"queue p50": "--", "queue p99": "--", "compute p50": "-", "compute p99": "-"}
    for ax, (key, name, unit, log) in zip(axes.flat, layout, strict=True):
        series = panels[key]
        for label in sorted(series.values):
            values = series.values[label]
            if all(v == 0 or math.isnan(v) for v in values):
                continue  # e.g. the metadata calls made before the load started
            # (matplotlib hides legend labels that start with "_")
            shown = label.replace("_unknown", "unknown model")
            ax.plot(series.t, values, styles.get(label, "-"), lw=2, label=shown)
        ax.set_title(name, fontsize=13, fontweight="bold", loc="left")
        ax.set_ylabel(unit)
        ax.set_xlabel("seconds since the load started")
        ax.grid(True, alpha=0.3)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        if ax.lines:
            ax.legend(fontsize=9, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    p.add_argument("--seconds", type=float, default=20.0, help="how long the load runs")
    p.add_argument("--clients", type=int, default=8, help="most concurrent clients")
    p.add_argument("--scrape-interval", type=float, default=1.0)
    p.add_argument("--window", type=int, default=3, help="scrapes per rate() window")
    args = p.parse_args()
    if not args.models_dir.is_dir():
        print(f"error: {args.models_dir}: no such folder (run `make train`)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(args.models_dir.resolve(), log_path=Path(tmp) / "server.log")
        try:
            server.start(timeout=180.0)
            models = discover(server.target)
            print(f"server on {server.target}, models: {', '.join(m.name for m in models)}")
            scraper = Scraper(
                f"http://127.0.0.1:{server.metrics_port}/metrics", args.scrape_interval
            )
            scraper.start()
            codes = Load(server.target, models, args.seconds, args.clients).run()
            scraper.stop()
        finally:
            server.stop()

    total = sum(codes.values())
    summary = ", ".join(f"{code} {n}" for code, n in sorted(codes.items(), key=lambda kv: -kv[1]))
    print(f"{total} calls in {args.seconds:.0f}s: {summary}")
    panels = rates(scraper.samples, max(1, args.window))
    window_s = args.window * args.scrape_interval
    draw(
        panels,
        args.out,
        f"cnnserve under {args.seconds:.0f} s of mixed load "
        f"({', '.join(m.name for m in models)}; 1 to {args.clients} concurrent clients)",
        f"{total} Predict calls: {summary}. Scraped from /metrics every "
        f"{args.scrape_interval:g} s; rates over {window_s:g} s windows, quantiles as "
        "histogram_quantile() computes them",
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
