"""`make fuzz`: hostile input against a live server, both APIs, counted by status code.

Hypothesis builds requests for every method of cnnserve.v1.CnnServe and of the Open Inference
Protocol (inference.GRPCInferenceService), plus health checks: random dtypes, datatypes and
shapes (huge, negative and zero dimensions, empty batches), byte lengths off by one, NaN and
infinite floats, garbage, truncated and bit-flipped PNG/JPEG/GIF/BMP/TIFF, decompression bombs,
unknown models and versions, oversized messages, and raw random bytes or mangled valid
messages on the wire (sent with a generic call, so no client-side serializer gets in the way).

Beside every burst run streams on both streaming methods (PredictStream, ModelStreamInfer):
valid messages mixed with hostile ones (the same Hypothesis-built requests, the other protocol's
messages, raw random bytes, empty and truncated or mangled messages, huge shapes, NaN and
infinities, unknown models), sent in a few ways: closed after the last message, repeated past
the server's --max-stream-inflight, closed at once without a message, silent (nothing sent and
never closed), cancelled or past a short deadline mid-stream, cut by a message over the size
limit, or as a unary call to the stream method. A round of Hypothesis bursts ends with one fixed
burst that has every one of these on both methods.

Every call must end with a proper status code (never UNKNOWN, INTERNAL, UNAVAILABLE or a
timeout). Every message on a stream must get exactly one answer, in order (its id), with a proper
code, the same code, message and result as the unary call (Predict, ModelInfer) of the same
bytes; every stream must end as its behaviour calls for (OK when the client closed it). After
every burst the server process must still be alive, hold nothing in flight (no call, stream or
request data, from its metrics) and a valid request on each protocol must get the right answer
(the probabilities of an in-process ONNX Runtime session).

    python -m harness.fuzz --models-dir models --model mnist --cases 10000
    python -m harness.fuzz --target host:port --model-file models/mnist/1/model.onnx --model mnist

tests/integration/test_fuzz.py runs the same strategies for a few hundred cases, and every
stream behaviour on both methods.
"""

from __future__ import annotations

import argparse
import functools
import io
import random
import struct
import sys
import threading
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from harness.scrape import Scrape
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.inference import grpc_predict_v2_pb2 as v2
from serving.tensors import decode as decode_tensor

CNN = "/cnnserve.v1.CnnServe/"
V2 = "/inference.GRPCInferenceService/"
HEALTH = "/grpc.health.v1.Health/Check"
Code = grpc.StatusCode
# What a hostile request may get. Anything else is a server bug: UNKNOWN (an exception gRPC
# did not expect), INTERNAL (an exception the handlers did not expect), UNAVAILABLE (dead or
# refusing), DEADLINE_EXCEEDED (hung).
PROPER = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.RESOURCE_EXHAUSTED,
        Code.UNIMPLEMENTED,
        Code.FAILED_PRECONDITION,
        Code.OUT_OF_RANGE,
    }
)
I64 = (-(2**63), 2**63 - 1)
SPECIAL_DIMS = (
    0,
    1,
    2,
    3,
    -1,
    255,
    256,
    2**31 - 1,
    2**31,
    2**32,
    2**53,
    2**62,
    2**63 - 1,
    -(2**63),
)


@dataclass(frozen=True)
class ModelFacts:
    """What the strategies need to know of the model under test."""

    name: str
    h: int
    w: int
    c: int
    classes: int
    max_message: int  # the server's --max-message-mb, in bytes
    input_name: str = "image"
    output_name: str = "probabilities"

    @property
    def image_values(self) -> int:
        return self.h * self.w * self.c


@dataclass(frozen=True)
class Case:
    family: str
    method: str
    payload: bytes = field(repr=False)
    expect: frozenset[grpc.StatusCode] = frozenset()  # empty: any proper code

    def __repr__(self) -> str:
        head = self.payload[:48]
        more = f"... ({len(self.payload):,} bytes)" if len(self.payload) > 48 else ""
        return f"Case({self.family}, {self.method}, {head!r}{more})"


# ------------------------------------------------------------------ payload pieces


