"""The Open Inference Protocol's (KServe v2, gRPC) messages: where its protobuf meets numpy.

Tensors are typed by datatype names ("FP32", "UINT8", "BYTES"). An input arrives either as raw
little-endian bytes (`raw_input_contents`, one entry per input, decoded with `np.frombuffer` after
the same length checks as cnnserve.v1's tensors) or as the typed repeated field of its datatype
(`contents.fp32_contents`, `contents.uint_contents`). Outputs always leave as raw bytes.

REST's codec builds the same messages for what both transports share (Triton's classification
strings and BYTES tensor, version parsing, model metadata, configuration and statistics).
"""

from __future__ import annotations

import math
from importlib import metadata

import numpy as np
import numpy.typing as npt

from serving import tensors
from serving.core.dataplane import (
    MODEL_FILE,
    BatchingOptions,
    Duration,
    ModelCatalog,
    Prediction,
    ServedVersion,
    State,
    TopK,
    VersionStats,
)
from serving.errors import InvalidArgument
from serving.pb.inference import grpc_predict_v2_pb2 as v2
from serving.pb.inference import model_config_pb2 as v2config

SERVER_NAME = "cnnserve"
# Triton's names of the protocol extensions both transports implement (REST adds its own).
EXTENSIONS = ["classification", "model_configuration", "statistics"]


def server_version() -> str:
    try:
        return metadata.version("cnnserve")
    except metadata.PackageNotFoundError:
        return "unknown"


V2_PLATFORM = "onnxruntime_onnx"
V2_BACKEND = "onnxruntime"
V2_DTYPES = tensors.DATATYPES
V2_CONTENTS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
V2_ACCEPTED = tensors.ACCEPTED_DATATYPES
CLASSIFICATION = "classification"  # Triton's parameter of a requested output: top-k classes
CLIENT_KEY = "client_key"  # our request parameter: the caller's key, for a sticky canary
TRITON_STATES = {
    State.LOADING: "LOADING",
    State.READY: "READY",
    State.FAILED: "UNAVAILABLE",
    State.UNLOADED: "UNAVAILABLE",
}


def parse_v2_version(text: str, newest: str = "leave it empty") -> int:
    """A protocol version string -> our version number ("" -> 0: the newest ready one);
    `newest` says how the protocol asks for the newest (gRPC: an empty field, REST: no
    /versions/ segment)."""
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()):
        raise InvalidArgument(
            f"model version {text!r} is not a version number (1, 2, ...); {newest} for the newest"
        )
    return int(text)


def v2_input_extent(request: v2.ModelInferRequest) -> tuple[tuple[int, ...], int]:
    """The one input's shape and item size, read without touching its bytes (0: nothing to
    hold yet; decoding refuses what is wrong)."""
    if len(request.inputs) != 1:
        return (), 0
    t = request.inputs[0]
    dtype = V2_DTYPES.get(t.datatype)
    return tuple(t.shape), 0 if dtype is None else dtype.itemsize


def decode_v2_input(
    request: v2.ModelInferRequest, served: ServedVersion
) -> npt.NDArray[np.generic]:
    """The request's one input tensor (raw bytes or typed contents) as an array."""
    info = served.runtime.info
    if len(request.inputs) != 1:
        raise InvalidArgument(
            f"model {served.name!r} takes 1 input ({info.input_name!r}); "
            f"the request has {len(request.inputs)}"
        )
    t = request.inputs[0]
    if t.name != info.input_name:
        raise InvalidArgument(
            f"unknown input {t.name!r} for model {served.name!r}; its input is {info.input_name!r}"
        )
    what = f"input {t.name!r}"
    dtype = V2_DTYPES.get(t.datatype)
    if dtype is None:
        raise InvalidArgument(
            f"{what}: datatype {t.datatype!r} not accepted; expected {V2_ACCEPTED}"
        )
    shape = tuple(t.shape)
    tensors.check_shape(shape, what)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidArgument(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for "
                f"{len(request.inputs)} inputs; expected one per input"
            )
        if t.HasField("contents"):
            raise InvalidArgument(f"{what}: contents must be empty when raw_input_contents is used")
        return tensors.from_bytes(request.raw_input_contents[0], dtype, shape, what, t.datatype)
    count = math.prod(shape)
    field = V2_CONTENTS[t.datatype]
    values = getattr(t.contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"{what}: shape {list(shape)} of {t.datatype} needs {count:,} values in "
            f"contents.{field} (or raw_input_contents), received {len(values):,}"
        )
    if t.datatype == "UINT8":
        wide = np.fromiter(values, dtype=np.uint32, count=count)
        if count and int(wide.max()) > 255:
            raise InvalidArgument(f"{what}: UINT8 contents hold values above 255")
        return wide.astype(np.uint8).reshape(shape)
    return np.fromiter(values, dtype=np.float32, count=count).reshape(shape)


