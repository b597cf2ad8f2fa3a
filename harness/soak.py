"""`make soak`: mixed valid and invalid traffic at a fixed concurrency for a set time.

Every request has an expected outcome (harness/soak_traffic.py builds the pool): valid ones must be
answered OK with the right answer (the probabilities or classes of an in-process ONNX Runtime
session on the same file), invalid ones with their status code (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED). Beside the unary workers, stream workers (4, each one stream at a time) run
streams of up to 32 messages on both streaming methods (PredictStream, ModelStreamInfer), valid and
invalid messages mixed: every message must get its own answer, in order (its id), with its expected
code and the right result, and every stream must end OK. The summary counts unexpected outcomes
(any other code or a wrong answer, a stream ending other than OK), lost responses (a call not
answered within its 30 s deadline, or never finished; a message on a stream left without an answer)
and the server's resident memory (VmRSS of /proc/<pid>/status) after the warm-up against its end.
The run passes with zero unexpected, zero lost and memory growth under 10% after warm-up.

    python -m harness.soak --models-dir models --model mnist --seconds 300
    python -m harness.soak --target host:port --pid PID --model-file models/mnist/1/model.onnx

tests/integration/test_soak.py runs ~15 s of it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from harness.fuzz.payloads import Code
from harness.fuzz.streams import STREAM_METHODS, STREAM_PREDICT
from harness.process import proc_status_kib
from harness.soak_traffic import StreamMessage, Traffic
from serving.client.sdk import STATUS_BY_NUMBER
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.inference import grpc_predict_v2_pb2 as v2

DEADLINE_S = 30.0
MAX_GROWTH = 0.10


def rss_kib(pid: int) -> int:
    kib = proc_status_kib(pid, "VmRSS")
    if kib is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return kib


@dataclass
class Result:
    seconds: float
    warmup: float
    concurrency: int
    stream_workers: int = 0
    sent: int = 0  # requests: unary calls and messages on streams
    answered: int = 0
    lost: int = 0
    recycled: int = 0  # calls retried once after a connection recycle (GOAWAY)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    streams: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, how it ended)
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, KiB)
    elapsed: float = 0.0

    def rss_after_warmup(self) -> int:
        """The median of the samples in the last 10% of the warm-up."""
        window = [kib for t, kib in self.rss if self.warmup * 0.9 <= t <= self.warmup]
        return int(statistics.median(window or [self.rss[0][1]]))

    def rss_at_end(self) -> int:
        """The median of the samples in the last 10% of the run."""
        tail = [kib for t, kib in self.rss if t >= self.elapsed * 0.9]
        return int(statistics.median(tail or [self.rss[-1][1]]))

    @property
    def growth(self) -> float:
        if not self.rss:
            return 0.0
        return self.rss_at_end() / self.rss_after_warmup() - 1.0

    @property
    def passed(self) -> bool:
        return (
            not self.unexpected
            and self.lost == 0
            and self.sent == self.answered
            and self.growth < MAX_GROWTH
        )

    def summary(self) -> str:
        kinds = sorted({k for k, _ in self.outcomes})
        with_streams = f" + {self.stream_workers} stream workers" if self.stream_workers else ""
        lines = [
            f"soak: {self.elapsed:.0f}s at concurrency {self.concurrency}{with_streams} "
            f"(warm-up {self.warmup:.0f}s)",
            f"  requests sent {self.sent:,}, answered {self.answered:,}, lost {self.lost}, "
            f"unexpected {sum(self.unexpected.values())} ({self.answered / max(self.elapsed, 1e-9):,.0f}/s)",
        ]
        if self.recycled:
            lines.append(
                f"  retried once after a connection recycle (GOAWAY, max_connection_age): "
                f"{self.recycled}"
            )
        for kind in kinds:
            codes = ", ".join(
                f"{code} {n:,}" for (k, code), n in sorted(self.outcomes.items()) if k == kind
            )
            lines.append(f"    {kind:<30} {codes}")
        if self.streams:
            lines.append(
                f"  streams {sum(self.streams.values()):,} (their messages are counted above, "
                "as METHOD/kind), by how they ended:"
            )
            for method in sorted({m for m, _ in self.streams}):
                ends = ", ".join(
                    f"{code} {n:,}" for (m, code), n in sorted(self.streams.items()) if m == method
                )
                lines.append(f"    {method:<30} {ends}")
        if self.unexpected:
            lines.append(f"  unexpected: {dict(self.unexpected)}")
            lines += [f"    {e}" for e in self.examples[:10]]
        if self.rss:
            peak = max(kib for _, kib in self.rss)
            lines.append(
                f"  server RSS: {self.rss[0][1] / 1024:.1f} MiB at start, {self.rss_after_warmup() / 1024:.1f} MiB "
                f"after warm-up, {self.rss_at_end() / 1024:.1f} MiB at the end (peak {peak / 1024:.1f} MiB): "
                f"growth {self.growth:+.1%} (limit {MAX_GROWTH:.0%})"
            )
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


async def soak(
    target: str,
    traffic: Traffic,
    *,
    pid: int | None,
    seconds: float,
    warmup: float,
    concurrency: int = 32,
    stream_workers: int = 4,
    stream_messages: int = 32,
    seed: int = 0,
) -> Result:
    """`concurrency` workers of unary calls and `stream_workers` more of streams (each one
    stream at a time, of 1 to `stream_messages` messages)."""
    result = Result(
        seconds=seconds, warmup=warmup, concurrency=concurrency, stream_workers=stream_workers
    )
    started = time.monotonic()
    stop_at = started + seconds
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        calls = {
            m: channel.unary_unary(m, request_serializer=None, response_deserializer=None)
            for m in {r.method for r in traffic.valid + traffic.invalid}
        }
        stream_calls = {
            m: channel.stream_stream(m, request_serializer=None, response_deserializer=None)
            for m in STREAM_METHODS
        }

        def unexpected(label: str, details: str) -> None:
            result.unexpected[label] += 1
            if len(result.examples) < 10:
                result.examples.append(f"{label} {details[:200]}")

        async def one_stream(
            method: str, messages: list[StreamMessage], name: str
        ) -> tuple[grpc.StatusCode, str, list[bytes]]:
            payloads = [
                m.payload + pb.PredictRequest(id=f"{name}.{i}").SerializeToString()
                if method == STREAM_PREDICT and m.parseable
                else m.payload
                for i, m in enumerate(messages)
            ]
            call = stream_calls[method](iter(payloads), timeout=DEADLINE_S)
            answers: list[bytes] = []
            try:
                async for answer in call:
                    answers.append(answer)
                return await call.code(), await call.details() or "", answers
            except grpc.aio.AioRpcError as err:
                return err.code(), err.details() or "", answers

        def check_answer(
            method: str, message: StreamMessage, index: int, name: str, data: bytes
        ) -> tuple[str, bool, str]:
            """(the answer's code name, is it right, what it said)."""
            if method == STREAM_PREDICT:
                answer = pb.PredictStreamResponse.FromString(data)
                want_id = f"{name}.{index}" if message.parseable else str(index)
                if answer.WhichOneof("result") == "response":
                    right = answer.id == want_id and (
                        message.check is None or message.check(answer.response.SerializeToString())
                    )
                    return "OK", right and message.expect == Code.OK, answer.id
                code = STATUS_BY_NUMBER.get(answer.error.code)
                label = code.name if code is not None else f"code {answer.error.code}"
                right = code == message.expect and answer.id == want_id
                return label, right, f"{answer.id}: {answer.error.message}"
            reply = v2.ModelStreamInferResponse.FromString(data)
            if reply.error_message:
                code_name = reply.error_message.partition(": ")[0]
                right = (
                    code_name == message.expect.name
                    and reply.infer_response.id == message.request_id
                )
                return code_name, right, reply.error_message
            right = message.expect == Code.OK and (
                message.check is None or message.check(reply.infer_response.SerializeToString())
            )
            return "OK", right, reply.infer_response.id

        async def stream_worker(i: int) -> None:
            rng = random.Random(seed * 1000 + 500 + i)
            number = 0
            while time.monotonic() < stop_at:
                method = STREAM_METHODS[number % 2]
                short = method.rpartition("/")[2]
                name = f"{i}.{number}"
                number += 1
                messages = [
                    traffic.pick_stream(method, rng) for _ in range(rng.randint(1, stream_messages))
                ]
                result.sent += len(messages)
                for attempt in (1, 2):
                    code, details, answers = await one_stream(method, messages, name)
                    if attempt == 1 and code == Code.UNAVAILABLE and "GOAWAY" in details:
                        result.recycled += 1  # as for unary calls: a client retries it
                        continue
                    break
                result.streams[(short, code.name)] += 1
                if code != Code.OK:
                    unexpected(f"{short} stream: {code.name}", details)
                if len(answers) > len(messages):
                    unexpected(f"{short} stream: more answers than messages", name)
                result.lost += max(0, len(messages) - len(answers))
                for index, (message, data) in enumerate(zip(messages, answers, strict=False)):
                    result.answered += 1
                    kind = f"{short}/{message.kind}"
                    try:
                        code_name, right, said = check_answer(method, message, index, name, data)
                    except Exception as exc:  # an answer the client cannot read
                        code_name, right, said = "unreadable", False, repr(exc)
                    result.outcomes[(kind, code_name)] += 1
                    if not right:
                        wrong = " (wrong answer)" if code_name == message.expect.name else ""
                        unexpected(f"{kind}: {code_name}{wrong}", f"#{index} {said}")

        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < stop_at:
                request = traffic.pick(rng)
                result.sent += 1
                for attempt in (1, 2):
                    try:
                        data = await calls[request.method](request.payload, timeout=DEADLINE_S)
                        code, details = Code.OK, ""
                    except grpc.aio.AioRpcError as err:
                        data, code, details = b"", err.code(), err.details() or ""
                    if attempt == 1 and code == Code.UNAVAILABLE and "GOAWAY" in details:
                        # The server recycled the connection (--max-connection-age-s) while
                        # this call was on it; gRPC retries such calls by itself, except those
                        # past its 256 KiB retry buffer. A client retries UNAVAILABLE: so do we.
                        result.recycled += 1
                        continue
                    break
                if code == Code.DEADLINE_EXCEEDED:
                    result.lost += 1  # nothing came back in time
                    continue
                result.answered += 1
                result.outcomes[(request.kind, code.name)] += 1
                right = code == request.expect
                if right and request.check is not None:
                    right = request.check(data)
                if not right:
                    label = f"{request.kind}: {code.name}" + (
                        "" if code != request.expect else " (wrong answer)"
                    )
                    unexpected(label, details)

        async def sample_rss() -> None:
            while pid is not None:
                result.rss.append((time.monotonic() - started, rss_kib(pid)))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_rss())
        workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        workers += [asyncio.create_task(stream_worker(i)) for i in range(stream_workers)]
        # Bounded: a worker stuck past its deadline means lost responses.
        done, pending = await asyncio.wait(workers, timeout=seconds + DEADLINE_S + 30)
        for task in pending:
            task.cancel()
            result.lost += 1
        for task in done:
            task.result()
        result.elapsed = time.monotonic() - started
        if pid is not None:
            result.rss.append((result.elapsed, rss_kib(pid)))
        sampler.cancel()
    return result


