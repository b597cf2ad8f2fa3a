"""The CNN of the design notes, and an MLP baseline for the same task."""

from __future__ import annotations

import keras
from keras import layers

# Layer names are stable so that the ONNX graph (whose node names carry them) reads well.
CNN_LAYERS = ("conv1", "pool1", "conv2", "pool2", "conv3", "flatten", "dense1", "output")


def build_cnn(input_shape: tuple[int, int, int], num_classes: int = 10) -> keras.Model:
    """Conv2D 32 3x3 relu, MaxPool 2, Conv2D 64 3x3 relu, MaxPool 2, Conv2D 64 3x3 relu,
    Flatten, Dense 64 relu, Dense `num_classes` softmax."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="image"),
            layers.Conv2D(32, (3, 3), activation="relu", name="conv1"),
            layers.MaxPooling2D((2, 2), name="pool1"),
            layers.Conv2D(64, (3, 3), activation="relu", name="conv2"),
            layers.MaxPooling2D((2, 2), name="pool2"),
            layers.Conv2D(64, (3, 3), activation="relu", name="conv3"),
            layers.Flatten(name="flatten"),
            layers.Dense(64, activation="relu", name="dense1"),
            layers.Dense(num_classes, activation="softmax", name="output"),
        ],
        name="cnn",
    )


def build_mlp(input_shape: tuple[int, int, int], num_classes: int = 10) -> keras.Model:
    """A fully connected baseline: every first-layer neuron sees every pixel."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="image"),
            layers.Flatten(name="flatten"),
            layers.Dense(128, activation="relu", name="dense1"),
            layers.Dense(64, activation="relu", name="dense2"),
            layers.Dense(num_classes, activation="softmax", name="output"),
        ],
        name="mlp",
    )


ARCHITECTURES = {"cnn": build_cnn, "mlp": build_mlp}


def layer_parameter_counts(model: keras.Model) -> list[tuple[str, int]]:
    return [(layer.name, int(layer.count_params())) for layer in model.layers]


# Small changes a digit or a garment survives: up to 10 % of the side shifted (about 3 pixels
# on 28x28), about 11 degrees of rotation, 10 % zoom. Empty borders are black, as the images'
# backgrounds are.
SHIFT_FACTOR = 0.1
ROTATION_FACTOR = 0.03  # a fraction of a full turn
ZOOM_FACTOR = 0.1


def build_augmentation(seed: int) -> keras.Sequential:
    """Keras preprocessing layers: random while training, the identity at inference, so they
    stay out of the exported network."""
    return keras.Sequential(
        [
            layers.RandomTranslation(
                SHIFT_FACTOR, SHIFT_FACTOR, fill_mode="constant", seed=seed, name="shift"
            ),
            layers.RandomRotation(
                ROTATION_FACTOR, fill_mode="constant", seed=seed + 1, name="rotate"
            ),
            layers.RandomZoom(ZOOM_FACTOR, fill_mode="constant", seed=seed + 2, name="zoom"),
        ],
        name="augment",
    )
