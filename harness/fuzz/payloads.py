"""Hostile payloads' raw material: the methods, the codes a hostile call may get, the model's
facts, a case, and bytes: filled tensors, images (broken and bombs), mangled messages."""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from PIL import Image

from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb

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


def grey_png(width: int, height: int, bit_depth: int = 1, rows: int | None = None) -> bytes:
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
        "png_at_limit": grey_png(4000, 4000),  # exactly the default 16,000,000-pixel limit
        "png_over": grey_png(4001, 4000),
        "png_bomb": grey_png(30000, 30000),  # 900 megapixels in ~110 KB
        "png_header_bomb": grey_png(65535, 65535, rows=0),
        "png_short_rows": grey_png(300, 300, rows=17),  # IDAT ends early
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
