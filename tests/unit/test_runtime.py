"""serving.core.runtime: a model's contract, the CPU fallback, fixed-size batches, corrupt files and
the session's threads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness import write_tiny_model
from serving.core.runtime import (
    ModelLoadError,
    ModelRuntime,
    RuntimeOptions,
    default_intra_op_threads,
    resolve_providers,
    run_in_fixed_batches,
)


def test_runtime_contract_and_fallback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_tiny_model(tmp_path / "m.onnx")
    rt = ModelRuntime(path, RuntimeOptions(provider="cpu", warmup_batch_sizes=(1, 2, 3)))
    assert rt.info.input_shape == (4, 4, 1) and rt.info.num_classes == 3
    assert rt.info.class_names == ["class0", "class1", "class2"]
    x = np.full((2, 4, 4, 1), 255, np.uint8)
    assert np.array_equal(rt.prepare(x), np.ones((2, 4, 4, 1), np.float32))
    assert rt.run(rt.prepare(x)).shape == (2, 3)
    assert resolve_providers("cuda") == ["CPUExecutionProvider"]
    assert "falling back to cpu" in caplog.text


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 11])
def test_fixed_batches_pad_and_split_without_changing_rows(tmp_path: Path, n: int) -> None:
    """What the CUDA path does (run_in_fixed_batches), checked on the CPU: every run the
    session sees has exactly 4 images, and each caller's row comes back unchanged."""
    rt = ModelRuntime(write_tiny_model(tmp_path / "m.onnx"), RuntimeOptions(provider="cpu"))
    assert rt.fixed_batch == 0  # only CUDA pads
    x = np.random.default_rng(n).random((n, 4, 4, 1), dtype=np.float32)
    seen: list[tuple[int, ...]] = []

    def run(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.shape)
        return rt.run(batch)

    got = run_in_fixed_batches(run, x, 4)
    assert seen == [(4, 4, 4, 1)] * -(-n // 4)
    np.testing.assert_allclose(got, rt.run(x), rtol=0, atol=1e-7)


def test_runtime_refuses_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelLoadError, match=r"bad\.onnx"):
        ModelRuntime(bad, RuntimeOptions())


def test_the_default_session_has_one_thread_per_run(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.onnx")
    rt = ModelRuntime(path, RuntimeOptions(intra_op_threads=default_intra_op_threads(2)))
    assert rt.session.get_session_options().intra_op_num_threads == 1
    assert default_intra_op_threads(1) >= 1
