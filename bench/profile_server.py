"""Where the server's time goes under load: py-spy samples a real server while h2load drives it.

    .venv/bin/python -m bench.profile_server --batch 1 --concurrency 16 --seconds 15
    make bench-profile

Writes py-spy's collapsed stacks (profile-*.txt, open them in speedscope or flamegraph.pl) and
prints the functions by self time and by inclusive time (every frame a sample passes through).
Needs py-spy (`pip install py-spy` into the venv) and h2load.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.loadgen import APIS, BENCH, BenchError, grpc_frame, h2load, request_bytes
from bench.measure import start_server
from harness import PYTHON, ROOT, newest_version, pick_model
from serving.core.runtime import ModelRuntime, RuntimeOptions


def summarize(collapsed: Path, top: int) -> str:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        names = [_short(f) for f in frames[1:]] or [frames[0]]
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "by thread:"]
    lines += [f"  {c / total:6.1%}  {t}" for t, c in threads.most_common()]
    lines += ["", "self:"]
    lines += [f"  {c / total:6.1%}  {n}" for n, c in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"  {c / total:6.1%}  {n}" for n, c in inclusive.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    return f"{name} ({'/'.join(Path(file).parts[-2:])})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("/tmp/shared-models"))
    p.add_argument("--model")
    p.add_argument("--api", default="cnnserve", choices=sorted(APIS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--idle", action="store_true", help="py-spy --idle (waiting threads too)")
    p.add_argument("--server-args", default="")
    p.add_argument(
        "--server-root",
        type=Path,
        default=ROOT,
        help="folder whose serving/ package runs (profile another checkout)",
    )
    p.add_argument("--out", type=Path, default=BENCH / "results" / "profile")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(pyspy).exists():
        raise BenchError("py-spy not found: .venv/bin/pip install py-spy")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    models = args.models.resolve()
    model = pick_model(models, args.model)
    info = ModelRuntime(newest_version(models, model), RuntimeOptions(warmup_batch_sizes=())).info
    x = np.random.default_rng(0).random((args.batch, *info.input_shape), dtype=np.float32)
    payload = out / "payload.bin"
    payload.write_bytes(grpc_frame(request_bytes(args.api, model, info.input_name, x)))
    server = start_server(
        models, args.server_args.split(), out / "server.log", args.server_root.resolve()
    )
    proc, port = server.running, server.port
    tag = f"{args.api}-b{args.batch}-c{args.concurrency}"
    collapsed = out / f"profile-{tag}.txt"
    try:
        server.wait_health(timeout=120, interval=0.005)
        url = f"http://127.0.0.1:{port}{APIS[args.api]}"
        warm, _ = h2load(url, payload, 2000, args.concurrency, out / "warm.log")
        rate = warm.requests / warm.seconds
        n = int(rate * (args.seconds + 4))
        results: list[object] = []
        load = threading.Thread(
            target=lambda: results.append(
                h2load(url, payload, n, args.concurrency, out / f"h2load-{tag}.log")
            )
        )
        load.start()
        time.sleep(1.0)
        cmd = [pyspy, "record", "--pid", str(proc.pid), "--duration", str(int(args.seconds)),
               "--rate", str(args.rate), "--format", "raw", "--threads", "--output",
               str(collapsed)]  # fmt: skip
        # --native cannot sample without pausing the process; Python-only sampling need not.
        cmd += ["--native"] if args.native else ["--nonblocking"]
        cmd += ["--idle"] if args.idle else []
        spy = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if spy.returncode != 0:
            raise BenchError(f"py-spy failed ({spy.returncode}): {spy.stderr[-2000:]}")
        load.join()
    finally:
        proc.stop()
    print(f"{tag}: {rate:,.0f} req/s in the warm-up; collapsed stacks in {collapsed}\n")
    print(summarize(collapsed, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
