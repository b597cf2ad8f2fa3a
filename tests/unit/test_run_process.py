"""The run process (serving/core/run_process.py) with a real child process and real sessions:
answers equal to in-process ONNX Runtime, buffers that grow, a failed run, a child that dies
with runs in it (each run answered again here, the child replaced), and the batcher over it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from harness import write_tiny_model
from serving.core.batching import Batcher
from serving.core.run_process import RemoteModel, RunProcess, RunProcessGone
from serving.core.runtime import ModelLoadError, ModelRuntime, RuntimeOptions
from tests.helpers import cpu_session, wait_for

OPTIONS = RuntimeOptions(warmup_batch_sizes=(1, 2))


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "tiny" / "1" / "model.onnx")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@contextlib.asynccontextmanager
async def started() -> AsyncIterator[RunProcess]:
    """A run process, started and, whatever the test does, stopped."""
    runs = RunProcess(OPTIONS)
    await asyncio.to_thread(runs.start, asyncio.get_running_loop())
    try:
        yield runs
    finally:
        await asyncio.to_thread(runs.stop)


async def stop_child(pid: int) -> None:
    """SIGSTOP the run process and wait until it is stopped: runs sent there stay in flight."""
    os.kill(pid, signal.SIGSTOP)
    status = Path(f"/proc/{pid}/status")
    await asyncio.to_thread(
        wait_for, "the child stopped", lambda: "State:\tT" in status.read_text()
    )


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 4, 4, 1), dtype=np.float32)


async def run_remote(remote: RemoteModel, x: np.ndarray) -> np.ndarray | Exception:
    future: asyncio.Future[np.ndarray | Exception] = asyncio.get_running_loop().create_future()
    assert remote.submit(x, lambda y, started, seconds: future.set_result(y))
    return await future


def test_answers_equal_in_process_runtime_at_every_size(
    model: Path, loop: asyncio.AbstractEventLoop
) -> None:
    async def main() -> None:
        async with started() as runs:
            remote = await asyncio.to_thread(runs.open, model, 2)
            assert remote.columns == 3
            reference = cpu_session(model)
            # 1 image, then sizes that outgrow the shared buffer (a page) several times
            for n in (1, 3, 64, 300, 2, 1000):
                x = images(n, seed=n)
                y = await run_remote(remote, x)
                assert isinstance(y, np.ndarray)
                np.testing.assert_allclose(y, reference.run(None, {"image": x})[0], atol=1e-6)
            # two runs at once, on the two channels; a third finds none free
            first, second = images(5, 1), images(7, 2)
            both = asyncio.gather(run_remote(remote, first), run_remote(remote, second))
            await asyncio.sleep(0)  # both submitted
            assert not remote.submit(images(1), lambda *_: None)
            a, b = await both
            assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
            assert (a.shape, b.shape) == ((5, 3), (7, 3))
            remote.close()
            assert not remote.submit(images(1), lambda *_: None)

    loop.run_until_complete(main())


def test_a_failed_run_is_an_error_and_the_channel_goes_on(
    model: Path, loop: asyncio.AbstractEventLoop
) -> None:
    async def main() -> None:
        async with started() as runs:
            remote = await asyncio.to_thread(runs.open, model, 1)
            result = await run_remote(remote, np.zeros((2, 4, 2, 1), np.float32))
            assert isinstance(result, RuntimeError)
            assert "images of 8 values sent, the model takes 4x4x1 = 16" in str(result)
            assert isinstance(await run_remote(remote, images(2)), np.ndarray)

    loop.run_until_complete(main())


def test_a_file_the_child_cannot_load_is_a_model_load_error(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not onnx")

    async def main() -> None:
        async with started() as runs:
            with pytest.raises(ModelLoadError, match="the run process cannot load it"):
                await asyncio.to_thread(runs.open, broken, 1)
            assert runs.pid is not None  # the child lives on

    loop.run_until_complete(main())


def test_a_child_that_dies_is_replaced_and_its_runs_are_answered_here(
    model: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """SIGKILL the child with runs in it: the batcher's callers still get the right rows (their
    runs go again in this process), and a new child takes the next runs."""

    async def main() -> None:
        runtime = ModelRuntime(model, OPTIONS)
        async with started() as runs:
            remote = await asyncio.to_thread(runs.open, model, 2)
            batcher = Batcher(
                runtime.run, ThreadPoolExecutor(2), max_batch_size=16, max_runs=2, remote=remote
            )
            reference = cpu_session(model)
            first = runs.pid
            assert first is not None
            inputs = [images(n, seed=n) for n in range(1, 60)]
            calls = [asyncio.ensure_future(batcher.submit(x)) for x in inputs]
            await asyncio.sleep(0)  # the first runs are in the child
            os.kill(first, signal.SIGKILL)
            answers = await asyncio.gather(*calls)
            for x, y in zip(inputs, answers, strict=True):
                np.testing.assert_allclose(y, reference.run(None, {"image": x})[0], atol=1e-6)
            await asyncio.to_thread(
                wait_for, "a new run process", lambda: runs.pid not in (None, first)
            )
            await asyncio.to_thread(wait_for, "the model in it", lambda: remote.alive)
            assert runs.restarts == 1
            x = images(9)
            again = await run_remote(remote, x)
            assert isinstance(again, np.ndarray)
            np.testing.assert_allclose(again, reference.run(None, {"image": x})[0], atol=1e-6)
            await batcher.close()

    loop.run_until_complete(main())


def test_lost_runs_report_the_child_gone(model: Path, loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        async with started() as runs:
            remote = await asyncio.to_thread(runs.open, model, 1)
            pid = runs.pid
            assert pid is not None
            await stop_child(pid)  # the run cannot start before the kill
            pending = asyncio.ensure_future(run_remote(remote, images(4)))
            await asyncio.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            result = await pending
            assert isinstance(result, RunProcessGone)

    loop.run_until_complete(main())


def test_stop_ends_the_child(model: Path, loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> int:
        runs = RunProcess(OPTIONS)
        await asyncio.to_thread(runs.start, asyncio.get_running_loop())
        await asyncio.to_thread(runs.open, model, 1)
        pid = runs.pid
        assert pid is not None
        await asyncio.to_thread(runs.stop)
        return pid

    pid = loop.run_until_complete(main())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_with_a_run_process_the_measured_costs_say_where_a_run_goes(
    model: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """The one rule holds with a run process too: a run cheaper than the hand-off goes on the
    loop's thread, even while another is in the run process; a dearer one goes over there."""

    async def main() -> None:
        here: list[int] = []
        reference = cpu_session(model)

        def run_here(x: np.ndarray) -> np.ndarray:
            here.append(len(x))
            out: np.ndarray = reference.run(None, {"image": x})[0]
            return out

        async with started() as runs:
            remote = await asyncio.to_thread(runs.open, model, 2)
            batcher = Batcher(
                run_here, ThreadPoolExecutor(1), max_batch_size=8, max_runs=2, remote=remote
            )
            batcher.costs.observe_run(1, 10.0)  # dearer than a hand-off: the run process
            batcher.costs.observe_run(2, 1e-6)  # far cheaper: the loop
            batcher.costs.observe_hop(1.0)
            big, small = images(1, seed=1), images(2, seed=2)  # one image cannot be split
            pid = runs.pid
            assert pid is not None
            await stop_child(pid)
            first = asyncio.ensure_future(batcher.submit(big))
            await asyncio.sleep(0.05)
            assert batcher.running_images == 1 and here == []
            y = await batcher.submit(small)  # answered here while the other is held there
            np.testing.assert_allclose(y, reference.run(None, {"image": small})[0], atol=1e-6)
            assert here == [2] and batcher.running_images == 1
            os.kill(pid, signal.SIGCONT)
            y = await first
            np.testing.assert_allclose(y, reference.run(None, {"image": big})[0], atol=1e-6)
            await batcher.close()

    loop.run_until_complete(main())