def v2_client_key(request: v2.ModelInferRequest) -> str:
    """The request parameter `client_key` (a string): the caller's key, which keeps its calls on
    one side of a canary rollout. Request parameters are the protocol's own extension point."""
    if CLIENT_KEY not in request.parameters:
        return ""
    param = request.parameters[CLIENT_KEY]
    if param.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(f"request parameter {CLIENT_KEY!r} must be a string")
    return str(param.string_param)


def v2_requested_top(request: v2.ModelInferRequest, served: ServedVersion) -> int:
    """How many classes the one requested output asks for (Triton's classification
    extension), or 0 for the probabilities themselves (also when no output is named)."""
    info = served.runtime.info
    if not request.outputs:
        return 0
    if len(request.outputs) > 1:
        names = ", ".join(repr(o.name) for o in request.outputs)
        raise InvalidArgument(
            f"{len(request.outputs)} outputs requested ({names}); model {served.name!r} has one: "
            f"{info.output_name!r}"
        )
    wanted = request.outputs[0]
    if wanted.name != info.output_name:
        raise InvalidArgument(
            f"unknown output {wanted.name!r} requested from model {served.name!r}; "
            f"its output is {info.output_name!r}"
        )
    if CLASSIFICATION not in wanted.parameters:
        return 0
    param = wanted.parameters[CLASSIFICATION]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(
            f"output {wanted.name!r}: parameter {CLASSIFICATION!r} must be an integer "
            f"(how many classes to return), got {kind or 'no value'}"
        )
    k = int(getattr(param, kind))
    if k < 1:
        raise InvalidArgument(f"output {wanted.name!r}: parameter {CLASSIFICATION!r} must be >= 1")
    return k


def bytes_tensor(items: list[str]) -> bytes:
    """BYTES elements in the protocol's raw form (gRPC's raw contents, REST's binary data):
    each one a 4-byte little-endian length, then its UTF-8 bytes."""
    encoded = [item.encode() for item in items]
    return b"".join(len(item).to_bytes(4, "little") + item for item in encoded)


def v2_infer_response(
    served: ServedVersion,
    request_id: str,
    prediction: Prediction,
    out: v2.ModelInferResponse | None = None,
) -> v2.ModelInferResponse:
    """Probabilities as FP32, or (classification: the prediction carries its top classes) a
    BYTES tensor [N, k] of Triton's "score:index:label" strings, best first; written into `out`
    (a stream answer's field) or a new one."""
    info = served.runtime.info
    response = v2.ModelInferResponse() if out is None else out
    response.model_name = served.name
    response.model_version = str(served.version)
    response.id = request_id
    top = prediction.top
    if top is None:
        probabilities = prediction.probabilities
        response.outputs.add(name=info.output_name, datatype="FP32", shape=probabilities.shape)
        response.raw_output_contents.append(tensors.to_bytes(probabilities))
    else:
        response.outputs.add(name=info.output_name, datatype="BYTES", shape=top.indices.shape)
        response.raw_output_contents.append(bytes_tensor(classification_strings(served, top)))
    return response


def classification_strings(served: ServedVersion, top: TopK) -> list[str]:
    """Triton's classification entries, "score:index:label", image by image, best first (the
    runtime names every class of the model's output)."""
    names = served.runtime.info.class_names
    return [
        f"{score:f}:{i}:{names[i]}"
        for row_idx, row_scores in zip(top.indices.tolist(), top.scores.tolist(), strict=True)
        for i, score in zip(row_idx, row_scores, strict=True)
    ]


def v2_stream_error(
    request: v2.ModelInferRequest | None, code_name: str, message: str
) -> v2.ModelStreamInferResponse:
    """Triton's form: the message in error_message (here after the status name, which the
    message type has no field for), the request's id and model in infer_response."""
    answer = v2.ModelStreamInferResponse(error_message=f"{code_name}: {message}")
    if request is not None:
        answer.infer_response.id = request.id
        answer.infer_response.model_name = request.model_name
        answer.infer_response.model_version = request.model_version
    return answer


