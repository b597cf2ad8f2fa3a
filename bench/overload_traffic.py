"""The overload benchmark's traffic: large Predict calls, sent in a burst, a closed loop or
an open loop, and the server's memory and CPU sampled meanwhile (bench/overload.py runs them)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from harness.process import tree_cpu_seconds, tree_status_kib
from serving.config import MiB
from serving.grpc.cnnserve_messages import encode_tensor
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb

PREDICT = "/cnnserve.v1.CnnServe/Predict"
MESSAGE_LIMIT = 64 * MiB
LIMIT_NAMES = ("max-inflight-mb", "max-queue-images")  # what a refusal must name
Code = grpc.StatusCode


# ================================================================================== memory


@contextlib.contextmanager
def cpu_used(pid: int, into: dict[str, float]) -> Iterator[None]:
    """CPU seconds the server (`pid` and its run process or workers) and this client process
    spend inside the `with`."""
    server, client = tree_cpu_seconds(pid), sum(os.times()[:2])
    try:
        yield
    finally:
        into["server"] = round(tree_cpu_seconds(pid) - server, 2)
        into["client"] = round(sum(os.times()[:2]) - client, 2)


class RssSampler:
    """VmRSS of a process and its descendants (the server and its run process) every
    `interval_s`, from a thread of its own (the client's event loop may be too busy to keep
    time during a burst)."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (monotonic seconds, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            kib = tree_status_kib(self.pid, "VmRSS")
            if kib:
                self.samples.append((time.monotonic(), kib * 1024))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def latest(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def between(self, start: float, stop: float = math.inf) -> list[int]:
        return [b for t, b in self.samples if start <= t <= stop]


# ================================================================================== traffic


@dataclass
class Workload:
    """One serialized Predict request (sent by every call: the client holds one copy of it) and
    the answer it must get, from ONNX Runtime in this process on the same file."""

    model: str
    payload: bytes
    expected_top1: list[int]
    images: int

    @classmethod
    def build(cls, model: str, model_file: Path, images: int, seed: int = 0) -> Workload:
        import onnxruntime as ort

        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        _, h, w, c = inp.shape
        rng = np.random.default_rng(seed)
        x = rng.random((images, h, w, c), dtype=np.float32)
        expected: npt.NDArray[np.float32] = session.run(None, {inp.name: x})[0]
        request = pb.PredictRequest(model=model, omit_probabilities=True)
        encode_tensor(x, request.images)
        return cls(model, request.SerializeToString(), expected.argmax(axis=1).tolist(), images)

    def right(self, response: pb.PredictResponse) -> bool:
        got = [c.top[0].index for c in response.classifications]
        return got == self.expected_top1


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MESSAGE_LIMIT),
        ("grpc.max_receive_message_length", MESSAGE_LIMIT),
        # A subchannel pool per channel: channels to one target otherwise share one connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]


@contextlib.asynccontextmanager
async def predict_stubs(
    target: str, channels: int
) -> AsyncIterator[list[grpc.aio.UnaryUnaryMultiCallable[bytes, pb.PredictResponse]]]:
    opened = [grpc.aio.insecure_channel(target, options=channel_options()) for _ in range(channels)]
    try:
        for ch in opened:
            await asyncio.wait_for(ch.channel_ready(), 30)
        yield [
            ch.unary_unary(
                PREDICT,
                request_serializer=None,
                response_deserializer=pb.PredictResponse.FromString,
            )
            for ch in opened
        ]
    finally:
        for ch in opened:
            await ch.close(None)


@dataclass
class Outcome:
    sent: float  # monotonic
    done: float
    code: str
    details: str = ""
    right: bool = True


async def one_call(
    stub: grpc.aio.UnaryUnaryMultiCallable[bytes, pb.PredictResponse],
    work: Workload,
    deadline_s: float,
) -> Outcome:
    sent = time.monotonic()
    try:
        response = await stub(work.payload, timeout=deadline_s)
    except grpc.aio.AioRpcError as err:
        return Outcome(sent, time.monotonic(), err.code().name, err.details() or "")
    return Outcome(sent, time.monotonic(), Code.OK.name, right=work.right(response))


