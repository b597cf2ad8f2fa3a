"""`make overload`: the server under a burst far beyond its memory, and under 4x its capacity.

    .venv/bin/python bench/overload.py                      # the whole run, ~3 minutes
    .venv/bin/python bench/overload.py --publish            # and write bench/OVERLOAD.md
    .venv/bin/python bench/overload.py --calls 300 --idle-seconds 10 --goodput-seconds 10

Issue 13: 1,500 concurrent Predict calls of 1,024 float32 images each (3.2 MB a call, 4.8 GB
in all, 60 s deadlines) took the server from 127 MB to 7.2 GB, and it stayed at 630-700 MB
afterwards. Here the real server (`python -m serving`, a subprocess) runs with the admission
budget a pod limited to 1 GiB would get (`--max-inflight-mb` from
`serving.memory.default_inflight_budget_bytes(1 GiB)`), and, one after the other:

1. three warm calls, then its idle resident memory for a few seconds: the baseline. Memory
   is VmRSS summed over the server's processes (it and its run process);
2. the burst: `--calls` concurrent calls over `--channels` grpc.aio channels (one TCP
   connection each), every one sent at once; VmRSS is sampled every 50 ms and VmHWM read at
   the end. Every call must end OK (with the right answer) or UNAVAILABLE naming the limit
   that refused it; none DEADLINE_EXCEEDED; peak resident memory at most 1 GiB;
3. one more valid call, answered correctly, then VmRSS sampled for `--idle-seconds`: the
   memory must come back to within 1.5x of the baseline;
4. goodput. Saturation is a closed loop of 8 callers, each sending its next call when the last
   is answered: enough to keep every run busy (a 1,024-image call is split over the runs), so
   its rate of OK images is what the server can do. Overload is an open loop at 4x that rate
   in calls a second: calls arrive on schedule whether or not earlier ones were answered, as
   from many independent clients. (A closed loop of 32 callers would be no overload at all:
   each waits for its answer, so it only lengthens the queue and offers what is served.)
   Goodput is the rate of OK images answered inside the measuring window; the target is at
   least 90 % of saturation, i.e. refusing the excess costs the server little.

The server's connection recycling (--max-connection-age-s) is off here: a recycled connection
fails calls larger than gRPC's retry buffer with UNAVAILABLE, which would count as refusals.
Writes bench/results/overload.json (and the server log beside it); `--publish` also writes
bench/OVERLOAD.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`python bench/overload.py`, as documented):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import bench's siblings

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import grpc

from bench.overload_traffic import (
    MESSAGE_LIMIT,
    BurstResult,
    Progress,
    RateResult,
    RssSampler,
    Workload,
    burst,
    closed_loop,
    cpu_used,
    one_call,
    open_loop,
    predict_stubs,
)
from harness import ServerProcess, newest_version, pick_model
from harness.process import (
    add_max_steal,
    cpu_times,
    stolen_share,
    too_stolen,
    tree_status_kib,
)
from serving.config import MiB
from serving.memory import GiB, default_inflight_budget_bytes

ROOT = Path(__file__).resolve().parent.parent

POD_LIMIT = 1 * GiB
PEAK_TARGET = 1 * GiB
IDLE_RATIO_TARGET = 1.5
GOODPUT_TARGET = 0.90
Code = grpc.StatusCode


def machine() -> dict[str, object]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        platform.processor() or "?",
    )
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def fmt_mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


@dataclass
class Memory:
    """The server's resident memory, in bytes."""

    idle_before: float  # the median over the idle seconds before the burst
    vmhwm: int  # the kernel's high-water mark, read after the burst
    peak_sampled: int  # the highest 50 ms sample during the burst
    idle_seconds: float
    idle_after: float  # the median of the last 2 s of the idle window after the burst
    idle_after_min: int
    series_mib: list[tuple[float, float]] = field(default_factory=list)  # (s from burst, MiB)

    @property
    def peak(self) -> int:
        return max(self.vmhwm, self.peak_sampled)

    @property
    def idle_ratio(self) -> float:
        return self.idle_after / self.idle_before if self.idle_before else math.inf


