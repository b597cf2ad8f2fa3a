"""`python -m harness.fuzz` (`make fuzz`): fuzz a server it starts, or a running one."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

import harness.fuzz
from harness.fuzz.oracle import Oracle
from harness.fuzz.payloads import model_facts
from harness.fuzz.runner import Settled, Tally, fuzz, stream_settled


@contextmanager
def target_server(
    args: argparse.Namespace,
) -> Iterator[tuple[str, Callable[[], bool], Path, Settled]]:
    """(target, is the server alive, its model file, does it hold nothing in flight)."""
    if args.target:
        if args.model_file is None:
            raise SystemExit("--target needs --model-file (the ONNX file the server runs)")
        settled = stream_settled(args.metrics_url) if args.metrics_url else None
        yield args.target, lambda: True, args.model_file, settled
        return
    import tempfile

    from harness import serve_newest

    extra = [
        "--max-message-mb",
        str(args.max_message_mb),
        "--max-stream-inflight",
        str(args.max_stream_inflight),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with serve_newest(args.models_dir, args.model, extra, log_path) as (proc, model_file):
            yield (
                proc.target,
                lambda: proc.proc is not None and proc.proc.poll() is None,
                model_file,
                stream_settled(f"http://127.0.0.1:{proc.metrics_port}/metrics"),
            )
        if "Traceback" in log_path.read_text():
            print(f"the server logged exceptions:\n{log_path.read_text()[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=harness.fuzz.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--model", default="mnist", help="model name in the repository")
    p.add_argument("--cases", type=int, default=10_000, help="at least this many hostile calls")
    p.add_argument("--burst", type=int, default=16, help="most cases sent at once")
    p.add_argument(
        "--stream-burst",
        type=int,
        default=2,
        help="most stream cases (PredictStream, ModelStreamInfer) beside each burst (0: none)",
    )
    p.add_argument(
        "--max-message-mb", type=int, default=1, help="the server's message limit (own server)"
    )
    p.add_argument(
        "--max-stream-inflight",
        type=int,
        default=8,
        help="the server's messages in flight per stream (own server; small, so that long "
        "streams meet the bound)",
    )
    p.add_argument("--target", help="fuzz a running server instead of starting one")
    p.add_argument(
        "--model-file", type=Path, help="with --target: the model's ONNX file (for the answers)"
    )
    p.add_argument(
        "--metrics-url",
        help="with --target: its /metrics, to check that nothing is left in flight after a burst",
    )
    args = p.parse_args(argv)

    started = time.monotonic()
    tally = Tally()
    with (
        target_server(args) as (target, alive, model_file, settled),
        grpc.insecure_channel(target) as channel,
    ):
        model = model_facts(channel, args.model, args.max_message_mb * 1024 * 1024)
        oracle = Oracle(model, model_file)
        print(
            f"fuzzing {target}: model {model.name} ({model.h}x{model.w}x{model.c}), "
            f"{args.cases:,} cases, up to {args.stream_burst} streams beside each burst"
        )

        def progress(tally: Tally) -> None:
            print(
                f"  {tally.total:,} cases, {tally.streams:,} streams ({tally.answers:,} answers), "
                f"{time.monotonic() - started:.0f}s",
                flush=True,
            )

        try:
            fuzz(
                channel,
                model,
                oracle=oracle,
                tally=tally,
                alive=alive,
                cases=args.cases,
                burst_size=args.burst,
                stream_burst=args.stream_burst,
                settled=settled,
                progress=progress,
            )
        except Exception as exc:
            print(tally.report())
            print(f"FAILED after {tally.total:,} cases: {type(exc).__name__}: {exc}")
            return 1
    print(tally.report())
    seconds = time.monotonic() - started
    print(
        f"OK: {tally.total:,} cases and {tally.streams:,} streams ({tally.answers:,} answers) in "
        f"{seconds:.0f}s ({tally.total / seconds:.0f} cases/s); no improper code, every message "
        "on a stream answered once, in order, as its unary call; server alive, valid calls right "
        "after every burst"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
