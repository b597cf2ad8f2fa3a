"""Errors of the data plane, free of gRPC: the API layer maps each kind to a status code."""

from __future__ import annotations

from enum import Enum

from serving.tensors import TensorError


class Kind(Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    INTERNAL = "INTERNAL"


class ServingError(Exception):
    kind = Kind.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    kind = Kind.INVALID_ARGUMENT


class NotFound(ServingError):
    kind = Kind.NOT_FOUND


class Unavailable(ServingError):
    kind = Kind.UNAVAILABLE


class ResourceExhausted(ServingError):
    kind = Kind.RESOURCE_EXHAUSTED


class FailedPrecondition(ServingError):
    """The request is valid but the model cannot answer it (an operation its graph lacks)."""

    kind = Kind.FAILED_PRECONDITION


def as_refusal(exc: BaseException) -> ServingError | None:
    """The refusal an exception stands for, or None for a bug: a tensor that does not fit its
    own dtype and shape (serving.tensors knows nothing of the server) is an invalid argument."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, TensorError):
        return InvalidArgument(str(exc))
    return None
