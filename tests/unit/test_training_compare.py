"""The shifted test images of `make compare` (no TensorFlow needed)."""

from __future__ import annotations

import numpy as np

from training.compare import DIRECTIONS, SHIFTS, first_layer_weights_per_neuron, shift, shifted_sets


def test_shift_moves_pixels_and_fills_black() -> None:
    x = np.arange(1, 17, dtype=np.uint8).reshape(1, 4, 4, 1)
    right = shift(x, 0, 1)
    np.testing.assert_array_equal(right[0, :, 1:, 0], x[0, :, :3, 0])
    assert (right[0, :, 0, 0] == 0).all()
    up = shift(x, -2, 0)
    np.testing.assert_array_equal(up[0, :2, :, 0], x[0, 2:, :, 0])
    assert (up[0, 2:, :, 0] == 0).all()
    np.testing.assert_array_equal(shift(x, 0, 0), x)
    assert not shift(x, 4, 0).any()  # moved out of the frame


def test_every_distance_in_every_direction_once() -> None:
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    sets = shifted_sets(x)
    assert set(sets) == {(n, d) for n in SHIFTS for d in DIRECTIONS}
    assert all(images.shape == x.shape for images in sets.values())


def test_weights_per_first_layer_neuron_as_the_notes_count_them() -> None:
    assert first_layer_weights_per_neuron("mlp", (28, 28, 1)) == 785
    assert first_layer_weights_per_neuron("mlp", (32, 32, 3)) == 3_073
    assert first_layer_weights_per_neuron("cnn", (28, 28, 1)) == 10