def v2_model_metadata(served: ServedVersion, versions: list[int]) -> v2.ModelMetadataResponse:
    """The model contract; -1 marks the batch dimension. Inputs are declared FP32 (what the model
    takes); UINT8 pixels are accepted too and scaled by the server (see the model config)."""
    info = served.runtime.info
    h, w, c = info.input_shape
    tensor = v2.ModelMetadataResponse.TensorMetadata
    return v2.ModelMetadataResponse(
        name=served.name,
        versions=[str(v) for v in versions],
        platform=V2_PLATFORM,
        inputs=[tensor(name=info.input_name, datatype="FP32", shape=[-1, h, w, c])],
        outputs=[tensor(name=info.output_name, datatype="FP32", shape=[-1, info.num_classes])],
    )


def v2_model_config(
    served: ServedVersion, batching: BatchingOptions, max_versions: int, max_batch_size: int
) -> v2.ModelConfigResponse:
    """The model's configuration in Triton's terms: dims without the batch dimension,
    max_batch_size = the largest batch one request may carry, dynamic batching when it is on."""
    info = served.runtime.info
    h, w, c = info.input_shape
    gpu = served.runtime.provider.startswith("CUDA")
    parameters = {
        **info.properties,
        "accepted_input_datatypes": ",".join(V2_DTYPES),
        "uint8_input_scaling": f"x * {info.input_scale!r} + {info.input_offset!r}",
        "execution_provider": served.runtime.provider,
    }
    if batching.enabled:
        parameters["dynamic_batching_max_batch_size"] = str(batching.max_batch_size)
    config = v2config.ModelConfig(
        name=served.name,
        platform=V2_PLATFORM,
        backend=V2_BACKEND,
        version_policy=v2config.ModelVersionPolicy(
            latest=v2config.ModelVersionPolicy.Latest(num_versions=max_versions)
        ),
        max_batch_size=max_batch_size,
        input=[
            v2config.ModelInput(
                name=info.input_name,
                data_type=v2config.TYPE_FP32,
                format=v2config.ModelInput.FORMAT_NHWC,
                dims=[h, w, c],
            )
        ],
        output=[
            v2config.ModelOutput(
                name=info.output_name, data_type=v2config.TYPE_FP32, dims=[info.num_classes]
            )
        ],
        instance_group=[
            v2config.ModelInstanceGroup(
                name=served.name,
                kind=v2config.ModelInstanceGroup.KIND_GPU
                if gpu
                else v2config.ModelInstanceGroup.KIND_CPU,
                count=batching.max_runs,
            )
        ],
        default_model_filename=MODEL_FILE,
        parameters={k: v2config.ModelParameter(string_value=v) for k, v in parameters.items()},
    )
    if batching.enabled:
        config.dynamic_batching.SetInParent()
        config.dynamic_batching.max_queue_delay_microseconds = round(batching.max_delay_s * 1e6)
    return v2.ModelConfigResponse(config=config)


def v2_model_statistics(name: str, version: int, s: VersionStats) -> v2.ModelStatistics:
    """What the data plane counted. cnnserve times the whole ONNX Runtime run (input and output
    handling included) as compute_infer; compute_input and compute_output carry the same count
    and no time of their own (Triton clients such as perf_analyzer require the three counts to
    be equal)."""

    def duration(d: Duration) -> v2.StatisticDuration:
        return v2.StatisticDuration(count=d.count, ns=d.ns)

    def untimed(d: Duration) -> v2.StatisticDuration:
        return v2.StatisticDuration(count=d.count, ns=0)

    return v2.ModelStatistics(
        name=name,
        version=str(version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=v2.InferStatistics(
            success=duration(s.success),
            fail=duration(s.fail),
            queue=duration(s.queue),
            compute_input=untimed(s.compute_infer),
            compute_infer=duration(s.compute_infer),
            compute_output=untimed(s.compute_infer),
        ),
        batch_stats=[
            v2.InferBatchStatistics(
                batch_size=size,
                compute_input=untimed(d),
                compute_infer=duration(d),
                compute_output=untimed(d),
            )
            for size, d in sorted(s.batches.items())
        ],
    )


def v2_repository_index(
    catalog: list[ModelCatalog], ready_only: bool
) -> v2.RepositoryIndexResponse:
    """One entry per model version on disk, in Triton's state words; our own state and its
    reason go into `reason` when the version does not serve."""
    index = v2.RepositoryIndexResponse.ModelIndex
    models = []
    for model in catalog:
        for s in model.statuses:
            if ready_only and s.state is not State.READY:
                continue
            reason = ""
            if s.state in (State.FAILED, State.UNLOADED):
                reason = s.state.value.lower() + (f": {s.reason}" if s.reason else "")
            models.append(
                index(
                    name=model.name,
                    version=str(s.version),
                    state=TRITON_STATES[s.state],
                    reason=reason,
                )
            )
    return v2.RepositoryIndexResponse(models=models)
