"""Encoded or raw images -> the model's input size and channels, with Pillow. No protobuf."""

from __future__ import annotations

import io
import warnings

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from serving.errors import InvalidArgument

U8 = npt.NDArray[np.uint8]


# Formats a client may send. Pillow opens many more (EPS, for one, runs Ghostscript on load):
# untrusted bytes only ever reach these decoders.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


def configure(max_pixels: int) -> None:
    """Make Pillow's own decompression-bomb check agree with our limit: it warns above
    MAX_IMAGE_PIXELS (which `open_encoded` turns into a refusal) and fails above twice that.
    0 keeps Pillow's default (about 89 megapixels)."""
    if max_pixels > 0:
        Image.MAX_IMAGE_PIXELS = max_pixels


def open_encoded(data: bytes, index: int, max_pixels: int) -> Image.Image:
    """Open PNG/JPEG/... bytes, refusing empty, corrupt and oversized (decompression-bomb) images."""
    if not data:
        raise InvalidArgument(f"image {index}: empty; expected PNG, JPEG or another encoded image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if max_pixels and width * height > max_pixels:
                raise InvalidArgument(
                    f"image {index}: {width}x{height} = {width * height:,} pixels, "
                    f"over the limit of {max_pixels:,}"
                )
            image.load()
    except InvalidArgument:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument(f"image {index}: refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidArgument(
            f"image {index}: cannot decode ({len(data):,} bytes): not an image in a supported "
            f"format ({', '.join(FORMATS)})"
        ) from None
    except Exception as exc:  # whatever a decoder raises on hostile bytes is a bad image
        raise InvalidArgument(
            f"image {index}: cannot decode ({len(data):,} bytes): {exc}"
        ) from None
    return image


def from_pixels(pixels: U8, index: int) -> Image.Image:
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        return Image.fromarray(pixels, mode="L")
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        return Image.fromarray(pixels, mode="RGB" if pixels.shape[2] == 3 else "RGBA")
    raise InvalidArgument(
        f"image {index}: raw pixels of shape {list(pixels.shape)}; expected [H, W] or [H, W, C] "
        "with C in 1, 3, 4"
    )


def fit(image: Image.Image, shape: tuple[int, int, int], index: int = 0) -> U8:
    """Convert to the model's channels (L or RGB) and size; returns uint8 [H, W, C]."""
    h, w, c = shape
    if image.mode in ("RGBA", "LA", "P", "PA"):
        # Composite transparency over white, as a viewer would show it.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    try:
        image = image.convert("L" if c == 1 else "RGB")
        if image.size != (w, h):
            image = image.resize((w, h), Image.Resampling.BILINEAR)
    except ValueError as exc:  # a mode Pillow cannot convert (LAB, ...), an empty image
        raise InvalidArgument(
            f"image {index}: cannot convert mode {image.mode} {image.size} to the model's input: {exc}"
        ) from None
    array = np.asarray(image, dtype=np.uint8)
    return array.reshape(h, w, c)
