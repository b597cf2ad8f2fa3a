"""Hypothesis strategies for unary cases: every method of both gRPC APIs, valid and hostile
requests, raw bytes on the wire, unknown methods and oversized messages."""

from __future__ import annotations

import functools
import random
from typing import Any, cast

import numpy as np
from grpc_health.v1 import health_pb2
from hypothesis import strategies as st

from harness.fuzz.payloads import (
    CNN,
    HEALTH,
    I64,
    SPECIAL_DIMS,
    V2,
    Case,
    Code,
    ModelFacts,
    fill,
    image_blobs,
    mangle,
)
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.inference import grpc_predict_v2_pb2 as v2

SEEDS = st.integers(0, 2**32 - 1)
MANGLINGS = st.sampled_from(("truncate", "flip", "insert", "splice"))
FILL_KINDS = st.sampled_from(("zeros", "random", "floats", "unit", "unit"))
DIMS = st.one_of(st.sampled_from(SPECIAL_DIMS), st.integers(*I64), st.integers(0, 64))
HOSTILE_NAMES = st.one_of(st.sampled_from(("", "nope", " ", "x" * 5000)), st.text(max_size=24))
V2_VERSIONS = ("2", "0", "-1", "01", "1.0", " 1", "\uff11", "9" * 30, "+1")
PARAMETER_VALUES = st.one_of(
    st.builds(lambda v: v2.InferParameter(int64_param=v), st.integers(*I64)),
    st.builds(lambda v: v2.InferParameter(uint64_param=v), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: v2.InferParameter(int64_param=v), st.integers(-2, 12)),
    st.builds(lambda v: v2.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: v2.InferParameter(string_param=v), st.text(max_size=8)),
    st.builds(lambda v: v2.InferParameter(double_param=v), st.floats()),
    st.just(v2.InferParameter()),
)
CLASSIFICATION: st.SearchStrategy[dict[str, v2.InferParameter]] = st.one_of(
    st.just({}),
    st.builds(lambda k: {"classification": v2.InferParameter(int64_param=k)}, st.integers(1, 12)),
)
PARAMETERS = st.dictionaries(
    st.one_of(st.just("classification"), st.text(max_size=8)), PARAMETER_VALUES, max_size=2
)
GOOD_BLOBS = (
    "png", "jpeg", "jpeg_progressive", "gif", "bmp", "tiff", "ppm", "png_rgba", "png_palette",
    "png_16bit", "png_1x1", "png_thin", "tiff_cmyk", "tiff_float",
    "png_short_rows",  # Pillow fills the missing rows: any proper code will do
)  # fmt: skip
REFUSED_BLOBS = (
    "eps", "ico", "tiff_lab", "png_over", "png_bomb", "png_header_bomb", "gif_bomb", "bmp_bomb",
    "jpeg_bomb",
)  # fmt: skip


VALID_3_IN_4 = st.sampled_from((True, True, True, False))


