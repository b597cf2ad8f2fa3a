"""cnnserve.v1's messages: where its protobuf meets numpy, both ways.

Tensors arrive as raw little-endian bytes: decoding is `np.frombuffer` on the message's own
buffer (no copy), after checking dtype, shape and byte length against each other.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

from serving import tensors
from serving.core.dataplane import (
    Explanation,
    FeatureMaps,
    Filters,
    ModelCatalog,
    ParameterSummary,
    Policy,
    Prediction,
    RolloutStatus,
    ServedVersion,
    TopK,
)
from serving.errors import InvalidArgument
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb

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
        precision=served.runtime.info.precision,
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


def explain_input(request: pb.ExplainRequest) -> tuple[bytes | npt.NDArray[np.generic], bool]:
    """The image of an Explain request, and whether it is a Predict-style tensor (else an image
    as Classify takes it)."""
    kind = request.WhichOneof("input")
    if kind == "tensor":
        return decode_tensor(request.tensor, "tensor"), True
    if kind == "image":
        return decode_image(request.image), False
    raise InvalidArgument(
        "no image in the request: set `tensor` (as Predict) or `image` (as Classify)"
    )


def explain_response(served: ServedVersion, e: Explanation) -> pb.ExplainResponse:
    response = pb.ExplainResponse(
        model=served.name,
        version=served.version,
        class_index=e.class_index,
        label=served.runtime.info.class_names[e.class_index],
        probability=e.probability,
        method=e.method,
        patch=e.patch,
        stride=e.stride,
        layer=e.layer,
        images=e.images,
    )
    encode_tensor(e.heat, response.heat)
    encode_tensor(e.image, response.image)
    return response


def metadata_response(
    served: ServedVersion, ready_versions: list[int], max_batch: int, rollout: RolloutStatus
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
        precision=info.precision,
        role=rollout.roles.get(served.version, ""),
        rollout=rollout_policy(rollout),
    )


def list_models_response(catalog: list[ModelCatalog]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[
            pb.ModelStatus(
                name=model.name,
                default_version=model.default_version,
                versions=[
                    pb.ModelVersionStatus(
                        version=s.version,
                        state=s.state.value,
                        reason=s.reason,
                        role=model.role(s.version),
                    )
                    for s in model.statuses
                ],
                precision=model.precision,
                rollout=rollout_policy(model.rollout) if model.rollout is not None else None,
            )
            for model in catalog
        ]
    )


def _bounds(policy: Policy) -> pb.RollbackBounds:
    b = policy.bounds
    return pb.RollbackBounds(
        after=b.after,
        min_agreement=b.min_agreement,
        max_error_rate=b.max_error_rate,
        max_p99_ratio=b.max_p99_ratio,
    )


def rollout_policy(status: RolloutStatus) -> pb.RolloutPolicy:
    out = pb.RolloutPolicy(
        state=status.state,
        reason=status.reason,
        file=status.path,
        file_error=status.file_error,
        since=status.since,
    )
    policy = status.policy
    if policy is not None:
        out.stable = policy.stable
        out.candidate = policy.candidate or 0
        out.mode = policy.mode
        out.canary_percent = policy.canary_percent
        out.rollback.CopyFrom(_bounds(policy))
    return out


def _score(names: tuple[str, ...], probabilities: npt.NDArray[np.float32]) -> pb.ClassScore:
    best = int(probabilities.argmax())
    label = names[best] if best < len(names) else str(best)
    return pb.ClassScore(index=best, label=label, score=float(probabilities[best]))


def rollout_response(status: RolloutStatus) -> pb.GetRolloutResponse:
    response = pb.GetRolloutResponse(model=status.model, policy=rollout_policy(status))
    a = status.agreement
    if a is None:
        return response
    response.compared = a.compared
    response.agreed = a.agreed
    response.agreement = a.agreement or 0.0
    response.mean_abs_diff = a.mean_abs_diff or 0.0
    response.shed = a.shed
    for version, tally in ((a.stable_version, a.stable), (a.candidate_version, a.candidate)):
        p50, p99 = tally.quantile(0.5), tally.quantile(0.99)
        response.versions.append(
            pb.VersionRollout(
                version=version,
                role=status.roles.get(version, ""),
                calls=tally.calls,
                errors=tally.errors,
                error_rate=tally.error_rate,
                p50_ms=(p50 or 0.0) * 1000,
                p99_ms=(p99 or 0.0) * 1000,
            )
        )
    names = status.class_names
    for d in a.disagreements:
        item = response.disagreements.add(
            time=d.at, stable=_score(names, d.stable), candidate=_score(names, d.candidate)
        )
        encode_tensor(d.image, item.image)
        encode_tensor(d.stable, item.stable_probabilities)
        encode_tensor(d.candidate, item.candidate_probabilities)
    return response
