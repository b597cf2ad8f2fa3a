"""Streaming inference against real servers: Triton's ModelStreamInfer through tritonclient's own
streaming API, our PredictStream through our client: answers equal to in-process ONNX Runtime,
in order and carrying their ids; bad messages answered and the stream goes on; cancels and
deadlines leave nothing behind; a bounded number of messages in flight per stream; a drain
answers what was read and ends every stream with OK."""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from harness import ServerProcess
from serving.client import Client, Failure, Prediction, predict_request
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from tests.helpers import expected_probabilities, metric_or_none, wait_for
from tests.integration import triton_client
from training import datasets

T = TypeVar("T")
MODEL = "fashion"


@pytest.fixture(scope="module")
def triton() -> Iterator[Callable[..., Any]]:
    """A function of tests.integration.triton_client, run in a spawned process (its protos and
    ours cannot share one)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:

        def call(fn: Callable[..., T], *args: Any) -> T:
            return pool.submit(fn, *args).result(timeout=300)

        yield call


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Real Fashion-MNIST test images, scaled as the model takes them (float32 NHWC)."""
    x = datasets.load("fashion_mnist", allow_download=False).x_test[:64]
    return (x.astype(np.float32) / np.float32(255.0)).astype(np.float32)


def settled(server: ServerProcess, method: str) -> bool:
    """Nothing of `method` left: no message in flight, no stream open, no request data held."""
    return (
        metric_or_none(server, "cnnserve_inflight_requests", method=method) in (0, None)
        and metric_or_none(server, "cnnserve_inflight_streams", method=method) in (0, None)
        and metric_or_none(server, "cnnserve_inflight_bytes") == 0
    )


# ------------------------------------------------------------------ ModelStreamInfer


def test_triton_streams_answer_every_message_in_order_with_its_id(
    server: ServerProcess,
    triton: Callable[..., Any],
    images: np.ndarray,
    reference: ort.InferenceSession,
) -> None:
    """1,000 messages over 8 streams of tritonclient; one bad message in the middle of one
    stream gets its error and the stream goes on."""
    rng = np.random.default_rng(0)
    streams: list[list[tuple[str, np.ndarray]]] = []
    for s in range(8):
        messages = []
        for m in range(125):
            n = int(rng.integers(1, 4))
            start = int(rng.integers(0, len(images) - n))
            messages.append((f"s{s}-m{m}", images[start : start + n]))
        streams.append(messages)
    streams[3][60] = ("bad", np.zeros((1, 27, 28, 1), np.float32))
    results = triton(triton_client.stream_infer, server.target, MODEL, streams)
    for messages, answers in zip(streams, results, strict=True):
        assert len(answers) == len(messages)
        for (request_id, x), (answer_id, out) in zip(messages, answers, strict=True):
            if request_id == "bad":
                assert answer_id == ""
                assert "INVALID_ARGUMENT" in out and "[N, 28, 28, 1]" in out
                continue
            assert answer_id == request_id
            np.testing.assert_allclose(out, expected_probabilities(reference, x), atol=1e-5)
    wait_for("the streams to settle", lambda: settled(server, "ModelStreamInfer"), 60)


def test_a_cancelled_triton_stream_leaves_nothing_behind(
    server: ServerProcess, triton: Callable[..., Any], images: np.ndarray
) -> None:
    triton(triton_client.stream_then_cancel, server.target, MODEL, images[:8], 300)
    wait_for("the cancelled stream to settle", lambda: settled(server, "ModelStreamInfer"), 60)
    # And the server streams on as before.
    (answers,) = triton(triton_client.stream_infer, server.target, MODEL, [[("after", images[:1])]])
    assert answers[0][0] == "after"


# ------------------------------------------------------------------ PredictStream


def test_predict_stream_answers_in_order_and_goes_on_after_a_bad_message(
    server: ServerProcess, images: np.ndarray, reference: ort.InferenceSession
) -> None:
    """1,000 messages over 8 streams of our client, all at once."""

    def one_stream(seed: int) -> list[tuple[np.ndarray, Prediction | Failure]]:
        rng = np.random.default_rng(seed)
        batches = []
        for _ in range(125):
            n = int(rng.integers(1, 4))
            start = int(rng.integers(0, len(images) - n))
            batches.append(images[start : start + n])
        with Client(server.target) as client:
            answers = list(client.predict_stream(MODEL, batches))
        return list(zip(batches, answers, strict=True))

    with ThreadPoolExecutor(8) as pool:
        streams = list(pool.map(one_stream, range(8)))
    for pairs in streams:
        assert len(pairs) == 125
        for x, answer in pairs:
            assert isinstance(answer, Prediction), answer
            assert answer.probabilities is not None
            np.testing.assert_allclose(
                answer.probabilities, expected_probabilities(reference, x), atol=1e-5
            )
    with Client(server.target) as client:
        good = images[:2]
        answers = list(
            client.predict_stream(MODEL, [good, images[:1, :27], good, np.full_like(good, np.nan)])
        )
        answers += list(client.predict_stream("no-such-model", [good]))
    assert [type(a).__name__ for a in answers] == [
        "Prediction",
        "Failure",
        "Prediction",
        "Failure",
        "Failure",
    ]
    bad_shape, nan, unknown = answers[1], answers[3], answers[4]
    assert isinstance(bad_shape, Failure) and bad_shape.index == 1
    assert (
        bad_shape.code == grpc.StatusCode.INVALID_ARGUMENT and "[N, 28, 28, 1]" in bad_shape.message
    )
    assert isinstance(nan, Failure) and "NaN" in nan.message
    assert isinstance(unknown, Failure) and unknown.code == grpc.StatusCode.NOT_FOUND
    wait_for("the streams to settle", lambda: settled(server, "PredictStream"), 60)