def fill(length: int, kind: str, seed: int) -> bytes:
    """`length` bytes: zeros, random, float32 in [0, 1), or float32 specials (NaN, infinities,
    extremes)."""
    length = max(0, length)
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return bytes(length)
    if kind == "unit":  # float32 in [0, 1): valid model input
        return rng.random(length // 4 + 1, dtype=np.float32).astype("<f4").tobytes()[:length]
    if kind == "floats":
        specials = np.array(
            [np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, -0.0, 0.5, 1.0, 255.0],
            dtype="<f4",
        )
        values = rng.choice(specials, size=length // 4 + 1)
        return values.tobytes()[:length]
    return rng.integers(0, 256, size=length, dtype=np.uint8).tobytes()


def _png(width: int, height: int, bit_depth: int = 1, rows: int | None = None) -> bytes:
    """A grey PNG written by hand (Pillow would need the whole bitmap in memory): all-zero rows
    compress about 1000:1, so 30000x30000 pixels fit in ~110 KB. `rows` < height truncates."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    row = bytes(1 + (width * bit_depth + 7) // 8)  # filter byte + packed pixels
    z = zlib.compressobj(9)
    parts = [z.compress(row * 500) for _ in range((rows if rows is not None else height) // 500)]
    parts.append(z.compress(row * ((rows if rows is not None else height) % 500)))
    parts.append(z.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def _save(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@functools.cache
def image_blobs(h: int, w: int) -> dict[str, bytes]:
    """Encoded images, good and hostile. Names ending in `_bomb` or `_over` must be refused."""
    rng = np.random.default_rng(7)
    grey = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    colour = Image.fromarray(rng.integers(0, 256, (2 * h, 2 * w, 3), dtype=np.uint8), mode="RGB")
    blobs = {
        "png": _save(grey, "PNG"),
        "jpeg": _save(colour, "JPEG", quality=90),
        "jpeg_progressive": _save(colour, "JPEG", progressive=True),
        "gif": _save(colour.convert("P"), "GIF"),
        "bmp": _save(colour, "BMP"),
        "tiff": _save(colour, "TIFF"),
        "ppm": _save(colour, "PPM"),
        "png_rgba": _save(colour.convert("RGBA"), "PNG"),
        "png_palette": _save(colour.convert("P"), "PNG", transparency=0),
        "png_16bit": _save(Image.new("I;16", (w, h), 300), "PNG"),
        "png_1x1": _save(Image.new("L", (1, 1), 9), "PNG"),
        "png_thin": _save(Image.new("L", (5000, 1), 200), "PNG"),
        "tiff_lab": _save(Image.new("LAB", (w, h)), "TIFF"),
        "tiff_cmyk": _save(Image.new("CMYK", (w, h)), "TIFF"),
        "tiff_float": _save(Image.new("F", (w, h), 1e30), "TIFF"),
        "eps": _save(grey, "EPS"),  # Pillow would run Ghostscript on it: not an accepted format
        "ico": _save(grey, "ICO"),
        "png_at_limit": _png(4000, 4000),  # exactly the default 16,000,000-pixel limit
        "png_over": _png(4001, 4000),
        "png_bomb": _png(30000, 30000),  # 900 megapixels in ~110 KB
        "png_header_bomb": _png(65535, 65535, rows=0),
        "png_short_rows": _png(300, 300, rows=17),  # IDAT ends early
    }
    gif = bytearray(blobs["gif"])
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen: 4.3 gigapixels
    blobs["gif_bomb"] = bytes(gif)
    bmp = bytearray(blobs["bmp"])
    bmp[18:26] = struct.pack("<ii", 100_000, 100_000)
    blobs["bmp_bomb"] = bytes(bmp)
    jpeg = bytearray(blobs["jpeg"])
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 65500, 65500)
    blobs["jpeg_bomb"] = bytes(jpeg)
    return blobs


def mangle(data: bytes, how: str, seed: int) -> bytes:
    """Truncate, flip bytes, insert junk or splice: the classic byte-level mutations."""
    rng = random.Random(seed)
    if not data:
        return rng.randbytes(rng.randint(1, 64))
    at = rng.randrange(len(data))
    if how == "truncate":
        return data[:at]
    if how == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if how == "insert":
        return data[:at] + rng.randbytes(rng.randint(1, 32)) + data[at:]
    return data[:at] + data[rng.randrange(len(data)) :]  # splice


# ------------------------------------------------------------------ strategies
# Built once per model (drawing from prebuilt strategies keeps generation fast). Each field of a
# request is usually valid and sometimes hostile, so that a good share of requests gets past
# the first check and reaches the deeper ones (and some are entirely valid).

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


CNN_METHODS = ("Predict", "Classify", "GetParameterSummary", "ListModels", "GetModelMetadata")
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
        base = draw(st.one_of(predict(s), v2_infer(s), classify(s)))
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

STREAM_PREDICT = CNN + "PredictStream"
STREAM_INFER = V2 + "ModelStreamInfer"
STREAM_METHODS = (STREAM_PREDICT, STREAM_INFER)
UNARY_OF = {STREAM_PREDICT: CNN + "Predict", STREAM_INFER: V2 + "ModelInfer"}
# What a message inside a stream may be answered with (the same as its unary twin).
STREAM_PROPER = PROPER - {Code.UNIMPLEMENTED}
# How a stream ends, by behaviour: "normal" sends its messages and half-closes; "long" does so
# with its messages repeated past the server's --max-stream-inflight; "half_close" closes at
# once without a message; "silent" sends nothing and never closes (its deadline ends it);
# "cancel" sends its messages, keeps its side open, reads `at` answers and cancels;
# "deadline" sends its messages, keeps its side open and passes a deadline of `at` ms while
# they are being answered (every answer that came must be right);
# "oversized" has a message over the server's limit at `at` (gRPC ends the call there);
# "unary_call" sends one message as a unary call to the stream method.
STREAM_ENDS = {
    "normal": Code.OK,
    "long": Code.OK,
    "half_close": Code.OK,
    "unary_call": Code.OK,
    "silent": Code.DEADLINE_EXCEEDED,
    "cancel": Code.CANCELLED,
    "deadline": Code.DEADLINE_EXCEEDED,
    "oversized": Code.RESOURCE_EXHAUSTED,
}
BEHAVIOURS = st.sampled_from(
    ("normal",) * 8
    + ("long", "half_close", "silent", "cancel", "cancel", "deadline", "oversized", "unary_call")
)
SILENT_DEADLINE_S = 0.5
LONG_STREAM = 120  # messages of a "long" stream, at least
HUGE_SHAPES = (
    (2**40, 1, 1, 1),
    (1, 2**31, 1, 1),
    (2**31, 2**31, 2**31, 2**31),  # the product overflows int64
    (0, 2**62),
    (2**62, 2**62, 0, 1),
    (-1, 28, 28, 1),
    (1, 28, 28, 1, 1),
    (),
)


@dataclass(frozen=True)
class Message:
    kind: str
    payload: bytes = field(repr=False)
    expect: frozenset[grpc.StatusCode] = frozenset()  # empty: what the unary call gets

    def __repr__(self) -> str:
        head = self.payload[:32]
        more = f"... ({len(self.payload):,} bytes)" if len(self.payload) > 32 else ""
        return f"Message({self.kind}, {head!r}{more})"


@dataclass(frozen=True)
class StreamCase:
    method: str  # STREAM_PREDICT or STREAM_INFER
    messages: tuple[Message, ...]
    behaviour: str = "normal"
    at: int = 0  # cancel: after this many answers; deadline: in ms; oversized: its index

    @property
    def short(self) -> str:
        return self.method.rpartition("/")[2]

    def __repr__(self) -> str:
        at = f" at {self.at}" if self.behaviour in ("cancel", "deadline", "oversized") else ""
        kinds = ", ".join(m.kind for m in self.messages[:16])
        more = f", ... ({len(self.messages)})" if len(self.messages) > 16 else ""
        return f"StreamCase({self.short}, {self.behaviour}{at}: [{kinds}{more}])"


def _pixels(model: ModelFacts, n: int, float32: bool, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (n, model.h, model.w, model.c)
    if float32:
        return rng.random(shape, dtype=np.float32).astype("<f4").tobytes()
    return rng.integers(0, 256, shape, dtype=np.uint8).tobytes()


def tensor_message(
    model: ModelFacts,
    method: str,
    shape: list[int],
    data: bytes,
    *,
    float32: bool = False,
    request_id: str = "",
    name: str | None = None,
    version: int = 0,
) -> bytes:
    """A PredictRequest or a ModelInferRequest (raw contents) of one tensor."""
    if method == STREAM_PREDICT:
        tensor = pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT32 if float32 else pb.DATA_TYPE_UINT8, shape=shape, data=data
        )
        return pb.PredictRequest(
            model=model.name if name is None else name,
            version=version,
            images=tensor,
            id=request_id,
        ).SerializeToString()
    request = v2.ModelInferRequest(
        model_name=model.name if name is None else name,
        model_version=str(version) if version else "",
        id=request_id,
    )
    request.inputs.add(name=model.input_name, datatype="FP32" if float32 else "UINT8", shape=shape)
    request.raw_input_contents.append(data)
    return request.SerializeToString()


STREAM_IDS = st.one_of(st.just(""), st.text(max_size=12))


@st.composite
def valid_message(draw: st.DrawFn, s: Strategies, method: str) -> Message:
    """A message that must be answered OK: the model's shape, uint8 or float32 in [0, 1)."""
    m = s.model
    n = draw(st.integers(1, 4))
    float32 = draw(st.booleans())
    data = _pixels(m, n, float32, draw(SEEDS))
    request_id = draw(STREAM_IDS)
    shape = [n, m.h, m.w, m.c]
    if method == STREAM_PREDICT:
        request = pb.PredictRequest(
            model=m.name,
            top_k=draw(st.integers(0, m.classes)),
            omit_probabilities=draw(st.booleans()),
            id=request_id,
            images=pb.Tensor(
                dtype=pb.DATA_TYPE_FLOAT32 if float32 else pb.DATA_TYPE_UINT8,
                shape=shape,
                data=data,
            ),
        )
        return Message("valid", request.SerializeToString(), frozenset({Code.OK}))
    infer = v2.ModelInferRequest(model_name=m.name, model_version="", id=request_id)
    infer.inputs.add(name=m.input_name, datatype="FP32" if float32 else "UINT8", shape=shape)
    infer.raw_input_contents.append(data)
    k = draw(st.integers(0, m.classes))
    if k:  # classification: a BYTES tensor of "score:index:label"
        infer.outputs.add(name=m.output_name).parameters["classification"].int64_param = k
    return Message("valid", infer.SerializeToString(), frozenset({Code.OK}))


@st.composite
def hostile_message(draw: st.DrawFn, s: Strategies, method: str) -> Message:
    m = s.model
    predict_stream = method == STREAM_PREDICT
    kind = draw(
        st.sampled_from(
            (
                "hypothesis", "hypothesis", "hypothesis", "cross", "wire", "empty", "truncated",
                "mangled", "huge_shape", "nan", "unknown_model",
            )
        )
    )  # fmt: skip
    bad = frozenset({Code.INVALID_ARGUMENT})
    if kind == "hypothesis":  # the unary cases' requests, with an id now and then
        if predict_stream:
            payload = draw(predict(s)).payload
            request_id = draw(STREAM_IDS)
            if request_id:  # a later field wins: the id is set whatever came before
                payload += pb.PredictRequest(id=request_id).SerializeToString()
            return Message(kind, payload)
        return Message(kind, draw(v2_infer(s)).payload)
    if kind == "cross":  # the other protocol's message, or a Classify request
        other = v2_infer(s) if predict_stream else predict(s)
        return Message(kind, draw(st.one_of(other, classify(s))).payload)
    if kind == "wire":
        return Message(kind, random.Random(draw(SEEDS)).randbytes(draw(st.integers(1, 2048))))
    if kind == "empty":  # a message of zero bytes: every field at its default
        return Message(kind, b"")
    if kind in ("truncated", "mangled"):
        base = draw(valid_message(s, method)).payload
        how = "truncate" if kind == "truncated" else draw(MANGLINGS)
        return Message(kind, mangle(base, how, draw(SEEDS)))
    request_id = draw(STREAM_IDS)
    if kind == "huge_shape":  # a few bytes behind a shape no memory could hold
        shape = list(draw(st.sampled_from(HUGE_SHAPES)))
        data = bytes(draw(st.sampled_from((0, 1, 4, 784))))
        return Message(kind, tensor_message(m, method, shape, data, request_id=request_id), bad)
    if kind == "nan":  # the model's shape, float32, a NaN or an infinity somewhere in it
        n = draw(st.integers(1, 3))
        values = np.frombuffer(_pixels(m, n, True, draw(SEEDS)), "<f4").copy()
        values[draw(st.integers(0, values.size - 1))] = draw(
            st.sampled_from((np.nan, np.inf, -np.inf))
        )
        shape = [n, m.h, m.w, m.c]
        return Message(
            kind,
            tensor_message(m, method, shape, values.tobytes(), float32=True, request_id=request_id),
            bad,
        )
    # unknown_model: a valid tensor for a model (or a version) that is not there
    name, version = draw(
        st.sampled_from(((m.name + "-nope", 0), ("nope", 0), ("../" + m.name, 0), (m.name, 999)))
    )
    data = _pixels(m, 1, False, draw(SEEDS))
    payload = tensor_message(
        m, method, [1, m.h, m.w, m.c], data, request_id=request_id, name=name, version=version
    )
    return Message(kind, payload, frozenset({Code.NOT_FOUND}))


@st.composite
def stream_message(draw: st.DrawFn, s: Strategies, method: str) -> Message:
    """Valid two times in five (some streams are all valid, some all hostile)."""
    if draw(st.sampled_from((True, True, False, False, False))):
        return draw(valid_message(s, method))
    return draw(hostile_message(s, method))


@st.composite
def oversized_message(draw: st.DrawFn, s: Strategies, method: str) -> Message:
    m = s.model
    size = m.max_message + draw(st.sampled_from((1, 17, 4096)))
    if draw(st.booleans()):
        n = size // m.image_values + 1
        payload = tensor_message(m, method, [n, m.h, m.w, m.c], bytes(n * m.image_values))
        return Message("oversized", payload)
    return Message("oversized", bytes(size))


@st.composite
def stream_case(draw: st.DrawFn, s: Strategies) -> StreamCase:
    method = draw(st.sampled_from(STREAM_METHODS))
    behaviour = draw(BEHAVIOURS)
    if behaviour in ("half_close", "silent"):
        return StreamCase(method, (), behaviour)
    messages = draw(st.lists(stream_message(s, method), min_size=1, max_size=12))
    if behaviour == "unary_call":
        return StreamCase(method, tuple(messages[:1]), behaviour)
    if behaviour == "long":
        messages = messages * (LONG_STREAM // len(messages) + 1)
    if behaviour == "deadline":
        if draw(st.booleans()):
            messages = messages * (LONG_STREAM // len(messages) + 1)
        return StreamCase(method, tuple(messages), behaviour, draw(st.integers(1, 300)))
    at = draw(st.integers(0, len(messages) - (1 if behaviour == "cancel" else 0)))
    if behaviour == "oversized":
        messages.insert(at, draw(oversized_message(s, method)))
    return StreamCase(method, tuple(messages), behaviour, at)


@functools.cache
def stream_cases(model: ModelFacts) -> st.SearchStrategy[StreamCase]:
    return stream_case(strategies(model))


def sample_messages(model: ModelFacts, method: str, seed: int = 0) -> list[Message]:
    """Valid messages between one hostile message of each fixed kind (for the tests)."""
    m = model
    rng = random.Random(seed)
    shape = [2, m.h, m.w, m.c]
    nan = np.frombuffer(_pixels(m, 2, True, seed), "<f4").copy()
    nan[rng.randrange(nan.size)] = np.nan
    ok, bad = frozenset({Code.OK}), frozenset({Code.INVALID_ARGUMENT})

    def valid(i: int, float32: bool = False) -> bytes:
        data = _pixels(m, 2, float32, seed + i)
        return tensor_message(
            m, method, shape, data, float32=float32, request_id=f"v{i}" if i % 2 else ""
        )

    other = STREAM_INFER if method == STREAM_PREDICT else STREAM_PREDICT
    unknown = tensor_message(m, method, shape, _pixels(m, 2, False, 0), request_id="?", name="nope")
    return [
        Message("valid", valid(0), ok),
        Message("wire", rng.randbytes(300)),
        Message("valid", valid(1, float32=True), ok),
        Message("truncated", valid(2)[: len(valid(2)) // 2]),
        Message("huge_shape", tensor_message(m, method, [2**40, 1, 1, 1], bytes(4)), bad),
        Message("valid", valid(3), ok),
        Message(
            "nan",
            tensor_message(m, method, shape, nan.tobytes(), float32=True, request_id="nan"),
            bad,
        ),
        Message("unknown_model", unknown, frozenset({Code.NOT_FOUND})),
        Message("empty", b"", bad),
        Message("valid", valid(4, float32=True), ok),
        Message("cross", tensor_message(m, other, shape, _pixels(m, 2, False, 1), request_id="x")),
        Message("valid", valid(5), ok),
    ]


def fixed_stream_cases(model: ModelFacts, seed: int = 0) -> list[StreamCase]:
    """Every behaviour on both stream methods, over `sample_messages`: run once a round, so
    that each round has them all whatever Hypothesis draws."""
    cases = []
    oversized = Message("oversized", bytes(model.max_message + 1))
    for method in STREAM_METHODS:
        messages = tuple(sample_messages(model, method, seed))
        cut = seed % len(messages)
        cases += [
            StreamCase(method, messages),
            StreamCase(method, messages * (LONG_STREAM // len(messages) + 1), "long"),
            StreamCase(method, (), "half_close"),
            StreamCase(method, (), "silent"),
            StreamCase(method, messages, "cancel", 0),
            StreamCase(method, messages, "cancel", 1 + cut % (len(messages) - 1)),
            StreamCase(method, messages * 10, "deadline", 20 + 10 * (seed % 10)),
            StreamCase(method, (*messages[:cut], oversized, *messages[cut:]), "oversized", cut),
            StreamCase(method, messages[1:2], "unary_call"),  # random bytes, as a unary call
            StreamCase(method, messages[:1], "unary_call"),
        ]
    return cases


# ------------------------------------------------------------------ running


def send(channel: grpc.Channel, case: Case, timeout: float = 30.0) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary(case.method, request_serializer=None, response_deserializer=None)
    try:
        call(case.payload, timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""  # type: ignore[attr-defined]
    return Code.OK, ""


class Oracle:
    """A valid request on each protocol, and the answer it must get (in-process ONNX Runtime on
    the same file: the server's probabilities match to float rounding, whatever the batching)."""

    def __init__(self, model: ModelFacts, model_file: Path) -> None:
        import onnxruntime as ort

        self.model = model
        rng = np.random.default_rng(3)
        self.x = rng.integers(0, 256, (3, model.h, model.w, model.c), dtype=np.uint8)
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        scale = np.float32(float(meta.get("input_scale", 1 / 255)))
        offset = np.float32(float(meta.get("input_offset", 0.0)))
        x = self.x.astype(np.float32) * scale
        if offset:
            x += offset
        self.expected: npt.NDArray[np.float32] = session.run(
            None, {session.get_inputs()[0].name: x}
        )[0]
        shape = list(self.x.shape)
        self.predict = Case(
            "valid",
            CNN + "Predict",
            pb.PredictRequest(
                model=model.name,
                images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=shape, data=self.x.tobytes()),
            ).SerializeToString(),
        )
        infer = v2.ModelInferRequest(model_name=model.name, id="oracle")
        infer.inputs.add(name=session.get_inputs()[0].name, datatype="UINT8", shape=shape)
        infer.raw_input_contents.append(self.x.tobytes())
        self.infer = Case("valid", V2 + "ModelInfer", infer.SerializeToString())

    def check(self, channel: grpc.Channel) -> None:
        call = channel.unary_unary(
            self.predict.method, request_serializer=None, response_deserializer=None
        )
        response = pb.PredictResponse.FromString(call(self.predict.payload, timeout=30))
        got = decode_tensor(response.probabilities.data, "FP32", response.probabilities.shape)
        np.testing.assert_allclose(got, self.expected, rtol=0, atol=1e-5)
        assert [c.top[0].index for c in response.classifications] == self.expected.argmax(
            1
        ).tolist()
        call = channel.unary_unary(
            self.infer.method, request_serializer=None, response_deserializer=None
        )
        answer = v2.ModelInferResponse.FromString(call(self.infer.payload, timeout=30))
        assert answer.id == "oracle" and len(answer.raw_output_contents) == 1
        got = decode_tensor(answer.raw_output_contents[0], "FP32", answer.outputs[0].shape)
        np.testing.assert_allclose(got, self.expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ streams


@dataclass(frozen=True)
class Unary:
    """A unary call's outcome, with its response when OK."""

    code: grpc.StatusCode
    details: str
    data: bytes = b""


def call_unary(channel: grpc.Channel, method: str, payload: bytes, timeout: float = 30.0) -> Unary:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        return Unary(Code.OK, "", call(payload, timeout=timeout))
    except grpc.RpcError as err:
        return Unary(err.code(), err.details() or "")  # type: ignore[attr-defined]


@dataclass(frozen=True)
class StreamOutcome:
    code: grpc.StatusCode  # how the call ended
    details: str
    answers: list[bytes]  # as they came, undecoded


def send_stream(channel: grpc.Channel, case: StreamCase, timeout: float = 60.0) -> StreamOutcome:
    """Run one stream case on a generic stream_stream call (no serializers: the bytes go as
    they are, and come back undecoded)."""
    payloads = [m.payload for m in case.messages]
    if case.behaviour == "unary_call":
        one = call_unary(channel, case.method, payloads[0], timeout)
        return StreamOutcome(one.code, one.details, [one.data] if one.code == Code.OK else [])
    release = threading.Event()

    def held_open() -> Iterator[bytes]:
        yield from payloads
        release.wait(timeout)  # the client's side stays open: a cancel or the deadline ends it

    held = case.behaviour in ("cancel", "silent", "deadline")
    requests = held_open() if held else iter(payloads)
    deadline = {"silent": SILENT_DEADLINE_S, "deadline": case.at / 1000}.get(
        case.behaviour, timeout
    )
    call = channel.stream_stream(case.method, request_serializer=None, response_deserializer=None)
    responses: Any = call(requests, timeout=deadline)
    answers: list[bytes] = []
    try:
        if case.behaviour == "cancel" and case.at == 0:
            time.sleep(0.05)  # let some messages out first
            responses.cancel()
        for answer in responses:
            answers.append(answer)
            if case.behaviour == "cancel" and len(answers) == case.at:
                responses.cancel()
        return StreamOutcome(responses.code(), responses.details() or "", answers)
    except grpc.RpcError as err:
        return StreamOutcome(err.code(), err.details() or "", answers)  # type: ignore[attr-defined]
    finally:
        release.set()


STATUS_BY_NUMBER = {code.value[0]: code for code in Code}
ATOL = 1e-5  # batching changes the probabilities by float rounding only


def _parsed(kind: Any, payload: bytes) -> Any:
    try:
        return kind.FromString(payload)
    except Exception:  # what the server's parser would refuse too
        return None


def _top(rows: list[list[tuple[int, float]]], twin: list[list[tuple[int, float]]]) -> str | None:
    """Top-k classes against the unary call's: the same counts and scores at every rank (a
    different index at a rank is a tie: its score equals the other's to rounding)."""
    if [len(r) for r in rows] != [len(r) for r in twin]:
        return f"top-k lengths {[len(r) for r in rows]}, the unary call's {[len(r) for r in twin]}"
    for row, other in zip(rows, twin, strict=True):
        for (_, score), (_, expected) in zip(row, other, strict=True):
            if abs(score - expected) > 2 * ATOL:
                return f"top classes {row}, the unary call's {other}"
    return None


def _close(a: bytes, b: bytes) -> str | None:
    x, y = np.frombuffer(a, "<f4"), np.frombuffer(b, "<f4")
    if x.shape != y.shape:
        return f"{x.size} probabilities, the unary call's {y.size}"
    if not np.allclose(x, y, rtol=0, atol=ATOL, equal_nan=False):
        return f"probabilities differ from the unary call's by {np.abs(x - y).max():.3g}"
    return None


def same_predict(a: pb.PredictResponse, b: pb.PredictResponse) -> str | None:
    """What differs between a stream's answer and the unary answer (None: nothing)."""
    if (a.model, a.version) != (b.model, b.version):
        return f"model {a.model!r} v{a.version}, the unary call's {b.model!r} v{b.version}"
    pa, pb_ = a.probabilities, b.probabilities
    if (pa.dtype, list(pa.shape)) != (pb_.dtype, list(pb_.shape)):
        return f"probabilities {list(pa.shape)}, the unary call's {list(pb_.shape)}"
    if wrong := _close(pa.data, pb_.data):
        return wrong
    return _top(
        [[(t.index, t.score) for t in c.top] for c in a.classifications],
        [[(t.index, t.score) for t in c.top] for c in b.classifications],
    )


def _classes(raw: bytes, shape: list[int]) -> list[list[tuple[int, float]]]:
    """A BYTES tensor of "score:index:label" strings (4-byte lengths before each), by row."""
    items, at = [], 0
    while at < len(raw):
        n = int.from_bytes(raw[at : at + 4], "little")
        items.append(raw[at + 4 : at + 4 + n].decode())
        at += 4 + n
    per_row = shape[-1] if shape else 1
    parsed = [(int(item.split(":")[1]), float(item.split(":")[0])) for item in items]
    return [parsed[r : r + per_row] for r in range(0, len(parsed), max(per_row, 1))]


def same_infer(a: v2.ModelInferResponse, b: v2.ModelInferResponse) -> str | None:
    if (a.model_name, a.model_version, a.id) != (b.model_name, b.model_version, b.id):
        return (
            f"model {a.model_name!r} v{a.model_version} id {a.id!r}, the unary call's "
            f"{b.model_name!r} v{b.model_version} id {b.id!r}"
        )
    outputs = [(o.name, o.datatype, list(o.shape)) for o in a.outputs]
    if outputs != [(o.name, o.datatype, list(o.shape)) for o in b.outputs]:
        return f"outputs {outputs}, the unary call's {[(o.name, o.datatype) for o in b.outputs]}"
    if len(a.raw_output_contents) != len(b.raw_output_contents):
        return "a different number of raw outputs than the unary call's"
    for output, x, y in zip(a.outputs, a.raw_output_contents, b.raw_output_contents, strict=True):
        shape = list(output.shape)
        wrong = (
            _close(x, y)
            if output.datatype == "FP32"
            else _top(_classes(x, shape), _classes(y, shape))
        )
        if wrong:
            return wrong
    return None


def _predict_answer(
    index: int, payload: bytes, data: bytes, twin: Unary
) -> tuple[grpc.StatusCode | None, str, str | None]:
    answer = pb.PredictStreamResponse.FromString(data)
    request = _parsed(pb.PredictRequest, payload)
    want_id = request.id if request is not None and request.id else str(index)
    which = answer.WhichOneof("result")
    if which == "error":
        code = STATUS_BY_NUMBER.get(answer.error.code)
        if code is None:
            return None, "", f"error code {answer.error.code} is no status code"
        text = answer.error.message
    elif which == "response":
        code, text = Code.OK, ""
    else:
        return None, "", "an answer with neither a response nor an error"
    if answer.id != want_id:
        return code, text, f"the answer's id is {answer.id!r}, not {want_id!r}: out of order?"
    if code == Code.OK and twin.code == Code.OK:
        return code, text, same_predict(answer.response, pb.PredictResponse.FromString(twin.data))
    return code, text, None


def _infer_answer(
    payload: bytes, data: bytes, twin: Unary
) -> tuple[grpc.StatusCode | None, str, str | None]:
    answer = v2.ModelStreamInferResponse.FromString(data)
    request = _parsed(v2.ModelInferRequest, payload)
    if answer.error_message:
        name, _, text = answer.error_message.partition(": ")
        code = Code.__members__.get(name)
        if code is None:
            return None, "", f"error_message {answer.error_message[:80]!r} names no status code"
        got = answer.infer_response
        want = ("", "", "")
        if request is not None:
            want = (request.id, request.model_name, request.model_version)
        if (got.id, got.model_name, got.model_version) != want:
            return code, text, f"the error answers {got.id!r} of {got.model_name!r}, not {want}"
        return code, text, None
    if not answer.HasField("infer_response"):
        return None, "", "an answer with neither error_message nor infer_response"
    if twin.code == Code.OK:
        return (
            Code.OK,
            "",
            same_infer(answer.infer_response, v2.ModelInferResponse.FromString(twin.data)),
        )
    return Code.OK, "", None


def check_answer(
    method: str, index: int, message: Message, data: bytes, twin: Unary
) -> tuple[grpc.StatusCode | None, str | None]:
    """The code of a stream's answer #index, and what is wrong with it (None: nothing): it must
    be proper, expected, and what the unary call of the same bytes got (code, message, result)."""
    try:
        if method == STREAM_PREDICT:
            code, text, wrong = _predict_answer(index, message.payload, data, twin)
        else:
            code, text, wrong = _infer_answer(message.payload, data, twin)
    except Exception as exc:  # not an answer the client can read
        return None, f"#{index} {message!r}: unreadable answer: {type(exc).__name__}: {exc}"
    if code is None or wrong:
        return code, f"#{index} {message!r}: {wrong}"
    said = f"#{index} {message!r} -> {code.name}: {text[:300]}"
    if code not in STREAM_PROPER or (message.expect and code not in message.expect):
        return code, said
    if code != twin.code:
        return code, f"{said}; the unary call -> {twin.code.name}: {twin.details[:300]}"
    if code != Code.OK and text != twin.details:
        return code, f"{said}; the unary call said: {twin.details[:300]}"
    return code, None


def check_stream(
    case: StreamCase, outcome: StreamOutcome, twins: dict[bytes, Unary]
) -> tuple[list[tuple[str, str]], list[str]]:
    """(message kind, code) of every answer, and the problems: the end the behaviour calls for,
    one answer per message (fewer only where the stream was cut short), each one right."""
    problems = []
    want_end = STREAM_ENDS[case.behaviour]
    if outcome.code != want_end:
        problems.append(f"ended {outcome.code.name} ({outcome.details[:200]}), not {want_end.name}")
    n, sent = len(outcome.answers), len(case.messages)
    wanted = {"cancel": case.at, "silent": 0, "oversized": case.at}.get(case.behaviour, sent)
    if n > wanted or (n < wanted and case.behaviour not in ("oversized", "deadline")):
        problems.append(f"{n} answers to {sent} messages ({wanted} expected)")
    counted = []
    for index, (message, data) in enumerate(zip(case.messages, outcome.answers, strict=False)):
        code, wrong = check_answer(case.method, index, message, data, twins[message.payload])
        counted.append((message.kind, code.name if code is not None else "unreadable"))
        if wrong:
            problems.append(wrong)
    return counted, [f"{case!r}: {p}" for p in problems]


def stream_settled(metrics_url: str) -> Callable[[], bool]:
    """Whether the server holds nothing in flight: no call, no stream, no request data."""

    def settled() -> bool:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            metrics = Scrape.parse(response.read().decode())
        held = (
            "cnnserve_inflight_requests",
            "cnnserve_inflight_streams",
            "cnnserve_inflight_bytes",
        )
        return not any(metrics.total(name) for name in held)

    return settled


def wait_settled(settled: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not settled():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Tally:
    codes: Counter[str] = field(default_factory=Counter)
    by_family: Counter[tuple[str, str]] = field(default_factory=Counter)
    bursts: int = 0
    streams: int = 0
    messages: int = 0  # sent on streams
    stream_codes: Counter[str] = field(default_factory=Counter)  # of the answers on streams
    by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)  # (message kind, code)
    stream_ends: Counter[tuple[str, str]] = field(default_factory=Counter)  # (how, code)

    @property
    def total(self) -> int:
        return sum(self.codes.values())

    @property
    def answers(self) -> int:
        return sum(self.stream_codes.values())

    @staticmethod
    def _rows(counts: Counter[tuple[str, str]]) -> list[str]:
        return [
            f"  {key:<30} "
            + ", ".join(f"{code} {n:,}" for (k, code), n in sorted(counts.items()) if k == key)
            for key in sorted({k for k, _ in counts})
        ]

    def report(self) -> str:
        lines = [f"{self.total:,} cases in {self.bursts:,} bursts; by status code:"]
        lines += [f"  {code:<20} {n:>8,}" for code, n in self.codes.most_common()]
        lines.append("by family:")
        lines += self._rows(self.by_family)
        if self.streams:
            lines.append(
                f"{self.streams:,} streams, {self.messages:,} messages on them, "
                f"{self.answers:,} answers; answers by status code:"
            )
            lines += [f"  {code:<20} {n:>8,}" for code, n in self.stream_codes.most_common()]
            lines.append("answers by message kind:")
            lines += self._rows(self.by_kind)
            lines.append("streams by method and behaviour, by how they ended:")
            lines += self._rows(self.stream_ends)
        return "\n".join(lines)


def run_burst(
    channel: grpc.Channel,
    burst: list[Case],
    *,
    oracle: Oracle,
    tally: Tally,
    alive: Callable[[], bool],
    pool: ThreadPoolExecutor,
    streams: Sequence[StreamCase] = (),
    settled: Callable[[], bool] | None = None,
) -> None:
    """Send a burst concurrently: the unary cases, the stream cases and, for every message on a
    stream, its unary twin. Check every code and answer, that the server lives, that it holds
    nothing once the burst is over (with `settled`), and a valid call on each protocol."""
    unary = [pool.submit(send, channel, case) for case in burst]
    outcomes = [pool.submit(send_stream, channel, case) for case in streams]
    twins: dict[tuple[str, bytes], Future[Unary]] = {}
    for stream in streams:
        for message in stream.messages:
            key = (UNARY_OF[stream.method], message.payload)
            if message.kind != "oversized" and key not in twins:
                twins[key] = pool.submit(call_unary, channel, *key)
    problems = []
    for case, future in zip(burst, unary, strict=True):
        code, details = future.result()
        tally.codes[code.name] += 1
        tally.by_family[(case.family.split(":")[0], code.name)] += 1
        if code not in PROPER or (case.expect and code not in case.expect):
            problems.append(f"{case!r} -> {code.name}: {details}")
    for stream, ended in zip(streams, outcomes, strict=True):
        outcome = ended.result()
        answers = {
            payload: twin.result()
            for (method, payload), twin in twins.items()
            if method == UNARY_OF[stream.method]
        }
        counted, wrong = check_stream(stream, outcome, answers)
        tally.streams += 1
        tally.messages += len(stream.messages)
        tally.stream_ends[(f"{stream.short} {stream.behaviour}", outcome.code.name)] += 1
        for kind, code_name in counted:
            tally.stream_codes[code_name] += 1
            tally.by_kind[(kind, code_name)] += 1
        problems += wrong
    tally.bursts += 1
    assert alive(), "the server process died"
    assert not problems, "\n".join(problems)
    oracle.check(channel)
    if streams and settled is not None:
        assert wait_settled(settled), "calls, streams or request data still held 10 s after a burst"


def fuzz(
    channel: grpc.Channel,
    model: ModelFacts,
    *,
    oracle: Oracle,
    tally: Tally,
    alive: Callable[[], bool],
    cases: int,
    burst_size: int = 8,
    stream_burst: int = 2,
    settled: Callable[[], bool] | None = None,
    progress: Callable[[Tally], None] | None = None,
) -> None:
    """At least `cases` more unary cases, in bursts of `burst_size` / 2 to `burst_size` cases
    sent at once with up to `stream_burst` stream cases beside them, each burst one Hypothesis
    example (rounds of 50 bursts, until enough were sent)."""
    target = tally.total + cases
    bursts = st.tuples(
        st.lists(strategies(model).case, min_size=max(1, burst_size // 2), max_size=burst_size),
        st.lists(stream_cases(model), min_size=min(1, stream_burst), max_size=max(0, stream_burst)),
    )
    failed = False  # once a burst failed, Hypothesis replays and shrinks it: let those run
    with ThreadPoolExecutor(burst_size) as pool:

        @settings(
            max_examples=50,
            deadline=None,
            database=None,
            phases=(Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )
        @given(bursts)
        def burst(drawn: tuple[list[Case], list[StreamCase]]) -> None:
            nonlocal failed
            if tally.total >= target and not failed:
                return
            cases, streams = drawn
            try:
                run_burst(
                    channel,
                    cases,
                    oracle=oracle,
                    tally=tally,
                    alive=alive,
                    pool=pool,
                    streams=streams,
                    settled=settled,
                )
            except BaseException:
                failed = True
                raise

        rounds = 0
        while tally.total < target:
            burst()
            if stream_burst > 0:  # and every stream behaviour, whatever was drawn
                run_burst(
                    channel,
                    [],
                    oracle=oracle,
                    tally=tally,
                    alive=alive,
                    pool=pool,
                    streams=fixed_stream_cases(model, seed=rounds),
                    settled=settled,
                )
            rounds += 1
            if progress is not None:
                progress(tally)


# ------------------------------------------------------------------ command line


Settled = Callable[[], bool] | None


@contextmanager
def target_server(
    args: argparse.Namespace,
) -> Iterator[tuple[str, Callable[[], bool], Path, Settled]]:
    """(target, is the server alive, its model file, does it hold nothing in flight)."""
    if args.target:
        if args.model_file is None:
            raise SystemExit("--target needs --model-file (the ONNX file the server runs)")
        settled = stream_settled(args.metrics_url) if args.metrics_url else None
        yield args.target, lambda: True, args.model_file, settled
        return
    import tempfile

    from harness import serve_newest

    extra = [
        "--max-message-mb",
        str(args.max_message_mb),
        "--max-stream-inflight",
        str(args.max_stream_inflight),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with serve_newest(args.models_dir, args.model, extra, log_path) as (proc, model_file):
            yield (
                proc.target,
                lambda: proc.proc is not None and proc.proc.poll() is None,
                model_file,
                stream_settled(f"http://127.0.0.1:{proc.metrics_port}/metrics"),
            )
        if "Traceback" in log_path.read_text():
            print(f"the server logged exceptions:\n{log_path.read_text()[-4000:]}")


def model_facts(channel: grpc.Channel, name: str, max_message: int) -> ModelFacts:
    call = channel.unary_unary(
        CNN + "GetModelMetadata", request_serializer=None, response_deserializer=None
    )
    md = pb.GetModelMetadataResponse.FromString(
        call(pb.GetModelMetadataRequest(model=name).SerializeToString(), timeout=30)
    )
    _, h, w, c = md.inputs[0].shape
    classes = int(md.outputs[0].shape[1])
    return ModelFacts(
        name, int(h), int(w), int(c), classes, max_message, md.inputs[0].name, md.outputs[0].name
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--model", default="mnist", help="model name in the repository")
    p.add_argument("--cases", type=int, default=10_000, help="at least this many hostile calls")
    p.add_argument("--burst", type=int, default=16, help="most cases sent at once")
    p.add_argument(
        "--stream-burst",
        type=int,
        default=2,
        help="most stream cases (PredictStream, ModelStreamInfer) beside each burst (0: none)",
    )
    p.add_argument(
        "--max-message-mb", type=int, default=1, help="the server's message limit (own server)"
    )
    p.add_argument(
        "--max-stream-inflight",
        type=int,
        default=8,
        help="the server's messages in flight per stream (own server; small, so that long "
        "streams meet the bound)",
    )
    p.add_argument("--target", help="fuzz a running server instead of starting one")
    p.add_argument(
        "--model-file", type=Path, help="with --target: the model's ONNX file (for the answers)"
    )
    p.add_argument(
        "--metrics-url",
        help="with --target: its /metrics, to check that nothing is left in flight after a burst",
    )
    args = p.parse_args(argv)

    started = time.monotonic()
    tally = Tally()
    with (
        target_server(args) as (target, alive, model_file, settled),
        grpc.insecure_channel(target) as channel,
    ):
        model = model_facts(channel, args.model, args.max_message_mb * 1024 * 1024)
        oracle = Oracle(model, model_file)
        print(
            f"fuzzing {target}: model {model.name} ({model.h}x{model.w}x{model.c}), "
            f"{args.cases:,} cases, up to {args.stream_burst} streams beside each burst"
        )

        def progress(tally: Tally) -> None:
            print(
                f"  {tally.total:,} cases, {tally.streams:,} streams ({tally.answers:,} answers), "
                f"{time.monotonic() - started:.0f}s",
                flush=True,
            )

        try:
            fuzz(
                channel,
                model,
                oracle=oracle,
                tally=tally,
                alive=alive,
                cases=args.cases,
                burst_size=args.burst,
                stream_burst=args.stream_burst,
                settled=settled,
                progress=progress,
            )
        except Exception as exc:
            print(tally.report())
            print(f"FAILED after {tally.total:,} cases: {type(exc).__name__}: {exc}")
            return 1
    print(tally.report())
    seconds = time.monotonic() - started
    print(
        f"OK: {tally.total:,} cases and {tally.streams:,} streams ({tally.answers:,} answers) in "
        f"{seconds:.0f}s ({tally.total / seconds:.0f} cases/s); no improper code, every message "
        "on a stream answered once, in order, as its unary call; server alive, valid calls right "
        "after every burst"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
