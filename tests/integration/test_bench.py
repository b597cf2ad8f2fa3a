"""`make bench` in miniature: the tooling runs end to end and its correctness check bites.

Figures are not checked (benchmarks only, no timed assertions): the smoke run measures nothing.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.serving_bench import BenchError, Runner
from tests.support import PYTHON, ROOT, write_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def h2load() -> str:
    path = shutil.which("h2load")
    if path is None:
        pytest.skip("h2load is not installed (apt-get install nghttp2-client; CI installs it)")
    return path


def test_bench_smoke_writes_csv_table_and_plot(h2load: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_tiny_model(models / "tiny" / "1" / "model.onnx")
    out = tmp_path / "out"
    done = subprocess.run(
        [PYTHON, "bench/serving_bench.py", "--smoke", "--models", str(models), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    points = {(r["target"], int(r["batch"]), int(r["concurrency"])) for r in rows}
    for api in ("cnnserve", "v2", "echo"):
        assert {(api, 1, 1), (api, 1, 4), (api, 32, 1)} <= points, points
    assert {("in-process", 1, 1), ("in-process x2", 1, 2), ("in-process", 32, 1)} <= points
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    served = [r for r in rows if r["target"] in ("cnnserve", "v2")]
    assert all(float(r["server_cpu_us_per_image"]) > 0 for r in served)
    assert all(r["vs_in_process"] and r["vs_echo"] for r in served)
    report = (out / "report.md").read_text()
    assert "| target | batch |" in report and "## Targets" in report
    assert "start-up to SERVING" in report and "VmRSS" in report
    assert (out / "report.png").stat().st_size > 10_000


def test_bench_fails_when_the_server_did_not_answer_every_request_ok() -> None:
    url = "http://127.0.0.1:1/cnnserve.v1.CnnServe/Predict"
    Runner._check({("requests", "Predict", "OK"): 100.0}, url, 100)  # all answered OK
    with pytest.raises(BenchError, match="sent 100 requests, the server counted 99"):
        Runner._check({("requests", "Predict", "OK"): 99.0}, url, 100)
    with pytest.raises(BenchError, match="INVALID_ARGUMENT"):
        Runner._check(
            {
                ("requests", "Predict", "OK"): 100.0,
                ("requests", "Predict", "INVALID_ARGUMENT"): 3.0,
            },
            url,
            100,
        )
