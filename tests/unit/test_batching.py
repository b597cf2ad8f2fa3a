"""serving.core.batching: the batcher's rule (how many images, which thread) and its runs: coalescing,
cutting, cancellation, retries one by one, and closing."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.core.batching import Batcher, Decision, Joins, RunCosts, decide, run_unbatched


def _recording_run(threads: list[str], sizes: list[int]):  # type: ignore[no-untyped-def]
    def run(x: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        sizes.append(len(x))
        out: np.ndarray = x.reshape(len(x), -1)[:, :1] * 2
        return out

    return run


@pytest.mark.parametrize(
    ("queued", "running", "max_runs", "expected"),
    [
        (0, 0, 2, 0),  # nothing queued: no run
        (32, 2, 2, 0),  # every run busy: the queue waits for one to end
        (32, 0, 2, 16),  # two free runs share 32 images: 16 each
        (33, 0, 2, 17),  # shares round up, so no third run is needed
        (32, 1, 2, 32),  # one free run takes what it can hold
        (1, 0, 2, 1),  # one image alone: a run of one
        (1000, 0, 2, 64),  # capped at max_batch_size
        (1000, 0, 1, 64),
        (100, 0, 4, 25),  # four cores: four runs of 25
    ],
)
def test_decide_shares_the_queue_over_the_free_runs(
    queued: int, running: int, max_runs: int, expected: int
) -> None:
    d = decide(queued, running, max_runs=max_runs, max_batch_size=64, inline=lambda n: False)
    assert d.images == expected and not d.inline
    inline = decide(queued, running, max_runs=max_runs, max_batch_size=64, inline=lambda n: True)
    # On the loop's thread a run takes all it can hold, busy workers or not.
    assert inline.images == min(queued, 64) and inline.inline == (queued > 0)


def test_decide_sends_runs_cheaper_than_the_hand_off_to_the_loop() -> None:
    def cheap(n: int) -> bool:
        return n <= 4

    assert decide(3, 0, max_runs=2, max_batch_size=64, inline=cheap) == Decision(3, True)
    assert decide(3, 2, max_runs=2, max_batch_size=64, inline=cheap) == Decision(3, True)
    assert decide(32, 0, max_runs=2, max_batch_size=64, inline=cheap) == Decision(16, False)


def test_run_costs_choose_inline_only_for_runs_cheaper_than_the_hand_off() -> None:
    costs = RunCosts()
    assert not costs.inline(1)  # nothing measured yet: a worker, which measures both
    costs.observe_run(1, 100e-6)
    assert not costs.inline(1)  # the hand-off is not known yet
    costs.observe_hop(300e-6)
    assert costs.inline(1)
    costs.observe_run(32, 1.5e-3)
    assert not costs.inline(32) and not costs.inline(20)  # same size class as 32
    for _ in range(100):  # the hand-off got cheap (an idle machine): runs of 1 go to workers
        costs.observe_hop(20e-6)
    assert not costs.inline(1)


def test_run_costs_recheck_the_hand_off_now_and_then() -> None:
    costs = RunCosts()
    costs.observe_run(1, 1e-6)
    costs.observe_hop(1.0)
    choices = []
    for _ in range(RunCosts.RECHECK * 3):
        choices.append(costs.inline(1))
        if not choices[-1]:
            assert not costs.inline(1)  # asked again before the run went: still a worker's
            costs.handed_off()
    assert choices.count(False) == 3


async def test_a_due_recheck_survives_the_fast_path_asking_first() -> None:
    """Lone requests on an idle loop ask the rule in `submit`; the one that draws the recheck
    is queued, and `_dispatch` asks again: the recheck stays due, so that run goes to a worker
    and the hand-off is measured again."""
    threads: list[str] = []
    with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
        batcher = Batcher(_recording_run(threads, []), pool, max_batch_size=8)
        batcher.costs.observe_run(1, 1e-6)
        batcher.costs.observe_hop(1.0)
        for _ in range(RunCosts.RECHECK + 8):
            await asyncio.sleep(0)
            await batcher.submit(np.ones((1, 1), np.float32))
        await batcher.close()
    workers = [i for i, t in enumerate(threads) if t.startswith("worker")]
    assert workers == [RunCosts.RECHECK - 1]


async def test_batcher_coalesces_concurrent_requests() -> None:
    sizes: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        out: np.ndarray = x.reshape(len(x), -1).sum(axis=1, keepdims=True).astype(np.float32)
        return out

    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(run, pool, max_batch_size=8, max_delay_s=0.05)
        inputs = [np.full((1, 2), i, np.float32) for i in range(8)]
        outs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.close()
    assert [float(o[0, 0]) for o in outs] == [2.0 * i for i in range(8)]
    assert sizes == [8]


async def test_batcher_cuts_a_request_where_a_batch_is_full_and_skips_cancelled() -> None:
    sizes: list[int] = []
    gate = asyncio.Event()

    def run(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        return x[:, :1].copy()

    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(run, pool, max_batch_size=4, max_delay_s=0.0)
        a = asyncio.ensure_future(batcher.submit(np.ones((3, 1), np.float32)))
        b = asyncio.ensure_future(batcher.submit(np.ones((3, 1), np.float32) * 2))
        c = asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32) * 3))
        c.cancel()
        gate.set()
        ra, rb = await asyncio.gather(a, b)
        await batcher.close()
    assert ra.tolist() == [[1.0]] * 3 and rb.tolist() == [[2.0]] * 3
    assert sizes == [4, 2]  # 3 + 3 > 4: b's first row fills the first run; c never ran


async def test_runs_go_to_the_executor_and_coalesce_while_the_next_fills() -> None:
    threads: list[str] = []
    sizes: list[int] = []
    with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
        batcher = Batcher(_recording_run(threads, sizes), pool, max_batch_size=4)
        first = asyncio.ensure_future(batcher.submit(np.ones((4, 1), np.float32)))
        await asyncio.sleep(0)  # the first batch is dispatched alone
        rest = [asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32))) for _ in "abc"]
        await asyncio.gather(first, *rest)
        await batcher.close()
    assert sizes == [4, 3]  # three requests queued while the first ran: one batch of 3
    assert threads and all(t.startswith("worker") for t in threads)


async def test_cheap_runs_go_inline_and_only_lone_hand_offs_are_measured() -> None:
    """With the costs measured (runs of 1 cheaper than the hand-off), a run of 1 goes on the
    loop's thread, also beside a long run in a worker; and a hand-off made while another run is
    in flight does not count as a measure of the hand-off."""
    threads: list[str] = []
    release = threading.Event()
    record = _recording_run(threads, [])

    def run(x: np.ndarray) -> np.ndarray:
        if len(x) == 8:
            release.wait(10)
        return record(x)  # type: ignore[no-any-return]

    with ThreadPoolExecutor(2, thread_name_prefix="worker") as pool:
        batcher = Batcher(run, pool, max_batch_size=64, max_runs=2)
        batcher.costs.observe_run(1, 1e-6)
        batcher.costs.observe_hop(1.0)
        await batcher.submit(np.ones((1, 1), np.float32))
        assert threads == [threading.current_thread().name]  # cheap: inline
        big = asyncio.ensure_future(batcher.submit(np.ones((8, 1), np.float32)))  # unmeasured
        await asyncio.sleep(0.01)
        await batcher.submit(np.ones((1, 1), np.float32))  # beside it, still inline
        assert threads[-1] == threading.current_thread().name
        release.set()
        await big
        assert batcher.costs.hop_s is not None and batcher.costs.hop_s < 1.0  # the lone big one
        hop = batcher.costs.hop_s
        first = asyncio.ensure_future(batcher.submit(np.ones((8, 1), np.float32)))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(batcher.submit(np.ones((16, 1), np.float32)))
        await asyncio.gather(first, second)
        await batcher.close()
    assert threads[-1].startswith("worker")
    assert batcher.costs.hop_s != hop  # the first (alone) was measured


async def test_inline_runs_stay_on_the_loop_thread_and_coalesce() -> None:
    threads: list[str] = []
    sizes: list[int] = []
    with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
        batcher = Batcher(_recording_run(threads, sizes), pool, max_batch_size=8, inline=True)
        outs = await asyncio.gather(
            *(batcher.submit(np.full((1, 3), i, np.float32)) for i in range(5))
        )
        await batcher.close()
    assert [o.tolist() for o in outs] == [[[2.0 * i]] for i in range(5)]
    assert sizes == [5]  # everything queued in one turn of the loop: one run
    assert threads == [threading.current_thread().name]


async def test_a_lone_request_on_an_idle_loop_runs_in_its_own_call() -> None:
    """Nothing else ready on the loop and nothing queued: no request can join the run, so it
    runs in `submit` itself, without suspending the caller; with other work ready on the loop
    (here a second caller's task), requests still queue and coalesce."""
    threads: list[str] = []
    sizes: list[int] = []
    observed: list[tuple[int, list[float]]] = []
    with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
        batcher = Batcher(
            _recording_run(threads, sizes),
            pool,
            max_batch_size=8,
            inline=True,
            observer=lambda n, waits, s: observed.append((n, waits)),
        )
        await asyncio.sleep(0)  # let the test's own start-up callbacks run
        coro = batcher.submit(np.full((1, 3), 3, np.float32))
        with pytest.raises(StopIteration) as ran:
            coro.send(None)  # completes at once: it never waited on a future
        assert ran.value.value.tolist() == [[6.0]]
        assert sizes == [1] and observed == [(1, [0.0])]
        outs = await asyncio.gather(
            *(batcher.submit(np.ones((1, 3), np.float32)) for _ in range(3))
        )
        await batcher.close()
    assert [o.tolist() for o in outs] == [[[2.0]]] * 3
    assert sizes == [1, 3]  # the three queued together: one run
    assert set(threads) == {threading.current_thread().name}


def test_joins_hold_lone_requests_back_only_while_they_get_company() -> None:
    """Held back until measured; once held-back requests go unjoined, lone requests run at
    once but every PROBE-th, which keeps measuring; joins seen again bring the holding back."""
    joins = Joins()
    assert joins.hold()
    for _ in range(40):
        joins.observe(False)
    assert joins.rate < Joins.MIN
    holds = [joins.hold() for _ in range(2 * Joins.PROBE)]
    assert holds.count(True) == 2 and holds[Joins.PROBE - 1] and holds[-1]
    joins.observe(True)
    assert joins.hold()


async def test_a_lone_request_on_a_busy_loop_runs_at_once_when_none_would_join_it() -> None:
    """Other callbacks ready on the loop: a lone request is held back a turn for company, and
    its dispatch tells `Joins` whether any came. Unary-like traffic (requests one turn apart)
    teaches it that none come, and lone requests then run in `submit`; requests that arrive
    together (as a stream's) are still queued and run as one batch."""
    sizes: list[int] = []
    with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
        batcher = Batcher(_recording_run([], sizes), pool, max_batch_size=8, inline=True)
        loop = asyncio.get_running_loop()
        for _ in range(40):  # one request a turn, with an unrelated callback ready beside it
            loop.call_soon(lambda: None)
            await batcher.submit(np.ones((1, 3), np.float32))
        assert batcher.joins.rate < Joins.MIN and sizes == [1] * 40
        loop.call_soon(lambda: None)
        coro = batcher.submit(np.full((1, 3), 5, np.float32))
        with pytest.raises(StopIteration) as ran:
            coro.send(None)  # ran in its own call: it never waited on a future
        assert ran.value.value.tolist() == [[10.0]]
        for _ in range(3 * Joins.PROBE):  # bursts: every PROBE-th held back, and joined
            loop.call_soon(lambda: None)
            await asyncio.gather(*(batcher.submit(np.ones((1, 3), np.float32)) for _ in "ab"))
            if batcher.joins.rate >= Joins.MIN:
                break
        assert batcher.joins.rate >= Joins.MIN
        del sizes[:]
        loop.call_soon(lambda: None)
        await asyncio.gather(*(batcher.submit(np.ones((1, 3), np.float32)) for _ in "abc"))
        await batcher.close()
    assert sizes == [3]


async def test_several_runs_go_at_once_and_share_the_queue() -> None:
    """max_runs=2: two batches are in the executor together (a barrier of two parties
    only opens then: with one run at a time it would time out), and what is queued while
    both are free is split between them instead of merged into one batch."""
    barrier = threading.Barrier(2, timeout=10)
    threads: list[str] = []
    sizes: list[int] = []
    record = _recording_run(threads, sizes)

    def run(x: np.ndarray) -> np.ndarray:
        barrier.wait()
        return record(x)  # type: ignore[no-any-return]

    with ThreadPoolExecutor(2, thread_name_prefix="worker") as pool:
        batcher = Batcher(run, pool, max_batch_size=64, max_runs=2)
        outs = await asyncio.gather(
            *(batcher.submit(np.full((8, 1), i, np.float32)) for i in range(4))
        )
        await batcher.close()
    assert sorted(sizes) == [16, 16]  # 32 queued images, two free runs: 16 each
    assert len(set(threads)) == 2
    assert [o[:, 0].tolist() for o in outs] == [[2.0 * i] * 8 for i in range(4)]


async def test_a_lone_request_is_split_over_every_free_run() -> None:
    """One request of 40 rows and two free runs: two runs of 20 side by side (the barrier
    opens only then), and the caller gets its 40 rows back in order."""
    barrier = threading.Barrier(2, timeout=10)
    sizes: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        barrier.wait()
        sizes.append(len(x))
        return x[:, :1] * 2

    with ThreadPoolExecutor(2) as pool:
        batcher = Batcher(run, pool, max_batch_size=64, max_runs=2)
        x = np.arange(40, dtype=np.float32).reshape(40, 1)
        out = await batcher.submit(x)
        await batcher.close()
    assert sizes == [20, 20]
    assert out[:, 0].tolist() == (2 * x[:, 0]).tolist()


async def test_a_request_larger_than_a_batch_is_cut_into_batches() -> None:
    sizes: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(_recording_run([], sizes), pool, max_batch_size=8, max_runs=1)
        x = np.arange(20, dtype=np.float32).reshape(20, 1)
        a, b = await asyncio.gather(batcher.submit(x), batcher.submit(np.ones((3, 1), np.float32)))
        await batcher.close()
    assert sizes == [8, 8, 7]  # the last run takes the request's tail and the next request
    assert a[:, 0].tolist() == (2 * x[:, 0]).tolist() and b[:, 0].tolist() == [2.0] * 3


async def test_one_run_at_a_time_merges_what_is_queued() -> None:
    sizes: list[int] = []
    with ThreadPoolExecutor(2, thread_name_prefix="worker") as pool:
        batcher = Batcher(_recording_run([], sizes), pool, max_batch_size=64, max_runs=1)
        await asyncio.gather(*(batcher.submit(np.ones((8, 1), np.float32)) for _ in range(4)))
        await batcher.close()
    assert sizes == [32]


async def test_a_caller_that_gave_up_is_never_run() -> None:
    release = threading.Event()
    sizes: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        release.wait(10)
        sizes.append(len(x))
        return x

    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(run, pool, max_batch_size=64, max_runs=1)
        first = asyncio.ensure_future(batcher.submit(np.ones((2, 1), np.float32)))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit(np.ones((5, 1), np.float32)))
        kept = asyncio.ensure_future(batcher.submit(np.ones((3, 1), np.float32)))
        await asyncio.sleep(0.01)
        gone.cancel()
        release.set()
        await asyncio.gather(first, kept)
        await batcher.close()
    assert sizes == [2, 3]
    assert batcher.queued_images == 0 and batcher.running_images == 0


