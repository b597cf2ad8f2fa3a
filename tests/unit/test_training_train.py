"""training.train's loss: label smoothing on integer labels, against the formula (TensorFlow
needed)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from training.train import training_loss  # noqa: E402


def test_smoothed_loss_is_crossentropy_against_smoothed_targets() -> None:
    y = np.array([2, 0], dtype=np.int64)
    p = np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]], dtype=np.float32)
    loss = np.asarray(training_loss(0.3, 3)(y, p))
    targets = np.full((2, 3), 0.1)  # s / classes
    targets[[0, 1], y] = 1 - 0.3 + 0.1
    np.testing.assert_allclose(loss, -(targets * np.log(p)).sum(axis=1), rtol=1e-5)
    assert training_loss(0.0, 3) == "sparse_categorical_crossentropy"