@st.composite
def usually(draw: st.DrawFn, valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    """`valid` three times in four (st.one_of(valid, valid, valid, hostile) would not do: it
    merges equal branches)."""
    return draw(valid) if draw(VALID_3_IN_4) else draw(hostile)


def _nudge(model: ModelFacts, n: int, delta: int, axis: int) -> list[int]:
    shape = [n, model.h, model.w, model.c]
    shape[axis] += delta
    return shape


def _length(shape: list[int], itemsize: int, delta: int, cap: int) -> int:
    """The byte length the shape needs, plus `delta`; a small wrong one when it is beyond `cap`."""
    count = 1
    for d in shape:
        count *= d
    expected = count * itemsize
    if 0 <= expected <= cap:
        return max(0, expected + delta)
    return abs(delta) * 7 % 100


class Strategies:
    """Every strategy for one model; `case` draws any kind of case."""

    def __init__(self, model: ModelFacts) -> None:
        m = self.model = model
        self.name = usually(
            st.just(m.name),
            st.one_of(
                st.sampled_from((m.name.upper(), m.name + "\x00", "../" + m.name)), HOSTILE_NAMES
            ),
        )
        exact = st.integers(1, 4).map(lambda n: [n, m.h, m.w, m.c])
        near = st.tuples(st.integers(0, 4), st.sampled_from((-1, 1)), st.integers(0, 3))
        self.shape = usually(
            exact,
            st.one_of(
                near.map(lambda t: _nudge(m, *t)),
                st.just([0, m.h, m.w, m.c]),
                st.lists(DIMS, max_size=10),
            ),
        )
        self.delta = usually(st.just(0), st.sampled_from((-1, 1, 4, -4)))
        self.dtype = usually(
            st.sampled_from((1, 2)), st.one_of(st.just(0), st.integers(-5, 2**31 - 1))
        )
        self.version = usually(
            st.sampled_from((0, 1)), st.one_of(st.sampled_from((2, -1)), st.integers(*I64))
        )
        self.top_k = usually(
            st.sampled_from((0, 1, 3)),
            st.one_of(st.sampled_from((m.classes, m.classes + 1)), st.integers(0, 2**32 - 1)),
        )
        self.v2_version = usually(
            st.sampled_from(("", "1")), st.one_of(st.sampled_from(V2_VERSIONS), st.text(max_size=6))
        )
        self.datatype = usually(
            st.sampled_from(("FP32", "UINT8")),
            st.sampled_from(("BYTES", "INT64", "FP16", "BOOL", "", "fp32")),
        )
        self.input_name = usually(
            st.just(m.input_name), st.sampled_from(("", "input_1", m.input_name + " "))
        )
        self.output_name = usually(st.just(m.output_name), st.sampled_from(("", "logits")))
        self.counts = usually(st.just(1), st.sampled_from((0, 2)))
        self.pixel_shape = st.one_of(
            st.lists(st.sampled_from((0, 1, 2, 3, 4, 5, 28, 29)), max_size=4),
            st.lists(DIMS, max_size=4),
        )
        self.blob = usually(st.sampled_from(GOOD_BLOBS), st.sampled_from(REFUSED_BLOBS))
        self.v2_version_any = st.one_of(
            st.sampled_from(("", "1", *V2_VERSIONS)), st.text(max_size=6)
        )
        self.number = st.one_of(st.sampled_from((0, 1, 2, -1)), st.integers(*I64))
        self.case = st.one_of(
            predict(self),
            predict(self),
            v2_infer(self),
            v2_infer(self),
            classify(self),
            explain(self),
            hostile_images(self),
            other_calls(self),
            wire(self),
            wire(self),
            unknown_method(self),
            oversized(self),
        )


@functools.cache
def strategies(model: ModelFacts) -> Strategies:
    return Strategies(model)


def cases(model: ModelFacts) -> st.SearchStrategy[Case]:
    return strategies(model).case


@st.composite
def tensors(draw: st.DrawFn, s: Strategies) -> pb.Tensor:
    dtype = draw(s.dtype)
    shape = draw(s.shape)
    length = _length(shape, 4 if dtype == pb.DATA_TYPE_FLOAT32 else 1, draw(s.delta), 256 * 1024)
    data = fill(length, draw(FILL_KINDS), draw(SEEDS))
    return pb.Tensor(dtype=cast(Any, dtype), shape=shape, data=data)


@st.composite
def predict(draw: st.DrawFn, s: Strategies) -> Case:
    request = pb.PredictRequest(
        model=draw(s.name),
        version=draw(s.version),
        top_k=draw(s.top_k),
        omit_probabilities=draw(st.booleans()),
    )
    if draw(usually(st.just(True), st.just(False))):  # now and then no images at all
        request.images.CopyFrom(draw(tensors(s)))
    return Case("predict", CNN + "Predict", request.SerializeToString())


@st.composite
def classify_images(draw: st.DrawFn, s: Strategies) -> pb.Image:
    blobs = image_blobs(s.model.h, s.model.w)
    source = draw(
        st.sampled_from(("blob", "blob", "blob", "mangled", "random", "empty", "pixels", "none"))
    )
    if source == "blob":
        return pb.Image(encoded=blobs[draw(s.blob)])
    if source == "mangled":
        base = blobs[draw(st.sampled_from(("png", "jpeg", "gif", "bmp", "tiff", "png_16bit")))]
        return pb.Image(encoded=mangle(base, draw(MANGLINGS), draw(SEEDS)))
    if source == "random":
        return pb.Image(encoded=random.Random(draw(SEEDS)).randbytes(draw(st.integers(1, 3000))))
    if source == "empty":
        return pb.Image(encoded=b"")
    if source == "pixels":
        shape = draw(s.pixel_shape)
        dtype = draw(st.sampled_from((1, 1, 1, 0, 2, 77)))
        length = _length(shape, 4 if dtype == 2 else 1, draw(s.delta), 64 * 1024)
        data = fill(length, "random", draw(SEEDS))
        return pb.Image(pixels=pb.Tensor(dtype=cast(Any, dtype), shape=shape, data=data))
    return pb.Image()


@st.composite
def classify(draw: st.DrawFn, s: Strategies) -> Case:
    request = pb.ClassifyRequest(
        model=draw(s.name),
        version=draw(s.version),
        images=draw(st.lists(classify_images(s), max_size=4)),
        top_k=draw(s.top_k),
    )
    return Case("classify", CNN + "Classify", request.SerializeToString())


@st.composite
def explain(draw: st.DrawFn, s: Strategies) -> Case:
    """Explain: half the time a request that must be answered (a known method, a good image or
    tensor, the class, patch and stride in range), else every field drawn as hostile as the
    other methods' (either input or none, any method, class, patch and stride)."""
    m = s.model
    methods = st.sampled_from(("", "occlusion", "grad_cam"))
    if draw(st.booleans()):
        request = pb.ExplainRequest(
            model=m.name,
            method=draw(methods),
            patch=draw(st.sampled_from((0, 1, 4, 7, m.h))),
            stride=draw(st.sampled_from((0, 2, 7))),
        )
        if draw(st.booleans()):
            request.class_index = draw(st.integers(0, m.classes - 1))
        if draw(st.booleans()):
            blob = image_blobs(m.h, m.w)[draw(st.sampled_from(GOOD_BLOBS))]
            request.image.encoded = blob
        else:
            length = m.image_values * 4
            data = fill(length, draw(st.sampled_from(("zeros", "unit"))), draw(SEEDS))
            shape = [1, m.h, m.w, m.c]
            request.tensor.CopyFrom(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=shape, data=data))
        return Case("explain", CNN + "Explain", request.SerializeToString())
    request = pb.ExplainRequest(
        model=draw(s.name),
        version=draw(s.version),
        method=draw(usually(methods, st.text(max_size=12))),
        patch=draw(usually(st.sampled_from((0, 4, 7)), st.sampled_from((m.h + 1, 2**32 - 1)))),
        stride=draw(usually(st.sampled_from((0, 2, 7)), st.integers(0, 2**32 - 1))),
    )
    if draw(st.booleans()):
        cls = usually(st.integers(0, m.classes - 1), st.sampled_from((-1, m.classes, 2**31 - 1)))
        request.class_index = draw(cls)
    source = draw(st.sampled_from(("tensor", "image", "image", "none")))
    if source == "tensor":
        request.tensor.CopyFrom(draw(tensors(s)))
    elif source == "image":
        request.image.CopyFrom(draw(classify_images(s)))
    return Case("explain", CNN + "Explain", request.SerializeToString())


