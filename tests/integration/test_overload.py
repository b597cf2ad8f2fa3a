"""Admission control under a real burst (issue 13; `make overload` runs the full-size one):
150 concurrent Predict calls of 1,024 float32 images (3.2 MB each) against the real server
with a small memory budget, then with a small queue bound. Every call ends OK with the right
answer or UNAVAILABLE with the limit named; the refusals are counted on /metrics by reason;
the server stays up and answers a valid call afterwards, and holds far less than the burst."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.overload_traffic import BurstResult, Workload, burst, one_call, predict_stubs
from harness import ServerProcess, scrape
from harness.process import proc_status_kib
from serving.metrics import UNKNOWN_MODEL

pytestmark = pytest.mark.slow

CALLS = 150
IMAGES = 1024  # 3.2 MB of float32 28x28x1 images a call
MiB = 1024 * 1024
COMMON = ["--max-message-mb", "64", "--max-connection-age-s", "0"]
# A call is estimated to hold 9.6 MB (admission.request_cost): a budget of 8 MiB holds one at a
# time, so any overlap is refused however fast the calls arrive (on a busy machine gRPC may
# deliver them barely faster than they are served). The queue bound is far above it (64 calls),
# so that memory is what refuses.
MEMORY_BOUND = ["--max-inflight-mb", "8", "--max-queue-images", str(64 * IMAGES), *COMMON]


def rejected(proc: ServerProcess) -> dict[tuple[str, ...], float]:
    """cnnserve_rejected_total by (model, reason), scraped from the server's /metrics."""
    return scrape(proc.metrics_port).by("cnnserve_rejected_total", "model", "reason")


async def burst_then_one_call(proc: ServerProcess, work: Workload) -> tuple[BurstResult, bool]:
    result = await burst(proc.target, work, calls=CALLS, channels=8, deadline_s=60)
    async with predict_stubs(proc.target, 1) as stubs:
        after = await one_call(stubs[0], work, 60)
    return result, after.code == "OK" and after.right


def check_burst(result: BurstResult, limit: str) -> None:
    summary = f"{result.codes}; refusals: {result.refusal_messages}; other: {result.other_messages}"
    assert set(result.codes) <= {"OK", "UNAVAILABLE"}, summary
    assert result.codes.get("OK", 0) > 0, summary  # admitted calls are served meanwhile
    assert result.codes.get("UNAVAILABLE", 0) > 0, summary
    assert sum(result.codes.values()) == CALLS
    assert result.wrong_answers == 0, summary
    assert result.refusals_naming_no_limit == 0, summary
    named = [m for m in result.refusal_messages if limit in m.replace("_", "-")]
    assert named, f"no refusal names {limit}: {summary}"


@pytest.fixture(scope="module")
def work(trained_repo: Path) -> Workload:
    return Workload.build("fashion", trained_repo / "fashion" / "1" / "model.onnx", IMAGES)


def test_memory_budget_refuses_the_excess(trained_repo: Path, work: Workload) -> None:
    with ServerProcess(trained_repo, MEMORY_BOUND) as proc:
        assert proc.proc is not None
        result, after_ok = asyncio.run(burst_then_one_call(proc, work))
        check_burst(result, "max-inflight-mb")
        assert after_ok
        counted = rejected(proc)
        # Calls refused before their message is read name no model yet; those that got as far
        # as the data plane name theirs. Which of the two a call meets depends on timing.
        assert {reason for _, reason in counted} == {"memory"}, counted
        assert {model for model, _ in counted} <= {"fashion", UNKNOWN_MODEL}, counted
        assert sum(counted.values()) == result.codes["UNAVAILABLE"] > 0, counted
        assert proc.proc.poll() is None
    assert proc.proc.returncode == 0
    assert "Traceback" not in proc.logs()


def test_memory_budget_bounds_what_the_server_holds(trained_repo: Path, work: Workload) -> None:
    """The burst is 480 MB; under a budget of 8 MiB the server must not hold most of it. What
    gRPC has received of a call before the handler refuses it counts too: this fails while
    every call's whole message is buffered before admission sees it."""
    with ServerProcess(trained_repo, MEMORY_BOUND) as proc:
        assert proc.proc is not None
        idle = (proc_status_kib(proc.proc.pid, "VmRSS") or 0) * 1024
        result, after_ok = asyncio.run(burst_then_one_call(proc, work))
        peak = (proc_status_kib(proc.proc.pid, "VmHWM") or 0) * 1024
        burst_bytes = CALLS * len(work.payload)
        print(f"{result.codes}: RSS idle {idle / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB")
        assert after_ok
        assert peak - idle < burst_bytes / 2, (
            f"peak {peak / MiB:.0f} MiB is {(peak - idle) / MiB:.0f} MiB over idle, for a burst "
            f"of {burst_bytes / MiB:.0f} MiB under a budget of 8 MiB ({result.codes})"
        )


def test_queue_bound_refuses_the_excess(trained_repo: Path, work: Workload) -> None:
    # One call's worth of queue (a call stays queued until its last rows are taken) under a
    # budget that holds the whole burst: the queue refuses.
    args = ["--max-inflight-mb", "2048", "--max-queue-images", str(IMAGES), *COMMON]
    with ServerProcess(trained_repo, args) as proc:
        assert proc.proc is not None
        result, after_ok = asyncio.run(burst_then_one_call(proc, work))
        check_burst(result, "max-queue-images")
        assert after_ok
        counted = rejected(proc)
        assert counted.get(("fashion", "queue"), 0) > 0, counted
        assert counted.get(("fashion", "memory"), 0) == 0, counted
        assert proc.proc.poll() is None
    assert proc.proc.returncode == 0
    assert "Traceback" not in proc.logs()
