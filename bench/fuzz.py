"""`make fuzz`: hostile input against a live server, both APIs, counted by status code.

Hypothesis builds requests for every method of cnnserve.v1.CnnServe and of the Open Inference
Protocol (inference.GRPCInferenceService), plus health checks: random dtypes, datatypes and
shapes (huge, negative and zero dimensions, empty batches), byte lengths off by one, NaN and
infinite floats, garbage, truncated and bit-flipped PNG/JPEG/GIF/BMP/TIFF, decompression bombs,
unknown models and versions, oversized messages, and raw random bytes or mangled valid
messages on the wire (sent with a generic call, so no client-side serializer gets in the way).

Every call must end with a proper status code (never UNKNOWN, INTERNAL, UNAVAILABLE or a
timeout); after every burst the server process must still be alive and a valid request on each
protocol must get the right answer (the probabilities of an in-process ONNX Runtime session).

    python bench/fuzz.py --models-dir models --model mnist --cases 10000
    python bench/fuzz.py --target host:port --model-file models/mnist/1/model.onnx --model mnist

tests/integration/test_fuzz.py runs the same strategies for a few hundred cases.
"""

from __future__ import annotations

import argparse
import functools
import io
import random
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import numpy.typing as npt
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpc_health.v1 import health_pb2  # noqa: E402

from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb  # noqa: E402
from serving.pb.inference import grpc_predict_v2_pb2 as v2  # noqa: E402

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
UNKNOWN_METHODS = (CNN + "Nope", V2 + "ModelStreamInfer", "/nope.Service/Predict", CNN + "predict")


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
        got = np.frombuffer(response.probabilities.data, "<f4").reshape(
            tuple(response.probabilities.shape)
        )
        np.testing.assert_allclose(got, self.expected, rtol=0, atol=1e-5)
        assert [c.top[0].index for c in response.classifications] == self.expected.argmax(
            1
        ).tolist()
        call = channel.unary_unary(
            self.infer.method, request_serializer=None, response_deserializer=None
        )
        answer = v2.ModelInferResponse.FromString(call(self.infer.payload, timeout=30))
        assert answer.id == "oracle" and len(answer.raw_output_contents) == 1
        got = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(
            tuple(answer.outputs[0].shape)
        )
        np.testing.assert_allclose(got, self.expected, rtol=0, atol=1e-5)


@dataclass
class Tally:
    codes: Counter[str] = field(default_factory=Counter)
    by_family: Counter[tuple[str, str]] = field(default_factory=Counter)
    bursts: int = 0

    @property
    def total(self) -> int:
        return sum(self.codes.values())

    def report(self) -> str:
        lines = [f"{self.total:,} cases in {self.bursts:,} bursts; by status code:"]
        lines += [f"  {code:<20} {n:>8,}" for code, n in self.codes.most_common()]
        lines.append("by family:")
        families = sorted({f for f, _ in self.by_family})
        for family in families:
            row = ", ".join(
                f"{code} {n:,}" for (f, code), n in sorted(self.by_family.items()) if f == family
            )
            lines.append(f"  {family:<24} {row}")
        return "\n".join(lines)


def run_burst(
    channel: grpc.Channel,
    burst: list[Case],
    *,
    oracle: Oracle,
    tally: Tally,
    alive: Callable[[], bool],
    pool: ThreadPoolExecutor,
) -> None:
    """Send a burst concurrently; check every code, that the server lives, and a valid call."""
    results = list(pool.map(lambda case: send(channel, case), burst))
    problems = []
    for case, (code, details) in zip(burst, results, strict=True):
        tally.codes[code.name] += 1
        tally.by_family[(case.family.split(":")[0], code.name)] += 1
        if code not in PROPER or (case.expect and code not in case.expect):
            problems.append(f"{case!r} -> {code.name}: {details}")
    tally.bursts += 1
    assert alive(), "the server process died"
    assert not problems, "\n".join(problems)
    oracle.check(channel)


def fuzz(
    channel: grpc.Channel,
    model: ModelFacts,
    *,
    oracle: Oracle,
    tally: Tally,
    alive: Callable[[], bool],
    cases: int,
    burst_size: int = 8,
    progress: Callable[[Tally], None] | None = None,
) -> None:
    """At least `cases` more cases, in bursts of `burst_size` / 2 to `burst_size` cases sent at
    once, each burst one Hypothesis example (rounds of 50 bursts, until enough were sent)."""
    target = tally.total + cases
    bursts = st.lists(strategies(model).case, min_size=max(1, burst_size // 2), max_size=burst_size)
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
        def burst(cases: list[Case]) -> None:
            if tally.total < target:
                run_burst(channel, cases, oracle=oracle, tally=tally, alive=alive, pool=pool)

        while tally.total < target:
            burst()
            if progress is not None:
                progress(tally)


# ------------------------------------------------------------------ command line


@contextmanager
def target_server(args: argparse.Namespace) -> Iterator[tuple[str, Callable[[], bool], Path]]:
    if args.target:
        if args.model_file is None:
            raise SystemExit("--target needs --model-file (the ONNX file the server runs)")
        yield args.target, lambda: True, args.model_file
        return
    import tempfile

    from tests.support import serve_newest

    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with serve_newest(
            args.models_dir, args.model, ["--max-message-mb", str(args.max_message_mb)], log_path
        ) as (proc, model_file):
            yield (
                proc.target,
                lambda: proc.proc is not None and proc.proc.poll() is None,
                model_file,
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
        "--max-message-mb", type=int, default=1, help="the server's message limit (own server)"
    )
    p.add_argument("--target", help="fuzz a running server instead of starting one")
    p.add_argument(
        "--model-file", type=Path, help="with --target: the model's ONNX file (for the answers)"
    )
    args = p.parse_args(argv)

    started = time.monotonic()
    tally = Tally()
    with (
        target_server(args) as (target, alive, model_file),
        grpc.insecure_channel(target) as channel,
    ):
        model = model_facts(channel, args.model, args.max_message_mb * 1024 * 1024)
        oracle = Oracle(model, model_file)
        print(
            f"fuzzing {target}: model {model.name} ({model.h}x{model.w}x{model.c}), {args.cases:,} cases"
        )

        def progress(tally: Tally) -> None:
            print(f"  {tally.total:,} cases, {time.monotonic() - started:.0f}s", flush=True)

        try:
            fuzz(
                channel,
                model,
                oracle=oracle,
                tally=tally,
                alive=alive,
                cases=args.cases,
                burst_size=args.burst,
                progress=progress,
            )
        except Exception as exc:
            print(tally.report())
            print(f"FAILED after {tally.total:,} cases: {type(exc).__name__}: {exc}")
            return 1
    print(tally.report())
    seconds = time.monotonic() - started
    print(
        f"OK: {tally.total:,} cases in {seconds:.0f}s ({tally.total / seconds:.0f}/s); no improper code, server alive, valid calls right after every burst"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
