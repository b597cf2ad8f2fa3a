"""The INT8 twin on a small real model: it agrees with FP32, its gate refuses a model that
does not, and its speed is measured (TensorFlow needed: the model is trained here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

keras = pytest.importorskip("keras")

from training import datasets  # noqa: E402
from training.config import TrainConfig, parse  # noqa: E402
from training.export import Exported, Int8Request, export  # noqa: E402
from training.quantize import GATE_POINTS, SPEED_BATCHES, Int8Result, Speed  # noqa: E402
from training.train import fit, scale_images  # noqa: E402

META = {"dataset": "mnist", "class_names": json.dumps([str(d) for d in range(10)])}


@pytest.fixture(scope="module")
def digits() -> datasets.Dataset:
    return datasets.subset(datasets.load("mnist", allow_download=False), 3000, 1000, seed=0)


@pytest.fixture(scope="module")
def net(digits: datasets.Dataset) -> Any:
    """Two short epochs on 3,000 real digits: about 94 % on the test subset."""
    config = TrainConfig(epochs=2, batch_size=32, augment=False, verbose=0, early_stopping=0)
    return fit(digits, config).net


def export_with_int8(
    net: Any, digits: datasets.Dataset, folder: Path, calibration: np.ndarray
) -> Exported:
    def report(where: Path, found: dict[str, object]) -> None:
        (where / "report.json").write_text(json.dumps(found))

    return export(
        net,
        models_dir=folder,
        name="digits",
        metadata=META,
        x_check=scale_images(digits.x_test[:500]),
        write_extras=report,
        int8=Int8Request(
            name="digits_int8",
            calibration=calibration,
            x_test=scale_images(digits.x_test),
            y_test=digits.y_test,
        ),
    )


def test_int8_twin_agrees_with_fp32_and_is_described(
    net: Any, digits: datasets.Dataset, tmp_path: Path
) -> None:
    done = export_with_int8(net, digits, tmp_path, scale_images(digits.x_train[:256]))
    assert done.int8_path == tmp_path / "digits_int8" / "1" / "model.onnx"
    onnx.checker.check_model(str(done.int8_path), full_check=True)
    graph = onnx.load(str(done.int8_path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}
    # Agreement measured here, from the two files, on the real test subset.
    x = scale_images(digits.x_test)
    fp32, int8 = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
        for p in (done.path, done.int8_path)
    )
    agreement = float((fp32.argmax(1) == int8.argmax(1)).mean())
    assert agreement >= 0.99, agreement
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["precision"] == "int8" and props["fp32_model"] == "digits/1"
    assert props["name"] == "digits_int8" and props["dataset"] == "mnist"
    assert props["input_layout"] == "NHWC" and props["keras_parameters"] == "93322"
    int8_accuracy = float((int8.argmax(1) == digits.y_test).mean())
    assert float(props["test_accuracy"]) == pytest.approx(int8_accuracy, abs=1e-6)
    for batch in SPEED_BATCHES:
        assert float(props[f"speedup_batch{batch}"]) > 0
    fp32_props = {p.key: p.value for p in onnx.load(str(done.path)).metadata_props}
    assert fp32_props["precision"] == "fp32"
    for folder in (done.path.parent, done.int8_path.parent):
        found = json.loads((folder / "report.json").read_text())["int8"]
        assert found["accepted"] is True and found["model"] == "digits_int8"
        assert [s["batch"] for s in found["speed"]] == list(SPEED_BATCHES)
        assert found["argmax_agreement"] == pytest.approx(agreement, abs=1e-9)


def test_gate_refuses_a_model_calibrated_on_blank_images(
    net: Any, digits: datasets.Dataset, tmp_path: Path
) -> None:
    blank = np.zeros((64, 28, 28, 1), np.float32)
    done = export_with_int8(net, digits, tmp_path, blank)
    assert done.int8 is not None and not done.int8.accepted
    assert done.int8.drop_points > GATE_POINTS
    assert done.int8_path is None and not (tmp_path / "digits_int8").exists()  # nothing written
    assert "the INT8 model is not written" in done.int8.verdict()
    found = json.loads((done.path.parent / "report.json").read_text())["int8"]
    assert found["accepted"] is False and found["model"] is None  # FP32 still written, says why


def test_gate_arithmetic_and_no_int8_flag() -> None:
    def result(fp32: float, int8: float, speedup: float = 1.5) -> Int8Result:
        return Int8Result(onnx.ModelProto(), 512, 10_000, fp32, int8, 1.0, [Speed(1, speedup, 1.0)])

    assert result(0.992, 0.989).accepted  # 0.3 points: at the limit
    assert not result(0.992, 0.9885).accepted
    assert result(0.99, 0.995).accepted  # better is fine
    assert not result(0.99, 0.99, speedup=1.01).gain
    assert parse([]).int8 is True and parse(["--no-int8"]).int8 is False
