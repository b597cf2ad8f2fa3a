"""Admission control: refuse, early and cheaply, what the server cannot hold.

Two bounds, checked before a request's tensor is decoded or copied, from its shape alone:

- a memory budget for the request data held at once (queued and running, both APIs, unary and
  streaming), `--max-inflight-mb`; what a request costs is estimated by `request_cost`;
- a bound on the images waiting in one model's queue, `--max-queue-images`.

A request that would pass either is refused with `Unavailable` (gRPC UNAVAILABLE: transient, to
be retried with backoff, here or at another replica) and a message naming the limit and its
value; the refusal is counted by reason. Knows nothing of gRPC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from serving.errors import Unavailable

MiB = 1024 * 1024
# What a call holds besides its tensors: the message objects, the handler's coroutine and
# futures, the response. Small, but a flood of tiny requests must cost something too.
PER_CALL_BYTES = 16 * 1024


def request_cost(images: int, pixels_per_image: int, itemsize: int, classes: int) -> int:
    """Bytes a request holds at its peak, from its shape: the received message and the copy of
    its tensor bytes that protobuf hands out (2x the wire size), the float32 model input (a
    scaled copy for uint8; for float32 a view of the wire bytes), the batch the batcher may
    assemble around its rows (another float32 copy at most), and the outputs (probabilities
    and their encoded copy)."""
    wire = images * pixels_per_image * itemsize
    as_float = images * pixels_per_image * 4
    scaled = as_float if itemsize != 4 else 0
    return 2 * wire + scaled + as_float + 8 * images * classes + PER_CALL_BYTES


class Queue(Protocol):
    queued_images: int


class Ticket:
    """Bytes held for one admitted request, given back once (on exit of the `with`)."""

    __slots__ = ("_admission", "nbytes")

    def __init__(self, admission: Admission, nbytes: int) -> None:
        self._admission = admission
        self.nbytes = nbytes

    def release(self) -> None:
        if self.nbytes:
            self._admission._release(self.nbytes)
            self.nbytes = 0

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """The server's budget (all models) and the per-model queue bound. Used on the event loop
    only: no locks."""

    def __init__(
        self,
        budget_bytes: int,
        max_queue_images: int,
        *,
        on_reject: Callable[[str, str], None] | None = None,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.max_queue_images = max_queue_images
        self.held_bytes = 0
        self.admitted = 0  # requests holding a ticket now
        self._on_reject = on_reject  # (model, reason)
        self._on_change = on_change  # held bytes, after each change

    def admit(self, model: str, queue: Queue | None, images: int, nbytes: int) -> Ticket:
        """A ticket for a request of `images` images costing `nbytes`, or `Unavailable`."""
        if queue is not None and queue.queued_images + images > self.max_queue_images:
            self._reject(model, "queue")
            raise Unavailable(
                f"server overloaded: model {model!r} has {queue.queued_images:,} images queued; "
                f"{images:,} more would pass --max-queue-images {self.max_queue_images:,}; "
                "retry later with backoff"
            )
        held = self.held_bytes
        # A request larger than the whole budget still goes when nothing else is held: refusing
        # it would refuse it forever (the per-request limits bound it).
        if held + nbytes > self.budget_bytes and held:
            self._reject(model, "memory")
            raise Unavailable(
                f"server overloaded: this request needs {nbytes / MiB:.1f} MiB and "
                f"{held / MiB:.1f} MiB of the --max-inflight-mb budget of "
                f"{self.budget_bytes / MiB:.0f} MiB are held by {self.admitted} requests; "
                "retry later with backoff"
            )
        self.held_bytes = held + nbytes
        self.admitted += 1
        if self._on_change is not None:
            self._on_change(self.held_bytes)
        return Ticket(self, nbytes)

    def _release(self, nbytes: int) -> None:
        self.held_bytes -= nbytes
        self.admitted -= 1
        if self._on_change is not None:
            self._on_change(self.held_bytes)

    def _reject(self, model: str, reason: str) -> None:
        if self._on_reject is not None:
            self._on_reject(model, reason)
