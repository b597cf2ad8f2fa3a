"""The only module where protobuf meets numpy.

Tensors arrive as raw little-endian bytes: decoding is `np.frombuffer` on the message's own
buffer (no copy), after checking dtype, shape and byte length against each other.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from serving.errors import InvalidArgument
from serving.inference import TopK
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.repository import ModelRepository, ServedVersion
from serving.summary import ParameterSummary

DTYPES: dict[int, np.dtype[np.generic]] = {
    pb.DATA_TYPE_UINT8: np.dtype("<u1"),
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
}
MAX_RANK = 8


def decode_tensor(t: pb.Tensor, what: str = "images") -> npt.NDArray[np.generic]:
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        name = pb.DataType.Name(t.dtype) if t.dtype in pb.DataType.values() else str(t.dtype)
        raise InvalidArgument(
            f"{what}: dtype {name} not accepted; expected DATA_TYPE_UINT8 or DATA_TYPE_FLOAT32"
        )
    shape = tuple(t.shape)
    if not shape or len(shape) > MAX_RANK:
        raise InvalidArgument(
            f"{what}: shape {list(shape)} has rank {len(shape)}; expected 1..{MAX_RANK}"
        )
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: shape {list(shape)} has a negative dimension")
    expected = math.prod(shape) * dtype.itemsize
    if len(t.data) != expected:
        raise InvalidArgument(
            f"{what}: shape {list(shape)} of {np.dtype(dtype).name} needs {expected:,} bytes, "
            f"received {len(t.data):,}"
        )
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


def encode_tensor(array: npt.NDArray[np.generic]) -> pb.Tensor:
    if array.dtype == np.float32:
        dtype = pb.DATA_TYPE_FLOAT32
    elif array.dtype == np.uint8:
        dtype = pb.DATA_TYPE_UINT8
    else:
        raise TypeError(f"cannot encode {array.dtype}")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return pb.Tensor(dtype=dtype, shape=array.shape, data=data)


def decode_classify_images(request: pb.ClassifyRequest) -> list[bytes | npt.NDArray[np.uint8]]:
    out: list[bytes | npt.NDArray[np.uint8]] = []
    for i, image in enumerate(request.images):
        kind = image.WhichOneof("source")
        if kind == "encoded":
            out.append(image.encoded)
        elif kind == "pixels":
            if image.pixels.dtype != pb.DATA_TYPE_UINT8:
                raise InvalidArgument(f"image {i}: raw pixels must be DATA_TYPE_UINT8")
            pixels = decode_tensor(image.pixels, f"image {i}")
            out.append(pixels)  # type: ignore[arg-type]
        else:
            raise InvalidArgument(f"image {i}: neither encoded bytes nor pixels set")
    return out


def classifications(served: ServedVersion, top: TopK) -> list[pb.Classification]:
    names = served.runtime.info.class_names
    out = []
    for row_idx, row_scores in zip(top.indices.tolist(), top.scores.tolist(), strict=True):
        out.append(
            pb.Classification(
                top=[
                    pb.ClassScore(index=i, label=names[i] if i < len(names) else str(i), score=s)
                    for i, s in zip(row_idx, row_scores, strict=True)
                ]
            )
        )
    return out


def predict_response(
    served: ServedVersion, probabilities: npt.NDArray[np.float32], top: TopK, omit: bool
) -> pb.PredictResponse:
    response = pb.PredictResponse(
        model=served.name, version=served.version, classifications=classifications(served, top)
    )
    if not omit:
        response.probabilities.CopyFrom(encode_tensor(probabilities))
    return response


def classify_response(served: ServedVersion, top: TopK) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        model=served.name, version=served.version, classifications=classifications(served, top)
    )


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


def list_models_response(repository: ModelRepository) -> pb.ListModelsResponse:
    models = []
    for name, statuses in repository.statuses().items():
        ready = repository.ready_versions(name)
        models.append(
            pb.ModelStatus(
                name=name,
                default_version=max(ready) if ready else 0,
                versions=[
                    pb.ModelVersionStatus(version=s.version, state=s.state.value, reason=s.reason)
                    for s in statuses
                ],
            )
        )
    return pb.ListModelsResponse(models=models)
