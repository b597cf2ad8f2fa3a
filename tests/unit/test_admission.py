"""Admission control's decisions: the budget, the queue bound, reservations before a message
is read, and the refusals that follow a full queue until it drains."""

from __future__ import annotations

import contextvars

import pytest

from serving.core.admission import (
    PER_CALL_BYTES,
    RESERVATION,
    UNREAD,
    Admission,
    request_cost,
)
from serving.errors import Unavailable

MiB = 1024 * 1024


class Queue:
    def __init__(self, queued: int = 0) -> None:
        self.queued_images = queued


def admission(
    budget: int = 100 * MiB, queue: int = 1000
) -> tuple[Admission, list[tuple[str, str]]]:
    rejected: list[tuple[str, str]] = []
    a = Admission(budget, queue, on_reject=lambda m, r: rejected.append((m, r)))
    return a, rejected


def test_request_cost_counts_wire_copies_float_input_batch_and_outputs() -> None:
    hwc = 28 * 28
    float32 = request_cost(1024, hwc, 4, 10)
    assert float32 == 2 * 1024 * hwc * 4 + 1024 * hwc * 4 + 8 * 1024 * 10 + PER_CALL_BYTES
    uint8 = request_cost(1024, hwc, 1, 10)  # the scaled float32 copy is counted too
    assert uint8 == 2 * 1024 * hwc + 2 * 1024 * hwc * 4 + 8 * 1024 * 10 + PER_CALL_BYTES


def test_admit_holds_until_released_and_refuses_past_the_budget() -> None:
    a, rejected = admission(budget=100 * MiB)
    first = a.admit("m", Queue(), 1, 60 * MiB)
    assert a.held_bytes == 60 * MiB and a.admitted == 1
    with pytest.raises(Unavailable, match=r"--max-inflight-mb budget of 100 MiB"):
        a.admit("m", Queue(), 1, 50 * MiB)
    assert rejected == [("m", "memory")]
    with first:
        pass
    first.release()  # a second release gives nothing back twice
    assert a.held_bytes == 0 and a.admitted == 0
    with a.admit("m", Queue(), 1, 50 * MiB):
        assert a.held_bytes == 50 * MiB


def test_a_request_larger_than_the_budget_goes_when_nothing_else_is_held() -> None:
    a, _ = admission(budget=10 * MiB)
    with a.admit("m", Queue(), 1024, 20 * MiB), pytest.raises(Unavailable):
        a.admit("m", Queue(), 1, MiB)


def test_the_queue_bound_refuses_what_would_pass_it() -> None:
    a, rejected = admission(queue=1000)
    a.admit("m", Queue(900), 100, MiB).release()  # exactly at the bound: fine
    with pytest.raises(Unavailable, match=r"'m' has 901 images queued.*--max-queue-images 1,000"):
        a.admit("m", Queue(901), 100, MiB)
    assert rejected == [("m", "queue")]
    assert a.held_bytes == 0


def in_call(fn):  # type: ignore[no-untyped-def]
    """Run `fn` in a context of its own, as each gRPC call's task has."""
    return contextvars.copy_context().run(fn)


def test_a_reservation_is_replaced_by_the_real_cost_and_teaches_the_next() -> None:
    a, _ = admission(budget=160 * MiB)

    def call(cost: int) -> tuple[int, int]:
        reservation = a.reserve("Predict")
        RESERVATION.set(reservation)
        reserved = a.held_bytes
        with a.admit("m", Queue(), 1, cost):
            assert RESERVATION.get() is None and reservation.nbytes == 0
            return reserved, a.held_bytes

    # Nothing measured yet: only the per-call minimum (a cold start refuses nothing on a guess).
    assert in_call(lambda: call(2 * MiB)) == (PER_CALL_BYTES, 2 * MiB)
    assert a.held_bytes == 0
    # Then what the method's calls cost: the first one's cost.
    assert in_call(lambda: call(2 * MiB)) == (2 * MiB, 2 * MiB)


def test_reservations_refuse_unread_once_the_budget_is_taken() -> None:
    a, rejected = admission(budget=160 * MiB)

    def learn() -> None:
        RESERVATION.set(a.reserve("Predict"))
        a.admit("m", Queue(), 1, 10 * MiB).release()

    in_call(learn)  # the method's calls cost 10 MiB
    held = [a.reserve("Predict") for _ in range(16)]
    with pytest.raises(Unavailable, match=r"--max-inflight-mb budget of 160 MiB"):
        a.reserve("Predict")
    assert rejected == [(UNREAD, "memory")]
    held[0].release()  # a call that ended (its task's done callback releases it)
    a.reserve("Predict").release()
    for ticket in held:
        ticket.release()
    assert a.held_bytes == 0 and a.admitted == 0


def test_after_a_full_queue_calls_are_refused_unread_until_it_drains() -> None:
    a, rejected = admission(queue=1000)
    queue = Queue(990)

    def call() -> None:
        RESERVATION.set(a.reserve("Predict"))
        a.admit("m", queue, 100, MiB).release()

    with pytest.raises(Unavailable, match="images queued"):
        in_call(call)
    with pytest.raises(Unavailable, match=r"'m' has 990 images queued; 100 more"):
        a.reserve("Predict")  # unread: the queue has not drained
    assert rejected == [("m", "queue"), ("m", "queue")]
    assert a.held_bytes == 0
    queue.queued_images = 900  # drained enough for that call
    a.reserve("Predict").release()
    queue.queued_images = 990
    a.reserve("Predict").release()  # no longer blocked: the next refusal is after reading again
    a.reserve("Classify").release()  # other methods were never blocked


def test_a_refilling_queue_lets_through_only_the_calls_it_has_room_for() -> None:
    """Under overload many calls arrive while a blocked queue has room for a few: only as many
    as fit are read; the rest are refused unread, not read and then refused."""
    a, rejected = admission(queue=1000)
    queue = Queue(990)

    def call() -> None:
        RESERVATION.set(a.reserve("Predict"))
        a.admit("m", queue, 100, MiB).release()

    with pytest.raises(Unavailable):
        in_call(call)  # blocks the method
    queue.queued_images = 800  # room for two more calls of 100
    let_through = [a.reserve("Predict"), a.reserve("Predict")]
    with pytest.raises(Unavailable, match=r"'m' has 1,000 images queued; 100 more"):
        a.reserve("Predict")  # 800 queued and 200 on their way: unread
    assert rejected == [("m", "queue"), ("m", "queue")]
    let_through[0].release()  # admitted (its rows go into the queue) or ended
    queue.queued_images = 900
    with pytest.raises(Unavailable, match="1,000 images queued"):
        a.reserve("Predict")
    let_through[1].release()
    queue.queued_images = 1000
    a.reserve("Predict").release()  # none pending: no longer blocked, the next is read
    assert a.held_bytes == 0 and a.admitted == 0