@contextmanager
def target_server(args: argparse.Namespace) -> Iterator[tuple[str, int | None, Path]]:
    if args.target:
        if args.model_file is None:
            raise SystemExit("--target needs --model-file (the ONNX file the server runs)")
        yield args.target, args.pid, args.model_file
        return
    import tempfile

    from harness import serve_newest

    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with serve_newest(
            args.models_dir, args.model, ["--max-message-mb", str(args.max_message_mb)], log_path
        ) as (proc, model_file):
            assert proc.proc is not None
            yield proc.target, proc.proc.pid, model_file
        if "Traceback" in log_path.read_text():
            print(f"the server logged exceptions:\n{log_path.read_text()[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--model", default="mnist")
    p.add_argument("--seconds", type=float, default=300.0, help="how long (default 5 minutes)")
    p.add_argument(
        "--warmup",
        type=float,
        help="seconds before memory is measured (default: a fifth, at most 60)",
    )
    p.add_argument("--concurrency", type=int, default=32, help="workers of unary calls")
    p.add_argument(
        "--stream-workers",
        type=int,
        default=4,
        help="more workers, each running one stream at a time (PredictStream and "
        "ModelStreamInfer in turn; 0: none)",
    )
    p.add_argument("--stream-messages", type=int, default=32, help="most messages per stream")
    p.add_argument(
        "--max-message-mb", type=int, default=2, help="the server's message limit (own server)"
    )
    p.add_argument("--target", help="soak a running server instead of starting one")
    p.add_argument(
        "--pid", type=int, help="with --target: the server's process id (for its memory)"
    )
    p.add_argument("--model-file", type=Path, help="with --target: the model's ONNX file")
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(60.0, args.seconds / 5)
    with target_server(args) as (target, pid, model_file):
        traffic = Traffic(args.model, model_file, args.max_message_mb * 1024 * 1024)
        print(
            f"soaking {target} for {args.seconds:.0f}s at concurrency {args.concurrency} "
            f"+ {args.stream_workers} stream workers",
            flush=True,
        )
        result = asyncio.run(
            soak(
                target,
                traffic,
                pid=pid,
                seconds=args.seconds,
                warmup=warmup,
                concurrency=args.concurrency,
                stream_workers=args.stream_workers,
                stream_messages=args.stream_messages,
            )
        )
    print(result.summary())
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
