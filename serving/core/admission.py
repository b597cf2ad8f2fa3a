"""Admission control: refuse, early and cheaply, what the server cannot hold.

Before a unary call's message is even read, `reserve` holds what such a call is expected to
cost (a moving average of what the method's requests really cost; nothing but the per-call
minimum until one has been measured, so that a cold start never refuses a call on a guess): a
server whose budget is taken refuses the call right there, and gRPC never hands its bytes to
Python.
Once the message is parsed, `admit` replaces the reservation with the request's real cost.

Two bounds, checked before a request's tensor is decoded or copied, from its shape alone:

- a memory budget for the request data held at once (queued and running, both APIs, unary and
  streaming), `--max-inflight-mb`; what a request costs is estimated by `request_cost`;
- a bound on the images waiting in one model's queue, `--max-queue-images`.

A request that would pass either is refused with `Unavailable` (gRPC UNAVAILABLE: transient, to
be retried with backoff, here or at another replica) and a message naming the limit and its
value; the refusal is counted by reason. Knows nothing of gRPC.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import NoReturn, Protocol

from serving.config import MiB
from serving.errors import Unavailable

# What a call holds besides its tensors: the message objects, the handler's coroutine and
# futures, the response. Small, but a flood of tiny requests must cost something too.
PER_CALL_BYTES = 16 * 1024
# Inference methods (as metrics name them, whichever protocol): each holds a reservation of the
# request data budget from before its message is read, and is refused unread when the budget is
# taken.
RESERVING = frozenset({"Predict", "Classify", "ModelInfer", "GetFeatureMaps", "Explain"})
EXPECTED_ALPHA = 0.1  # weight of a new cost in the moving average: about the last 10-20 calls
UNREAD = "_unknown"  # the model label of a call refused before its message was read
# The reservation of the call being handled: set where the call was accepted (before its
# message was read), taken by `admit`. Each call runs in a task of its own, with its own value.
RESERVATION: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
    "cnnserve_reservation", default=None
)


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
    """Bytes held for one admitted request (or reserved for one not yet read), given back once
    (on exit of the `with`, or `release`)."""

    __slots__ = ("_admission", "_blocked", "key", "nbytes")

    def __init__(
        self, admission: Admission, nbytes: int, key: str = "", blocked: _Blocked | None = None
    ) -> None:
        self._admission = admission
        self.nbytes = nbytes
        self.key = key  # what the reservation was for (its method); "" for an admission
        self._blocked = blocked  # the blocked queue that counts this reservation's images

    def release(self) -> None:
        if self.nbytes:
            self._admission._release(self.nbytes)
            self.nbytes = 0
        if self._blocked is not None:
            self._admission._unpromise(self.key, self._blocked)
            self._blocked = None

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Blocked:
    """A method whose last call was refused for its model's full queue: that model, its queue,
    the call's images, and the images of the reservations let through since, not yet
    admitted (each expected to be as large): what the queue will hold once they are."""

    __slots__ = ("images", "model", "promised", "queue")

    def __init__(self, model: str, queue: Queue, images: int) -> None:
        self.model = model
        self.queue = queue
        self.images = images
        self.promised = 0


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
        self.admitted = 0  # requests (and reservations) holding a ticket now
        self._expected: dict[str, float] = {}  # method -> moving average of real costs
        # method -> its last call refused for a full queue, while that queue is refilling
        self._blocked: dict[str, _Blocked] = {}
        self._on_reject = on_reject  # (model, reason)
        self._on_change = on_change  # held bytes, after each change

    def reserve(self, key: str, at_least: int = 0) -> Ticket:
        """Hold what a call of `key` (its method) is expected to cost before its message is
        read (`at_least`: what its declared size says it will cost, over HTTP where the body's
        length is known first), or raise `Unavailable` (the caller refuses the call unread):
        when the budget is taken, or when the last call of this method was refused for its
        model's full queue and that queue has no room yet for one more such call, counting the
        calls already let through to fill it (reading more would only be to refuse them: under
        overload many calls arrive while the queue has room for one)."""
        blocked = self._blocked.get(key)
        if blocked is not None:
            ahead = blocked.queue.queued_images + blocked.promised
            if self._overflows(ahead, blocked.images):
                self._refuse_queue(blocked.model, ahead, blocked.images)
        nbytes = max(int(self._expected.get(key, 0)), PER_CALL_BYTES, at_least)
        if self._over_budget(nbytes):
            self._refuse_memory(UNREAD, "")
        self._hold(nbytes)
        if blocked is not None:
            blocked.promised += blocked.images
        return Ticket(self, nbytes, key, blocked)

    def _unpromise(self, key: str, blocked: _Blocked) -> None:
        """A reservation let through a blocked queue was admitted or ended: once none is
        pending, the method is no longer blocked (its next refusal, after reading, blocks it
        again), so that it never stays judged by one model's queue for long."""
        blocked.promised -= blocked.images
        if blocked.promised <= 0 and self._blocked.get(key) is blocked:
            del self._blocked[key]

    def _overflows(self, queued: int, images: int) -> bool:
        """Whether `images` more would pass the queue bound. A request larger than the bound
        goes into an empty queue: refusing it would refuse it forever (--max-request-batch
        bounds it)."""
        return bool(queued) and queued + images > self.max_queue_images

    def _over_budget(self, nbytes: int) -> bool:
        """Whether `nbytes` more would pass the budget; likewise, a request larger than the
        whole budget goes when nothing else is held."""
        return bool(self.held_bytes) and self.held_bytes + nbytes > self.budget_bytes

    def _refuse_memory(self, model: str, need: str) -> NoReturn:
        self._reject(model, "memory")
        raise Unavailable(
            f"server overloaded: {need}{self.held_bytes / MiB:.1f} MiB of the --max-inflight-mb "
            f"budget of {self.budget_bytes / MiB:.0f} MiB are held by {self.admitted} requests; "
            "retry later with backoff"
        )

    def _refuse_queue(self, model: str, queued: int, images: int) -> NoReturn:
        self._reject(model, "queue")
        raise Unavailable(
            f"server overloaded: model {model!r} has {queued:,} images queued; {images:,} more "
            f"would pass --max-queue-images {self.max_queue_images:,}; retry later with backoff"
        )

    def admit(self, model: str, queue: Queue | None, images: int, nbytes: int) -> Ticket:
        """A ticket for a request of `images` images costing `nbytes`, or `Unavailable`. The
        call's reservation (`RESERVATION`), if any, is given back first: the real cost
        replaces it, and teaches what the next calls of its method are expected to cost."""
        reservation = RESERVATION.get()
        if reservation is not None:
            RESERVATION.set(None)
            reservation.release()
            old = self._expected.get(reservation.key)
            self._expected[reservation.key] = (
                nbytes if old is None else old + EXPECTED_ALPHA * (nbytes - old)
            )
        if queue is not None and self._overflows(queue.queued_images, images):
            if reservation is not None:  # its method's next calls are refused unread for now
                self._blocked[reservation.key] = _Blocked(model, queue, images)
            self._refuse_queue(model, queue.queued_images, images)
        if self._over_budget(nbytes):
            self._refuse_memory(model, f"this request needs {nbytes / MiB:.1f} MiB and ")
        self._hold(nbytes)
        return Ticket(self, nbytes)

    def _hold(self, nbytes: int) -> None:
        self.held_bytes += nbytes
        self.admitted += 1
        if self._on_change is not None:
            self._on_change(self.held_bytes)

    def _release(self, nbytes: int) -> None:
        self.held_bytes -= nbytes
        self.admitted -= 1
        if self._on_change is not None:
            self._on_change(self.held_bytes)

    def _reject(self, model: str, reason: str) -> None:
        if self._on_reject is not None:
            self._on_reject(model, reason)
