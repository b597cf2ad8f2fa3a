"""Stream cases (PredictStream, ModelStreamInfer: valid and hostile messages, sent in each
behaviour), the fixed set of them, and the generic calls that send a case's raw bytes."""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from hypothesis import strategies as st

from harness.fuzz.payloads import CNN, PROPER, V2, Code, ModelFacts, mangle
from harness.fuzz.strategies import (
    MANGLINGS,
    SEEDS,
    Strategies,
    classify,
    predict,
    strategies,
    v2_infer,
)
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.inference import grpc_predict_v2_pb2 as v2

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
