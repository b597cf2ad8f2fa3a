"""The lean request path: the callback-driven batcher (inline and executor runs), the warm-up
timings that choose between them, and the cached metric children."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serving import codec
from serving.batching import Batcher, run_unbatched
from serving.inference import top_k
from serving.metrics import Metrics
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.runtime import ModelRuntime, RuntimeOptions
from tests.support import write_tiny_model


def _recording_run(threads: list[str], sizes: list[int]):  # type: ignore[no-untyped-def]
    def run(x: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        sizes.append(len(x))
        out: np.ndarray = x.reshape(len(x), -1)[:, :1] * 2
        return out

    return run


async def test_small_batches_run_inline_and_coalesce() -> None:
    threads: list[str] = []
    sizes: list[int] = []
    with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
        batcher = Batcher(
            _recording_run(threads, sizes), pool, max_batch_size=8, inline_max_images=8
        )
        outs = await asyncio.gather(
            *(batcher.submit(np.full((1, 3), i, np.float32)) for i in range(5))
        )
        await batcher.close()
    assert [o.tolist() for o in outs] == [[[2.0 * i]] for i in range(5)]
    assert sizes == [5]  # everything queued in one turn of the loop: one run
    assert threads == [threading.current_thread().name]  # on the loop's own thread


async def test_large_batches_run_in_the_executor_while_the_next_fills() -> None:
    threads: list[str] = []
    sizes: list[int] = []
    with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
        batcher = Batcher(
            _recording_run(threads, sizes), pool, max_batch_size=4, inline_max_images=2
        )
        first = asyncio.ensure_future(batcher.submit(np.ones((4, 1), np.float32)))
        await asyncio.sleep(0)  # the first batch is dispatched alone
        rest = [asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32))) for _ in "abc"]
        await asyncio.gather(first, *rest)
        await batcher.close()
    assert sizes == [4, 3]  # three requests queued while the first ran: one batch of 3
    assert all(t.startswith("worker") for t in threads)


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
        batcher = Batcher(
            _recording_run([], []), pool, max_batch_size=64, max_runs=2, run_parallel=run
        )
        outs = await asyncio.gather(
            *(batcher.submit(np.full((8, 1), i, np.float32)) for i in range(4))
        )
        await batcher.close()
    assert sorted(sizes) == [16, 16]  # 32 queued images, two free runs: 16 each
    assert len(set(threads)) == 2
    assert [o[:, 0].tolist() for o in outs] == [[2.0 * i] * 8 for i in range(4)]


async def test_a_batch_alone_gets_every_thread_and_the_others_wait() -> None:
    """Nothing else queued or running: `run` (all of ONNX Runtime's threads), and a request
    arriving meanwhile waits for it rather than running beside it on too few cores."""
    spans: list[tuple[str, float, float]] = []

    def timed(name: str):  # type: ignore[no-untyped-def]
        def run(x: np.ndarray) -> np.ndarray:
            started = time.perf_counter()
            time.sleep(0.05)
            spans.append((name, started, time.perf_counter()))
            return x[:, :1]

        return run

    with ThreadPoolExecutor(2, thread_name_prefix="worker") as pool:
        batcher = Batcher(
            timed("all threads"), pool, max_batch_size=64, max_runs=2, run_parallel=timed("one")
        )
        first = asyncio.ensure_future(batcher.submit(np.ones((8, 1), np.float32)))
        await asyncio.sleep(0.01)  # the first is running alone by now
        await asyncio.gather(first, batcher.submit(np.ones((8, 1), np.float32)))
        await batcher.close()
    assert [s[0] for s in spans] == ["all threads", "all threads"]
    assert spans[1][1] >= spans[0][2]  # one after the other


async def test_one_run_at_a_time_merges_what_is_queued() -> None:
    sizes: list[int] = []
    with ThreadPoolExecutor(2, thread_name_prefix="worker") as pool:
        batcher = Batcher(_recording_run([], sizes), pool, max_batch_size=64, max_runs=1)
        await asyncio.gather(*(batcher.submit(np.ones((8, 1), np.float32)) for _ in range(4)))
        await batcher.close()
    assert sizes == [32]


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


@pytest.mark.parametrize("inline", [0, 8])
async def test_a_failing_batch_is_retried_one_by_one(inline: int) -> None:
    def run(x: np.ndarray) -> np.ndarray:
        if (x < 0).any():
            raise ValueError("negative input")
        out: np.ndarray = x[:, :1].copy()
        return out

    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(run, pool, max_batch_size=8, inline_max_images=inline)
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


def test_warm_up_times_power_of_two_batches(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.onnx")
    rt = ModelRuntime(path, RuntimeOptions(warmup_batch_sizes=tuple(range(1, 17))))
    assert sorted(rt.run_seconds) == [1, 2, 4, 8, 16]
    assert rt.inline_limit(10.0) == 16 and rt.inline_limit(0.0) == 0
    rt.run_seconds[4] = 1.0  # one slow size caps the limit below it
    assert rt.inline_limit(0.5) == 2
    assert ModelRuntime(path, RuntimeOptions(warmup_batch_sizes=())).inline_limit(10.0) == 0


def test_top_k_of_one_matches_argmax() -> None:
    p = np.random.default_rng(0).random((6, 10)).astype(np.float32)
    top = top_k(p, 1)
    assert top.indices.dtype == np.int64 and top.indices.shape == (6, 1)
    assert top.indices[:, 0].tolist() == p.argmax(axis=1).tolist()
    assert np.array_equal(top.scores[:, 0], p.max(axis=1))
    assert top_k(p, 3).indices[:, 0].tolist() == p.argmax(axis=1).tolist()


def test_count_call_reuses_labelled_children() -> None:
    m = Metrics()
    for _ in range(3):
        m.count_call("mnist", "1", "Predict", "OK", 0.001)
    m.count_call("mnist", "1", "Predict", "INVALID_ARGUMENT", 0.002)
    assert (
        m.registry.get_sample_value(
            "cnnserve_requests_total",
            {"model": "mnist", "version": "1", "method": "Predict", "code": "OK"},
        )
        == 3
    )
    assert (
        m.registry.get_sample_value(
            "cnnserve_request_duration_seconds_count", {"model": "mnist", "method": "Predict"}
        )
        == 4
    )
    inflight = m.inflight_for("Predict")
    assert inflight is m.inflight_for("Predict")
    inflight.inc()
    inflight.inc()
    inflight.dec()
    assert m.registry.get_sample_value("cnnserve_inflight_requests", {"method": "Predict"}) == 1
    assert len(m._call_children) == 2


def test_small_batches_get_a_single_threaded_session_of_the_same_model(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.onnx")
    rt = ModelRuntime(path, RuntimeOptions(intra_op_threads=2, warmup_batch_sizes=(1, 2, 3, 4)))
    assert rt._small_session is not rt.session
    assert rt._small_session.get_session_options().intra_op_num_threads == 1
    x = np.random.default_rng(0).random((3, 4, 4, 1), dtype=np.float32)
    assert np.array_equal(rt.run_small(x), rt.run(x))
    one = ModelRuntime(path, RuntimeOptions(intra_op_threads=1, warmup_batch_sizes=(1,)))
    assert one._small_session is one.session  # nothing to gain: no second session


@pytest.mark.parametrize("k", [1, 3])
def test_hand_encoded_classifications_equal_the_messages(tmp_path: Path, k: int) -> None:
    """codec writes the classifications as wire bytes: they must parse to exactly the
    messages protobuf itself would build (index 0 and a score of 0.0 included)."""
    rt = ModelRuntime(write_tiny_model(tmp_path / "m.onnx"), RuntimeOptions())
    served = types.SimpleNamespace(name="tiny", version=3, runtime=rt)
    probs = np.array([[0.0, 0.3, 0.7], [1.0, 0.0, 0.0], [0.2, 0.5, 0.3]], np.float32)
    top = top_k(probs, k)
    names = rt.info.class_names
    expected = [
        pb.Classification(
            top=[
                pb.ClassScore(index=int(i), label=names[int(i)], score=float(s))
                for i, s in zip(row_i, row_s, strict=True)
            ]
        )
        for row_i, row_s in zip(top.indices, top.scores, strict=True)
    ]
    got = codec.predict_response(served, probs, top, omit=False)  # type: ignore[arg-type]
    assert list(got.classifications) == expected
    assert (got.model, got.version) == ("tiny", 3)
    assert np.array_equal(codec.decode_tensor(got.probabilities, "probabilities"), probs)
    assert not codec.predict_response(served, probs, top, omit=True).HasField("probabilities")  # type: ignore[arg-type]
    classify = codec.classify_response(served, top)  # type: ignore[arg-type]
    assert list(classify.classifications) == expected
