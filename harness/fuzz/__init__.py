"""`make fuzz`: hostile input against a live server, both APIs, counted by status code.

Hypothesis builds requests for every method of cnnserve.v1.CnnServe and of the Open Inference
Protocol (inference.GRPCInferenceService), plus health checks: random dtypes, datatypes and
shapes (huge, negative and zero dimensions, empty batches), byte lengths off by one, NaN and
infinite floats, garbage, truncated and bit-flipped PNG/JPEG/GIF/BMP/TIFF, decompression bombs,
unknown models and versions, oversized messages, and raw random bytes or mangled valid
messages on the wire (sent with a generic call, so no client-side serializer gets in the way).

Beside every burst run streams on both streaming methods (PredictStream, ModelStreamInfer):
valid messages mixed with hostile ones (the same Hypothesis-built requests, the other protocol's
messages, raw random bytes, empty and truncated or mangled messages, huge shapes, NaN and
infinities, unknown models), sent in a few ways: closed after the last message, repeated past
the server's --max-stream-inflight, closed at once without a message, silent (nothing sent and
never closed), cancelled or past a short deadline mid-stream, cut by a message over the size
limit, or as a unary call to the stream method. A round of Hypothesis bursts ends with one fixed
burst that has every one of these on both methods.

Every call must end with a proper status code (never UNKNOWN, INTERNAL, UNAVAILABLE or a
timeout). Every message on a stream must get exactly one answer, in order (its id), with a proper
code, the same code, message and result as the unary call (Predict, ModelInfer) of the same
bytes; every stream must end as its behaviour calls for (OK when the client closed it). After
every burst the server process must still be alive, hold nothing in flight (no call, stream or
request data, from its metrics) and a valid request on each protocol must get the right answer
(the probabilities of an in-process ONNX Runtime session).

    python -m harness.fuzz --models-dir models --model mnist --cases 10000
    python -m harness.fuzz --target host:port --model-file models/mnist/1/model.onnx --model mnist

tests/integration/test_fuzz.py runs the same strategies for a few hundred cases, and every
stream behaviour on both methods.
"""

from harness.fuzz.oracle import Oracle, check_stream
from harness.fuzz.payloads import (
    CNN,
    HEALTH,
    PROPER,
    V2,
    Case,
    Code,
    ModelFacts,
    image_blobs,
    model_facts,
)
from harness.fuzz.runner import Tally, fuzz, run_burst, send, stream_settled
from harness.fuzz.strategies import METHODS, cases, strategies
from harness.fuzz.streams import (
    STREAM_ENDS,
    STREAM_INFER,
    STREAM_METHODS,
    STREAM_PREDICT,
    STREAM_PROPER,
    UNARY_OF,
    Message,
    StreamCase,
    StreamOutcome,
    call_unary,
    fixed_stream_cases,
    sample_messages,
    send_stream,
    stream_cases,
)

__all__ = [
    "CNN",
    "Case",
    "Code",
    "HEALTH",
    "METHODS",
    "Message",
    "ModelFacts",
    "Oracle",
    "PROPER",
    "STREAM_ENDS",
    "STREAM_INFER",
    "STREAM_METHODS",
    "STREAM_PREDICT",
    "STREAM_PROPER",
    "StreamCase",
    "StreamOutcome",
    "Tally",
    "UNARY_OF",
    "V2",
    "call_unary",
    "cases",
    "check_stream",
    "fixed_stream_cases",
    "fuzz",
    "image_blobs",
    "model_facts",
    "run_burst",
    "sample_messages",
    "send",
    "send_stream",
    "strategies",
    "stream_cases",
    "stream_settled",
]
