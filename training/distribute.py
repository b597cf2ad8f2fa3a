"""tf.distribute.MultiWorkerMirroredStrategy for one worker of a TF_CONFIG cluster, with the
time limits that turn a missing or dead peer into a clear failure instead of a hang."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import tensorflow as tf

from training.cluster import Role


@contextmanager
def deadline(seconds: float, message: str) -> Iterator[None]:
    """Exit the process with status 3 and `message` unless the block ends within `seconds`.

    TensorFlow waits for every worker without a limit while the strategy is made (and blocks
    in C++ where no Python exception can reach it), so only leaving the process stops it.
    """

    def expire() -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


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
