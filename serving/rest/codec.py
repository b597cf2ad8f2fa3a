"""The REST API's message builder: JSON (and Triton's binary tensor extension) <-> numpy.

KServe v2 REST: an inference request is a JSON object, optionally followed by raw tensor bytes
(the request's `Inference-Header-Content-Length` header says where the JSON ends; each input
sent that way carries `parameters.binary_data_size`, in input order). Outputs leave as JSON
`data`, or as raw bytes after the JSON when they ask for `binary_data` (or the request for
`binary_data_output`). Knows nothing of HTTP servers or protobuf; tensors go through
serving.tensors like every protocol's.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from serving import tensors
from serving.core.dataplane import (
    BatchingOptions,
    Explanation,
    FeatureMaps,
    Filters,
    ModelCatalog,
    ParameterSummary,
    Prediction,
    RolloutStatus,
    ServedVersion,
    VersionStats,
)
from serving.errors import InvalidArgument
from serving.grpc import cnnserve_messages
from serving.grpc import inference_messages as v2_messages
from serving.pb.inference import grpc_predict_v2_pb2 as v2

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON = "application/json"
BINARY = "application/octet-stream"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def error_body(message: str) -> bytes:
    return dumps({"error": message})


def parse_version(text: str) -> int:
    """A path's version segment -> our version number ("" -> 0: the newest ready one)."""
    return v2_messages.parse_v2_version(text, newest="leave it out")


def parse_top_k(text: str | None) -> int:
    if text is None or text == "":
        return 1
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise InvalidArgument(f"top_k must be a whole number >= 1, got {text!r}")
    return int(text)


# ------------------------------------------------------------------ inference requests