@st.composite
def hostile_images(draw: st.DrawFn, s: Strategies) -> Case:
    """One image that must be refused between good ones: the call is INVALID_ARGUMENT."""
    blobs = image_blobs(s.model.h, s.model.w)
    bad = draw(st.sampled_from(REFUSED_BLOBS))
    images = [blobs["png"], blobs[bad], blobs["jpeg"]]
    request = pb.ClassifyRequest(model=s.model.name, images=[pb.Image(encoded=b) for b in images])
    return Case(
        f"image:{bad}",
        CNN + "Classify",
        request.SerializeToString(),
        frozenset({Code.INVALID_ARGUMENT}),
    )


@st.composite
def v2_infer(draw: st.DrawFn, s: Strategies) -> Case:
    request = v2.ModelInferRequest(
        model_name=draw(s.name), model_version=draw(s.v2_version), id=draw(st.text(max_size=12))
    )
    if draw(st.integers(0, 4)) == 0:
        for key, value in draw(PARAMETERS).items():
            request.parameters[key].CopyFrom(value)
    raw = draw(st.booleans())
    for _ in range(draw(s.counts)):
        datatype = draw(s.datatype)
        shape = draw(s.shape)
        tensor = request.inputs.add(name=draw(s.input_name), datatype=datatype, shape=shape)
        count = _length(shape, 1, draw(s.delta), 64 * 1024)
        if raw:
            itemsize = 1 if datatype == "UINT8" else 4
            request.raw_input_contents.append(fill(count * itemsize, draw(FILL_KINDS), draw(SEEDS)))
            continue
        which = draw(
            usually(st.just(datatype), st.sampled_from(("FP32", "UINT8", "INT32", "BYTES", "none")))
        )
        rng = np.random.default_rng(draw(SEEDS))
        if which == "FP32":
            values = np.frombuffer(fill(count * 4, draw(FILL_KINDS), draw(SEEDS)), "<f4")
            tensor.contents.fp32_contents.extend(values.tolist())
        elif which == "UINT8":
            top = draw(usually(st.just(256), st.just(2**32)))
            tensor.contents.uint_contents.extend(rng.integers(0, top, count).tolist())
        elif which == "INT32":
            tensor.contents.int_contents.extend(rng.integers(-(2**31), 2**31, count).tolist())
        elif which == "BYTES":
            tensor.contents.bytes_contents.extend([b"x"] * min(count, 100))
    if raw and request.inputs and draw(st.integers(0, 9)) == 0:
        request.inputs[0].contents.fp32_contents.append(1.0)  # both kinds at once: refused
    if raw and draw(st.integers(0, 9)) == 0:
        request.raw_input_contents.append(b"\0" * 4)  # one entry too many
    for _ in range(draw(st.sampled_from((0, 0, 1, 1, 2)))):
        output = request.outputs.add(name=draw(s.output_name))
        for key, value in draw(usually(CLASSIFICATION, PARAMETERS)).items():
            output.parameters[key].CopyFrom(value)
    return Case("v2_infer", V2 + "ModelInfer", request.SerializeToString())


