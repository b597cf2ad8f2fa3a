"""Runs handed to a second process (serving/core/run_child.py) instead of this one's threads.

Why: this process's event loop reads, decodes and answers every call, and holds the GIL while it
does. A run in one of its threads gives the GIL up while ONNX Runtime computes but must take it
back to hand its answer over, and waits for the loop to let go: under load the loop keeps the GIL
most of the time, so the batcher ran large batches on the loop itself and one connection's calls
used one core (bench/PROFILE.md). A run in another process needs no GIL of ours: the loop copies
the batch into a shared buffer, writes eight bytes to a socket, and reads the answer when the
socket says it is there, like any other I/O.

`RunProcess` is the child process; `RemoteModel` one loaded model version in it with its run
channels (one per run that may go at once, each with its own thread and shared buffer over there).
A child that exits (killed, out of memory) is replaced and given its models again; meanwhile, and
for good after `MAX_RESTARTS` exits within `RESTART_WINDOW_S`, `RemoteModel.submit` says no and the
batcher runs in this process's threads as before. A run lost with the child is run again here.
Knows nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from serving.core.batching import RemoteDone
from serving.core.run_child import FAILED, MAX_MESSAGE, OP_MAP, OP_RUN, REPLY, RUN, output_offset
from serving.core.runtime import ModelLoadError, RuntimeOptions

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 2.0


class RunProcessGone(RuntimeError):
    """The run process exited with this run in it."""


class _Channel:
    """This side of one run channel: its socket, its shared buffer, the run in it (if any)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer: mmap.mmap | None = None
        self.done: RemoteDone | None = None
        self.input_bytes = 0

    def reserve(self, size: int) -> mmap.mmap:
        """A shared buffer of at least `size` bytes, sent over when it is new (doubling, so
        that a growing batch maps a few times, not every time)."""
        if self.buffer is not None and len(self.buffer) >= size:
            return self.buffer
        size = max(size, 2 * len(self.buffer) if self.buffer is not None else 0, mmap.PAGESIZE)
        fd = os.memfd_create("cnnserve-run", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
            socket.send_fds(self.sock, [RUN.pack(OP_MAP, size, 0)], [fd])
        finally:
            os.close(fd)
        if self.buffer is not None:
            self.buffer.close()
        self.buffer = buffer
        return buffer

    def close(self) -> None:
        self.sock.close()
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None


class RemoteModel:
    """One model version in the run process: `submit` a batch, be called back on the loop."""

    def __init__(self, process: RunProcess, path: Path, runs: int):
        self.process = process
        self.path = path
        self.runs = runs
        self.key = 0
        self.columns = 0  # the output's, as the run process read them from the file
        self._free: list[_Channel] = []
        self._busy: set[_Channel] = set()
        self._closed = False

    @property
    def alive(self) -> bool:
        return bool(self._free or self._busy)

    def submit(self, x: F32, done: RemoteDone) -> bool:
        """Start a run of `x` ([n, H, W, C]) on a free channel; False when there is none (every
        run busy, or no run process now): the caller runs it another way."""
        if not self._free:
            return False
        channel = self._free.pop()
        try:
            need = output_offset(x.nbytes) + len(x) * self.columns * 4
            buffer = channel.reserve(need)
            shared = np.frombuffer(buffer, np.float32, x.size).reshape(x.shape)
            shared[...] = x
            del shared
            channel.sock.send(RUN.pack(OP_RUN, len(x), x[0].size if len(x) else 0))
        except OSError:
            self._free.append(channel)
            self.process.lost()
            return False
        channel.done = done
        channel.input_bytes = x.nbytes
        self._busy.add(channel)
        return True

    def _readable(self, channel: _Channel) -> None:
        """The loop's reader: the run's answer is there (or the child is gone)."""
        try:
            data = channel.sock.recv(MAX_MESSAGE)
        except OSError:
            data = b""
        done = channel.done
        if not data or done is None or channel.buffer is None:
            self.process.lost()
            return
        channel.done = None
        self._busy.discard(channel)
        self._free.append(channel)
        status, rows, cols, started, seconds = REPLY.unpack_from(data)
        if status == FAILED:
            done(RuntimeError(data[REPLY.size :].decode(errors="replace")), started, 0.0)
            return
        y = np.frombuffer(
            channel.buffer, np.float32, rows * cols, output_offset(channel.input_bytes)
        ).reshape(rows, cols)
        done(y.copy(), started, seconds)

    def attach(
        self, key: int, columns: int, socks: list[socket.socket], loop: asyncio.AbstractEventLoop
    ) -> None:
        """On the loop: take the channels of this model in a (new) run process."""
        self.key, self.columns = key, columns
        for sock in socks:
            sock.setblocking(False)
            channel = _Channel(sock)
            loop.add_reader(sock.fileno(), self._readable, channel)
            self._free.append(channel)

    def detach(self, loop: asyncio.AbstractEventLoop | None) -> list[RemoteDone]:
        """On the loop: drop every channel; the callbacks of the runs that were in them."""
        lost = [c.done for c in self._busy if c.done is not None]
        for channel in [*self._free, *self._busy]:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(channel.sock.fileno())
            channel.close()
        self._free.clear()
        self._busy.clear()
        return lost

    def close(self) -> None:
        """On the loop, once no call can reach this version: its channels and its session."""
        if self._closed:
            return
        self._closed = True
        for done in self.detach(self.process.loop):
            done(RunProcessGone("model unloaded"), 0.0, 0.0)
        self.process.forget(self)


class _Child:
    """A started run process and its control socket (used under RunProcess's lock)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "serving.core.run_child", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.control = ours
        self.control.settimeout(START_TIMEOUT_S)
        hello = self._reply()
        self.pid = int(hello["pid"])

    def _reply(self) -> dict[str, Any]:
        try:
            data = self.control.recv(MAX_MESSAGE)
        except (TimeoutError, OSError) as exc:
            raise RunProcessGone(f"run process {self.popen.pid} does not answer ({exc})") from exc
        if not data:
            raise RunProcessGone(
                f"run process {self.popen.pid} exited (status {self.popen.poll()})"
            )
        reply: dict[str, Any] = json.loads(data)
        return reply

    def ask(self, message: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        try:
            socket.send_fds(self.control, [json.dumps(message).encode()], fds or [])
        except OSError as exc:
            raise RunProcessGone(f"run process {self.popen.pid} is gone ({exc})") from exc
        return self._reply()

    def stop(self) -> None:
        self.control.close()  # its control loop ends, and so does the process
        try:
            self.popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class RunProcess:
    """The one run process of this server and the model versions in it."""

    def __init__(
        self, options: RuntimeOptions, on_change: Callable[[bool, bool], None] | None = None
    ) -> None:
        self.options = options
        # (a run process is up now, this is a restart): for metrics; called from any thread
        self._on_change = on_change or (lambda up, restarted: None)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # the child and its control socket
        self._child: _Child | None = None
        self._models: list[RemoteModel] = []
        self._next_key = 1
        self._exits: deque[float] = deque()
        self._restarting: asyncio.Task[None] | None = None
        self._stopped = False
        self._started = threading.Event()  # set once the first start is over, done or failed
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None else None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Blocking (call it off the loop): start the child."""
        self.loop = loop
        try:
            with self._lock:
                if self._child is None and not self._stopped:
                    self._child = _Child()
                    log.info("run process %d started", self._child.pid)
                    self._on_change(True, False)
        finally:
            self._started.set()

    def start_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the child in a thread of its own; `open` waits for it. A child that cannot
        start is logged, and the models run in this process's threads."""
        self.loop = loop

        def start() -> None:
            try:
                self.start(loop)
            except Exception as exc:
                log.warning("no run process (%s): runs go to this process's threads", exc)

        threading.Thread(target=start, name="run-process-start", daemon=True).start()

    def open(self, path: Path, runs: int) -> RemoteModel:
        """Blocking (call it off the loop): load a model version there with `runs` channels.
        ModelLoadError when it cannot (this process then runs it in its own threads)."""
        model = RemoteModel(self, path, runs)
        self._started.wait(START_TIMEOUT_S)
        with self._lock:
            if self._child is None:
                raise ModelLoadError(f"{path}: no run process")
            opened = self._open(self._child, model)
        self._on_loop(self._attached, model, *opened)
        return model

    def _open(self, child: _Child, model: RemoteModel) -> tuple[int, int, list[socket.socket]]:
        key = self._next_key
        self._next_key += 1
        pairs = [
            socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(model.runs)
        ]
        try:
            reply = child.ask(
                {
                    "op": "open",
                    "key": key,
                    "path": str(model.path),
                    "warmup": list(self.options.warmup_batch_sizes),
                    "provider": self.options.provider,
                    "cuda_fixed_batch": self.options.cuda_fixed_batch,
                    "intra_op_threads": 1,
                    "inter_op_threads": self.options.inter_op_threads,
                    "spinning": self.options.spinning,
                },
                [theirs.fileno() for _, theirs in pairs],
            )
        except RunProcessGone as exc:
            for ours, _ in pairs:
                ours.close()
            raise ModelLoadError(str(exc)) from exc
        finally:
            for _, theirs in pairs:
                theirs.close()
        if "error" in reply:
            for ours, _ in pairs:
                ours.close()
            raise ModelLoadError(f"{model.path}: the run process cannot load it ({reply['error']})")
        return key, int(reply["columns"]), [ours for ours, _ in pairs]

    def _attached(
        self, model: RemoteModel, key: int, columns: int, socks: list[socket.socket]
    ) -> None:
        if model._closed or self._stopped or self.loop is None:
            for sock in socks:
                sock.close()
            return
        model.attach(key, columns, socks, self.loop)
        if model not in self._models:
            self._models.append(model)

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self.loop
        if loop is None:
            raise RuntimeError("RunProcess.start was not called")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            asyncio.run_coroutine_threadsafe(_call(fn, *args), loop).result()

    def forget(self, model: RemoteModel) -> None:
        """On the loop: a closed model's session goes (its channels are closed already)."""
        if model in self._models:
            self._models.remove(model)
        key, child = model.key, self._child
        if child is not None and key and self.loop is not None:
            self.loop.run_in_executor(None, self._close_key, child, key)

    def _close_key(self, child: _Child, key: int) -> None:
        with self._lock:
            if self._child is child:
                with contextlib.suppress(RunProcessGone):
                    child.ask({"op": "close", "key": key})

    def lost(self) -> None:
        """On the loop: a channel found the child gone. Runs that were in it are run again by
        their callers; the child is replaced unless it keeps dying."""
        if self._child is None or self._stopped:
            return
        child, self._child = self._child, None
        self._on_change(False, False)
        lost = [done for model in self._models for done in model.detach(self.loop)]
        status = child.popen.poll()
        log.error(
            "run process %d exited (status %s) with %d runs in it; they run again in this process",
            child.pid,
            status,
            len(lost),
        )
        threading.Thread(target=child.stop, daemon=True).start()
        gone = RunProcessGone(f"run process {child.pid} exited")
        for done in lost:  # on the loop's next turn: this may be inside a caller's submit
            if self.loop is not None:
                self.loop.call_soon(done, gone, 0.0, 0.0)
        now = time.monotonic()
        self._exits.append(now)
        while self._exits and now - self._exits[0] > RESTART_WINDOW_S:
            self._exits.popleft()
        if len(self._exits) > MAX_RESTARTS:
            log.error(
                "run process exited %d times within %.0f s: runs stay in this process's threads",
                len(self._exits),
                RESTART_WINDOW_S,
            )
            return
        if self.loop is not None and self._restarting is None:
            self._restarting = self.loop.create_task(self._restart())

    async def _restart(self) -> None:
        try:
            opened = await asyncio.to_thread(self._spawn_and_open)
        except Exception as exc:
            log.error("run process could not be restarted (%s): runs stay in threads", exc)
            return
        finally:
            self._restarting = None
        if self._stopped or self._child is None:
            return
        self.restarts += 1
        self._on_change(True, True)
        for model, key, columns, socks in opened:
            self._attached(model, key, columns, socks)
        log.info("run process %s started again with %d models", self.pid, len(opened))

    def _spawn_and_open(self) -> list[tuple[RemoteModel, int, int, list[socket.socket]]]:
        with self._lock:
            if self._stopped:
                return []
            child = _Child()
            opened = []
            for model in list(self._models):
                if not model._closed:
                    opened.append((model, *self._open(child, model)))
            self._child = child
            return opened

    def stop(self) -> None:
        """Blocking: end the child (after the models' runs are drained by the caller)."""
        self._stopped = True
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            child.stop()


async def _call(fn: Callable[..., None], *args: Any) -> None:
    fn(*args)
