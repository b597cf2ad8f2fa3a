"""Keras -> ONNX with tf2onnx, self-describing metadata, and a parity check before writing;
optionally its INT8 twin (training.quantize), written beside it under a name of its own.

Each file is written into a temporary folder and renamed into `models/<name>/<version>/` in
one step, so a watching server never sees half a model and no version is ever overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import onnx

from training.quantize import Int8Result, predict, quantize_and_check, session

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "batch"
PARITY_ATOL = 1e-5
PARITY_MIN_IMAGES = 1000


class ExportError(Exception):
    """The exported graph is invalid or disagrees with Keras; nothing was written."""


@dataclass(frozen=True)
class Parity:
    images: int
    max_abs_diff: float
    argmax_mismatches: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= PARITY_ATOL and self.argmax_mismatches == 0


def to_onnx(model: keras.Model) -> onnx.ModelProto:
    """Convert through a tf.function with a named, batch-dynamic input signature.

    tf2onnx's `from_keras` fails on Keras 3 models; the function route works and lets us
    name the input `image` and the output `probabilities` directly.
    """
    import tensorflow as tf
    import tf2onnx

    h, w, c = (int(d) for d in model.input_shape[1:])
    spec = tf.TensorSpec([None, h, w, c], tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec])  # type: ignore[untyped-decorator]
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT_NAME: model(image, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=[spec], opset=OPSET)
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    names = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ExportError(f"unexpected graph inputs/outputs {names}")
    assert isinstance(proto, onnx.ModelProto)
    return proto


def check_parity(
    model: keras.Model,
    proto: onnx.ModelProto,
    x: npt.NDArray[np.float32],
) -> Parity:
    keras_out = model.predict(x, batch_size=256, verbose=0)
    onnx_out = predict(session(proto), x)
    return Parity(
        images=len(x),
        max_abs_diff=float(np.abs(keras_out - onnx_out).max()),
        argmax_mismatches=int((keras_out.argmax(1) != onnx_out.argmax(1)).sum()),
    )


@dataclass(frozen=True)
class Int8Request:
    """What quantization needs: training images to calibrate on, test images for its gate."""

    name: str  # the INT8 model's name in the repository
    calibration: npt.NDArray[np.float32]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]


@dataclass(frozen=True)
class Exported:
    path: Path
    parity: Parity
    int8: Int8Result | None = None  # None: not asked for, or quantization failed
    int8_path: Path | None = None  # None: not written (see int8.verdict())
    int8_error: str | None = None


def library_versions() -> dict[str, str]:
    out = {}
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def write_version(
    model_dir: Path, proto: onnx.ModelProto, write_extras: Callable[[Path], None] | None
) -> Path:
    """`model_dir/<next version>/model.onnx` (and the extras), appearing in one rename."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        onnx.save_model(proto, staging / "model.onnx")
        if write_extras is not None:
            write_extras(staging)
        os.chmod(staging, 0o755)
        while True:  # another exporter may take a number between our look and our rename
            target = model_dir / str(next_version(model_dir))
            try:
                os.rename(staging, target)  # fails rather than replace: never overwrite
                break
            except OSError:
                if not target.exists():
                    raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / "model.onnx"


def export(
    model: keras.Model,
    *,
    models_dir: Path,
    name: str,
    metadata: dict[str, str],
    x_check: npt.NDArray[np.float32],
    write_extras: Callable[[Path, dict[str, Any]], None] | None = None,
    int8: Int8Request | None = None,
) -> Exported:
    """Write `models_dir/name/<next version>/model.onnx` and, when `int8` asks and the INT8
    model passes its accuracy gate, `models_dir/<int8.name>/<next version>/model.onnx`.
    `write_extras(folder, findings)` adds the report; `findings` holds parity and INT8."""
    if len(x_check) == 0:
        raise ExportError("the parity check needs test images")
    started = time.perf_counter()
    proto = to_onnx(model)
    keras_params = int(model.count_params())
    props = {
        **metadata,
        "input_layout": "NHWC",
        "input_scale": repr(1.0 / 255.0),
        "input_offset": "0.0",
        "input_dtype_accepted": "uint8,float32",
        "keras_parameters": str(keras_params),
        "opset": str(OPSET),
        "library_versions": json.dumps(library_versions(), sort_keys=True),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    onnx.helper.set_model_props(proto, {**props, "precision": "fp32"})
    proto.producer_name = "cnnserve.training"
    proto.doc_string = f"{name}: {metadata.get('architecture', 'cnn')} on {metadata.get('dataset')}"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker refused the graph: {exc}") from exc

    parity = check_parity(model, proto, x_check)
    log.info(
        "parity on %d test images: max |keras - onnxruntime| = %.2e, argmax mismatches %d",
        parity.images,
        parity.max_abs_diff,
        parity.argmax_mismatches,
    )
    if not parity.ok:
        raise ExportError(
            f"ONNX output differs from Keras on {parity.images} test images: max abs diff "
            f"{parity.max_abs_diff:.3e} (limit {PARITY_ATOL:.0e}), "
            f"{parity.argmax_mismatches} argmax mismatches (limit 0); nothing written"
        )
    findings: dict[str, Any] = {
        "parity": {
            "images": parity.images,
            "max_abs_diff": parity.max_abs_diff,
            "argmax_mismatches": parity.argmax_mismatches,
        }
    }
    result: Int8Result | None = None
    error: str | None = None
    if int8 is not None:
        try:
            result = quantize_and_check(proto, int8.calibration, int8.x_test, int8.y_test)
        except Exception as exc:  # onnxruntime's quantizer or checker: FP32 stays usable
            error = f"{type(exc).__name__}: {exc}"
            log.warning("int8: quantization failed (%s); only the FP32 model is written", error)
            findings["int8"] = {"accepted": False, "error": error}
        else:
            findings["int8"] = {**result.report(), "model": int8.name if result.accepted else None}
            if not result.accepted:
                log.warning("int8: refused: %s", result.verdict())

    def extras(folder: Path) -> None:
        if write_extras is not None:
            write_extras(folder, findings)

    path = write_version(models_dir / name, proto, extras)
    log.info("exported %s in %.1fs", path, time.perf_counter() - started)
    int8_path: Path | None = None
    if int8 is not None and result is not None and result.accepted:
        int8_props = {
            **props,
            **result.metadata(),
            "name": int8.name,
            "fp32_model": f"{name}/{path.parent.name}",
        }
        onnx.helper.set_model_props(result.proto, int8_props)
        result.proto.doc_string = f"{proto.doc_string} (INT8)"
        int8_path = write_version(models_dir / int8.name, result.proto, extras)
        log.info("exported %s", int8_path)
    return Exported(path, parity, result, int8_path, error)
