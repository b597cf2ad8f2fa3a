"""serving.grpc.cnnserve_messages: tensors decoded without a copy and checked, encoded back, and the
classifications written by hand as wire bytes equal to protobuf's own messages."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from harness import write_tiny_model
from serving.core.dataplane import Prediction, top_k
from serving.core.runtime import (
    ModelRuntime,
    RuntimeOptions,
)
from serving.errors import InvalidArgument
from serving.grpc import cnnserve_messages
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.tensors import TensorError

TENSOR_REFUSALS = (InvalidArgument, TensorError)


def test_codec_decodes_without_copy_and_checks_lengths() -> None:
    # A tensor's own dtype, shape and bytes are checked in serving.tensors (TensorError, which
    # the API layer answers as INVALID_ARGUMENT); the protocol's dtype names in the cnnserve_messages.
    x = np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)
    t = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=x.shape, data=x.tobytes())
    assert np.array_equal(cnnserve_messages.decode_tensor(t), x)
    t.data = t.data[:-1]
    with pytest.raises(TENSOR_REFUSALS, match=r"needs 72 bytes, received 71"):
        cnnserve_messages.decode_tensor(t)
    with pytest.raises(TENSOR_REFUSALS, match="DATA_TYPE_UNSPECIFIED not accepted"):
        cnnserve_messages.decode_tensor(pb.Tensor(shape=[1], data=b"\0"))
    with pytest.raises(TENSOR_REFUSALS, match="negative"):
        cnnserve_messages.decode_tensor(
            pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[-1, 2], data=b"")
        )
    with pytest.raises(TENSOR_REFUSALS, match="rank 0"):
        cnnserve_messages.decode_tensor(pb.Tensor(dtype=pb.DATA_TYPE_UINT8, data=b""))


def test_codec_roundtrip_encode() -> None:
    y = np.random.default_rng(0).random((4, 10), dtype=np.float32)
    t = cnnserve_messages.encode_tensor(y)
    assert list(t.shape) == [4, 10] and np.array_equal(
        cnnserve_messages.decode_tensor(t, "probabilities"), y
    )


@pytest.mark.parametrize("k", [1, 3])
def test_hand_encoded_classifications_equal_the_messages(tmp_path: Path, k: int) -> None:
    """cnnserve_messages writes the classifications as wire bytes: they must parse to exactly the
    messages protobuf itself would build (index 0 and a score of 0.0 included)."""
    rt = ModelRuntime(write_tiny_model(tmp_path / "m.onnx"), RuntimeOptions())
    served = types.SimpleNamespace(name="tiny", version=3, runtime=rt)
    probs = np.array([[0.0, 0.3, 0.7], [1.0, 0.0, 0.0], [0.2, 0.5, 0.3]], np.float32)
    top = top_k(probs, k)
    names = rt.info.class_names
    expected = [
        pb.Classification(
            top=[
                pb.ClassScore(index=int(i), label=names[int(i)], score=float(s))
                for i, s in zip(row_i, row_s, strict=True)
            ]
        )
        for row_i, row_s in zip(top.indices, top.scores, strict=True)
    ]
    prediction = Prediction(probs, top)
    got = cnnserve_messages.predict_response(served, prediction, omit=False)  # type: ignore[arg-type]
    assert list(got.classifications) == expected
    assert (got.model, got.version) == ("tiny", 3)
    assert np.array_equal(
        cnnserve_messages.decode_tensor(got.probabilities, "probabilities"), probs
    )
    omitted = cnnserve_messages.predict_response(served, prediction, omit=True)  # type: ignore[arg-type]
    assert not omitted.HasField("probabilities")
    classify = cnnserve_messages.classify_response(served, prediction)  # type: ignore[arg-type]
    assert list(classify.classifications) == expected
