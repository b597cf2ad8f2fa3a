"""serving.core.images: encoded images converted to the model's channels and size, and refused
when garbage, too large or empty."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.core import images
from serving.errors import InvalidArgument


def _png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_images_convert_channels_and_size() -> None:
    rgb = np.zeros((40, 30, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    img = images.open_encoded(_png(rgb, "RGB"), 0, 10_000)
    out = images.fit(img, (28, 28, 1))
    assert out.shape == (28, 28, 1) and out.dtype == np.uint8
    assert int(out[0, 0, 0]) == 76  # ITU-R 601 luma of pure red
    gray = images.fit(images.from_pixels(np.full((28, 28), 9, np.uint8), 0), (32, 32, 3))
    assert gray.shape == (32, 32, 3) and set(np.unique(gray)) == {9}


def test_images_refuse_garbage_bombs_and_empties() -> None:
    with pytest.raises(InvalidArgument, match="image 3: cannot decode"):
        images.open_encoded(b"not an image at all", 3, 10_000)
    with pytest.raises(InvalidArgument, match="image 0: empty"):
        images.open_encoded(b"", 0, 10_000)
    big = _png(np.zeros((200, 200), np.uint8), "L")
    with pytest.raises(InvalidArgument, match=r"image 1: 200x200 = 40,000 pixels, over the limit"):
        images.open_encoded(big, 1, 10_000)
    truncated = _png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), "L")[:200]
    with pytest.raises(InvalidArgument, match="image 2"):
        images.open_encoded(truncated, 2, 10_000)
