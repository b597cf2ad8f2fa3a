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