async def test_a_full_batch_does_not_wait_out_the_delay() -> None:
    sizes: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(_recording_run([], sizes), pool, max_batch_size=4, max_delay_s=30.0)
        outs = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(np.ones((1, 1), np.float32)) for _ in range(4))),
            timeout=10,
        )
        await batcher.close()
    assert len(outs) == 4 and sizes == [4]


@pytest.mark.parametrize("inline", [False, True])
async def test_a_failing_batch_is_retried_one_by_one(inline: bool) -> None:
    def run(x: np.ndarray) -> np.ndarray:
        if (x < 0).any():
            raise ValueError("negative input")
        out: np.ndarray = x[:, :1].copy()
        return out

    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(run, pool, max_batch_size=8, inline=inline)
        results = await asyncio.gather(
            batcher.submit(np.ones((1, 1), np.float32)),
            batcher.submit(-np.ones((1, 1), np.float32)),
            batcher.submit(np.full((1, 1), 3, np.float32)),
            return_exceptions=True,
        )
        await batcher.close()
    assert results[0].tolist() == [[1.0]] and results[2].tolist() == [[3.0]]  # type: ignore[union-attr]
    assert isinstance(results[1], ValueError)


async def test_close_answers_every_waiting_caller() -> None:
    release = threading.Event()

    def run(x: np.ndarray) -> np.ndarray:
        release.wait(10)
        return x

    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(run, pool, max_batch_size=1)
        running = asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32)))
        queued = asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32)))
        await asyncio.sleep(0.05)
        await batcher.close()
        release.set()
        for call in (running, queued):
            with pytest.raises(RuntimeError, match="model unloaded"):
                await call
        with pytest.raises(RuntimeError, match="batcher closed"):
            await batcher.submit(np.ones((1, 1), np.float32))


async def test_run_unbatched_inline_stays_on_the_loop_thread() -> None:
    threads: list[str] = []
    with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
        run = _recording_run(threads, [])
        await run_unbatched(run, pool, np.ones((2, 1), np.float32), inline=True)
        await run_unbatched(run, pool, np.ones((2, 1), np.float32))
    assert threads[0] == threading.current_thread().name and threads[1].startswith("worker")