@dataclass
class Report:
    burst: BurstResult
    memory: Memory
    after_burst_call_ok: bool
    saturation: RateResult
    overload: RateResult
    overload_factor: float
    server_alive: bool
    budget_bytes: int
    client_peak_rss_mib: float = 0.0

    @property
    def goodput_ratio(self) -> float:
        sat = self.saturation.ok_images_per_s
        return self.overload.ok_images_per_s / sat if sat else 0.0

    def targets(self) -> dict[str, bool]:
        b, m = self.burst, self.memory
        deadline = Code.DEADLINE_EXCEEDED.name
        return {
            "every burst call answered OK or UNAVAILABLE": b.codes.get("OK", 0)
            + b.codes.get(Code.UNAVAILABLE.name, 0)
            == b.calls,
            "no DEADLINE_EXCEEDED": deadline not in b.codes and deadline not in self.overload.codes,
            "every OK answer right": b.wrong_answers == 0
            and self.saturation.wrong_answers == 0
            and self.overload.wrong_answers == 0,
            "every refusal names its limit": b.refusals_naming_no_limit == 0,
            f"peak RSS <= {fmt_mib(PEAK_TARGET)}": m.peak <= PEAK_TARGET,
            f"idle RSS after the burst <= {IDLE_RATIO_TARGET}x before": m.idle_ratio
            <= IDLE_RATIO_TARGET,
            "a valid call after the burst answered correctly": self.after_burst_call_ok,
            f"goodput >= {GOODPUT_TARGET:.0%} of saturation": self.goodput_ratio >= GOODPUT_TARGET,
            "server alive and answering at the end": self.server_alive,
        }

    def table(self) -> str:
        """The figures and the targets, as Markdown tables."""
        b, m, sat, over = self.burst, self.memory, self.saturation, self.overload
        rows = [
            (
                "burst",
                f"{b.calls:,} calls x {b.images_per_call:,} float32 images over {b.channels} "
                f"channels, {b.deadline_s:.0f} s deadlines; all answered in {b.seconds:.1f} s",
            ),
            ("burst status codes", _codes(b.codes)),
            (
                "wrong answers / refusals naming no limit",
                f"{b.wrong_answers} / {b.refusals_naming_no_limit}",
            ),
            ("OK latency p50 / p99 / max", _lat(b.latency_ok_s)),
            ("refusal latency p50 / p99 / max", _lat(b.latency_refused_s)),
            ("server budget (--max-inflight-mb)", fmt_mib(self.budget_bytes)),
            ("idle RSS before the burst", fmt_mib(m.idle_before)),
            (
                "peak RSS: sum of VmHWM / highest 50 ms sample",
                f"{fmt_mib(m.vmhwm)} / {fmt_mib(m.peak_sampled)}",
            ),
            (
                f"RSS after {m.idle_seconds:.0f} s idle",
                f"{fmt_mib(m.idle_after)} ({m.idle_ratio:.2f}x before; lowest in the window "
                f"{fmt_mib(m.idle_after_min)})",
            ),
            (
                "a valid call after the burst",
                "answered correctly" if self.after_burst_call_ok else "FAILED",
            ),
            (
                f"saturation: closed loop of {sat.concurrency} callers",
                f"{sat.ok_images_per_s:,.0f} OK images/s ({sat.ok_calls_per_s:.2f} calls/s); "
                f"{_codes(sat.codes)}; OK p50 {_lat(sat.latency_ok_s, ('p50',))}",
            ),
            (
                f"overload: open loop at {self.overload_factor:g}x, "
                f"{over.offered_calls_per_s:.1f} calls/s",
                f"{over.ok_images_per_s:,.0f} OK images/s; {_codes(over.codes)}; "
                f"OK p50 / p99 {_lat(over.latency_ok_s, ('p50', 'p99'))}",
            ),
            ("goodput / saturation", f"{self.goodput_ratio:.1%}"),
            (
                "CPU seconds, server / client: burst, saturation, overload",
                ", ".join(_cpu(r.cpu_s) for r in (b, sat, over)),
            ),
            ("client peak RSS", f"{self.client_peak_rss_mib:,.0f} MiB"),
        ]
        lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
        lines += ["", "| target | met |", "|---|---|"]
        lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in self.targets().items()]
        return "\n".join(lines)


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{c} {n:,}" for c, n in codes.items()) or "-"


def _cpu(c: dict[str, float]) -> str:
    return f"{c['server']:.0f} / {c['client']:.0f}" if c else "-"


def _lat(q: dict[str, float], keys: Sequence[str] = ("p50", "p99", "max")) -> str:
    return " / ".join(f"{q[k]:.2f} s" for k in keys) if q else "-"


# ================================================================================== main


