"""bench/triton_peer.py: the Triton peer of `make bench`.

The model repository it writes is checked everywhere. Triton itself is a benchmark peer, not a
test dependency: the end-to-end test runs only where `python -m bench.triton_peer --setup-only`
has already set it up in bench's cache (CI does not), and is skipped elsewhere.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import triton_peer
from harness import PYTHON, ROOT, write_tiny_cnn


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


@pytest.mark.slow
def test_triton_serves_the_model_as_onnx_runtime_does(tmp_path: Path) -> None:
    if not triton_peer.is_set_up():
        pytest.skip("Triton is not set up (python -m bench.triton_peer --setup-only)")
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
