"""Runs the fuzz: bursts of unary and stream cases sent at once, every code and answer checked,
the server alive and holding nothing after each, counted by status code."""

from __future__ import annotations

import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from harness.fuzz.oracle import Oracle, check_stream
from harness.fuzz.payloads import PROPER, Case, Code, ModelFacts
from harness.fuzz.strategies import strategies
from harness.fuzz.streams import (
    UNARY_OF,
    StreamCase,
    Unary,
    call_unary,
    fixed_stream_cases,
    send_stream,
    stream_cases,
)
from harness.scrape import Scrape


def send(channel: grpc.Channel, case: Case, timeout: float = 30.0) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary(case.method, request_serializer=None, response_deserializer=None)
    try:
        call(case.payload, timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""  # type: ignore[attr-defined]
    return Code.OK, ""


def stream_settled(metrics_url: str) -> Callable[[], bool]:
    """Whether the server holds nothing in flight: no call, no stream, no request data."""

    def settled() -> bool:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            metrics = Scrape.parse(response.read().decode())
        held = (
            "cnnserve_inflight_requests",
            "cnnserve_inflight_streams",
            "cnnserve_inflight_bytes",
        )
        return not any(metrics.total(name) for name in held)

    return settled


def wait_settled(settled: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not settled():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Tally:
    codes: Counter[str] = field(default_factory=Counter)
    by_family: Counter[tuple[str, str]] = field(default_factory=Counter)
    bursts: int = 0
    streams: int = 0
    messages: int = 0  # sent on streams
    stream_codes: Counter[str] = field(default_factory=Counter)  # of the answers on streams
    by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)  # (message kind, code)
    stream_ends: Counter[tuple[str, str]] = field(default_factory=Counter)  # (how, code)

    @property
    def total(self) -> int:
        return sum(self.codes.values())

    @property
    def answers(self) -> int:
        return sum(self.stream_codes.values())

    @staticmethod
    def _rows(counts: Counter[tuple[str, str]]) -> list[str]:
        return [
            f"  {key:<30} "
            + ", ".join(f"{code} {n:,}" for (k, code), n in sorted(counts.items()) if k == key)
            for key in sorted({k for k, _ in counts})
        ]

    def report(self) -> str:
        lines = [f"{self.total:,} cases in {self.bursts:,} bursts; by status code:"]
        lines += [f"  {code:<20} {n:>8,}" for code, n in self.codes.most_common()]
        lines.append("by family:")
        lines += self._rows(self.by_family)
        if self.streams:
            lines.append(
                f"{self.streams:,} streams, {self.messages:,} messages on them, "
                f"{self.answers:,} answers; answers by status code:"
            )
            lines += [f"  {code:<20} {n:>8,}" for code, n in self.stream_codes.most_common()]
            lines.append("answers by message kind:")
            lines += self._rows(self.by_kind)
            lines.append("streams by method and behaviour, by how they ended:")
            lines += self._rows(self.stream_ends)
        return "\n".join(lines)


def run_burst(
    channel: grpc.Channel,
    burst: list[Case],
    *,
    oracle: Oracle,
    tally: Tally,
    alive: Callable[[], bool],
    pool: ThreadPoolExecutor,
    streams: Sequence[StreamCase] = (),
    settled: Callable[[], bool] | None = None,
) -> None:
    """Send a burst concurrently: the unary cases, the stream cases and, for every message on a
    stream, its unary twin. Check every code and answer, that the server lives, that it holds
    nothing once the burst is over (with `settled`), and a valid call on each protocol."""
    unary = [pool.submit(send, channel, case) for case in burst]
    outcomes = [pool.submit(send_stream, channel, case) for case in streams]
    twins: dict[tuple[str, bytes], Future[Unary]] = {}
    for stream in streams:
        for message in stream.messages:
            key = (UNARY_OF[stream.method], message.payload)
            if message.kind != "oversized" and key not in twins:
                twins[key] = pool.submit(call_unary, channel, *key)
    problems = []
    for case, future in zip(burst, unary, strict=True):
        code, details = future.result()
        tally.codes[code.name] += 1
        tally.by_family[(case.family.split(":")[0], code.name)] += 1
        if code not in PROPER or (case.expect and code not in case.expect):
            problems.append(f"{case!r} -> {code.name}: {details}")
    for stream, ended in zip(streams, outcomes, strict=True):
        outcome = ended.result()
        answers = {
            payload: twin.result()
            for (method, payload), twin in twins.items()
            if method == UNARY_OF[stream.method]
        }
        counted, wrong = check_stream(stream, outcome, answers)
        tally.streams += 1
        tally.messages += len(stream.messages)
        tally.stream_ends[(f"{stream.short} {stream.behaviour}", outcome.code.name)] += 1
        for kind, code_name in counted:
            tally.stream_codes[code_name] += 1
            tally.by_kind[(kind, code_name)] += 1
        problems += wrong
    tally.bursts += 1
    assert alive(), "the server process died"
    assert not problems, "\n".join(problems)
    oracle.check(channel)
    if streams and settled is not None:
        assert wait_settled(settled), "calls, streams or request data still held 10 s after a burst"


def fuzz(
    channel: grpc.Channel,
    model: ModelFacts,
    *,
    oracle: Oracle,
    tally: Tally,
    alive: Callable[[], bool],
    cases: int,
    burst_size: int = 8,
    stream_burst: int = 2,
    settled: Callable[[], bool] | None = None,
    progress: Callable[[Tally], None] | None = None,
) -> None:
    """At least `cases` more unary cases, in bursts of `burst_size` / 2 to `burst_size` cases
    sent at once with up to `stream_burst` stream cases beside them, each burst one Hypothesis
    example (rounds of 50 bursts, until enough were sent)."""
    target = tally.total + cases
    bursts = st.tuples(
        st.lists(strategies(model).case, min_size=max(1, burst_size // 2), max_size=burst_size),
        st.lists(stream_cases(model), min_size=min(1, stream_burst), max_size=max(0, stream_burst)),
    )
    failed = False  # once a burst failed, Hypothesis replays and shrinks it: let those run
    with ThreadPoolExecutor(burst_size) as pool:

        @settings(
            max_examples=50,
            deadline=None,
            database=None,
            phases=(Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )
        @given(bursts)
        def burst(drawn: tuple[list[Case], list[StreamCase]]) -> None:
            nonlocal failed
            if tally.total >= target and not failed:
                return
            cases, streams = drawn
            try:
                run_burst(
                    channel,
                    cases,
                    oracle=oracle,
                    tally=tally,
                    alive=alive,
                    pool=pool,
                    streams=streams,
                    settled=settled,
                )
            except BaseException:
                failed = True
                raise

        rounds = 0
        while tally.total < target:
            burst()
            if stream_burst > 0:  # and every stream behaviour, whatever was drawn
                run_burst(
                    channel,
                    [],
                    oracle=oracle,
                    tally=tally,
                    alive=alive,
                    pool=pool,
                    streams=fixed_stream_cases(model, seed=rounds),
                    settled=settled,
                )
            rounds += 1
            if progress is not None:
                progress(tally)


# ------------------------------------------------------------------ command line


Settled = Callable[[], bool] | None