def refusal_names_limit(o: Outcome) -> bool:
    details = o.details.replace("_", "-")
    return any(name in details for name in LIMIT_NAMES)


# ================================================================================== phases


@dataclass
class BurstResult:
    calls: int
    images_per_call: int
    channels: int
    deadline_s: float
    seconds: float = 0.0
    codes: dict[str, int] = field(default_factory=dict)
    wrong_answers: int = 0
    refusals_naming_no_limit: int = 0
    refusal_messages: dict[str, int] = field(default_factory=dict)
    other_messages: dict[str, int] = field(default_factory=dict)
    latency_ok_s: dict[str, float] = field(default_factory=dict)
    latency_refused_s: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # server and client CPU seconds


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)

    def q(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))], 3)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(values[-1], 3)}


def _message_key(details: str) -> str:
    """A refusal's message without its figures, so that like ones count together."""
    return "".join("#" if ch.isdigit() else ch for ch in details)[:160]


async def burst(
    target: str,
    work: Workload,
    *,
    calls: int,
    channels: int = 8,
    deadline_s: float = 60.0,
    progress: Progress | None = None,
) -> BurstResult:
    """`calls` Predict calls sent at once over `channels` channels; waits for every answer."""
    result = BurstResult(calls, work.images, channels, deadline_s)
    codes: Counter[str] = Counter()
    started = time.monotonic()
    async with predict_stubs(target, channels) as stubs:

        async def call(i: int) -> Outcome:
            o = await one_call(stubs[i % channels], work, deadline_s)
            codes[o.code] += 1
            return o

        tasks = [asyncio.create_task(call(i)) for i in range(calls)]
        ticker = asyncio.create_task(_tick(progress, "burst", codes, calls))
        outcomes = await asyncio.gather(*tasks)
        ticker.cancel()
    result.seconds = time.monotonic() - started
    result.codes = dict(sorted(codes.items()))
    refused = [o for o in outcomes if o.code == Code.UNAVAILABLE.name]
    result.wrong_answers = sum(1 for o in outcomes if o.code == "OK" and not o.right)
    result.refusals_naming_no_limit = sum(1 for o in refused if not refusal_names_limit(o))
    result.refusal_messages = dict(Counter(_message_key(o.details) for o in refused).most_common(5))
    result.other_messages = dict(
        Counter(
            f"{o.code}: {_message_key(o.details)}"
            for o in outcomes
            if o.code not in ("OK", Code.UNAVAILABLE.name)
        ).most_common(5)
    )
    result.latency_ok_s = _quantiles([o.done - o.sent for o in outcomes if o.code == "OK"])
    result.latency_refused_s = _quantiles([o.done - o.sent for o in refused])
    return result


@dataclass
class RateResult:
    mode: str  # "closed" (callers wait for their answers) or "open" (arrivals on schedule)
    concurrency: int  # closed: callers; open: 0
    offered_calls_per_s: float  # open: the schedule; closed: what was sent
    seconds: float
    warmup_s: float
    sent: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    wrong_answers: int = 0
    ok_images_per_s: float = 0.0  # OK images answered inside the window [warmup, seconds]
    ok_calls_per_s: float = 0.0
    latency_ok_s: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # server and client CPU seconds


def _rate(result: RateResult, outcomes: list[Outcome], started: float, images: int) -> RateResult:
    lo, hi = started + result.warmup_s, started + result.seconds
    ok = [o for o in outcomes if o.code == "OK" and o.right and lo <= o.done <= hi]
    window = result.seconds - result.warmup_s
    result.sent = len(outcomes)
    result.codes = dict(sorted(Counter(o.code for o in outcomes).items()))
    result.wrong_answers = sum(1 for o in outcomes if o.code == "OK" and not o.right)
    result.ok_calls_per_s = len(ok) / window
    result.ok_images_per_s = len(ok) * images / window
    result.latency_ok_s = _quantiles([o.done - o.sent for o in ok])
    return result


