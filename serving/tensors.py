"""Tensors as bytes on a wire and as numpy arrays: dtype names, shape checks, both directions.

Protocol-neutral and free of the server: the server's message builders (gRPC, REST), the client,
the benchmarks and the tests all convert through here, so there is one bytes <-> array path.
Every protocol sends tensors as contiguous little-endian bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

MAX_RANK = 8
MAX_ELEMENTS = 1 << 40  # far beyond any message; keeps numpy's sizes in range

# The Open Inference Protocol's datatype names (gRPC and REST) of the dtypes a model takes.
DATATYPES: dict[str, np.dtype[np.generic]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("<u1")}
ACCEPTED_DATATYPES = " or ".join(DATATYPES)


class TensorError(ValueError):
    """A tensor whose dtype, shape and bytes do not agree: the caller's mistake, never ours."""


def check_shape(shape: tuple[int, ...], what: str) -> None:
    """Rank 1..MAX_RANK, no negative dimension, and no dimension numpy cannot represent (a
    tensor of zero elements may still name one: [0, 2**62] carries no bytes at all)."""
    if not shape or len(shape) > MAX_RANK:
        raise TensorError(
            f"{what}: shape {list(shape)} has rank {len(shape)}; expected 1..{MAX_RANK}"
        )
    if min(shape) < 0:
        raise TensorError(f"{what}: shape {list(shape)} has a negative dimension")
    # Without generators on the common path: every request goes through here.
    if (math.prod(shape) or math.prod(d for d in shape if d)) > MAX_ELEMENTS:
        raise TensorError(f"{what}: shape {list(shape)} is too large")


def from_bytes(
    data: bytes | memoryview,
    dtype: np.dtype[np.generic],
    shape: tuple[int, ...],
    what: str,
    type_name: str,
) -> npt.NDArray[np.generic]:
    """Raw little-endian tensor bytes as an array (a view, no copy), once the byte length fits
    dtype and shape (a shape that passed `check_shape`)."""
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise TensorError(
            f"{what}: shape {list(shape)} of {type_name} needs {expected:,} bytes, "
            f"received {len(data):,}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def to_bytes(array: npt.NDArray[np.generic]) -> bytes:
    """An array's values as contiguous little-endian bytes."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def decode(data: bytes | memoryview, datatype: str, shape: Iterable[int]) -> npt.NDArray[Any]:
    """A tensor by the protocol's datatype name (FP32, UINT8), checked, as an array view."""
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise TensorError(f"datatype {datatype!r} not accepted; expected {ACCEPTED_DATATYPES}")
    dims = tuple(int(d) for d in shape)
    check_shape(dims, "tensor")
    return from_bytes(data, dtype, dims, "tensor", datatype)
