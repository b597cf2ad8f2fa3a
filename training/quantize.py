"""INT8 by ONNX Runtime's static quantization, with an accuracy gate and its measured speed.

The FP32 graph is quantized in QDQ form (int8 weights per output channel, uint8 activations),
with activation ranges calibrated on training images only; the test images are kept for the
gate. QDQ rather than QOperator: ONNX Runtime fuses QDQ pairs into its integer kernels, and
QOperator ran slower than FP32 at batch 1 when the issue measured both. The final softmax stays
in float, so the probabilities a client reads are not rounded to 1/255, and the ReLUs stay in
the graph (ONNX Runtime folds them into the quantization at load), so the INT8 graph reads as
the same layers as the FP32 one.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnxruntime import quantization as q

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

GATE_POINTS = 0.3  # the INT8 model may be at most this many points less accurate than FP32
CALIBRATION_IMAGES = 512
SPEED_BATCHES = (1, 32)
NO_GAIN = 1.05  # below this speedup at every batch, the log says INT8 buys nothing here
SCHEME = (
    "static QDQ, int8 weights per channel, uint8 activations, MinMax calibration, softmax in float"
)


class _Images(q.CalibrationDataReader):  # type: ignore[misc]
    """Calibration batches of the model's input, as quantize_static reads them."""

    def __init__(self, input_name: str, images: F32, batch: int = 64) -> None:
        self._batches: Iterator[F32] = (images[i : i + batch] for i in range(0, len(images), batch))
        self._input = input_name

    def get_next(self) -> dict[str, F32] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input: batch}


def quantize(fp32: onnx.ModelProto, calibration: F32) -> onnx.ModelProto:
    """The INT8 twin of `fp32`, its activation ranges taken from `calibration` images."""
    if len(calibration) == 0:
        raise ValueError("quantization needs calibration images")
    input_name = fp32.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="cnnserve-int8-") as tmp:
        source = Path(tmp) / "fp32.onnx"
        prepared, out = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(fp32, source)
        # Shape inference and graph folding first, as ONNX Runtime's guide asks.
        q.shape_inference.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        q.quantize_static(
            str(prepared),
            str(out),
            _Images(input_name, calibration),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=q.CalibrationMethod.MinMax,
            nodes_to_exclude=[n.name for n in fp32.graph.node if n.op_type == "Softmax"],
            extra_options={"QDQKeepRemovableActivations": True},
        )
        proto = onnx.load(str(out))
    del proto.metadata_props[:]  # the caller writes the INT8 model's own
    proto.producer_name = fp32.producer_name
    return proto


def session(proto: onnx.ModelProto | bytes, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    raw = proto if isinstance(proto, bytes) else proto.SerializeToString()
    return ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])