def test_predict_stream_answers_an_undecodable_message_and_echoes_ids(
    server: ServerProcess, images: np.ndarray
) -> None:
    good = predict_request(MODEL, images[:1])
    named = predict_request(MODEL, images[:1])
    named.id = "first"
    messages = [named.SerializeToString(), b"\xff\xff\xff garbage", good.SerializeToString()]
    with grpc.insecure_channel(server.target) as channel:
        call = channel.stream_stream(
            "/cnnserve.v1.CnnServe/PredictStream",
            request_serializer=lambda b: b,
            response_deserializer=pb.PredictStreamResponse.FromString,
        )
        answers = list(call(iter(messages), timeout=30))
    assert [a.WhichOneof("result") for a in answers] == ["response", "error", "response"]
    assert [a.id for a in answers] == ["first", "1", "2"]  # without an id: the position
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "cannot parse" in answers[1].error.message


def test_closing_a_predict_stream_early_cancels_it_and_leaves_nothing_behind(
    server: ServerProcess, images: np.ndarray
) -> None:
    def endless() -> Iterator[np.ndarray]:
        while True:
            yield images[:16]

    with Client(server.target) as client:
        stream = client.predict_stream(MODEL, endless())
        for _, answer in zip(range(5), stream, strict=False):
            assert isinstance(answer, Prediction)
        stream.close()  # cancels the call
    wait_for("the cancelled stream to settle", lambda: settled(server, "PredictStream"), 60)


def test_a_stream_past_its_deadline_ends_and_leaves_nothing_behind(
    server: ServerProcess, images: np.ndarray
) -> None:
    def slow() -> Iterator[pb.PredictRequest]:
        for _ in range(100):
            yield predict_request(MODEL, images[:1])
            time.sleep(0.05)

    with Client(server.target) as client:
        call = client.stub.PredictStream(slow(), timeout=0.5)
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for("the expired stream to settle", lambda: settled(server, "PredictStream"), 60)


def test_messages_in_flight_per_stream_are_bounded(trained_repo: Path, images: np.ndarray) -> None:
    """With --max-stream-inflight 4 and a client that sends 300 messages but reads no answer
    for a while, the server holds at most 4 of them; then every answer arrives."""
    with ServerProcess(trained_repo, extra_args=["--max-stream-inflight", "4"]) as proc:
        with Client(proc.target) as client:
            requests = (predict_request(MODEL, images[:32]) for _ in range(300))
            call = client.stub.PredictStream(requests, timeout=120)
            seen = []
            for _ in range(20):  # answers are not read meanwhile
                seen.append(
                    metric_or_none(proc, "cnnserve_inflight_requests", method="PredictStream")
                )
                time.sleep(0.05)
            answers = list(call)
        assert max(v or 0 for v in seen) <= 4 and max(v or 0 for v in seen) >= 1
        assert len(answers) == 300
        assert all(a.WhichOneof("result") == "response" for a in answers)


def test_sigterm_answers_what_each_stream_read_and_exits_zero(
    trained_repo: Path, images: np.ndarray
) -> None:
    """16 busy streams; on SIGTERM the server stops reading, answers every message it read,
    ends each stream with OK, and exits 0."""
    proc = ServerProcess(trained_repo, extra_args=["--grace-seconds", "20"]).start()
    started = threading.Barrier(17, timeout=60)
    outcomes: list[tuple[int, int, grpc.StatusCode]] = []
    lock = threading.Lock()

    def stream() -> None:
        sent = 0

        def requests() -> Iterator[pb.PredictRequest]:
            nonlocal sent
            while True:
                sent += 1
                yield predict_request(MODEL, images[:4])

        answered, code = 0, grpc.StatusCode.OK
        with Client(proc.target) as client:
            call = client.stub.PredictStream(requests(), timeout=60)
            try:
                for answer in call:
                    assert answer.WhichOneof("result") == "response", answer
                    answered += 1
                    if answered == 3:
                        started.wait()
            except grpc.RpcError as exc:
                code = exc.code()
        with lock:
            outcomes.append((sent, answered, code))

    threads = [threading.Thread(target=stream) for _ in range(16)]
    try:
        for t in threads:
            t.start()
        started.wait()
        proc.signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.proc is not None
        assert proc.proc.wait(30) == 0, proc.logs()
    finally:
        proc.stop()
    assert len(outcomes) == 16
    for sent, answered, code in outcomes:
        assert code == grpc.StatusCode.OK, (code, proc.logs()[-2000:])
        assert 3 <= answered <= sent
