"""The metrics, proven with real parts: a real Prometheus (Debian's `prometheus` package, run as
our own subprocess, never the system service) scrapes a real server over a really trained model
while real gRPC calls succeed and fail on purpose; `promtool` lints the exposition; every PromQL
expression of the Grafana dashboard runs against that Prometheus."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import ROOT, Scrape, ServerProcess, free_port
from serving.core import rollout
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc
from tests.helpers import wait_for

pytestmark = pytest.mark.slow

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "cnnserve.json"
JOB = "cnnserve"


# ------------------------------------------------------------------ helpers


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def ensure_prometheus() -> tuple[str, str]:
    """The `prometheus` and `promtool` binaries; installs Debian's package when they are missing."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if found[0] and found[1]:
        return found[0], found[1]
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo"):
        prefix = ["sudo", "-n"]
    else:
        pytest.skip("prometheus is not installed, and installing it needs root (apt-get)")
    if not shutil.which("apt-get"):
        pytest.skip("prometheus is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    errors = ""
    for cmd in ([*install], [*prefix, "apt-get", "update", "-q"], [*install]):
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=600, check=False
        )
        errors = done.stderr[-500:]
        if cmd[-1] == "prometheus" and done.returncode == 0:
            break
    found = shutil.which("prometheus"), shutil.which("promtool")
    if not (found[0] and found[1]):
        pytest.skip(f"Debian's prometheus package could not be installed: {errors.strip()}")
    return found[0], found[1]


class PromQLError(AssertionError):
    pass


