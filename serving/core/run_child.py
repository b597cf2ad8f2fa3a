"""The run process: ONNX Runtime sessions in a process of their own, fed through shared memory.

The serving process reads, decodes and answers calls on its event loop; the runs it hands here
take no share of its GIL, so one connection's calls keep every core busy (runs/process.py in
bench/PROFILE.md has the figures). Started by `RunProcess` as

    python -m serving.core.run_child CONTROL_FD

Wire (Unix SOCK_SEQPACKET sockets, so that every message arrives whole):
- control: JSON messages, one reply each. `open` (a model file, its warm-up sizes and ONNX
  Runtime options, with the child's ends of its run channels attached as descriptors) loads a
  session and starts one thread per channel; `close` forgets it.
- a run channel: `MAP` (a memfd attached: the shared buffer, its size in `n`) and `RUN` (`n`
  images of the model's input shape, float32, at offset 0 of the buffer). The reply is `REPLY`: status, the
  output's rows and columns (written at `output_offset(n images' bytes)` of the buffer), when the
  run started (time.perf_counter, CLOCK_MONOTONIC: the same clock in both processes) and its
  seconds; an error's text follows the header.
Imports no gRPC and nothing of the server but the runtime, to stay small in memory.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from serving.core.runtime import ModelRuntime, RuntimeOptions

log = logging.getLogger(__name__)

RUN = struct.Struct("<III")  # op, n (images; a MAP's bytes), values per image
REPLY = struct.Struct("<IIIdd")  # status, rows, cols, started, seconds
OP_RUN, OP_MAP = 1, 2
OK, FAILED = 0, 1
MAX_MESSAGE = 1 << 16
ALIGN = 64


def output_offset(input_bytes: int) -> int:
    """Where a run's output starts in the shared buffer: after its input, cache-line aligned."""
    return -(-input_bytes // ALIGN) * ALIGN


def messages(sock: socket.socket, max_fds: int) -> Iterator[tuple[bytes, list[int]]]:
    """Each message and the descriptors it carries, until the serving process closes its end."""
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, max_fds)
        except OSError:
            return
        if not data:
            return
        yield data, fds


def serve_channel(sock: socket.socket, runtime: ModelRuntime) -> None:
    """One run at a time from one channel, until the serving process closes its end."""
    h, w, c = runtime.info.input_shape
    buffer: mmap.mmap | None = None
    with sock:
        for data, fds in messages(sock, 1):
            op, n, size = RUN.unpack_from(data)
            if op == OP_MAP:
                if buffer is not None:
                    buffer.close()
                buffer = mmap.mmap(fds[0], n)
                os.close(fds[0])
                continue
            started = time.perf_counter()
            try:
                if buffer is None:
                    raise RuntimeError("no shared buffer mapped before the run")
                if size != h * w * c:
                    raise ValueError(
                        f"images of {size} values sent, the model takes {h}x{w}x{c} = {h * w * c}"
                    )
                x = np.frombuffer(buffer, np.float32, n * h * w * c).reshape(n, h, w, c)
                y = runtime.run(x)
                seconds = time.perf_counter() - started
                offset = output_offset(x.nbytes)
                del x  # no view may outlive a remap
                if offset + y.nbytes > len(buffer):
                    raise RuntimeError(f"output of {y.nbytes} bytes does not fit the buffer")
                out = np.frombuffer(buffer, np.float32, y.size, offset).reshape(y.shape)
                out[...] = y
                del out
                rows, cols = y.shape
                sock.send(REPLY.pack(OK, rows, cols, started, seconds))
            except Exception as exc:  # the serving process decides what a failed run means
                text = f"{type(exc).__name__}: {exc}".encode()[: MAX_MESSAGE - REPLY.size]
                try:
                    sock.send(REPLY.pack(FAILED, 0, 0, started, 0.0) + text)
                except OSError:
                    break
    if buffer is not None:
        buffer.close()


def open_model(message: dict[str, Any], fds: list[int], models: dict[int, ModelRuntime]) -> int:
    """Load the session and start its channels' threads; the output's columns."""
    options = RuntimeOptions(
        provider=str(message["provider"]),
        cuda_fixed_batch=int(message["cuda_fixed_batch"]),
        intra_op_threads=int(message["intra_op_threads"]),
        inter_op_threads=int(message["inter_op_threads"]),
        spinning=bool(message["spinning"]),
        warmup_batch_sizes=tuple(message["warmup"]),
    )
    runtime = ModelRuntime(Path(message["path"]), options, check=False)
    models[int(message["key"])] = runtime
    for i, fd in enumerate(fds):
        sock = socket.socket(fileno=fd)
        threading.Thread(
            target=serve_channel,
            args=(sock, runtime),
            name=f"run-{message['key']}-{i}",
            daemon=True,
        ).start()
    return runtime.info.num_classes


def main(argv: list[str]) -> int:
    # The serving process decides when this one ends (it closes the control socket): a Ctrl-C
    # or a SIGTERM sent to the whole process group must not end runs before it has drained.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="run process: %(message)s")
    control = socket.socket(fileno=int(argv[0]))
    models: dict[int, ModelRuntime] = {}
    control.send(json.dumps({"ok": True, "pid": os.getpid()}).encode())
    for data, fds in messages(control, 64):
        message = json.loads(data)
        reply: dict[str, Any] = {"ok": True}
        try:
            if message["op"] == "open":
                started = time.perf_counter()
                reply["columns"] = open_model(message, fds, models)
                reply["seconds"] = time.perf_counter() - started
            elif message["op"] == "close":
                models.pop(int(message["key"]), None)
            else:
                reply = {"error": f"unknown op {message['op']!r}"}
        except Exception as exc:  # a refusal for this model, never the end of this process
            for fd in fds:
                os.close(fd)
            reply = {"error": str(exc)}
        control.send(json.dumps(reply).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
