"""Fit and evaluate a model, and write its training report (history, curves, summary)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from training.config import LR_SCHEDULES, OPTIMIZERS, TrainConfig
from training.datasets import Dataset
from training.model import ARCHITECTURES, build_augmentation

log = logging.getLogger(__name__)

__all__ = ["LR_SCHEDULES", "OPTIMIZERS", "Fitted", "TrainConfig", "TrainResult", "evaluate", "fit"]
__all__ += ["scale_images", "train", "write_report"]


@dataclass
class Fitted:
    """What every worker holds after fit: the network (without augmentation) and its history."""

    net: keras.Model
    history: dict[str, list[float]]
    epoch_seconds: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 1-based epoch whose weights the model holds


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    test_loss: float
    test_accuracy: float
    epoch_seconds: list[float] = field(default_factory=list)
    summary: str = ""
    best_epoch: int = 0  # 1-based epoch whose weights the model holds
    workers: int = 1

    def report(self, config: TrainConfig, ds: Dataset) -> dict[str, Any]:
        return {
            "config": config.report(),
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
            "workers": self.workers,
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


class Trainer(keras.Model):  # type: ignore[misc]
    """What fit trains: the augmentation layers (if any), then the network. Only the network is
    evaluated and exported, so the ONNX graph and the parameter count never see augmentation.

    With `multi_worker`, two Keras 3 defects under MultiWorkerMirroredStrategy are worked around
    (keras-team/keras#20585): fit's symbolic build reduces the (x, y) batch as one value, and
    the per-step metrics (scalars) are reduced with `axis=0`. The first is built from this
    worker's batch instead; the second gets metrics of shape [1], whose mean over axis 0 is the
    mean over the workers, so every worker logs (and early-stops on) the same figures.
    """

    def __init__(
        self, net: keras.Model, augment: keras.Model | None, *, multi_worker: bool = False
    ) -> None:
        super().__init__(name=f"train_{net.name}")
        self.net = net
        self.augment = augment
        self.multi_worker = multi_worker

    def call(self, x: Any, training: bool = False) -> Any:
        if self.augment is not None:
            x = self.augment(x, training=training)
        return self.net(x, training=training)

    def _maybe_symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> None:
        if not self.multi_worker:
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
            return
        strategy = self.distribute_strategy
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = keras.tree.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0], next(it)
                )
                break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def _per_worker(self, logs: dict[str, Any]) -> dict[str, Any]:
        if not self.multi_worker:
            return logs
        return {k: keras.ops.reshape(v, (1,)) for k, v in logs.items()}

    def train_step(self, data: Any) -> dict[str, Any]:
        return self._per_worker(super().train_step(data))

    def test_step(self, data: Any) -> dict[str, Any]:
        return self._per_worker(super().test_step(data))


def make_optimizer(
    name: str,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    weight_decay: float = 0.0,
) -> keras.optimizers.Optimizer:
    decay = weight_decay or None  # Keras applies it decoupled (AdamW's way) for every optimizer
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, weight_decay=decay)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, weight_decay=decay)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, weight_decay=decay)
    raise ValueError(f"--optimizer {name!r}: allowed {', '.join(OPTIMIZERS)}")


def training_loss(label_smoothing: float, classes: int) -> Any:
    """Cross-entropy on integer labels; with smoothing, against the smoothed one-hot targets
    (Keras's sparse loss has no smoothing of its own)."""
    if not label_smoothing:
        return "sparse_categorical_crossentropy"

    def smoothed_crossentropy(y_true: Any, y_pred: Any) -> Any:
        labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        return keras.losses.categorical_crossentropy(
            keras.ops.one_hot(labels, classes), y_pred, label_smoothing=label_smoothing
        )

    return smoothed_crossentropy


def fit(ds: Dataset, config: TrainConfig, strategy: Any = None) -> Fitted:
    """Build and fit, under `strategy` (a tf.distribute strategy) when one is given."""
    config = config.resolved(len(ds.x_train))
    assert config.batch_size is not None and config.validation_split is not None
    keras.utils.set_random_seed(config.seed)
    train_images = int(len(ds.x_train) * (1 - config.validation_split))
    steps = config.epochs * max(1, -(-train_images // config.batch_size))
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        net = ARCHITECTURES[config.architecture](ds.input_shape, len(ds.class_names))
        augment = build_augmentation(config.seed) if config.augmenting else None
        model = Trainer(net, augment, multi_worker=strategy is not None)
        rate: float | keras.optimizers.schedules.LearningRateSchedule = config.learning_rate
        if config.lr_schedule == "cosine":
            rate = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=steps)
        elif config.lr_schedule != "constant":
            raise ValueError(
                f"--lr-schedule {config.lr_schedule!r}: allowed {', '.join(LR_SCHEDULES)}"
            )
        model.compile(
            optimizer=make_optimizer(config.optimizer, rate, config.weight_decay),
            loss=training_loss(config.label_smoothing, len(ds.class_names)),
            metrics=["accuracy"],
        )
    timer = _EpochTimer()
    callbacks: list[keras.callbacks.Callback] = [timer]
    monitor = "val_accuracy" if config.validation_split > 0 else "accuracy"
    verbose = config.fit_verbose
    if config.early_stopping > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor,
                patience=config.early_stopping,
                restore_best_weights=True,
                verbose=min(verbose, 1),
            )
        )
    log.info(
        "training %s on %s: %d epochs, batch %d (%d steps), validation %g, %s lr=%g (%s), "
        "weight decay %g, label smoothing %g, augmentation %s",
        config.architecture,
        ds.describe(),
        config.epochs,
        config.batch_size,
        steps,
        config.validation_split,
        config.optimizer,
        config.learning_rate,
        config.lr_schedule,
        config.weight_decay,
        config.label_smoothing,
        "on" if config.augmenting else "off",
    )
    history = model.fit(
        scale_images(ds.x_train),
        ds.y_train,
        epochs=config.epochs,
        batch_size=config.batch_size,
        verbose=verbose,
        validation_split=config.validation_split,
        shuffle=config.shuffle,
        callbacks=callbacks,
    )
    scores = history.history.get(monitor, [])
    best_epoch = (
        int(max(range(len(scores)), key=scores.__getitem__)) + 1
        if config.early_stopping > 0 and scores
        else len(scores)
    )
    return Fitted(
        net=net,
        history={k: [float(np.ravel(v)[0]) for v in vs] for k, vs in history.history.items()},
        epoch_seconds=timer.seconds,
        best_epoch=best_epoch,
    )


def plain_copy(net: keras.Model, ds: Dataset, architecture: str) -> keras.Model:
    """The same weights in a network built outside any strategy: the chief evaluates and
    exports alone, and a model of the strategy would wait for the other workers."""
    plain = ARCHITECTURES[architecture](ds.input_shape, len(ds.class_names))
    plain.set_weights(net.get_weights())
    return plain


def evaluate(fitted: Fitted, ds: Dataset, config: TrainConfig, workers: int = 1) -> TrainResult:
    net = fitted.net
    net.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    test_loss, test_accuracy = net.evaluate(
        scale_images(ds.x_test),
        ds.y_test,
        batch_size=512,
        verbose=1 if config.fit_verbose == 1 else 0,
    )
    lines: list[str] = []
    net.summary(print_fn=lambda line, *_, **__: lines.append(line))
    return TrainResult(
        model=net,
        history=fitted.history,
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        epoch_seconds=fitted.epoch_seconds,
        summary="\n".join(lines),
        best_epoch=fitted.best_epoch,
        workers=workers,
    )


def train(ds: Dataset, config: TrainConfig) -> TrainResult:
    """Fit and evaluate on one machine."""
    return evaluate(fit(ds, config), ds, config)


def write_report(
    result: TrainResult,
    config: TrainConfig,
    ds: Dataset,
    folder: Path,
    export: dict[str, Any] | None = None,
) -> None:
    """history.json, report.json (with what export found: parity, INT8), summary.txt and
    curves.png beside the model."""
    report = {**result.report(config, ds), **(export or {})}
    (folder / "history.json").write_text(json.dumps(result.history, indent=2) + "\n")
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "summary.txt").write_text(result.summary + "\n")
    title = (
        f"{config.architecture} on {ds.name}, {len(ds.x_train):,} training images, "
        f"augmentation {'on' if config.augmenting else 'off'}"
        + (f", {result.workers} workers" if result.workers > 1 else "")
        + f": test accuracy {result.test_accuracy:.4f}"
    )
    plot_curves(result.history, folder / "curves.png", title=title)


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
