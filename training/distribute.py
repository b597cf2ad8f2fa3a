"""tf.distribute.MultiWorkerMirroredStrategy for one worker of a TF_CONFIG cluster, with the
time limits that turn a missing or dead peer into a clear failure instead of a hang."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import tensorflow as tf

from training.cluster import Role

# Runs beside the worker: exits quietly when its stdin closes (the block ended, or the worker
# died), else prints the message and kills the worker when the time is up.
_WATCHDOG = """
import os, select, signal, sys
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], seconds)
if not ready:
    sys.stderr.write("error: " + message + "\\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
"""


@contextmanager
def deadline(seconds: float, message: str) -> Iterator[None]:
    """Kill this process, saying `message`, unless the block ends within `seconds`.

    While the strategy is made, TensorFlow waits for every worker without a limit, in C++ and
    holding the GIL: no Python thread, timer or signal handler of this process runs then, and
    SIGTERM is not enough, so the watchdog is a process of its own and uses SIGKILL.
    """
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message],
        stdin=subprocess.PIPE,
    )
    try:
        yield
    finally:
        assert watchdog.stdin is not None
        watchdog.stdin.close()
        watchdog.wait()


def make_strategy(role: Role, timeout: float) -> Any:
    """The strategy, once every worker has joined (within `timeout` seconds). Each collective
    step afterwards also fails after `timeout` seconds without its peers."""
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    peers = ", ".join(role.addresses)
    with deadline(
        timeout,
        f"{role.describe()}: the other workers did not join within {timeout:g} s "
        f"(cluster {peers}); start every worker, check that each address is reachable from "
        "the others, or raise --worker-timeout",
    ):
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if strategy.num_replicas_in_sync < role.workers:
        raise RuntimeError(
            f"expected {role.workers} replicas, the strategy has {strategy.num_replicas_in_sync}"
        )
    return strategy


# What TensorFlow raises in a worker whose peer died or stopped answering mid-training.
PEER_ERRORS: tuple[type[BaseException], ...] = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
    tf.errors.InternalError,
    tf.errors.FailedPreconditionError,
)
