"""The soak's traffic: pre-serialized requests, valid and invalid, with their expected outcomes.

Valid requests (Predict, ModelInfer, Classify, health, metadata, list) must be answered OK with
the right answer: the probabilities or classes of an in-process ONNX Runtime session on the same
file. Invalid ones must get their status code (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED).
Stream messages for PredictStream and ModelStreamInfer come from the same pool (no oversized
one: it would end the whole call). harness/soak.py sends them and judges the answers.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2
from PIL import Image

from harness.fuzz.payloads import CNN, HEALTH, V2, Code, grey_png
from harness.fuzz.streams import STREAM_INFER, STREAM_PREDICT
from serving import tensors
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.inference import grpc_predict_v2_pb2 as v2

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Request:
    kind: str
    method: str
    payload: bytes
    expect: grpc.StatusCode
    check: Callable[[bytes], bool] | None = None  # for OK: is the answer right?


@dataclass(frozen=True)
class StreamMessage:
    """One message of a stream and its expected answer."""

    kind: str
    payload: bytes
    expect: grpc.StatusCode
    check: Callable[[bytes], bool] | None = None  # for OK: is the answer (its bytes) right?
    request_id: str = ""  # ModelStreamInfer: the id in the request, which its answer carries
    parseable: bool = True  # PredictStream: a message an id can be added to (a later field wins)


def _probabilities(response: pb.PredictResponse) -> F32:
    t = response.probabilities
    return tensors.decode(t.data, "FP32", t.shape)


class Traffic:
    """A pool of pre-serialized requests, valid and invalid, with their expected outcomes."""

    def __init__(self, model: str, model_file: Path, max_message: int, seed: int = 0) -> None:
        import onnxruntime as ort

        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        _, h, w, c = inp.shape
        meta = session.get_modelmeta().custom_metadata_map
        scale = np.float32(float(meta.get("input_scale", 1 / 255)))
        offset = np.float32(float(meta.get("input_offset", 0.0)))
        rng = np.random.default_rng(seed)
        pool = rng.integers(0, 256, (64, h, w, c), dtype=np.uint8)
        x = pool.astype(np.float32) * scale + offset
        expected: F32 = session.run(None, {inp.name: x})[0]
        self.valid: list[Request] = []
        self.invalid: list[Request] = []
        for i in range(48):
            n = int(rng.integers(1, 17))
            start = int(rng.integers(0, 64 - n))
            images, want = pool[start : start + n], expected[start : start + n]
            self.valid.append(self._predict(model, images, want))
            self.valid.append(self._infer(model, inp.name, images, want, i))
        for i in range(16):
            png = io.BytesIO()
            Image.fromarray(pool[i, :, :, 0] if c == 1 else pool[i]).save(png, format="PNG")
            self.valid.append(self._classify(model, png.getvalue(), int(expected[i].argmax())))
        self.valid.append(
            Request("health", HEALTH, health_pb2.HealthCheckRequest().SerializeToString(), Code.OK)
        )
        self.valid.append(
            Request(
                "metadata",
                CNN + "GetModelMetadata",
                pb.GetModelMetadataRequest(model=model).SerializeToString(),
                Code.OK,
            )
        )
        self.valid.append(Request("list", CNN + "ListModels", b"", Code.OK))

        bad = Code.INVALID_ARGUMENT
        wrong = pool[:2].reshape(2, h * w * c, 1, 1)
        nan = np.full((1, h, w, c), np.nan, np.float32)
        self.invalid += [
            Request(
                "bad_shape",
                CNN + "Predict",
                _predict_request(model, wrong).SerializeToString(),
                bad,
            ),
            Request("nan", CNN + "Predict", _predict_request(model, nan).SerializeToString(), bad),
            Request(
                "unknown_model",
                CNN + "Predict",
                _predict_request("nope", pool[:1]).SerializeToString(),
                Code.NOT_FOUND,
            ),
            Request("garbage", CNN + "Predict", random.Random(seed).randbytes(300), bad),
            Request("garbage_v2", V2 + "ModelInfer", b"\xff" * 40, bad),
            Request(
                "bomb",
                CNN + "Classify",
                pb.ClassifyRequest(
                    model=model, images=[pb.Image(encoded=grey_png(30000, 30000))]
                ).SerializeToString(),
                bad,
            ),
            Request("oversized", CNN + "Predict", bytes(max_message + 1), Code.RESOURCE_EXHAUSTED),
        ]
        # Streams: the same valid requests; invalid ones that fail alone (an oversized message
        # would end the whole call, so none is sent on a stream).
        predict_stream = (
            [
                StreamMessage("predict", r.payload, r.expect, r.check)
                for r in self.valid
                if r.kind == "predict"
            ],
            [
                StreamMessage(r.kind, r.payload, r.expect, parseable=r.kind != "garbage")
                for r in self.invalid
                if r.method == CNN + "Predict" and r.kind != "oversized"
            ],
        )
        infer_valid = [
            StreamMessage(
                "infer_v2",
                r.payload,
                r.expect,
                r.check,
                v2.ModelInferRequest.FromString(r.payload).id,
            )
            for r in self.valid
            if r.kind == "infer_v2"
        ]
        infer_invalid = [
            StreamMessage("garbage_v2", b"\xff" * 40, bad),
            StreamMessage(
                "bad_shape_v2",
                _infer_request(model, inp.name, wrong, "w").SerializeToString(),
                bad,
                request_id="w",
            ),
            StreamMessage(
                "nan_v2",
                _infer_request(model, inp.name, nan, "n").SerializeToString(),
                bad,
                request_id="n",
            ),
            StreamMessage(
                "unknown_model_v2",
                _infer_request("nope", inp.name, pool[:1], "u").SerializeToString(),
                Code.NOT_FOUND,
                request_id="u",
            ),
        ]
        self.stream: dict[str, tuple[list[StreamMessage], list[StreamMessage]]] = {
            STREAM_PREDICT: predict_stream,
            STREAM_INFER: (infer_valid, infer_invalid),
        }

    @staticmethod
    def _predict(model: str, images: npt.NDArray[np.uint8], want: F32) -> Request:
        def check(data: bytes) -> bool:
            response = pb.PredictResponse.FromString(data)
            got = _probabilities(response)
            return got.shape == want.shape and bool(np.allclose(got, want, rtol=0, atol=1e-5))

        payload = _predict_request(model, images).SerializeToString()
        return Request("predict", CNN + "Predict", payload, Code.OK, check)

    @staticmethod
    def _infer(model: str, name: str, images: npt.NDArray[np.uint8], want: F32, i: int) -> Request:
        request = _infer_request(model, name, images, str(i))

        def check(data: bytes) -> bool:
            response = v2.ModelInferResponse.FromString(data)
            got = tensors.decode(response.raw_output_contents[0], "FP32", want.shape)
            return response.id == str(i) and bool(np.allclose(got, want, rtol=0, atol=1e-5))

        return Request("infer_v2", V2 + "ModelInfer", request.SerializeToString(), Code.OK, check)

    @staticmethod
    def _classify(model: str, png: bytes, best: int) -> Request:
        def check(data: bytes) -> bool:
            response = pb.ClassifyResponse.FromString(data)
            return response.classifications[0].top[0].index == best

        payload = pb.ClassifyRequest(
            model=model, images=[pb.Image(encoded=png)]
        ).SerializeToString()
        return Request("classify", CNN + "Classify", payload, Code.OK, check)

    def pick(self, rng: random.Random) -> Request:
        """Four valid requests in five."""
        return rng.choice(self.valid if rng.random() < 0.8 else self.invalid)

    def pick_stream(self, method: str, rng: random.Random) -> StreamMessage:
        """Four valid messages in five."""
        valid, invalid = self.stream[method]
        return rng.choice(valid if rng.random() < 0.8 else invalid)


def _infer_request(
    model: str, name: str, images: npt.NDArray[np.generic], request_id: str
) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=model, id=request_id)
    datatype = "FP32" if images.dtype == np.float32 else "UINT8"
    request.inputs.add(name=name, datatype=datatype, shape=images.shape)
    request.raw_input_contents.append(np.ascontiguousarray(images).tobytes())
    return request


def _predict_request(model: str, images: npt.NDArray[np.generic]) -> pb.PredictRequest:
    dtype = pb.DATA_TYPE_FLOAT32 if images.dtype == np.float32 else pb.DATA_TYPE_UINT8
    return pb.PredictRequest(
        model=model,
        images=pb.Tensor(
            dtype=dtype, shape=images.shape, data=np.ascontiguousarray(images).tobytes()
        ),
    )
