"""Fit and evaluate a model, and write its training report (history, curves, summary)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from training.datasets import Dataset
from training.model import ARCHITECTURES

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd", "rmsprop")
LR_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "mnist"
    architecture: str = "cnn"
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    # "cosine": the rate falls from learning_rate to 0 over the planned epochs, so the last
    # epochs refine instead of bouncing around a minimum; "constant" keeps it fixed.
    lr_schedule: str = "cosine"
    validation_split: float = 0.2
    shuffle: bool = True
    seed: int = 42
    # Stop when validation accuracy has not improved for this many epochs and keep the best
    # epoch's weights (0: train every epoch, keep the last). This CNN has no dropout and
    # starts to overfit Fashion-MNIST after about five epochs.
    early_stopping: int = 3
    verbose: int = 1


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    test_loss: float
    test_accuracy: float
    epoch_seconds: list[float] = field(default_factory=list)
    summary: str = ""
    best_epoch: int = 0  # 1-based epoch whose weights the model holds

    def report(self, config: TrainConfig, ds: Dataset) -> dict[str, Any]:
        return {
            "config": asdict(config),
            "dataset": ds.name,
            "data_source": ds.source,
            "train_images": len(ds.x_train),
            "test_images": len(ds.x_test),
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
            "parameters": int(self.model.count_params()),
            "epoch_seconds": self.epoch_seconds,
            "epochs_run": len(self.epoch_seconds),
            "best_epoch": self.best_epoch,
        }


def scale_images(x: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """uint8 pixels to [0, 1] float32: the model's input contract (metadata `input_scale`)."""
    return x.astype(np.float32) * np.float32(1.0 / 255.0)


class _EpochTimer(keras.callbacks.Callback):  # type: ignore[misc]
    """Per-epoch wall time; nothing per batch, so it costs fit nothing measurable."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def make_optimizer(
    name: str, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule
) -> keras.optimizers.Optimizer:
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    raise ValueError(f"--optimizer {name!r}: allowed {', '.join(OPTIMIZERS)}")


def train(ds: Dataset, config: TrainConfig) -> TrainResult:
    keras.utils.set_random_seed(config.seed)
    model = ARCHITECTURES[config.architecture](ds.input_shape, len(ds.class_names))
    train_images = int(len(ds.x_train) * (1 - config.validation_split))
    steps = config.epochs * max(1, -(-train_images // config.batch_size))
    rate: float | keras.optimizers.schedules.LearningRateSchedule = config.learning_rate
    if config.lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=steps)
    elif config.lr_schedule != "constant":
        raise ValueError(f"--lr-schedule {config.lr_schedule!r}: allowed {', '.join(LR_SCHEDULES)}")
    model.compile(
        optimizer=make_optimizer(config.optimizer, rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    x_train, x_test = scale_images(ds.x_train), scale_images(ds.x_test)
    timer = _EpochTimer()
    callbacks: list[keras.callbacks.Callback] = [timer]
    monitor = "val_accuracy" if config.validation_split > 0 else "accuracy"
    if config.early_stopping > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor,
                patience=config.early_stopping,
                restore_best_weights=True,
                verbose=min(config.verbose, 1),
            )
        )
    log.info(
        "training %s on %s: %d epochs, batch %d, %s lr=%g (%s)",
        config.architecture,
        ds.describe(),
        config.epochs,
        config.batch_size,
        config.optimizer,
        config.learning_rate,
        config.lr_schedule,
    )
    history = model.fit(
        x_train,
        ds.y_train,
        epochs=config.epochs,
        batch_size=config.batch_size,
        verbose=config.verbose,
        validation_split=config.validation_split,
        shuffle=config.shuffle,
        callbacks=callbacks,
    )
    test_loss, test_accuracy = model.evaluate(
        x_test, ds.y_test, batch_size=512, verbose=1 if config.verbose == 1 else 0
    )
    scores = history.history.get(monitor, [])
    best_epoch = (
        int(max(range(len(scores)), key=scores.__getitem__)) + 1
        if config.early_stopping > 0 and scores
        else len(scores)
    )
    lines: list[str] = []
    model.summary(print_fn=lambda line, *_, **__: lines.append(line))
    return TrainResult(
        model=model,
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        epoch_seconds=timer.seconds,
        summary="\n".join(lines),
        best_epoch=best_epoch,
    )


def write_report(result: TrainResult, config: TrainConfig, ds: Dataset, folder: Path) -> None:
    """history.json, report.json, summary.txt and curves.png beside the model."""
    (folder / "history.json").write_text(json.dumps(result.history, indent=2) + "\n")
    (folder / "report.json").write_text(json.dumps(result.report(config, ds), indent=2) + "\n")
    (folder / "summary.txt").write_text(result.summary + "\n")
    plot_curves(result.history, folder / "curves.png", title=f"{config.architecture} on {ds.name}")


def plot_curves(history: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        epochs = range(1, len(history.get(metric, [])) + 1)
        ax.plot(epochs, history.get(metric, []), "o-", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "s--", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
