"""The only module where protobuf meets numpy.

Tensors arrive as raw little-endian bytes: decoding is `np.frombuffer` on the message's own
buffer (no copy), after checking dtype, shape and byte length against each other.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import numpy.typing as npt

from serving import tensors
from serving.core.dataplane import (
    MODEL_FILE,
    BatchingOptions,
    Duration,
    FeatureMaps,
    Filters,
    ModelCatalog,
    ParameterSummary,
    Prediction,
    ServedVersion,
    State,
    TopK,
    VersionStats,
)
from serving.errors import InvalidArgument
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.inference import grpc_predict_v2_pb2 as v2
from serving.pb.inference import model_config_pb2 as v2config

DTYPES: dict[int, np.dtype[np.generic]] = {
    pb.DATA_TYPE_UINT8: np.dtype("<u1"),
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
}


def decode_tensor(t: pb.Tensor, what: str = "images") -> npt.NDArray[np.generic]:
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        name = pb.DataType.Name(t.dtype) if t.dtype in pb.DataType.values() else str(t.dtype)
        raise InvalidArgument(
            f"{what}: dtype {name} not accepted; expected DATA_TYPE_UINT8 or DATA_TYPE_FLOAT32"
        )
    shape = tuple(t.shape)
    tensors.check_shape(shape, what)
    return tensors.from_bytes(t.data, dtype, shape, what, dtype.name)


def tensor_extent(t: pb.Tensor) -> tuple[tuple[int, ...], int]:
    """A tensor's shape and item size, read without touching its bytes (0: a dtype that
    decoding refuses), for admission before decoding."""
    dtype = DTYPES.get(t.dtype)
    return tuple(t.shape), 0 if dtype is None else dtype.itemsize


def encode_tensor(array: npt.NDArray[np.generic], out: pb.Tensor | None = None) -> pb.Tensor:
    """`array` as a Tensor: written into `out` (a field of a response, so nothing is copied
    into it afterwards) or a new one."""
    if array.dtype == np.float32:
        dtype = pb.DATA_TYPE_FLOAT32
    elif array.dtype == np.uint8:
        dtype = pb.DATA_TYPE_UINT8
    else:
        raise TypeError(f"cannot encode {array.dtype}")
    t = pb.Tensor() if out is None else out
    t.dtype = dtype
    t.shape.extend(array.shape)
    t.data = tensors.to_bytes(array)
    return t


def classify_extent(request: pb.ClassifyRequest) -> tuple[int, int]:
    """How many images a Classify request carries and its size on the wire (protobuf computes
    it without copying anything), for admission before decoding."""
    return len(request.images), request.ByteSize()


def decode_classify_images(request: pb.ClassifyRequest) -> list[bytes | npt.NDArray[np.uint8]]:
    return [decode_image(image, i) for i, image in enumerate(request.images)]


def decode_image(image: pb.Image, i: int = 0) -> bytes | npt.NDArray[np.uint8]:
    kind = image.WhichOneof("source")
    if kind == "encoded":
        return image.encoded
    if kind == "pixels":
        if image.pixels.dtype != pb.DATA_TYPE_UINT8:
            raise InvalidArgument(f"image {i}: raw pixels must be DATA_TYPE_UINT8")
        return decode_tensor(image.pixels, f"image {i}")  # type: ignore[return-value]
    raise InvalidArgument(f"image {i}: neither encoded bytes nor pixels set")


# The per-image classifications are written as wire bytes and merged in one C-level parse:
# building them as messages was slow per image, and passing that list to the response's
# constructor copied every message again (figures: bench/PROFILE.md, "Figures behind the code").
# The field numbers are cnnserve.proto's; a test checks the result against messages.
_SCORE = b"\x1d"  # ClassScore.score: field 3, fixed32
_TOP = b"\x0a"  # Classification.top: field 1, length-delimited
_PREDICT_CLASSIFICATIONS = b"\x22"  # PredictResponse.classifications: field 4
_CLASSIFY_CLASSIFICATIONS = b"\x1a"  # ClassifyResponse.classifications: field 3


@functools.lru_cache(maxsize=256)
def _class_heads(names: tuple[str, ...]) -> tuple[bytes, ...]:
    """ClassScore without its score, serialized once per class: index and label (the runtime
    names every class of the model's output, so every index has one)."""
    return tuple(pb.ClassScore(index=i, label=n).SerializeToString() for i, n in enumerate(names))


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def classifications_wire(served: ServedVersion, top: TopK, field: bytes) -> bytes:
    """The repeated `classifications` field (tag `field`) of a response, one per image."""
    heads = _class_heads(tuple(served.runtime.info.class_names))
    scores = top.scores.astype("<f4", copy=False).tobytes()
    out = []
    offset = 0
    for row in top.indices.tolist():
        body = bytearray()
        for i in row:
            entry = heads[i] + _SCORE + scores[offset : offset + 4]
            offset += 4
            body += _TOP + _varint(len(entry)) + entry
        out.append(field + _varint(len(body)) + body)
    return b"".join(out)


def predict_response(
    served: ServedVersion,
    prediction: Prediction,
    omit: bool,
    out: pb.PredictResponse | None = None,
) -> pb.PredictResponse:
    """Written into `out` (a stream answer's field: nothing is copied afterwards) or a new one."""
    response = pb.PredictResponse() if out is None else out
    response.model = served.name
    response.version = served.version
    if prediction.top is not None:
        wire = classifications_wire(served, prediction.top, _PREDICT_CLASSIFICATIONS)
        response.MergeFromString(wire)
    if not omit:
        encode_tensor(prediction.probabilities, response.probabilities)
    return response


def predict_stream_answer(request: pb.PredictRequest, index: int) -> pb.PredictStreamResponse:
    """An answer whose `response` the prediction is then written into."""
    return pb.PredictStreamResponse(id=_stream_id(request, index))


def predict_stream_error(
    request: pb.PredictRequest | None, index: int, code: int, message: str
) -> pb.PredictStreamResponse:
    return pb.PredictStreamResponse(
        error=pb.Status(code=code, message=message), id=_stream_id(request, index)
    )


def _stream_id(request: pb.PredictRequest | None, index: int) -> str:
    return request.id if request is not None and request.id else str(index)


def classify_response(served: ServedVersion, prediction: Prediction) -> pb.ClassifyResponse:
    response = pb.ClassifyResponse(model=served.name, version=served.version)
    if prediction.top is not None:
        wire = classifications_wire(served, prediction.top, _CLASSIFY_CLASSIFICATIONS)
        response.MergeFromString(wire)
    return response


def summary_response(served: ServedVersion, s: ParameterSummary) -> pb.GetParameterSummaryResponse:
    props = served.runtime.info.properties
    keras = props.get("keras_parameters", "0")
    return pb.GetParameterSummaryResponse(
        model=served.name,
        version=served.version,
        input_shape=s.input_shape,
        layers=[
            pb.LayerSummary(
                name=layer.name,
                kind=layer.kind,
                output_shape=layer.output_shape,
                parameters=layer.parameters,
                formula=layer.formula,
                kernel=layer.kernel,
                strides=layer.strides,
                padding=layer.padding,
                activation=layer.activation,
                output_size_formula=layer.output_size_formula,
            )
            for layer in s.layers
        ],
        total_parameters=s.total,
        trainable_parameters=s.trainable,
        non_trainable_parameters=s.total - s.trainable,
        dense_neuron_parameters=s.dense_neuron_parameters,
        dense_neuron_formula=s.dense_neuron_formula,
        keras_parameters=int(keras) if keras.isdigit() else 0,
    )


def feature_maps_response(served: ServedVersion, maps: FeatureMaps) -> pb.GetFeatureMapsResponse:
    response = pb.GetFeatureMapsResponse(model=served.name, version=served.version)
    for layer in maps.layers:
        encode_tensor(layer.values, response.layers.add(name=layer.name, kind=layer.kind).values)
    names = served.runtime.info.class_names
    response.classification.top.extend(
        pb.ClassScore(index=i, label=names[i], score=score)
        for i, score in zip(maps.top.indices[0].tolist(), maps.top.scores[0].tolist(), strict=True)
    )
    encode_tensor(maps.probabilities, response.probabilities)
    encode_tensor(maps.image, response.image)
    return response


def filters_response(served: ServedVersion, filters: Filters) -> pb.GetFiltersResponse:
    response = pb.GetFiltersResponse(model=served.name, version=served.version, layer=filters.layer)
    encode_tensor(filters.kernels, response.kernels)
    encode_tensor(filters.biases, response.biases)
    return response


def metadata_response(
    served: ServedVersion, ready_versions: list[int], max_batch: int
) -> pb.GetModelMetadataResponse:
    info = served.runtime.info
    h, w, c = info.input_shape
    return pb.GetModelMetadataResponse(
        name=served.name,
        version=served.version,
        ready_versions=ready_versions,
        inputs=[
            pb.TensorSpec(name=info.input_name, dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, h, w, c])
        ],
        outputs=[
            pb.TensorSpec(
                name=info.output_name, dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, info.num_classes]
            )
        ],
        accepted_dtypes=[pb.DATA_TYPE_UINT8, pb.DATA_TYPE_FLOAT32],
        input_layout=info.properties.get("input_layout", "NHWC"),
        input_scale=info.input_scale,
        class_names=info.class_names,
        dataset=info.dataset,
        test_accuracy=info.test_accuracy,
        execution_provider=served.runtime.provider,
        properties=info.properties,
        max_batch_size=max_batch,
    )


def list_models_response(catalog: list[ModelCatalog]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[
            pb.ModelStatus(
                name=model.name,
                default_version=model.default_version,
                versions=[
                    pb.ModelVersionStatus(version=s.version, state=s.state.value, reason=s.reason)
                    for s in model.statuses
                ],
            )
            for model in catalog
        ]
    )


# ==================================================================================================
# Open Inference Protocol (KServe v2) and its Triton extensions
#
# Tensors are typed by datatype names ("FP32", "UINT8", "BYTES"). An input arrives either as raw
# little-endian bytes (`raw_input_contents`, one entry per input, decoded with `np.frombuffer`
# after the same length checks as above) or as the typed repeated field of its datatype
# (`contents.fp32_contents`, `contents.uint_contents`). Outputs always leave as raw bytes.
# ==================================================================================================

V2_PLATFORM = "onnxruntime_onnx"
V2_BACKEND = "onnxruntime"
V2_DTYPES = tensors.DATATYPES
V2_CONTENTS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
V2_ACCEPTED = tensors.ACCEPTED_DATATYPES
CLASSIFICATION = "classification"  # Triton's parameter of a requested output: top-k classes
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
