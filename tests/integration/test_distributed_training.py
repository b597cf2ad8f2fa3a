"""Multi-worker training with TensorFlow's MultiWorkerMirroredStrategy, for real, on loopback:
two workers (`--workers 2`) against one on the same real digits, and the faults: a worker that
never comes, and one that dies during training. Each must fail with a clear message and a
non-zero status, and leave nothing in the model repository."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import onnx
import pytest

from harness import PYTHON, ROOT, free_port, train_model
from training.cluster import tf_config

pytest.importorskip("tensorflow")

SMALL = (
    "--dataset", "mnist", "--epochs", "1", "--train-limit", "2000", "--test-limit", "1000",
    "--batch-size", "16", "--no-download", "--no-int8",
)  # fmt: skip
# How long a worker waits for a peer that never comes; the process limits add TensorFlow's
# start-up, which is what varies from machine to machine.
WORKER_TIMEOUT = 10
STARTUP = 240
# While training, --worker-timeout also bounds every collective step, which a slow or busy
# machine may stretch: the dead-peer test gives it room, as TensorFlow's heartbeats notice a
# killed peer first anyway.
STEP_TIMEOUT = 120


def props(model: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(model)).metadata_props}


def repository_files(models: Path) -> list[str]:
    return sorted(str(p.relative_to(models)) for p in models.rglob("*")) if models.exists() else []


@pytest.mark.slow
def test_two_workers_export_one_model_as_good_as_one_workers(tmp_path: Path) -> None:
    one = train_model(tmp_path / "one", *SMALL)
    cmd = [
        PYTHON,
        "-m",
        "training",
        *SMALL,
        "--models-dir",
        str(tmp_path / "two"),
        "--workers",
        "2",
    ]
    done = subprocess.run(
        [*cmd, "--verbose", "2"], cwd=ROOT, capture_output=True, text=True, timeout=2 * STARTUP,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    # The log names each worker's role; both train, only the chief evaluates and exports.
    assert "[worker 0 (chief)] role: worker 0 of 2 (chief)" in out
    assert "[worker 1] role: worker 1 of 2 (non-chief)" in out
    # Both train the same steps: 1,600 images in global batches of 16 (8 on each worker).
    assert out.count("[worker 0 (chief)] 100/100 - ") == out.count("[worker 1] 100/100 - ") == 1
    assert "[worker 1] done: worker 1 of 2 (non-chief) writes nothing" in out
    assert "[worker 1] exported:" not in out and "[worker 1] test accuracy" not in out
    assert "cluster: all 2 workers finished" in out
    # One model, whole (no staging folder, no second version), from the chief.
    files = repository_files(tmp_path / "two")
    assert files == [
        "mnist", "mnist/1", "mnist/1/curves.png", "mnist/1/history.json",
        "mnist/1/model.onnx", "mnist/1/report.json", "mnist/1/summary.txt",
    ]  # fmt: skip
    two = tmp_path / "two" / "mnist" / "1" / "model.onnx"
    onnx.checker.check_model(str(two))
    assert props(two)["workers"] == "2" and props(one)["workers"] == "1"
    assert props(two)["keras_parameters"] == "93322"
    report = json.loads((two.parent / "report.json").read_text())
    assert report["workers"] == 2 and report["config"]["distributed"] is True
    accuracy_one = float(props(one)["test_accuracy"])
    accuracy_two = float(props(two)["test_accuracy"])
    assert accuracy_one > 0.5 and abs(accuracy_two - accuracy_one) <= 0.03, (
        accuracy_one,
        accuracy_two,
    )


def worker(
    models: Path, addresses: list[str], index: int, *args: str, timeout: float = WORKER_TIMEOUT
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "training", *args, "--models-dir", str(models), "--verbose", "2",
         "--worker-timeout", str(timeout)],
        cwd=ROOT, env={**os.environ, "TF_CONFIG": tf_config(addresses, index)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_a_worker_that_never_comes_fails_the_run(tmp_path: Path) -> None:
    nobody = free_port()  # nothing listens there
    models = tmp_path / "models"
    proc = worker(models, [f"127.0.0.1:{free_port()}", f"127.0.0.1:{nobody}"], 0, *SMALL)
    out, _ = proc.communicate(timeout=STARTUP + WORKER_TIMEOUT)
    assert proc.returncode != 0, out
    assert (
        f"error: worker 0 of 2 (chief): the other workers did not join within {WORKER_TIMEOUT} s"
        in out
    )
    assert f"127.0.0.1:{nobody}" in out and "--worker-timeout" in out
    assert repository_files(models) == []


@pytest.mark.slow
def test_a_worker_that_dies_during_training_fails_the_run(tmp_path: Path) -> None:
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    models = tmp_path / "models"
    longer = [*SMALL, "--epochs", "30", "--early-stopping", "0"]
    chief, other = (worker(models, addresses, i, *longer, timeout=STEP_TIMEOUT) for i in (0, 1))
    try:
        assert other.stdout is not None
        seen = []
        for line in other.stdout:  # until the second epoch: the cluster formed and trains
            seen.append(line)
            if line.startswith("Epoch 2/"):
                break
        assert seen and seen[-1].startswith("Epoch 2/"), "".join(seen)
        other.send_signal(signal.SIGKILL)
        out, _ = chief.communicate(timeout=STARTUP + 2 * STEP_TIMEOUT)
    finally:
        for proc in (chief, other):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert chief.returncode == 1, out
    assert "error: worker 0 of 2 (chief): training stopped, a peer died or stopped answering" in out
    assert repository_files(models) == []
