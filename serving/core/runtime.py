"""One ONNX Runtime session: execution provider, threads, input contract, warm-up, run.

Knows nothing of gRPC. `run` is synchronous and thread-safe (ONNX Runtime sessions may be
run from several threads, and release the GIL while they compute).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from serving.config import DEFAULTS
from serving.cores import available_cores
from serving.errors import InvalidArgument

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
MAX_OPSET = 21  # the newest default-domain opset this server is tested with
MIN_OPSET = 7
PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# TF32 (ONNX Runtime's default on Ampere and newer) rounds convolution inputs to 10 bits of
# mantissa: outputs move away from the CPU's and the exported model's (bench/CUDA.md), for no
# speed a CNN this small can see. Full float32 keeps the export's parity check
# meaningful on the GPU too.
CUDA_OPTIONS = {"use_tf32": "0"}


class ModelLoadError(Exception):
    """The file cannot be served: unreadable, wrong contract, unsupported opset, failed warm-up."""


@dataclass(frozen=True)
class RuntimeOptions:
    provider: str = DEFAULTS.provider
    intra_op_threads: int = DEFAULTS.intra_op_threads
    inter_op_threads: int = DEFAULTS.inter_op_threads
    warmup_batch_sizes: tuple[int, ...] = (1,)
    # ONNX Runtime's idle worker threads busy-wait for the next run by default. On a server the
    # cores they burn are the ones gRPC and Python need (measured: bench/PROFILE.md), so they
    # sleep unless this is set.
    spinning: bool = DEFAULTS.ort_spinning
    # On CUDA every run has exactly this many images (smaller batches padded with zeros, larger
    # ones split): cuDNN re-plans a convolution whenever its input shape changes (figures in
    # bench/CUDA.md). 0 runs batches as they come.
    cuda_fixed_batch: int = DEFAULTS.max_batch_size


def default_concurrent_runs(provider: str) -> int:
    """One run per available core on the CPU, each single-threaded (runs side by side on their
    own threads beat one run spread over the cores' pool for this size of model: bench/PROFILE.md);
    one on CUDA, whose runs queue on one device anyway."""
    if provider == "cuda" and PROVIDER_NAMES["cuda"] in ort.get_available_providers():
        return 1
    return available_cores()


def default_intra_op_threads(concurrent_runs: int) -> int:
    """One thread per run when several runs go side by side (the batcher splits the work over
    them, so a pool per run would only fight for the same cores); with a single run, every
    core this process may use (its affinity and CPU limit counted, not the node's)."""
    return 1 if concurrent_runs > 1 else available_cores()


def run_in_fixed_batches(run: Callable[[F32], F32], x: F32, size: int) -> F32:
    """`run` over x in batches of exactly `size` images: the last one padded with zeros (the
    padded rows are computed and dropped; no row depends on another in this kind of model)."""
    n = len(x)
    if n == size:
        return run(x)
    outs = []
    for start in range(0, n, size):
        chunk = x[start : start + size]
        rows = len(chunk)
        if rows < size:
            padded = np.zeros((size, *chunk.shape[1:]), dtype=np.float32)
            padded[:rows] = chunk
            chunk = padded
        outs.append(run(chunk)[:rows])
    return outs[0] if len(outs) == 1 else np.concatenate(outs)


@dataclass(frozen=True)
class ModelInfo:
    """What the server and its clients need to know, read from the file itself."""

    input_name: str
    output_name: str
    input_shape: tuple[int, int, int]  # H, W, C
    num_classes: int
    class_names: list[str]
    input_scale: float
    input_offset: float
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def dataset(self) -> str:
        return self.properties.get("dataset", "")

    @property
    def precision(self) -> str:
        """ "fp32", or "int8" for a quantized twin; files from before it was recorded are FP32."""
        return self.properties.get("precision", "fp32")

    @property
    def test_accuracy(self) -> float:
        try:
            return float(self.properties.get("test_accuracy", "nan"))
        except ValueError:
            return float("nan")


def resolve_providers(requested: str) -> list[str]:
    """The provider list for a session; CUDA falls back to CPU when it cannot run here."""
    if requested not in PROVIDER_NAMES:
        raise ValueError(f"unknown provider {requested!r}; allowed {', '.join(PROVIDER_NAMES)}")
    available = ort.get_available_providers()
    if requested == "cuda":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning(
            "provider cuda requested but this onnxruntime offers only %s "
            "(install onnxruntime-gpu on a machine with a GPU); falling back to cpu",
            ", ".join(available),
        )
    return ["CPUExecutionProvider"]


def _read_info(session: ort.InferenceSession, path: Path) -> ModelInfo:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise ModelLoadError(
            f"{path}: expected one input and at least one output, found "
            f"{len(inputs)} inputs and {len(outputs)} outputs"
        )
    inp, out = inputs[0], outputs[0]
    if inp.type != "tensor(float)":
        raise ModelLoadError(f"{path}: input {inp.name!r} is {inp.type}, expected tensor(float)")
    shape = inp.shape
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise ModelLoadError(f"{path}: input {inp.name!r} has shape {shape}, expected [N, H, W, C]")
    out_shape = out.shape
    if len(out_shape) != 2 or not isinstance(out_shape[1], int):
        raise ModelLoadError(f"{path}: output {out.name!r} has shape {out_shape}, expected [N, K]")
    props = dict(session.get_modelmeta().custom_metadata_map)
    num_classes = int(out_shape[1])
    try:
        names = json.loads(props.get("class_names", "[]"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: metadata class_names is not JSON ({exc})") from exc
    if not isinstance(names, list) or len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    try:
        scale = float(props.get("input_scale", 1.0 / 255.0))
        offset = float(props.get("input_offset", 0.0))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: bad input_scale/input_offset metadata ({exc})") from exc
    return ModelInfo(
        input_name=inp.name,
        output_name=out.name,
        input_shape=(int(shape[1]), int(shape[2]), int(shape[3])),
        num_classes=num_classes,
        class_names=[str(n) for n in names],
        input_scale=scale,
        input_offset=offset,
        properties=props,
    )


def check_opset(path: Path) -> int:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX file ({exc})") from exc
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx", 0)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelLoadError(
            f"{path}: opset {opset} unsupported (this server runs {MIN_OPSET}..{MAX_OPSET})"
        )
    return opset


class ModelRuntime:
    """A loaded, warmed-up session and the contract of its input. `run` may be called from
    several threads at once: the batcher runs one batch per thread, each on the session's
    intra-op threads (one by default on the CPU, so that runs side by side share no pool)."""

    def __init__(self, path: Path, options: RuntimeOptions, *, check: bool = True) -> None:
        """`check=False` skips the opset check (it reads the file with `onnx`, a large import):
        for a file the serving process has checked and loaded already."""
        started = time.perf_counter()
        self.path = path
        self.opset = check_opset(path) if check else 0
        self.session = self._session(options, options.intra_op_threads)
        self.info = _read_info(self.session, path)
        self.provider = self.session.get_providers()[0]
        self.fixed_batch = (
            options.cuda_fixed_batch if self.provider == PROVIDER_NAMES["cuda"] else 0
        )
        self._run_options = ort.RunOptions()
        self._output_names = [self.info.output_name]
        self._feeds_name = self.info.input_name
        if options.warmup_batch_sizes:
            self.warm_up(options.warmup_batch_sizes)
        self.load_seconds = time.perf_counter() - started

    def _session(self, options: RuntimeOptions, intra_op_threads: int) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if not options.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers: list[str | tuple[str, dict[str, str]]] = list(
            resolve_providers(options.provider)
        )
        if providers[0] == PROVIDER_NAMES["cuda"]:
            providers[0] = (PROVIDER_NAMES["cuda"], CUDA_OPTIONS)
        try:
            return ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            raise ModelLoadError(f"{self.path}: ONNX Runtime cannot load it ({exc})") from exc

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Run each batch size once so that no first request pays for allocation and planning."""
        for n in batch_sizes:
            self._warm(self.run, n)

    def _warm(self, run: Callable[[F32], F32], n: int) -> F32:
        """One checked run of a batch of n zero images; returns that batch."""
        h, w, c = self.info.input_shape
        x = np.zeros((n, h, w, c), dtype=np.float32)
        try:
            out = run(x)
        except Exception as exc:
            raise ModelLoadError(f"{self.path}: warm-up with batch {n} failed ({exc})") from exc
        if out.shape != (n, self.info.num_classes) or not np.isfinite(out).all():
            raise ModelLoadError(
                f"{self.path}: warm-up with batch {n} gave shape {out.shape} "
                f"(expected {(n, self.info.num_classes)}) or non-finite values"
            )
        return x

    def prepare(self, pixels: npt.NDArray[np.generic]) -> F32:
        """uint8 pixels -> scaled float32 model input; float32 passes through unchanged."""
        if pixels.dtype == np.float32:
            return pixels  # type: ignore[return-value]
        if pixels.dtype == np.uint8:
            x = pixels.astype(np.float32)
            x *= np.float32(self.info.input_scale)
            if self.info.input_offset:
                x += np.float32(self.info.input_offset)
            return x
        raise InvalidArgument(f"dtype {pixels.dtype} not accepted; expected uint8 or float32")

    def run(self, x: F32) -> F32:
        """Thread-safe; on CUDA in batches of exactly `fixed_batch` images."""
        if self.fixed_batch:
            return run_in_fixed_batches(self._run_session, x, self.fixed_batch)
        return self._run_session(x)

    def _run_session(self, x: F32) -> F32:
        out: F32 = self.session.run(self._output_names, {self._feeds_name: x}, self._run_options)[0]
        return out
