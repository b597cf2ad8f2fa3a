"""A rollout's bookkeeping: agreement, mean |diff|, the disagreement sample, the bounds; and
the canary's draw (by chance, or sticky by client key)."""

from __future__ import annotations

import random

import numpy as np

from serving.core.agreement import SAMPLE, Agreement
from serving.core.rollout import Bounds
from serving.core.routing import in_canary


def probs(best: list[int], classes: int = 4) -> np.ndarray:
    out = np.full((len(best), classes), 0.1, np.float32)
    out[np.arange(len(best)), best] = 0.7
    return out


def test_agreement_and_mean_abs_diff_count_images() -> None:
    a = Agreement(1, 2)
    images = np.arange(4 * 2 * 2, dtype=np.uint8).reshape(4, 2, 2, 1)
    n, agreed, diff = a.compare(probs([0, 1, 2, 3]), probs([0, 1, 3, 3]), lambda i: images[i])
    assert (n, agreed) == (4, 3)
    assert abs(diff - 0.3) < 1e-6  # one image differs by 0.6 on two of 4 classes: mean 0.3
    assert a.agreement == 0.75 and a.mean_abs_diff == diff / 4
    (d,) = a.disagreements
    assert d.image.tolist() == images[2].tolist()
    assert (int(d.stable.argmax()), int(d.candidate.argmax())) == (2, 3)


def test_the_disagreement_sample_keeps_the_latest() -> None:
    a = Agreement(1, 2)
    image = np.zeros((1, 1, 1), np.uint8)
    for i in range(3 * SAMPLE):
        a.compare(probs([0]), probs([1]), lambda _, i=i: image + i)  # type: ignore[misc]
    assert len(a.disagreements) == SAMPLE
    assert [int(d.image[0, 0, 0]) for d in a.disagreements] == list(range(2 * SAMPLE, 3 * SAMPLE))


def test_bounds_are_judged_only_after_enough_calls() -> None:
    a = Agreement(1, 2)
    image = np.zeros((1, 1, 1), np.uint8)
    bounds = Bounds(after=10, min_agreement=0.5)
    for _ in range(9):
        a.compare(probs([0]), probs([1]), lambda _: image)
    assert a.breach(bounds) is None  # 0 % agreement, but only 9 images
    a.compare(probs([0]), probs([1]), lambda _: image)
    bound, why = a.breach(bounds) or ("", "")
    assert bound == "min_agreement"
    assert why == "top-1 agreement 0.0% over 10 compared images is under the bound of 50.0%"


def test_error_rate_and_p99_bounds() -> None:
    a = Agreement(1, 2)
    for _ in range(10):
        a.stable.add(True, 0.001)
        a.candidate.add(True, 0.001)
    assert a.breach(Bounds(after=10, max_error_rate=0.1, max_p99_ratio=2)) is None
    for _ in range(5):
        a.candidate.add(False, 0.0)
    assert a.candidate.error_rate == 5 / 15
    assert a.breach(Bounds(after=10, max_error_rate=0.1))[0] == "max_error_rate"  # type: ignore[index]
    slow = Agreement(1, 2)
    for _ in range(10):
        slow.stable.add(True, 0.001)
        slow.candidate.add(True, 0.005)
    bound, why = slow.breach(Bounds(after=10, max_p99_ratio=2)) or ("", "")
    assert bound == "max_p99_ratio" and "5.00x stable's" in why


def test_the_canary_share_by_chance() -> None:
    rng = random.Random(1)
    drawn = sum(in_canary("m", 20.0, "", rng) for _ in range(10_000))
    assert abs(drawn / 10_000 - 0.2) < 0.02
    assert not any(in_canary("m", 0.0, "", rng) for _ in range(100))
    assert all(in_canary("m", 100.0, "k", rng) for _ in range(100))


def test_a_client_key_is_sticky_and_stays_in_as_the_share_grows() -> None:
    rng = random.Random(1)
    keys = [f"user-{i}" for i in range(2000)]
    at10 = {k for k in keys if in_canary("m", 10.0, k, rng)}
    assert at10 == {k for k in keys if in_canary("m", 10.0, k, rng)}  # the same every time
    assert abs(len(at10) / len(keys) - 0.1) < 0.03
    at30 = {k for k in keys if in_canary("m", 30.0, k, rng)}
    assert at10 < at30  # a key in the canary at 10 % is still in it at 30 %