async def measure(
    args: argparse.Namespace, proc: ServerProcess, work: Workload, budget: int
) -> Report:
    """The phases of the module's docstring, one after the other, against a started server."""
    assert proc.proc is not None
    pid, target = proc.proc.pid, proc.target
    with RssSampler(pid) as sampler:
        progress = Progress(sampler)
        print("warm-up: 3 calls, then idle", flush=True)
        async with predict_stubs(target, 1) as stubs:
            for _ in range(3):
                o = await one_call(stubs[0], work, args.deadline)
                if o.code != "OK" or not o.right:
                    raise SystemExit(f"warm-up call failed: {o.code} {o.details}")
        t = time.monotonic()
        await asyncio.sleep(args.baseline_seconds)
        idle_before = statistics.median(sampler.between(t) or [sampler.latest()])

        print(f"burst: {args.calls:,} calls at once", flush=True)
        t_burst = time.monotonic()
        cpu: dict[str, float] = {}
        with cpu_used(pid, cpu):
            b = await burst(
                target,
                work,
                calls=args.calls,
                channels=args.channels,
                deadline_s=args.deadline,
                progress=progress,
            )
        b.cpu_s = cpu
        vmhwm = tree_status_kib(pid, "VmHWM") * 1024
        peak_sampled = max(sampler.between(t_burst) or [0])

        async with predict_stubs(target, 1) as stubs:
            after = await one_call(stubs[0], work, args.deadline)
        after_ok = after.code == "OK" and after.right
        print(f"after the burst: one call {after.code}{'' if after.right else ' (WRONG ANSWER)'}")

        print(f"idle for {args.idle_seconds:.0f} s", flush=True)
        t_idle = time.monotonic()
        while time.monotonic() - t_idle < args.idle_seconds:
            await asyncio.sleep(0.5)
            progress.show(f"idle {time.monotonic() - t_idle:4.1f}s")
        progress.show("idle: done", final=True)
        window = sampler.between(t_idle)
        tail = sampler.between(time.monotonic() - min(2.0, args.idle_seconds / 4))
        memory = Memory(
            idle_before=idle_before,
            vmhwm=vmhwm,
            peak_sampled=peak_sampled,
            idle_seconds=args.idle_seconds,
            idle_after=statistics.median(tail or window or [sampler.latest()]),
            idle_after_min=min(window or [0]),
            series_mib=[
                (round(t - t_burst, 2), round(v / MiB, 1)) for t, v in sampler.samples[::4]
            ],
        )

        print(f"goodput: saturation, {args.saturation_concurrency} callers", flush=True)
        common = {
            "seconds": args.goodput_seconds,
            "warmup_s": args.goodput_warmup,
            "channels": args.channels,
            "deadline_s": args.deadline,
            "progress": progress,
        }
        with cpu_used(pid, cpu := {}):
            sat = await closed_loop(target, work, concurrency=args.saturation_concurrency, **common)
        sat.cpu_s = cpu
        offered = max(sat.ok_calls_per_s * args.overload_factor, 0.1)
        print(f"goodput: overload, {offered:.1f} calls/s on schedule", flush=True)
        with cpu_used(pid, cpu := {}):
            over = await open_loop(target, work, calls_per_s=offered, **common)
        over.cpu_s = cpu
        async with predict_stubs(target, 1) as stubs:
            last = await one_call(stubs[0], work, args.deadline)
    return Report(
        burst=b,
        memory=memory,
        after_burst_call_ok=after_ok,
        saturation=sat,
        overload=over,
        overload_factor=args.overload_factor,
        server_alive=proc.proc.poll() is None and last.code == "OK" and last.right,
        budget_bytes=budget,
        client_peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def main(argv: Sequence[str] | None = None) -> int:
    default_models = (
        Path("/tmp/shared-models") if Path("/tmp/shared-models").is_dir() else ROOT / "models"
    )
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        type=Path,
        default=default_models,
        help=f"model repository (default {default_models})",
    )
    p.add_argument("--model", help="model to call (default: fashion when present, else the first)")
    p.add_argument("--calls", type=int, default=1500, help="calls in the burst")
    p.add_argument("--images", type=int, default=1024, help="float32 images per call")
    p.add_argument("--channels", type=int, default=8, help="grpc.aio channels (connections)")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds per call")
    p.add_argument(
        "--pod-limit-mib",
        type=int,
        default=POD_LIMIT // MiB,
        help="the memory limit whose default budget the server gets (default %(default)s)",
    )
    p.add_argument("--max-inflight-mb", type=int, help="give the server this budget instead")
    p.add_argument("--baseline-seconds", type=float, default=3.0, help="idle before the burst")
    p.add_argument("--idle-seconds", type=float, default=30.0, help="idle after the burst")
    p.add_argument("--saturation-concurrency", type=int, default=8)
    p.add_argument("--overload-factor", type=float, default=4.0)
    p.add_argument("--goodput-seconds", type=float, default=20.0, help="length of each phase")
    p.add_argument(
        "--goodput-warmup", type=float, default=3.0, help="seconds left out at a phase's start"
    )
    p.add_argument("--server-args", default="", help="more flags for python -m serving")
    p.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for the server"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--publish",
        action="store_true",
        help="also write bench/OVERLOAD.md (not when more than --max-steal of the CPU time was "
        "stolen during the run)",
    )
    add_max_steal(p)
    args = p.parse_args(argv)

    model = pick_model(args.models, args.model, prefer="fashion")
    model_file = newest_version(args.models, model)
    budget = (
        args.max_inflight_mb * MiB
        if args.max_inflight_mb is not None
        else default_inflight_budget_bytes(args.pod_limit_mib * MiB)
    )
    server_args = [
        "--max-inflight-mb",
        str(budget // MiB),
        "--max-message-mb",
        str(MESSAGE_LIMIT // MiB),
        "--max-connection-age-s",
        "0",
        *shlex.split(args.server_args),
    ]
    env = dict(kv.split("=", 1) for kv in args.env)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Workload.build(model, model_file, args.images)
    print(
        f"model {model} ({model_file}), {len(work.payload) / 1e6:.1f} MB a call; server flags "
        f"{' '.join(server_args)}" + (f"; env {' '.join(args.env)}" if env else ""),
        flush=True,
    )
    started = datetime.datetime.now(datetime.UTC)
    cpu_start = cpu_times()
    log_path = args.out / "overload-server.log"
    with ServerProcess(args.models, server_args, env=env, log_path=log_path) as proc:
        report = asyncio.run(measure(args, proc, work, budget))
        exit_code = proc.stop()
    stolen = stolen_share(cpu_start, cpu_times())
    command = " ".join(["bench/overload.py", *(sys.argv[1:] if argv is None else argv)])
    targets = report.targets()
    passed = all(targets.values())
    data = {
        "when": started.isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(),
        "cpu_time_stolen": round(stolen, 3),
        "model": str(model_file),
        "server_args": server_args,
        "server_env": env,
        "server_exit_code": exit_code,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **asdict(report),
        "goodput_ratio": report.goodput_ratio,
        "targets": targets,
        "passed": passed,
    }
    (args.out / "overload.json").write_text(json.dumps(data, indent=2) + "\n")
    table = report.table()
    print(f"\n{table}\n\n{'PASS' if passed else 'FAIL'}; wrote {args.out / 'overload.json'}")
    if args.publish:
        if why := too_stolen(stolen, args.max_steal):
            print(f"not published: {why}; the figures stay in {args.out / 'overload.json'}")
            return 3
        publish(data, table, server_args, env)
    return 0 if passed else 1


def publish(
    data: dict[str, object], table: str, server_args: list[str], env: dict[str, str]
) -> None:
    m: dict[str, object] = data["machine"]  # type: ignore[assignment]
    envs = " ".join(f"{k}={v}" for k, v in env.items())
    text = f"""# Overload: a burst beyond the server's memory, and 4x its capacity

`make overload` (`.venv/bin/python {data["command"]}`), {data["when"]}: {m["cpu"]},
{m["cores"]} cores, {m["memory_gib"]} GiB, {m["os"]}, Python {m["python"]}, grpcio
{m["grpcio"]}; load average {m["load_average_at_start"]} at the start; CPU time stolen by the
hypervisor during the run {data["cpu_time_stolen"]:.1%} (/proc/stat; a shared machine: figures move
from run to run). The client runs on the same cores as the server.

Server: `{envs + " " if envs else ""}python -m serving {" ".join(server_args)}`; its
`--max-inflight-mb` is `serving.memory.default_inflight_budget_bytes(1 GiB)`, the default
budget of a pod limited to 1 GiB. What each phase does and why: bench/overload.py's docstring;
every figure: bench/results/overload.json.

{table}
"""
    (ROOT / "bench" / "OVERLOAD.md").write_text(text)
    print(f"wrote {ROOT / 'bench' / 'OVERLOAD.md'}")


if __name__ == "__main__":
    sys.exit(main())
