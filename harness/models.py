"""Real models for tests and benchmarks: trained by our own training code, or tiny ONNX graphs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def train_model(models_dir: Path, *args: str, timeout: float = 600) -> Path:
    """Run `python -m training ...` for real; return the exported model.onnx path."""
    cmd = [PYTHON, "-m", "training", "--models-dir", str(models_dir), "--verbose", "0", *args]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"training failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    for line in done.stdout.splitlines():
        if line.startswith("exported: "):
            return Path(line.removeprefix("exported: ").strip())
    raise AssertionError(f"no exported path in output:\n{done.stdout}")


def copy_repository(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_tiny_model(
    path: Path, *, h: int = 4, w: int = 4, c: int = 1, classes: int = 3, seed: int = 0
) -> Path:
    """A small real ONNX classifier (Flatten -> MatMul + Add -> Softmax) built with onnx helpers,
    for fast unit tests of the serving side. Trained models are used by the integration tests."""
    import json

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 0.5, (h * w * c, classes)).astype(np.float32)
    bias = rng.normal(0, 0.1, classes).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], name="net/flatten/Flatten", axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits0"], name="net/dense/MatMul"),
            helper.make_node("Add", ["logits0", "B"], ["logits"], name="net/dense/BiasAdd"),
            helper.make_node(
                "Softmax", ["logits"], ["probabilities"], name="net/dense/Softmax", axis=-1
            ),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", h, w, c])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(
        model,
        {
            "dataset": "tiny",
            "class_names": json.dumps([f"class{i}" for i in range(classes)]),
            "input_scale": repr(1 / 255),
            "keras_parameters": str(weights.size + bias.size),
        },
    )
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