async def closed_loop(
    target: str,
    work: Workload,
    *,
    concurrency: int,
    seconds: float,
    warmup_s: float,
    channels: int = 8,
    deadline_s: float = 60.0,
    progress: Progress | None = None,
) -> RateResult:
    """`concurrency` callers, each sending its next call when its last is answered."""
    outcomes: list[Outcome] = []
    codes: Counter[str] = Counter()
    started = time.monotonic()
    stop_at = started + seconds
    async with predict_stubs(target, channels) as stubs:

        async def caller(i: int) -> None:
            while time.monotonic() < stop_at:
                o = await one_call(stubs[i % channels], work, deadline_s)
                codes[o.code] += 1
                outcomes.append(o)

        ticker = asyncio.create_task(_tick(progress, f"closed loop x{concurrency}", codes, None))
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        ticker.cancel()
    result = RateResult("closed", concurrency, 0.0, seconds, warmup_s)
    result.offered_calls_per_s = len(outcomes) / max(time.monotonic() - started, 1e-9)
    return _rate(result, outcomes, started, work.images)


async def open_loop(
    target: str,
    work: Workload,
    *,
    calls_per_s: float,
    seconds: float,
    warmup_s: float,
    channels: int = 8,
    deadline_s: float = 60.0,
    progress: Progress | None = None,
) -> RateResult:
    """Calls sent on a fixed schedule of `calls_per_s` for `seconds`, answered or not; waits
    for every answer (each within its deadline)."""
    codes: Counter[str] = Counter()
    started = time.monotonic()
    n = max(1, round(calls_per_s * seconds))
    async with predict_stubs(target, channels) as stubs:

        async def call(i: int) -> Outcome:
            o = await one_call(stubs[i % channels], work, deadline_s)
            codes[o.code] += 1
            return o

        ticker = asyncio.create_task(_tick(progress, f"open loop {calls_per_s:.1f}/s", codes, n))
        tasks = []
        for i in range(n):
            delay = started + i / calls_per_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(call(i)))
        outcomes = list(await asyncio.gather(*tasks))
        ticker.cancel()
    result = RateResult("open", 0, calls_per_s, seconds, warmup_s)
    return _rate(result, outcomes, started, work.images)


# ================================================================================== output


class Progress:
    """One status line, rewritten in place on a terminal and printed every few seconds
    elsewhere, with the server's memory from the sampler."""

    def __init__(self, sampler: RssSampler | None) -> None:
        self.sampler = sampler
        self.tty = sys.stdout.isatty()
        self._last_print = 0.0

    def show(self, line: str, final: bool = False) -> None:
        if self.sampler is not None:
            line += f" | server RSS {self.sampler.latest() / MiB:,.0f} MiB"
        now = time.monotonic()
        if self.tty:
            print(f"\r\x1b[K  {line}", end="\n" if final else "", flush=True)
        elif final or now - self._last_print >= 5:
            print(f"  {line}", flush=True)
            self._last_print = now


async def _tick(
    progress: Progress | None, what: str, codes: Counter[str], total: int | None
) -> None:
    if progress is None:
        return
    started = time.monotonic()
    try:
        while True:
            await asyncio.sleep(0.25)
            done = sum(codes.values())
            counts = ", ".join(f"{c} {n:,}" for c, n in sorted(codes.items()))
            of = f"/{total:,}" if total else ""
            progress.show(
                f"{what}: {done:,}{of} answered ({counts}) {time.monotonic() - started:5.1f}s"
            )
    except asyncio.CancelledError:
        done = sum(codes.values())
        counts = ", ".join(f"{c} {n:,}" for c, n in sorted(codes.items()))
        progress.show(
            f"{what}: {done:,} answered ({counts}) in {time.monotonic() - started:.1f}s", final=True
        )
        raise