@dataclass
class InferRequest:
    """A parsed inference request: its one input (JSON data or binary bytes) and outputs."""

    id: str
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None  # the JSON `data`, when the input came as JSON
    raw: memoryview | None = None  # its bytes, when it came as binary data
    top: int = 0  # classes asked for (classification), or 0 for the probabilities
    output_name: str | None = None  # the output asked for by name, if any
    binary_output: bool = False
    extra_outputs: list[str] = field(default_factory=list)  # more outputs than the model has
    client_key: str = ""  # the request parameter `client_key`: keeps a caller on one canary side


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _string(obj: dict[str, Any], key: str, what: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "nothing" if value is None else type(value).__name__
        raise InvalidArgument(f"{what}: {key!r} must be a string, got {got}")
    return value


def _bool(params: dict[str, Any], key: str, what: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what}: parameter {key!r} must be true or false, got {value!r}")
    return value


def _client_key(params: dict[str, Any]) -> str:
    key = params.get(v2_messages.CLIENT_KEY, "")
    if not isinstance(key, str):
        raise InvalidArgument(f"request parameter {v2_messages.CLIENT_KEY!r} must be a string")
    return key


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """The request's JSON (the first `header_length` bytes of the body when that header is
    sent, else all of it) and the binary data after it."""
    if header_length is None:
        head, tail = body, memoryview(b"")
    else:
        if not (header_length.isascii() and header_length.isdigit()):
            raise InvalidArgument(
                f"{HEADER_LENGTH} must be a byte count, got {header_length[:40]!r}"
            )
        n = int(header_length)
        if n > len(body):
            raise InvalidArgument(f"{HEADER_LENGTH} is {n:,} but the body has {len(body):,} bytes")
        head, tail = body[:n], memoryview(body)[n:]
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the request is not valid JSON: {exc}") from None
    request = _object(request, "the request")
    params = _object(request.get("parameters"), "the request's parameters")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("the request needs 'inputs': a list of one tensor")
    if len(inputs) != 1:
        raise InvalidArgument(f"the request has {len(inputs)} inputs; the model takes 1")
    tensor = _object(inputs[0], "input 0")
    name = _string(tensor, "name", "input 0")
    what = f"input {name!r}"
    datatype = _string(tensor, "datatype", what)
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise InvalidArgument(f"{what}: 'shape' must be a list of whole numbers, got {shape!r}")
    dims = tuple(shape)
    tensors.check_shape(dims, what)  # a TensorError is answered 400 (errors.as_refusal)
    parsed = InferRequest(
        id=_string(request, "id", "the request", required=False),
        name=name,
        datatype=datatype,
        shape=dims,
        binary_output=_bool(params, "binary_data_output", "the request"),
        client_key=_client_key(params),
    )
    tparams = _object(tensor.get("parameters"), f"{what}: parameters")
    size = tparams.get("binary_data_size")
    if size is not None:
        if not _whole(size) or size < 0:
            raise InvalidArgument(f"{what}: binary_data_size must be a byte count, got {size!r}")
        if "data" in tensor:
            raise InvalidArgument(f"{what}: has both 'data' and binary_data_size; send one")
        if size != len(tail):
            raise InvalidArgument(
                f"{what}: binary_data_size is {size:,} but {len(tail):,} bytes follow the JSON "
                f"({HEADER_LENGTH} {header_length or 'not sent'})"
            )
        parsed.raw = tail
    else:
        if len(tail):
            raise InvalidArgument(
                f"{len(tail):,} bytes follow the JSON but no input has binary_data_size"
            )
        if "data" not in tensor:
            raise InvalidArgument(f"{what}: needs 'data' (or binary_data_size and binary data)")
        parsed.data = tensor["data"]
    outputs = request.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidArgument("'outputs' must be a list of requested outputs")
        names = []
        for i, item in enumerate(outputs):
            out = _object(item, f"output {i}")
            oname = _string(out, "name", f"output {i}")
            names.append(oname)
            oparams = _object(out.get("parameters"), f"output {oname!r}: parameters")
            if _bool(oparams, "binary_data", f"output {oname!r}"):
                parsed.binary_output = True
            k = oparams.get(v2_messages.CLASSIFICATION)
            if k is not None:
                if not _whole(k) or k < 1:
                    raise InvalidArgument(
                        f"output {oname!r}: parameter {v2_messages.CLASSIFICATION!r} must be a whole number "
                        f">= 1 (how many classes to return), got {k!r}"
                    )
                parsed.top = k
        if names:
            parsed.output_name = names[0]
            parsed.extra_outputs = names[1:]
    return parsed


def infer_extent(request: InferRequest) -> tuple[tuple[int, ...], int]:
    """The input's shape and item size, for admission before its data is decoded (0: a
    datatype decoding refuses)."""
    dtype = tensors.DATATYPES.get(request.datatype)
    return request.shape, 0 if dtype is None else dtype.itemsize


def check_names(request: InferRequest, served: ServedVersion) -> None:
    info = served.runtime.info
    if request.name != info.input_name:
        raise InvalidArgument(
            f"unknown input {request.name!r} for model {served.name!r}; its input is "
            f"{info.input_name!r}"
        )
    if request.extra_outputs:
        raise InvalidArgument(
            f"{1 + len(request.extra_outputs)} outputs requested; model {served.name!r} has one: "
            f"{info.output_name!r}"
        )
    if request.output_name is not None and request.output_name != info.output_name:
        raise InvalidArgument(
            f"unknown output {request.output_name!r} requested from model {served.name!r}; "
            f"its output is {info.output_name!r}"
        )


def decode_input(request: InferRequest) -> npt.NDArray[np.generic]:
    """The input as an array: a view of the binary bytes, or the JSON numbers (flat or nested,
    row-major), checked against the datatype and the shape."""
    what = f"input {request.name!r}"
    dtype = tensors.DATATYPES.get(request.datatype)
    if dtype is None:
        raise InvalidArgument(
            f"{what}: datatype {request.datatype!r} not accepted; expected "
            f"{tensors.ACCEPTED_DATATYPES}"
        )
    if request.raw is not None:
        return tensors.from_bytes(request.raw, dtype, request.shape, what, request.datatype)
    count = math.prod(request.shape)
    try:
        values = np.asarray(request.data, dtype=np.float64)
    except (ValueError, TypeError):
        raise InvalidArgument(
            f"{what}: 'data' must hold {request.datatype} numbers (a flat or nested list of "
            f"{count:,}), got {str(request.data)[:60]}"
        ) from None
    if values.size != count:
        raise InvalidArgument(
            f"{what}: shape {list(request.shape)} needs {count:,} values in 'data', "
            f"received {values.size:,}"
        )
    values = values.reshape(request.shape)
    if request.datatype == "UINT8":
        if count and (
            not np.array_equal(values, np.floor(values)) or values.min() < 0 or values.max() > 255
        ):
            raise InvalidArgument(f"{what}: UINT8 data must be whole numbers 0..255")
        return values.astype(np.uint8)
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


def infer_response(
    served: ServedVersion, request: InferRequest, prediction: Prediction
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON alone, or the JSON then the output's bytes."""
    info = served.runtime.info
    output: dict[str, Any] = {"name": info.output_name}
    top = prediction.top
    raw: bytes
    if top is None:
        probabilities = prediction.probabilities
        output.update(datatype="FP32", shape=list(probabilities.shape))
        if request.binary_output:
            raw = tensors.to_bytes(probabilities)
        else:
            output["data"] = probabilities.ravel().tolist()
    else:
        strings = v2_messages.classification_strings(served, top)
        output.update(datatype="BYTES", shape=list(top.indices.shape))
        if request.binary_output:
            raw = v2_messages.bytes_tensor(strings)
        else:
            output["data"] = strings
    if request.binary_output:
        output["parameters"] = {"binary_data_size": len(raw)}
    response: dict[str, Any] = {
        "model_name": served.name,
        "model_version": str(served.version),
        "outputs": [output],
    }
    if request.id:
        response["id"] = request.id
    head = dumps(response)
    if not request.binary_output:
        return head, {"Content-Type": JSON}
    return head + raw, {"Content-Type": BINARY, HEADER_LENGTH: str(len(head))}


# ------------------------------------------------------------------ metadata


def server_metadata(name: str, version: str, extensions: list[str]) -> dict[str, Any]:
    return {"name": name, "version": version, "extensions": extensions}


def model_metadata(served: ServedVersion, versions: list[int]) -> dict[str, Any]:
    """The model contract, as the gRPC ModelMetadata RPC answers it (-1 marks the batch
    dimension; UINT8 pixels are accepted beside the declared FP32)."""
    return _proto_json(v2_messages.v2_model_metadata(served, versions))


_INT64 = {FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64}


def _proto_json(message: Any) -> dict[str, Any]:
    """A Triton message as Triton's HTTP endpoints write it: protobuf's JSON mapping with the
    .proto's field names and fields at their defaults included, and 64-bit integers as JSON
    numbers (the mapping writes them as strings; Triton writes numbers, and perf_analyzer reads
    its statistics' counts as numbers)."""
    out: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_as_numbers(message, out)
    return out


def _int64_as_numbers(message: Any, out: dict[str, Any]) -> None:
    for f in message.DESCRIPTOR.fields:
        if f.name not in out:
            continue
        value, held = out[f.name], getattr(message, f.name)
        if f.cpp_type in _INT64:
            out[f.name] = [int(v) for v in value] if f.is_repeated else int(value)
        elif f.cpp_type != FieldDescriptor.CPPTYPE_MESSAGE:
            continue
        elif f.message_type.GetOptions().map_entry:
            entry = f.message_type.fields_by_name["value"]
            for key in value:
                if entry.cpp_type in _INT64:
                    value[key] = int(value[key])
                elif entry.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                    _int64_as_numbers(held[key], value[key])
        elif f.is_repeated:
            for item, item_out in zip(held, value, strict=True):
                _int64_as_numbers(item, item_out)
        else:
            _int64_as_numbers(held, value)


def model_config(
    served: ServedVersion, batching: BatchingOptions, max_versions: int, max_batch_size: int
) -> dict[str, Any]:
    """Triton's model configuration extension (GET .../config): the same ModelConfig message
    the gRPC ModelConfig RPC answers, as JSON."""
    response = v2_messages.v2_model_config(served, batching, max_versions, max_batch_size)
    return _proto_json(response.config)


def model_statistics(counted: list[tuple[str, int, VersionStats]]) -> dict[str, Any]:
    """Triton's statistics extension (GET .../stats): the gRPC ModelStatistics answer, as JSON."""
    response = v2.ModelStatisticsResponse(
        model_stats=[v2_messages.v2_model_statistics(n, version, s) for n, version, s in counted]
    )
    return _proto_json(response)


# ------------------------------------------------------------------ our own API (/v1)


def classify_json(served: ServedVersion, prediction: Prediction) -> dict[str, Any]:
    top = prediction.top
    assert top is not None
    names = served.runtime.info.class_names
    return {
        "model": served.name,
        "version": served.version,
        "classifications": [
            {
                "top": [
                    {"index": i, "label": names[i] if i < len(names) else str(i), "score": s}
                    for i, s in zip(row_idx, row_scores, strict=True)
                ]
            }
            for row_idx, row_scores in zip(top.indices.tolist(), top.scores.tolist(), strict=True)
        ],
    }


def summary_json(served: ServedVersion, s: ParameterSummary) -> dict[str, Any]:
    keras = served.runtime.info.properties.get("keras_parameters", "0")
    return {
        "model": served.name,
        "version": served.version,
        "input_shape": list(s.input_shape),
        "layers": [
            {
                "name": layer.name,
                "kind": layer.kind,
                "output_shape": list(layer.output_shape),
                "parameters": layer.parameters,
                "formula": layer.formula,
                "kernel": list(layer.kernel),
                "strides": list(layer.strides),
                "padding": layer.padding,
                "activation": layer.activation,
                "output_size_formula": layer.output_size_formula,
            }
            for layer in s.layers
        ],
        "total_parameters": s.total,
        "trainable_parameters": s.trainable,
        "non_trainable_parameters": s.total - s.trainable,
        "dense_neuron_parameters": s.dense_neuron_parameters,
        "dense_neuron_formula": s.dense_neuron_formula,
        "keras_parameters": int(keras) if keras.isdigit() else 0,
        "precision": served.runtime.info.precision,
    }


def models_json(catalog: list[ModelCatalog]) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": m.name,
                "default_version": m.default_version,
                "versions": [
                    {
                        "version": s.version,
                        "state": s.state.value,
                        "reason": s.reason,
                        "role": m.role(s.version),
                    }
                    for s in m.statuses
                ],
                "precision": m.precision,
                "rollout": _proto_json(cnnserve_messages.rollout_policy(m.rollout))
                if m.rollout is not None
                else None,
            }
            for m in catalog
        ]
    }


