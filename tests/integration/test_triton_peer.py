"""bench/triton_peer.py: the Triton peer of `make bench`.

The model repository it writes is checked everywhere. Triton itself is a benchmark peer, not a
test dependency: the end-to-end test runs only where `python -m bench.triton_peer --setup-only`
has already set it up in bench's cache (CI does not), and is skipped elsewhere.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import triton_peer
from bench.loadgen import setup_perf_analyzer
from harness import PYTHON, ROOT, write_tiny_cnn, write_tiny_model


def test_repository_from_the_onnx_file(tmp_path: Path) -> None:
    model = write_tiny_cnn(tmp_path / "src" / "3" / "model.onnx", h=9, w=7, c=2, classes=5)
    repository = tmp_path / "repository"
    spec = triton_peer.write_repository(model, repository, "tiny", version="3", instances=2)
    assert spec.inputs == (triton_peer.TensorSpec("image", "TYPE_FP32", "FP32", (9, 7, 2)),)
    assert [(t.name, t.dims) for t in spec.outputs] == [("probabilities", (5,))]
    config = (repository / "tiny" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 64" in config
    assert '{ name: "image" data_type: TYPE_FP32 dims: [ 9, 7, 2 ] }' in config
    assert '{ name: "probabilities" data_type: TYPE_FP32 dims: [ 5 ] }' in config
    assert "dynamic_batching { max_queue_delay_microseconds: 0 }" in config
    assert "instance_group [ { count: 2 kind: KIND_CPU } ]" in config
    assert (repository / "tiny" / "3" / "model.onnx").read_bytes() == model.read_bytes()
    compile((repository / "tiny" / "3" / "model.py").read_text(), "model.py", "exec")


def needs_triton() -> None:
    if not triton_peer.is_set_up():
        pytest.skip("Triton is not set up (python -m bench.triton_peer --setup-only)")


@pytest.mark.slow
def test_triton_serves_the_model_as_onnx_runtime_does(tmp_path: Path) -> None:
    needs_triton()
    model = write_tiny_cnn(tmp_path / "tiny" / "1" / "model.onnx")
    done = subprocess.run(
        [PYTHON, "-m", "bench.triton_peer", "--model-file", str(model), "--model", "tiny",
         "--instances", "2", "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "answers: gRPC and HTTP agree with in-process ONNX Runtime" in done.stdout
    assert "stopped (exit code 0)" in done.stdout
    # Triton and its two backend stubs, one per model instance
    assert "over 3 processes" in done.stdout, done.stdout


@pytest.mark.slow
def test_bench_smoke_puts_triton_beside_ours(tmp_path: Path) -> None:
    """`make bench` in miniature with Triton: its rows at the issue's points, each with ours
    under the same perf_analyzer, and the ratios in the report."""
    needs_triton()
    if shutil.which("h2load") is None or setup_perf_analyzer()[0] is None:
        pytest.skip("h2load or perf_analyzer is not here")
    models = tmp_path / "models"
    write_tiny_model(models / "tiny" / "1" / "model.onnx")
    out = tmp_path / "out"
    done = subprocess.run(
        # short, but not --smoke's 0.1 s windows: with those perf_analyzer now and then exits
        # with 2 (its stability error, without a message) on a busy machine
        [PYTHON, "bench/serving_bench.py", "--triton", "--duration", "1", "--warmup", "0",
         "--startups", "1", "--workers-compare", "0", "--batch1", "1", "--batch32", "",
         "--stream-batches", "1", "--streams", "1", "--rest", "", "--no-echo",
         "--no-in-process", "--quiet-wait", "0", "--models", str(models), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    warnings = [line for line in done.stdout.splitlines() if line.startswith("WARNING")]
    if any("tritonserver exited" in w for w in warnings):
        # Triton itself died under load (a crash inside tritonserver, seen now and then with
        # its Python backend here); the bench went on without it, as it should. Not ours.
        pytest.skip("Triton crashed during the run: " + " | ".join(warnings)[-500:])
    with (out / "results.csv").open() as f:
        rows = {(r["target"], int(r["batch"]), int(r["concurrency"])): r for r in csv.DictReader(f)}
    report = (out / "report.md").read_text()
    refused: list[str] = []
    for ours, batch, conc in (("v2 pa", 1, 16), ("v2 pa", 32, 4), ("v2 stream", 1, 16),
                              ("rest pa", 1, 16), ("rest pa", 32, 4)):  # fmt: skip
        peer = {"v2 pa": "triton pa", "v2 stream": "triton stream", "rest pa": "triton http"}[ours]
        assert (ours, batch, conc) in rows, "\n".join(warnings)
        if (peer, batch, conc) not in rows:
            # Triton's Python backend now and then fails a point twice on a loaded machine (a
            # perf_analyzer error, or a traceback from its own stub). Not ours to fix: what the
            # bench owes is to go on and say so in the report.
            assert f"{peer} batch {batch} at {conc} failed twice" in report, "\n".join(warnings)
            refused.append(f"{peer} b{batch} c{conc}")
            continue
        mine, theirs = rows[ours, batch, conc], rows[peer, batch, conc]
        assert float(theirs["images_per_s"]) > 0 and float(theirs["server_cpu_us_per_image"]) > 0
        assert float(theirs["mean_batch"]) >= 1, theirs
        ratio = float(mine["images_per_s"]) / float(theirs["images_per_s"])
        assert float(mine["vs_triton"]) == pytest.approx(ratio, rel=1e-3)
    if len(refused) == 5:
        triton_log = (out / "logs" / "triton.log").read_text(errors="replace")[-2000:]
        pytest.skip(f"Triton failed every point: {warnings}\n{triton_log}")
    assert "## Against Triton" in report and "Triton 2.51" in report
    assert "≥ 0.8x Triton's" in report
    if "triton pa b1 c16" not in refused:
        assert "| triton pa | perf_analyzer | 1 | 16 |" in report