@dataclass
class Prometheus:
    """A real Prometheus server on a free loopback port, scraping one target every second."""

    binary: str
    workdir: Path
    target: str
    port: int = 0
    proc: subprocess.Popen[str] | None = None
    log_path: Path = field(init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.port = free_port()
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            "    static_configs:\n"
            f"      - targets: ['{self.target}']\n"
        )
        self.log_path = self.workdir / "prometheus.log"
        cmd = [
            self.binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)

        def ready() -> bool | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()}")
            try:
                return True if http_get(f"{self.url}/-/ready", 1.0)[0] == 200 else None
            except OSError:
                return None

        wait_for("prometheus to be ready", ready, timeout, interval=0.2)
        return self

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; PromQLError when Prometheus refuses it."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url)
        reply = json.loads(body)
        if status != 200 or reply.get("status") != "success":
            raise PromQLError(f"{expr!r}: {reply.get('errorType')}: {reply.get('error')}")
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        """The value of a query that yields one series, or None when it yields none."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr!r} gave {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def exposition(server: ServerProcess) -> str:
    status, body = http_get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert status == 200
    return body


def sample_names(text: str) -> set[str]:
    return Scrape.parse(text).names()


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (strings, matchers, ranges and label lists dropped;
    a name followed by `(` is a function or an aggregation)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", s):
        if m.group() in _KEYWORDS or s[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


# ------------------------------------------------------------------ traffic


@dataclass
class Sent:
    """What the test sent, to compare with what Prometheus scraped."""

    calls: dict[tuple[str, str, str, str], int] = field(default_factory=dict)  # labels -> n
    images_ok: int = 0
    ok: int = 0

    def add(self, model: str, version: str, code: grpc.StatusCode, images: int = 0) -> None:
        key = (model, version, "Predict", code.name)
        self.calls[key] = self.calls.get(key, 0) + 1
        if code is grpc.StatusCode.OK:
            self.ok += 1
            self.images_ok += images


def pixels(n: int, shape: tuple[int, int, int] = (28, 28, 1), seed: int = 0) -> pb.Tensor:
    data = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    return pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=data.shape, data=data.tobytes())


def send(stub: pb_grpc.CnnServeStub, sent: Sent, ok: int, not_found: int, invalid: int) -> None:
    """`ok` good Predict calls (concurrent, 1..4 images), `not_found` calls to a model that does
    not exist, `invalid` calls whose images have the wrong shape; every code is checked."""
    futures = []
    for i in range(ok):
        n = 1 + i % 4
        request = pb.PredictRequest(model="fashion", images=pixels(n, seed=i), top_k=3)
        futures.append((n, stub.Predict.future(request, timeout=30)))
    for n, future in futures:
        reply = future.result()
        assert (reply.model, reply.version, len(reply.classifications)) == ("fashion", 1, n)
        sent.add("fashion", "1", grpc.StatusCode.OK, n)
    for model, shape, count, code, labels in (
        ("no-such-model", (28, 28, 1), not_found, grpc.StatusCode.NOT_FOUND, ("_unknown", "")),
        ("fashion", (32, 32, 1), invalid, grpc.StatusCode.INVALID_ARGUMENT, ("fashion", "1")),
    ):
        for _ in range(count):
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(pb.PredictRequest(model=model, images=pixels(1, shape)), timeout=30)
            assert err.value.code() is code, err.value.details()
            sent.add(*labels, code)


def scraped_calls(prom: Prometheus) -> dict[tuple[str, str, str, str], int]:
    result = prom.query(f'cnnserve_requests_total{{job="{JOB}"}}')
    return {
        (
            r["metric"]["model"],
            r["metric"].get("version", ""),  # Prometheus drops empty labels
            r["metric"]["method"],
            r["metric"]["code"],
        ): (int(float(r["value"][1])))
        for r in result
    }


# ------------------------------------------------------------------ fixture


@dataclass
class Stack:
    server: ServerProcess
    prometheus: Prometheus
    promtool: str
    sent: Sent


@pytest.fixture(scope="module")
def stack(trained_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin, promtool = ensure_prometheus()
    # fashion v1 answers; a copy of it, v2, shadows it (the dashboard's rollout panels need a
    # rollout to show). Copies run through v2's batcher only: v1's series count the calls.
    repo = tmp_path_factory.mktemp("stack") / "models"
    for version in ("1", "2"):
        shutil.copytree(trained_repo / "fashion" / "1", repo / "fashion" / version)
    rollout.write(repo / "fashion", rollout.Policy(1, 2, rollout.SHADOW))
    server = ServerProcess(repo, extra_args=["--max-batch-size", "16"])
    server.start(wait_ready=False)  # picks its ports; Prometheus starts while models load
    prom = Prometheus(
        prometheus_bin, tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{server.metrics_port}"
    )
    try:
        prom.start()
        server.wait_health("")
        # Let Prometheus see the server before any call, so rate() has a starting point.
        wait_for(
            "a first scrape of the model state",
            lambda: prom.scalar(
                f'cnnserve_model_state{{job="{JOB}",model="fashion",version="1",state="READY"}}'
            ),
            interval=0.2,
        )
        sent = Sent()
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.CnnServeStub(channel)
            # One of each first: a series Prometheus meets with its final value has rate() 0.
            send(stub, sent, ok=1, not_found=1, invalid=1)
            first = dict(sent.calls)
            wait_for(
                "the first calls in prometheus", lambda: scraped_calls(prom) == first, interval=0.2
            )
            send(stub, sent, ok=40, not_found=7, invalid=5)
        yield Stack(server, prom, promtool, sent)
    finally:
        prom.stop()
        server.stop()


# ------------------------------------------------------------------ tests


def test_request_counters_match_what_was_sent(stack: Stack) -> None:
    prom, sent = stack.prometheus, stack.sent
    wait_for(
        "prometheus to scrape every call", lambda: scraped_calls(prom) == sent.calls, interval=0.2
    )
    assert (
        scraped_calls(prom)
        == sent.calls
        == {
            ("fashion", "1", "Predict", "OK"): 41,
            ("_unknown", "", "Predict", "NOT_FOUND"): 8,
            ("fashion", "1", "Predict", "INVALID_ARGUMENT"): 6,
        }
    )
    by_code = {
        r["metric"]["code"]: float(r["value"][1])
        for r in prom.query(f'sum by (code) (cnnserve_requests_total{{job="{JOB}"}})')
    }
    assert by_code == {"OK": 41, "NOT_FOUND": 8, "INVALID_ARGUMENT": 6}
    # Every image of every good call went through the batcher exactly once.
    j = f'job="{JOB}",model="fashion",version="1"'
    assert prom.scalar(f"sum(cnnserve_batch_size_sum{{{j}}})") == sent.images_ok
    assert prom.scalar(f"sum(cnnserve_queue_duration_seconds_count{{{j}}})") == sent.ok
    runs = prom.scalar(f"sum(cnnserve_compute_duration_seconds_count{{{j}}})")
    # A request may be shared out over several runs (one per free core), never a run per image
    # more than there were images.
    assert runs is not None and 1 <= runs <= sent.images_ok
    assert prom.scalar(f"sum(cnnserve_batch_size_count{{{j}}})") == runs
    assert prom.scalar(f'sum(cnnserve_inflight_requests{{job="{JOB}"}})') == 0


def test_latency_quantiles_are_finite(stack: Stack) -> None:
    prom, sent = stack.prometheus, stack.sent
    wait_for("every call scraped", lambda: scraped_calls(prom) == sent.calls, interval=0.2)
    quantiles = {}
    for q in (0.5, 0.99):
        for metric in ("request", "queue", "compute"):
            expr = (
                f"histogram_quantile({q}, sum by (le) "
                f'(rate(cnnserve_{metric}_duration_seconds_bucket{{job="{JOB}"}}[5m])))'
            )
            value = prom.scalar(expr)
            assert value is not None and math.isfinite(value), (expr, value)
            quantiles[metric, q] = value
    for metric in ("request", "compute"):
        assert 0 < quantiles[metric, 0.5] <= quantiles[metric, 0.99] <= 10.0
    assert 0 <= quantiles["queue", 0.5] <= quantiles["queue", 0.99] <= 10.0


def test_model_state_and_provider(stack: Stack) -> None:
    prom = stack.prometheus
    j = f'job="{JOB}",model="fashion",version="1"'
    states = {
        r["metric"]["state"]: float(r["value"][1])
        for r in prom.query(f"cnnserve_model_state{{{j}}}")
    }
    assert states == {"LOADING": 0, "READY": 1, "FAILED": 0, "UNLOADED": 0}
    info = prom.query(f"cnnserve_model_info{{{j}}}")
    assert [r["metric"]["provider"] for r in info] == ["CPUExecutionProvider"]
    load = prom.scalar(f"cnnserve_model_load_duration_seconds{{{j}}}")
    assert load is not None and load > 0
    loaded_at = prom.scalar(f"cnnserve_model_last_load_timestamp_seconds{{{j}}}")
    assert loaded_at is not None and abs(loaded_at - time.time()) < 3600
    rss = prom.scalar(f'process_resident_memory_bytes{{job="{JOB}"}}')
    assert rss is not None and rss > 10 * 2**20


def test_promtool_accepts_the_exposition(stack: Stack) -> None:
    text = exposition(stack.server)
    assert "cnnserve_requests_total" in text
    done = subprocess.run(
        [stack.promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    # One prefix for everything of ours; the rest is the client library's process/Python set.
    names = {f.name for f in text_string_to_metric_families(text)}
    assert all(n.startswith(("cnnserve_", "process_", "python_")) for n in names), names


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) for every query of every panel, rows included."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            out.extend((panel["title"], t["expr"]) for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name in ("__rate_interval", "__interval", "__range"):
        expr = expr.replace(f"${{{name}}}", "5m").replace(f"${name}", "5m")
    for name, value in variables.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, f"unknown variable in {expr!r}"
    return expr


def test_dashboard_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "cnnserve"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in (
        "Request rate",
        "Errors by gRPC code",
        "Latency p50 / p95 / p99",
        "Queue vs compute time",
        "Batch size",
        "In-flight requests",
        "Model versions by state",
        "Rollout agreement (top-1)",
    ):
        assert wanted in titles
    for panel in dashboard["panels"]:
        sources = [panel.get("datasource"), *(t.get("datasource") for t in panel["targets"])]
        assert all(s == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for s in sources), panel
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_run_on_live_prometheus(stack: Stack) -> None:
    prom, sent = stack.prometheus, stack.sent
    wait_for("every call scraped", lambda: scraped_calls(prom) == sent.calls, interval=0.2)
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = sample_names(exposition(stack.server))
    variables = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            # label_values(metric, label): the metric must be ours, the label one it carries.
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
            assert m, var["definition"]
            assert m[1] in exposed
            values = prom.query(f'count by ({m[2]}) ({m[1]}{{job="{JOB}"}})')
            assert [r["metric"][m[2]] for r in values] == ["fashion"]
            variables[var["name"]] = var.get("allValue") or ".*"
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= exposed, f"{title}: {sorted(names - exposed)} not in our /metrics"
        result = prom.query(substitute(expr, variables))  # raises on any PromQL error
        assert result, f"{title}: {expr!r} returned nothing after the test traffic"


def test_metric_names_parser() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{code!="OK", x=~"$m"}[5m])))'
    ) == {"a_bucket"}
    assert metric_names("sum(rate(a_sum[1m])) / sum(rate(b_count[1m])) or vector(0)") == {
        "a_sum",
        "b_count",
    }
    assert metric_names("rss and on (instance, job) info * 1e3") == {"rss", "info"}