@st.composite
def other_calls(draw: st.DrawFn, s: Strategies) -> Case:
    """The other methods, with random model names and versions."""
    name = draw(s.name)
    version = draw(s.v2_version_any)
    number = draw(s.number)
    method, request = draw(
        st.sampled_from(
            [
                (
                    CNN + "GetParameterSummary",
                    pb.GetParameterSummaryRequest(model=name, version=number),
                ),
                (CNN + "GetModelMetadata", pb.GetModelMetadataRequest(model=name, version=number)),
                (CNN + "ListModels", pb.ListModelsRequest()),
                (V2 + "ServerLive", v2.ServerLiveRequest()),
                (V2 + "ServerReady", v2.ServerReadyRequest()),
                (V2 + "ServerMetadata", v2.ServerMetadataRequest()),
                (V2 + "ModelReady", v2.ModelReadyRequest(name=name, version=version)),
                (V2 + "ModelMetadata", v2.ModelMetadataRequest(name=name, version=version)),
                (V2 + "ModelConfig", v2.ModelConfigRequest(name=name, version=version)),
                (V2 + "ModelStatistics", v2.ModelStatisticsRequest(name=name, version=version)),
                (
                    V2 + "RepositoryIndex",
                    v2.RepositoryIndexRequest(repository_name=name, ready=number % 2 == 0),
                ),
                (HEALTH, health_pb2.HealthCheckRequest(service=name)),
            ]
        )
    )
    return Case("other", method, request.SerializeToString())


CNN_METHODS = (
    "Predict",
    "Classify",
    "Explain",
    "GetParameterSummary",
    "ListModels",
    "GetModelMetadata",
)
V2_METHODS = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
]
METHODS = (*(CNN + m for m in CNN_METHODS), *(V2 + m for m in V2_METHODS), HEALTH)
UNKNOWN_METHODS = (
    CNN + "Nope",
    V2 + "ModelStreamInfer2",
    "/nope.Service/Predict",
    CNN + "predict",
    CNN + "predictstream",
)


@st.composite
def wire(draw: st.DrawFn, s: Strategies) -> Case:
    """Bytes that are not the message the method expects: random, or a valid one mangled."""
    method = draw(st.sampled_from(METHODS))
    if draw(st.booleans()):
        payload = random.Random(draw(SEEDS)).randbytes(draw(st.integers(0, 4096)))
    else:
        base = draw(st.one_of(predict(s), v2_infer(s), classify(s), explain(s)))
        payload = mangle(base.payload, draw(MANGLINGS), draw(SEEDS))
    return Case("wire", method, payload)


@st.composite
def unknown_method(draw: st.DrawFn, s: Strategies) -> Case:
    payload = random.Random(draw(SEEDS)).randbytes(draw(st.integers(0, 64)))
    method = draw(st.sampled_from(UNKNOWN_METHODS))
    return Case("unknown_method", method, payload, frozenset({Code.UNIMPLEMENTED}))


@st.composite
def oversized(draw: st.DrawFn, s: Strategies) -> Case:
    """A message just over the server's limit, valid or not: RESOURCE_EXHAUSTED, unparsed."""
    m = s.model
    size = m.max_message + draw(st.sampled_from((1, 17, 4096)))
    expect = frozenset({Code.RESOURCE_EXHAUSTED})
    if draw(st.booleans()):
        n = size // m.image_values + 1
        images = pb.Tensor(
            dtype=pb.DATA_TYPE_UINT8, shape=[n, m.h, m.w, m.c], data=bytes(n * m.image_values)
        )
        request = pb.PredictRequest(model=m.name, images=images)
        return Case("oversized", CNN + "Predict", request.SerializeToString(), expect)
    return Case("oversized", draw(st.sampled_from(METHODS)), bytes(size), expect)


# ------------------------------------------------------------------ streaming strategies
# A stream case is a stream on PredictStream or ModelStreamInfer: messages that mix valid and
# hostile ones (each one an answer of its own; the stream must go on), sent with one of a few
# stream-level behaviours. Every answer is compared with the unary call (Predict, ModelInfer) of
# the same bytes: the same status code, the same message, the same result.