def predict(sess: ort.InferenceSession, x: F32, batch: int = 256) -> npt.NDArray[np.float32]:
    name = sess.get_inputs()[0].name
    return np.concatenate(
        [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


@dataclass(frozen=True)
class Speed:
    """Median CPU time per call of each model at one batch size, one thread, same images."""

    batch: int
    fp32_ms: float
    int8_ms: float

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms


def measure_speed(
    fp32: onnx.ModelProto, int8: onnx.ModelProto, x: F32, seconds: float = 0.2, rounds: int = 5
) -> list[Speed]:
    """In-process ONNX Runtime on one thread, FP32 and INT8 interleaved in `rounds` turns of
    `seconds` of wall time each (the count of calls follows this machine's speed). A call is
    timed in the CPU time of this thread, which runs the single-threaded session: time spent
    waiting while other processes hold the cores is left out, so a shared machine still
    compares the two models' own cost."""
    sessions = {"fp32": session(fp32, threads=1), "int8": session(int8, threads=1)}
    name = sessions["fp32"].get_inputs()[0].name
    out = []
    for batch in SPEED_BATCHES:
        feed = {name: np.ascontiguousarray(x[:batch])}
        per_call: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():
            s.run(None, feed)  # warm-up: first-call allocations stay out of the figures
        for _ in range(rounds):
            for key, s in sessions.items():
                calls, started, cpu = 0, time.perf_counter(), time.thread_time()
                while time.perf_counter() - started < seconds or calls < 3:
                    s.run(None, feed)
                    calls += 1
                per_call[key].append((time.thread_time() - cpu) / calls)
        out.append(
            Speed(
                batch,
                statistics.median(per_call["fp32"]) * 1e3,
                statistics.median(per_call["int8"]) * 1e3,
            )
        )
    return out


@dataclass
class Int8Result:
    """What the gate and the speed measurement found; `accepted` says if the model is written."""

    proto: onnx.ModelProto = field(repr=False)
    calibration_images: int
    test_images: int
    fp32_accuracy: float
    int8_accuracy: float
    agreement: float  # fraction of test images where INT8's argmax is FP32's
    speeds: list[Speed]

    @property
    def drop_points(self) -> float:
        return (self.fp32_accuracy - self.int8_accuracy) * 100

    @property
    def accepted(self) -> bool:
        return round(self.drop_points, 9) <= GATE_POINTS  # 0.3 is 0.30000000000000027 in floats

    @property
    def gain(self) -> bool:
        return any(s.speedup >= NO_GAIN for s in self.speeds)

    def verdict(self) -> str:
        if self.accepted:
            return (
                f"INT8 test accuracy {self.int8_accuracy:.4f} against FP32 {self.fp32_accuracy:.4f} "
                f"({self.drop_points:+.2f} points lost, limit {GATE_POINTS})"
            )
        return (
            f"INT8 test accuracy {self.int8_accuracy:.4f} is {self.drop_points:.2f} points below "
            f"FP32's {self.fp32_accuracy:.4f} on {self.test_images:,} test images (limit "
            f"{GATE_POINTS}); the INT8 model is not written"
        )

    def report(self) -> dict[str, Any]:
        return {
            "scheme": SCHEME,
            "calibration_images": self.calibration_images,
            "test_images": self.test_images,
            "fp32_accuracy": self.fp32_accuracy,
            "int8_accuracy": self.int8_accuracy,
            "argmax_agreement": self.agreement,
            "gate_points": GATE_POINTS,
            "accepted": self.accepted,
            "speed": [
                {
                    "batch": s.batch,
                    "fp32_ms": round(s.fp32_ms, 4),
                    "int8_ms": round(s.int8_ms, 4),
                    "speedup": round(s.speedup, 3),
                    "threads": 1,
                    "clock": "thread CPU time",
                }
                for s in self.speeds
            ],
        }

    def metadata(self) -> dict[str, str]:
        """The INT8 model's own metadata_props (beside those both models share)."""
        props = {
            "precision": "int8",
            "quantization": SCHEME,
            "calibration_images": str(self.calibration_images),
            "test_accuracy": f"{self.int8_accuracy:.6f}",
            "fp32_test_accuracy": f"{self.fp32_accuracy:.6f}",
            "int8_argmax_agreement": f"{self.agreement:.6f}",
        }
        for s in self.speeds:
            props[f"speedup_batch{s.batch}"] = f"{s.speedup:.3f}"
            props[f"int8_ms_batch{s.batch}"] = f"{s.int8_ms:.4f}"
            props[f"fp32_ms_batch{s.batch}"] = f"{s.fp32_ms:.4f}"
        return props


def quantize_and_check(
    fp32: onnx.ModelProto, calibration: F32, x_test: F32, y_test: npt.NDArray[np.int64]
) -> Int8Result:
    """Quantize, check the graph, score both models on the same test images, time both."""
    started = time.perf_counter()
    int8 = quantize(fp32, calibration)
    onnx.checker.check_model(int8, full_check=True)
    fp32_out = predict(session(fp32), x_test).argmax(1)
    int8_out = predict(session(int8), x_test).argmax(1)
    speeds = measure_speed(fp32, int8, x_test[: max(SPEED_BATCHES)])
    result = Int8Result(
        proto=int8,
        calibration_images=len(calibration),
        test_images=len(x_test),
        fp32_accuracy=float((fp32_out == y_test).mean()),
        int8_accuracy=float((int8_out == y_test).mean()),
        agreement=float((fp32_out == int8_out).mean()),
        speeds=speeds,
    )
    log.info(
        "int8: %s; quantized and measured in %.1fs", result.verdict(), time.perf_counter() - started
    )
    for s in speeds:
        log.info(
            "int8: batch %d on one thread: %.3f ms against FP32 %.3f ms (%.2fx)",
            s.batch,
            s.int8_ms,
            s.fp32_ms,
            s.speedup,
        )
    if result.accepted and not result.gain:
        log.warning(
            "int8: no speed gain on this machine (below %.2fx at every batch); the INT8 model is "
            "written anyway, for a machine where it pays (integer dot-product instructions)",
            NO_GAIN,
        )
    return result
