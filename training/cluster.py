"""Multi-worker training with TensorFlow's own engine: TF_CONFIG, the worker's role, and the
local launcher of `--workers N`. Nothing here imports TensorFlow."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any


class ClusterError(Exception):
    """TF_CONFIG is malformed, or a worker failed; the message says which and why."""


@dataclass(frozen=True)
class Role:
    task_type: str
    index: int
    addresses: tuple[str, ...]  # every task that trains: the chief (if any), then the workers
    has_chief_task: bool = False

    @property
    def workers(self) -> int:
        return len(self.addresses)

    @property
    def is_chief(self) -> bool:
        # TensorFlow's rule: the "chief" task, or worker 0 when the cluster names no chief.
        return self.task_type == "chief" or (
            self.task_type == "worker" and self.index == 0 and not self.has_chief_task
        )

    def describe(self) -> str:
        what = "chief" if self.is_chief else "non-chief"
        return f"{self.task_type} {self.index} of {self.workers} ({what})"


def role_from_tf_config(text: str) -> Role:
    """The worker's place in the cluster, from the TF_CONFIG that TensorFlow reads too."""
    try:
        config = json.loads(text)
        cluster: dict[str, list[str]] = config["cluster"]
        task: dict[str, Any] = config["task"]
        task_type, index = str(task["type"]), int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(
            'TF_CONFIG: expected JSON like {"cluster": {"worker": ["host:port", ...]}, '
            f'"task": {{"type": "worker", "index": 0}}}}, got {text!r} ({exc})'
        ) from None
    training = {k: v for k, v in cluster.items() if k in ("chief", "worker")}
    if task_type not in training or not 0 <= index < len(training[task_type]):
        raise ClusterError(
            f"TF_CONFIG: task {task_type} {index} is not in the cluster "
            f"{json.dumps(cluster)} (expected a chief or worker index that it lists)"
        )
    addresses = (*training.get("chief", []), *training.get("worker", []))
    return Role(task_type, index, tuple(addresses), "chief" in training)


def tf_config(addresses: Sequence[str], index: int) -> str:
    return json.dumps(
        {"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}}
    )


def free_loopback_ports(count: int) -> list[int]:
    """Ports the kernel just gave out; held open together, so they differ from each other."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _relay(stream: IO[str], prefix: str, out: IO[str]) -> None:
    for line in stream:
        out.write(f"{prefix}{line}")
        out.flush()


def run_local_workers(argv: Sequence[str], workers: int, stop_grace: float = 10.0) -> int:
    """Start `workers` processes of `python -m training <argv> --distributed` on loopback, each
    with its own TF_CONFIG; relay their output line by line, prefixed with the worker's role;
    wait for all. When one fails, the others are stopped (they could only wait for it) and its
    exit status is returned."""
    ports = free_loopback_ports(workers)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    procs: list[tuple[str, subprocess.Popen[str]]] = []
    relays: list[threading.Thread] = []
    print(f"cluster: {workers} local workers on {', '.join(addresses)}", flush=True)
    for index in range(workers):
        env = {**os.environ, "TF_CONFIG": tf_config(addresses, index)}
        name = f"worker {index}" + (" (chief)" if index == 0 else "")
        proc = subprocess.Popen(
            [sys.executable, "-m", "training", *argv, "--distributed"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        procs.append((name, proc))
        assert proc.stdout is not None
        relay = threading.Thread(target=_relay, args=(proc.stdout, f"[{name}] ", sys.stdout))
        relay.start()
        relays.append(relay)
    failed: tuple[str, int] | None = None
    try:
        while True:
            # Whether all have ended, read before who failed: one that ends between the two
            # reads is still seen failing.
            ended = all(p.poll() is not None for _, p in procs)
            failed = next(((n, p.returncode) for n, p in procs if p.poll() not in (None, 0)), None)
            if failed or ended:
                break
            time.sleep(0.2)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + stop_grace
        for _, proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for relay in relays:
            relay.join()
    if failed is not None:
        name, code = failed
        print(
            f"error: {name} exited with status {code}; the other workers were stopped",
            file=sys.stderr,
            flush=True,
        )
        return code if code > 0 else 1
    print(f"cluster: all {workers} workers finished", flush=True)
    return 0
