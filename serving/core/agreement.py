"""What a rollout measures: how far the candidate's answers agree with stable's on the same
images (top-1 agreement, mean absolute difference of the probabilities), each version's latency
and error rate, and a bounded sample of the latest disagreements, image and both answers.

Plain bookkeeping on the event loop (no locks), judged against the policy's bounds by `breach`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from serving.core.rollout import Bounds

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
STABLE = "stable"
CANDIDATE = "candidate"
SAMPLE = 16  # disagreements kept, the latest
LATENCIES = 2048  # latencies kept per version, the latest, for its p50 and p99


@dataclass(frozen=True)
class Disagreement:
    """One image the two versions answered differently (top-1)."""

    at: float  # Unix time
    image: U8  # [H, W, C], as the models saw it
    stable: F32  # [classes]
    candidate: F32


@dataclass
class Tally:
    """One version's calls in the rollout: answered for real, or copies for comparison."""

    calls: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES))

    def add(self, ok: bool, seconds: float) -> None:
        self.calls += 1
        if ok:
            self.latencies.append(seconds)
        else:
            self.errors += 1

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    def quantile(self, q: float) -> float | None:
        """Seconds, over the latest successful calls; None before any."""
        if not self.latencies:
            return None
        return float(np.quantile(np.fromiter(self.latencies, float), q))


@dataclass
class Agreement:
    """The measurements of one stable/candidate pair under one policy."""

    stable_version: int
    candidate_version: int
    compared: int = 0  # images answered by both
    agreed: int = 0  # of them, with the same best class
    abs_diff: float = 0.0  # sum over compared images of mean |p_stable - p_candidate|
    shed: int = 0  # copies for comparison dropped because the server was loaded
    stable: Tally = field(default_factory=Tally)
    candidate: Tally = field(default_factory=Tally)
    disagreements: deque[Disagreement] = field(default_factory=lambda: deque(maxlen=SAMPLE))

    def tally(self, role: str) -> Tally:
        return self.stable if role == STABLE else self.candidate

    def compare(
        self, stable: F32, candidate: F32, image_of: Callable[[int], U8]
    ) -> tuple[int, int, float]:
        """Both versions' probabilities [N, classes] for the same N images: counted, and the
        images they disagree on sampled (`image_of(i)`: image i as uint8 [H, W, C], made only
        for those). Returns (images, agreed, sum of mean |diff|)."""
        best_s = stable.argmax(axis=1)
        best_c = candidate.argmax(axis=1)
        same = best_s == best_c
        agreed = int(same.sum())
        diff = float(np.abs(stable - candidate).mean(axis=1).sum())
        n = len(stable)
        self.compared += n
        self.agreed += agreed
        self.abs_diff += diff
        now = time.time()
        for i in np.flatnonzero(~same)[-SAMPLE:]:
            self.disagreements.append(
                Disagreement(now, image_of(int(i)), stable[i].copy(), candidate[i].copy())
            )
        return n, agreed, diff

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @property
    def mean_abs_diff(self) -> float | None:
        return self.abs_diff / self.compared if self.compared else None

    def breach(self, bounds: Bounds) -> tuple[str, str] | None:
        """The first bound the candidate breaks, as (its key, why in words), or None. A bound is
        judged once `bounds.after` images were compared (agreement) or calls made (errors; p99
        on both versions' successful calls)."""
        after = bounds.after
        agreement = self.agreement
        if (
            bounds.min_agreement is not None
            and self.compared >= after
            and agreement is not None
            and agreement < bounds.min_agreement
        ):
            return "min_agreement", (
                f"top-1 agreement {agreement:.1%} over {self.compared:,} compared images is under "
                f"the bound of {bounds.min_agreement:.1%}"
            )
        c = self.candidate
        if (
            bounds.max_error_rate is not None
            and c.calls >= after
            and c.error_rate > bounds.max_error_rate
        ):
            return "max_error_rate", (
                f"error rate {c.error_rate:.1%} ({c.errors:,} of {c.calls:,} calls) is over the "
                f"bound of {bounds.max_error_rate:.1%}"
            )
        if (
            bounds.max_p99_ratio is not None
            and len(c.latencies) >= after
            and len(self.stable.latencies) >= after
        ):
            mine, theirs = c.quantile(0.99), self.stable.quantile(0.99)
            if mine is not None and theirs and mine > bounds.max_p99_ratio * theirs:
                return "max_p99_ratio", (
                    f"p99 latency {mine * 1000:.2f} ms is {mine / theirs:.2f}x stable's "
                    f"{theirs * 1000:.2f} ms, over the bound of {bounds.max_p99_ratio:g}x"
                )
        return None
