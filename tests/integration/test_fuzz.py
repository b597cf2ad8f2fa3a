"""Hostile input against a live server: Hypothesis-built requests for both APIs, raw bytes on
the wire, hostile images, and streams (PredictStream, ModelStreamInfer) that mix valid and
hostile messages, cancel, close at once, send nothing or pass the message limit. Every call gets
a proper status code (never UNKNOWN or INTERNAL); every message on a stream gets one answer, in
order, the same as its unary call's; the server process lives on, holds nothing once a burst is
over, and a valid request after every burst gets the right answer.

The strategies live in harness/fuzz/, whose `make fuzz` runs 10,000 and more of them."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from harness import ServerProcess, scrape
from harness.fuzz import (
    CNN,
    HEALTH,
    METHODS,
    PROPER,
    STREAM_ENDS,
    STREAM_INFER,
    STREAM_METHODS,
    STREAM_PREDICT,
    STREAM_PROPER,
    UNARY_OF,
    V2,
    Case,
    Message,
    ModelFacts,
    Oracle,
    StreamCase,
    StreamOutcome,
    Tally,
    call_unary,
    check_stream,
    fixed_stream_cases,
    fuzz,
    image_blobs,
    model_facts,
    run_burst,
    sample_messages,
    send,
    send_stream,
    stream_settled,
)
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.inference import grpc_predict_v2_pb2 as v2

pytestmark = pytest.mark.slow

MESSAGE_MB = 1  # small, so that oversized messages are cheap to send
STREAM_INFLIGHT = 8  # small, so that long streams meet the bound


@dataclass
class Target:
    proc: ServerProcess
    channel: grpc.Channel
    model: ModelFacts
    oracle: Oracle

    def alive(self) -> bool:
        return self.proc.proc is not None and self.proc.proc.poll() is None

    def settled(self) -> bool:
        return stream_settled(f"http://127.0.0.1:{self.proc.metrics_port}/metrics")()


@pytest.fixture(scope="module")
def target(trained_repo: Path) -> Iterator[Target]:
    with (
        ServerProcess(
            trained_repo,
            ["--max-message-mb", str(MESSAGE_MB), "--max-stream-inflight", str(STREAM_INFLIGHT)],
        ) as proc,
        grpc.insecure_channel(proc.target) as channel,
    ):
        model = model_facts(channel, "fashion", MESSAGE_MB * 1024 * 1024)
        oracle = Oracle(model, trained_repo / "fashion" / "1" / "model.onnx")
        yield Target(proc, channel, model, oracle)


def burst(target: Target, cases: list[Case], streams: list[StreamCase] | None = None) -> Tally:
    tally = Tally()
    with ThreadPoolExecutor(8) as pool:
        run_burst(
            target.channel,
            cases,
            oracle=target.oracle,
            tally=tally,
            alive=target.alive,
            pool=pool,
            streams=streams or [],
            settled=target.settled,
        )
    return tally


def test_hypothesis_fuzz_both_protocols(target: Target) -> None:
    tally = Tally()
    fuzz(
        target.channel,
        target.model,
        oracle=target.oracle,
        tally=tally,
        alive=target.alive,
        cases=300,
        settled=target.settled,
    )
    print(tally.report())
    assert tally.total >= 300, tally.report()
    families = {family for family, _ in tally.by_family}
    assert {"predict", "v2_infer", "classify", "wire", "oversized"} <= families, families
    assert tally.codes["OK"] and tally.codes["INVALID_ARGUMENT"], tally.report()
    assert set(tally.codes) <= {code.name for code in PROPER}
    # A stream or two beside every burst, on both methods, valid and hostile messages.
    assert tally.streams >= tally.bursts, tally.report()
    assert {how.split()[0] for how, _ in tally.stream_ends} == {"PredictStream", "ModelStreamInfer"}
    assert tally.stream_codes["OK"] and tally.stream_codes["INVALID_ARGUMENT"], tally.report()
    assert set(tally.stream_codes) <= {code.name for code in STREAM_PROPER}, tally.report()


def test_random_bytes_on_every_method(target: Target) -> None:
    """Random bytes, the empty message, and valid messages cut short, on every method."""
    rng = random.Random(1)
    valid = pb.PredictRequest(
        model="fashion",
        images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[1, 28, 28, 1], data=bytes(784)),
    ).SerializeToString()
    cases = []
    for method in METHODS:
        cases.append(Case("wire", method, b""))
        cases.append(Case("wire", method, b"\xff" * 7))
        cases.append(Case("wire", method, valid[: rng.randrange(1, len(valid))]))
        cases += [Case("wire", method, rng.randbytes(rng.randrange(1, 600))) for _ in range(4)]
    tally = burst(target, cases)
    assert set(tally.codes) <= {code.name for code in PROPER}, tally.report()
    code, details = send(target.channel, Case("wire", CNN + "Predict", b"\xff\xff\xff"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("cannot parse the request: Error parsing message")
    code, _ = send(target.channel, Case("wire", HEALTH, b"\x0a\xff"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


HOSTILE_IMAGES = {
    "png_bomb": "refused as a decompression bomb",
    "png_header_bomb": "refused as a decompression bomb",
    "gif_bomb": "refused as a decompression bomb",
    "bmp_bomb": "refused as a decompression bomb",
    "jpeg_bomb": "refused as a decompression bomb",
    "png_over": "Image size (16004000 pixels) exceeds limit of 16000000 pixels",
    "eps": "not an image in a supported format",  # Pillow would have run Ghostscript
    "ico": "not an image in a supported format",
    "tiff_lab": "cannot convert mode LAB",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_IMAGES))
def test_hostile_images_are_refused_with_a_reason(target: Target, name: str) -> None:
    blobs = image_blobs(28, 28)
    request = pb.ClassifyRequest(
        model="fashion",
        images=[pb.Image(encoded=blobs["png"]), pb.Image(encoded=blobs[name])],
    )
    code, details = send(
        target.channel, Case("image", CNN + "Classify", request.SerializeToString())
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("image 1: ") and HOSTILE_IMAGES[name] in details, details
    target.oracle.check(target.channel)


def test_good_images_of_every_kind_are_classified(target: Target) -> None:
    blobs = image_blobs(28, 28)
    names = [
        "png", "jpeg", "jpeg_progressive", "gif", "bmp", "tiff", "ppm", "png_rgba",
        "png_palette", "png_16bit", "png_1x1", "png_thin", "tiff_cmyk", "png_at_limit",
    ]  # fmt: skip
    request = pb.ClassifyRequest(
        model="fashion", images=[pb.Image(encoded=blobs[n]) for n in names]
    )
    call = target.channel.unary_unary(CNN + "Classify", None, None)
    response = pb.ClassifyResponse.FromString(call(request.SerializeToString(), timeout=60))
    assert len(response.classifications) == len(names)


def test_shapes_numpy_cannot_hold_are_invalid(target: Target) -> None:
    """Found by the fuzzer: [0, 2**62] carries no bytes, yet numpy cannot make the view."""
    huge = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[0, 2**62], data=b"")
    predict = pb.PredictRequest(model="fashion", images=huge)
    infer = v2.ModelInferRequest(model_name="fashion")
    infer.inputs.add(name="image", datatype="UINT8", shape=[0, 2**62, 2**40])
    infer.raw_input_contents.append(b"")
    for case in (
        Case("predict", CNN + "Predict", predict.SerializeToString()),
        Case("v2_infer", V2 + "ModelInfer", infer.SerializeToString()),
    ):
        code, details = send(target.channel, case)
        # Refused by the model's shape (checked first since admission control) or by size.
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "do not fit model" in details or "is too large" in details, details


@pytest.mark.parametrize("seed", [0, 5])
def test_every_stream_behaviour_with_hostile_messages(target: Target, seed: int) -> None:
    """Each behaviour on each stream method, with valid messages between hostile ones of each
    kind: one answer per message, in order, as the unary call answers it; each stream ends as
    its behaviour says; nothing is left in flight after."""
    streams = fixed_stream_cases(target.model, seed)
    assert max(len(s.messages) for s in streams) > 3 * STREAM_INFLIGHT
    tally = burst(target, [], streams)
    print(tally.report())
    assert tally.streams == len(streams)
    assert set(tally.stream_ends) == {
        (f"{s.short} {s.behaviour}", STREAM_ENDS[s.behaviour].name) for s in streams
    }
    assert len(tally.stream_ends) == 2 * len(STREAM_ENDS)
    kinds = {kind for kind, _ in tally.by_kind}
    assert kinds == {m.kind for s in streams for m in s.messages} - {"oversized"}, kinds
    assert tally.stream_codes["OK"] > 0 and tally.stream_codes["INVALID_ARGUMENT"] > 0
    assert tally.stream_codes["NOT_FOUND"] > 0


@pytest.mark.parametrize("method", STREAM_METHODS, ids=lambda m: m.rpartition("/")[2])
def test_the_stream_checks_catch_a_wrong_stream(target: Target, method: str) -> None:
    """The checks themselves: answers swapped, one lost, one extra, the wrong end."""
    messages = tuple(sample_messages(target.model, method))
    case = StreamCase(method, messages)
    outcome = send_stream(target.channel, case)
    twins = {m.payload: call_unary(target.channel, UNARY_OF[method], m.payload) for m in messages}
    counted, problems = check_stream(case, outcome, twins)
    assert not problems and len(counted) == len(messages)
    answers = outcome.answers
    # valid answers 0 and 2 swapped (uint8 and float32 images: different probabilities)
    swapped = [answers[2], answers[1], answers[0], *answers[3:]]
    wrong = [
        StreamOutcome(grpc.StatusCode.OK, "", swapped),
        StreamOutcome(grpc.StatusCode.OK, "", answers[:-1]),
        StreamOutcome(grpc.StatusCode.OK, "", [*answers, answers[-1]]),
        StreamOutcome(grpc.StatusCode.INTERNAL, "boom", answers),
        StreamOutcome(grpc.StatusCode.OK, "", [answers[1], *answers[1:]]),  # an error for a valid
    ]
    for bad in wrong:
        _, problems = check_stream(case, bad, twins)
        assert problems, bad.code


def test_streams_of_random_bytes_and_a_stream_method_called_unary(target: Target) -> None:
    """Streams of nothing but random bytes, empty messages and valid ones cut short: each one
    answered INVALID_ARGUMENT ("cannot parse ...") and the stream goes on to OK."""
    rng = random.Random(2)
    streams = []
    for method in STREAM_METHODS:
        valid = sample_messages(target.model, method)[0].payload
        junk = [Message("wire", rng.randbytes(rng.randrange(1, 600))) for _ in range(20)]
        junk += [Message("truncated", valid[: rng.randrange(1, len(valid))]) for _ in range(10)]
        junk.append(Message("wire", b"\xff" * 7))
        streams.append(StreamCase(method, tuple(junk)))
    tally = burst(target, [], streams)
    assert set(tally.stream_codes) <= {"INVALID_ARGUMENT", "NOT_FOUND", "OK"}, tally.report()
    assert tally.stream_codes["INVALID_ARGUMENT"] >= 40, tally.report()
    for method in STREAM_METHODS:
        outcome = send_stream(target.channel, StreamCase(method, (Message("wire", b"\xff\xff"),)))
        assert outcome.code == grpc.StatusCode.OK and len(outcome.answers) == 1
        if method == STREAM_PREDICT:
            error = pb.PredictStreamResponse.FromString(outcome.answers[0]).error
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert error.message.startswith("cannot parse the request: "), error.message
        else:
            assert method == STREAM_INFER
            message = v2.ModelStreamInferResponse.FromString(outcome.answers[0]).error_message
            assert message.startswith("INVALID_ARGUMENT: cannot parse the request: "), message


def test_no_internal_or_unknown_codes_were_counted(target: Target) -> None:
    """Runs last in this module: the server's own count of every call it answered."""
    calls = scrape(target.proc.metrics_port).by("cnnserve_requests_total", "method", "code")
    assert any(code == "INVALID_ARGUMENT" for _, code in calls)
    bad = {key: n for key, n in calls.items() if key[1] in ("INTERNAL", "UNKNOWN")}
    assert not bad, bad
    assert target.alive()
    assert "Traceback" not in target.proc.logs()  # no exception escaped anywhere
