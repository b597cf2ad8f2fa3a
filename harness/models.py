"""Real models for tests and benchmarks: trained, tiny ONNX graphs, or found in a repository.

The finding (`pick_model`, `newest_version`, `one_model_repository`) is what every benchmark
and hostile-traffic script does before it starts a server, so it is written once, here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


class NoModel(SystemExit):
    """The repository lacks the model (or a version of it) a script was asked to use."""


def pick_model(models: Path, wanted: str | None, prefer: str = "mnist") -> str:
    """`wanted`, which must be in the repository; else `prefer` when it is there, else the
    first model by name."""
    names = (
        sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith("."))
        if models.is_dir()
        else []
    )
    if wanted:
        if wanted not in names:
            raise NoModel(f"no model {wanted!r} in {models} (found {', '.join(names) or 'none'})")
        return wanted
    if not names:
        raise NoModel(f"no models in {models}: train one first (make train)")
    return prefer if prefer in names else names[0]


def newest_version(models: Path, model: str) -> Path:
    """The model.onnx of `model`'s highest version: the one a server over `models` serves
    when no rollout policy says otherwise."""
    folder = models / model
    versions = [int(p.name) for p in folder.glob("[0-9]*") if p.name.isdigit()]
    if not versions:
        raise NoModel(f"{folder}: no model versions (train one first: make train)")
    return folder / str(max(versions)) / "model.onnx"


@contextmanager
def one_model_repository(models: Path, model: str) -> Iterator[Path]:
    """A temporary repository holding only `model` (a link to its folder in `models`)."""
    with tempfile.TemporaryDirectory(prefix="cnnserve-") as tmp:
        repo = Path(tmp) / "models"
        repo.mkdir()
        (repo / model).symlink_to((models / model).resolve())
        yield repo


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


def write_tiny_cnn(
    path: Path,
    *,
    h: int = 9,
    w: int = 9,
    c: int = 2,
    filters: int = 3,
    conv: tuple[int, int, str | tuple[int, int, int, int]] = (3, 1, (0, 0, 0, 0)),
    pool: tuple[int, int, str | tuple[int, int, int, int]] = (2, 2, (0, 0, 0, 0)),
    classes: int = 3,
    seed: int = 0,
) -> Path:
    """A small real CNN laid out as tf2onnx lays out Keras's: NHWC in, a transpose to NCHW,
    Conv + Relu, MaxPool, back to NHWC, Flatten, Dense + Softmax. `conv` and `pool` are
    (kernel, stride, pads [top, left, bottom, right] or an auto_pad such as "SAME_UPPER")."""
    import json

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def spatial(size: int, kernel: int, stride: int, pads: str | tuple[int, ...], d: int) -> int:
        if isinstance(pads, str):
            return -(-size // stride)
        return (size - kernel + pads[d] + pads[d + 2]) // stride + 1

    def pad_attrs(pads: str | tuple[int, int, int, int]) -> dict[str, Any]:
        return {"auto_pad": pads} if isinstance(pads, str) else {"pads": list(pads)}

    rng = np.random.default_rng(seed)
    ck, cs, cp = conv
    pk, ps, pp = pool
    oh, ow = spatial(h, ck, cs, cp, 0), spatial(w, ck, cs, cp, 1)
    ph, pw = spatial(oh, pk, ps, pp, 0), spatial(ow, pk, ps, pp, 1)
    kernel = rng.normal(0, 0.5, (filters, c, ck, ck)).astype(np.float32)
    conv_bias = rng.normal(0, 0.1, filters).astype(np.float32)
    dense = rng.normal(0, 0.5, (ph * pw * filters, classes)).astype(np.float32)
    dense_bias = rng.normal(0, 0.1, classes).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], name="Transpose__1", perm=[0, 3, 1, 2]),
        helper.make_node(
            "Conv",
            ["nchw", "K", "KB"],
            ["conv"],
            name="net/conv1_1/BiasAdd",
            kernel_shape=[ck, ck],
            strides=[cs, cs],
            **pad_attrs(cp),
        ),
        helper.make_node("Relu", ["conv"], ["relu"], name="net/conv1_1/Relu"),
        helper.make_node(
            "MaxPool",
            ["relu"],
            ["pool"],
            name="net/pool1_1/MaxPool2d",
            kernel_shape=[pk, pk],
            strides=[ps, ps],
            **pad_attrs(pp),
        ),
        helper.make_node("Transpose", ["pool"], ["nhwc"], name="Transpose__2", perm=[0, 2, 3, 1]),
        helper.make_node("Flatten", ["nhwc"], ["flat"], name="net/flatten_1/Reshape", axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["logits0"], name="net/output_1/MatMul"),
        helper.make_node("Add", ["logits0", "B"], ["logits"], name="net/output_1/BiasAdd"),
        helper.make_node(
            "Softmax", ["logits"], ["probabilities"], name="net/output_1/Softmax", axis=-1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", h, w, c])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        [
            numpy_helper.from_array(kernel, "K"),
            numpy_helper.from_array(conv_bias, "KB"),
            numpy_helper.from_array(dense, "W"),
            numpy_helper.from_array(dense_bias, "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(
        model,
        {"dataset": "tiny", "class_names": json.dumps([f"class{i}" for i in range(classes)])},
    )
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