def rollout_json(status: RolloutStatus) -> dict[str, Any]:
    """GetRollout's answer in protobuf's JSON mapping, as our gRPC API's; tensors (the images
    and probabilities of the disagreements) as `array_json` writes them."""
    response = cnnserve_messages.rollout_response(status)
    disagreements = response.disagreements
    out = _proto_json(response)
    out["disagreements"] = [
        {
            "time": d.time,
            "image": array_json(cnnserve_messages.decode_tensor(d.image, "image")),
            "stable": _proto_json(d.stable),
            "candidate": _proto_json(d.candidate),
            "stable_probabilities": array_json(
                cnnserve_messages.decode_tensor(d.stable_probabilities, "probabilities")
            ),
            "candidate_probabilities": array_json(
                cnnserve_messages.decode_tensor(d.candidate_probabilities, "probabilities")
            ),
        }
        for d in disagreements
    ]
    return out


# ------------------------------------------------------------------ inside the model


def parse_layers(text: str | None) -> list[str]:
    """`?layers=conv1,pool1` -> their names (none: every convolution and pooling layer)."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def array_json(array: npt.NDArray[np.generic]) -> dict[str, Any]:
    """An array as its dtype, shape and little-endian C-order bytes in base64: exact, and a
    third the size of the same floats written as JSON numbers."""
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "base64": base64.b64encode(tensors.to_bytes(array)).decode("ascii"),
    }


def feature_maps_json(served: ServedVersion, maps: FeatureMaps) -> dict[str, Any]:
    names = served.runtime.info.class_names
    return {
        "model": served.name,
        "version": served.version,
        "top": [
            {"index": i, "label": names[i], "score": score}
            for i, score in zip(
                maps.top.indices[0].tolist(), maps.top.scores[0].tolist(), strict=True
            )
        ],
        "probabilities": maps.probabilities.tolist(),
        "image": array_json(maps.image),
        "layers": [
            {"name": m.name, "kind": m.kind, "values": array_json(m.values)} for m in maps.layers
        ],
    }


def filters_json(served: ServedVersion, filters: Filters) -> dict[str, Any]:
    return {
        "model": served.name,
        "version": served.version,
        "layer": filters.layer,
        "kernels": array_json(filters.kernels),
        "biases": array_json(filters.biases),
    }


# ------------------------------------------------------------------ explanations


def parse_explain_query(query: Any) -> dict[str, Any]:
    """`?method=occlusion|grad_cam&class=3&patch=4&stride=2` -> the data plane's arguments
    (each optional)."""

    def whole(key: str, low: int) -> int | None:
        text = query.get(key)
        if text is None or text == "":
            return None
        if not (text.isascii() and text.isdigit()) or int(text) < low or len(text) > 9:
            raise InvalidArgument(f"{key} must be a whole number >= {low}, got {text!r}")
        return int(text)

    return {
        "method": query.get("method", ""),
        "class_index": whole("class", 0),
        "patch": whole("patch", 1) or 0,
        "stride": whole("stride", 1) or 0,
    }


def parse_explain_tensor(body: bytes) -> npt.NDArray[np.generic]:
    """A JSON body `{"datatype": "UINT8" | "FP32", "shape": [1, H, W, C], "data": [...]}`: one
    image as Predict takes it, written as a v2 JSON input is (flat or nested numbers)."""
    what = "the JSON image"
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what}: not valid JSON: {exc}") from None
    obj = _object(obj, what)
    datatype = _string(obj, "datatype", what)
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise InvalidArgument(f"{what}: 'shape' must be a list of whole numbers, got {shape!r}")
    dims = tuple(shape)
    tensors.check_shape(dims, what)
    if "data" not in obj:
        raise InvalidArgument(f"{what}: no 'data'")
    return decode_input(InferRequest("", "image", datatype, dims, data=obj["data"]))


def explain_json(served: ServedVersion, e: Explanation) -> dict[str, Any]:
    return {
        "model": served.name,
        "version": served.version,
        "class_index": e.class_index,
        "label": served.runtime.info.class_names[e.class_index],
        "probability": e.probability,
        "method": e.method,
        "patch": e.patch,
        "stride": e.stride,
        "layer": e.layer,
        "images": e.images,
        "heat": array_json(e.heat),
        "image": array_json(e.image),
    }
