"""What a right answer is: the valid calls' probabilities from in-process ONNX Runtime, and a
stream's answers checked against the unary call of the same bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from harness.fuzz.payloads import CNN, V2, Case, Code, ModelFacts
from harness.fuzz.streams import (
    STREAM_ENDS,
    STREAM_PREDICT,
    STREAM_PROPER,
    Message,
    StreamCase,
    StreamOutcome,
    Unary,
)
from serving.client.sdk import STATUS_BY_NUMBER
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.inference import grpc_predict_v2_pb2 as v2
from serving.tensors import decode as decode_tensor


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
