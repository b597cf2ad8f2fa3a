"""Every training option in one place: its default, its flag, its help text; argparse is made
from this dataclass, so a default lives here once. No TensorFlow: `--help` stays instant."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from training.datasets import DATASETS

ARCHITECTURES = ("cnn", "mlp")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
LR_SCHEDULES = ("cosine", "constant")

# Defaults that follow the data, not its name (README, "Defaults that follow the data"):
# - validation: a fifth of the training images, at most VALIDATION_MAX of them: 5,000 images
#   measure an accuracy to +-0.3 points, and every image beyond is better spent on training;
# - batch: the largest power of two in BATCH_RANGE that still gives TARGET_STEPS optimizer steps
#   over the planned epochs: Adam at 1e-3 with cosine decay needs about that many to converge,
#   and a few thousand images for a few epochs at batch 64 got only a few hundred;
# - augmentation: only for small data trained long (fewer than AUGMENT_MAX_IMAGES images and at
#   least AUGMENT_MIN_EPOCHS epochs): its moved images slow learning, which pays only where
#   the network would otherwise learn the training images by heart.
VALIDATION_FRACTION = 0.2
VALIDATION_MAX = 5000
TARGET_STEPS = 2000
BATCH_RANGE = (16, 64)
AUGMENT_MAX_IMAGES = 20_000
AUGMENT_MIN_EPOCHS = 8


def _checked(
    convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str
) -> Callable[[str], Any]:
    """An argparse type: `convert`, then `ok`, or "expected <expected>, got ..." (argparse
    prints it beside the flag)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive whole number")
fraction = _checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
positive_float = _checked(float, lambda v: v > 0, "a positive number")


def _meta(
    help: str,
    *,
    flag: str | None = None,
    type: Callable[[str], Any] | None = None,
    choices: tuple[Any, ...] | None = None,
    metavar: str | None = None,
    action: str | type[argparse.Action] | None = None,
) -> dict[str, Any]:
    """A field's metadata: what argparse needs to make its flag."""
    return {
        "help": help,
        "flag": flag,
        "type": type,
        "choices": choices,
        "metavar": metavar,
        "action": action,
    }


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = field(
        default="mnist", metadata=_meta("which dataset to train on", choices=DATASETS)
    )
    data_dir: Path | None = field(
        default=None,
        metadata=_meta("folder with IDX .gz, npz or CIFAR-10 batches (tried first)", type=Path),
    )
    architecture: str = field(
        default="cnn",
        metadata=_meta(
            "the design-notes CNN or the MLP baseline", flag="--arch", choices=ARCHITECTURES
        ),
    )
    epochs: int = field(
        default=10, metadata=_meta("epochs to train (fewer with early stopping)", type=positive_int)
    )
    batch_size: int | None = field(
        default=None,
        metadata=_meta(
            "the global batch: with N workers each one takes 1/N of it (default: follows the "
            f"data, the largest of {BATCH_RANGE[0]}..{BATCH_RANGE[1]} that gives "
            f"{TARGET_STEPS:,} steps over the epochs)",
            type=positive_int,
        ),
    )
    optimizer: str = field(default="adam", metadata=_meta("optimizer", choices=OPTIMIZERS))
    learning_rate: float = field(
        default=1e-3, metadata=_meta("initial learning rate", type=positive_float)
    )
    # "cosine": the rate falls from learning_rate to 0 over the planned epochs, so the last
    # epochs refine instead of bouncing around a minimum; "constant" keeps it fixed.
    lr_schedule: str = field(
        default="cosine", metadata=_meta("learning-rate schedule", choices=LR_SCHEDULES)
    )
    weight_decay: float = field(
        default=0.0,
        metadata=_meta(
            "decoupled weight decay of the optimizer, per step and in units of the learning rate "
            "(0: none)",
            type=_checked(float, lambda v: v >= 0, "a number >= 0"),
        ),
    )
    # 0.1: Fashion-MNIST 91.10 % -> 91.86 % at 10 epochs (README); the network itself, which
    # has no dropout, is the design notes' and stays so.
    label_smoothing: float = field(
        default=0.1,
        metadata=_meta(
            "train toward 1 - s on the true class and s/classes elsewhere, not 1 and 0",
            type=fraction,
        ),
    )
    validation_split: float | None = field(
        default=None,
        metadata=_meta(
            "fraction of the training images held out for validation (default: "
            f"{VALIDATION_FRACTION:g}, at most {VALIDATION_MAX:,} images)",
            type=fraction,
        ),
    )
    shuffle: bool = field(
        default=True,
        metadata=_meta("keep the training order", flag="--no-shuffle", action="store_false"),
    )
    shuffle_labels: bool = field(
        default=False,
        metadata=_meta(
            "train on the training labels shuffled: a deliberately useless model (right about one "
            "time in ten), to rehearse a rollout's automatic rollback; the test labels are kept",
            action="store_true",
        ),
    )
    seed: int = field(
        default=42, metadata=_meta("seed of weights, shuffling, subsets and augmentation", type=int)
    )
    # This CNN has no dropout and starts to overfit Fashion-MNIST after about five epochs.
    early_stopping: int = field(
        default=3,
        metadata=_meta(
            "stop after this many epochs without a better validation accuracy and keep the best "
            "epoch's weights (0: off)",
            type=int,
            metavar="PATIENCE",
        ),
    )
    # None: decided by the data (resolved()), from the README's measurements.
    augment: bool | None = field(
        default=None,
        metadata=_meta(
            "random shifts, rotations and zoom of the training images (Keras preprocessing "
            "layers, active only while training; the exported model is the plain network) "
            f"(default: on below {AUGMENT_MAX_IMAGES:,} training images and from "
            f"{AUGMENT_MIN_EPOCHS} epochs, off otherwise)",
            action=argparse.BooleanOptionalAction,
        ),
    )
    train_limit: int | None = field(
        default=None,
        metadata=_meta("use a random subset of this many training images", type=positive_int),
    )
    test_limit: int | None = field(
        default=None,
        metadata=_meta("use a random subset of this many test images", type=positive_int),
    )
    models_dir: Path = field(
        default=Path("models"), metadata=_meta("the model repository to export into", type=Path)
    )
    name: str | None = field(
        default=None, metadata=_meta("model name in the repository (default: the dataset, +_mlp)")
    )
    int8: bool = field(
        default=True,
        metadata=_meta(
            "do not write the INT8 twin (static QDQ quantization, calibrated on training images, "
            "written as <name>_int8 when within 0.3 points of FP32's test accuracy)",
            flag="--no-int8",
            action="store_false",
        ),
    )
    download: bool = field(
        default=True,
        metadata=_meta(
            "never try Keras's own download", flag="--no-download", action="store_false"
        ),
    )
    verbose: int | None = field(
        default=None,
        metadata=_meta(
            "Keras fit verbosity: 1 = progress bar (default on a terminal), 2 = a line per epoch",
            type=int,
            choices=(0, 1, 2),
        ),
    )
    distributed: bool = field(
        default=False,
        metadata=_meta(
            "train with tf.distribute.MultiWorkerMirroredStrategy as one worker of the cluster "
            "that TF_CONFIG describes (implied when TF_CONFIG is set)",
            action="store_true",
        ),
    )
    workers: int = field(
        default=1,
        metadata=_meta(
            "start this many local worker processes on free loopback ports, each with its own "
            "TF_CONFIG, and wait for all of them (1: train in this process)",
            type=positive_int,
        ),
    )
    worker_timeout: float = field(
        default=300.0,
        metadata=_meta(
            "seconds a worker waits for the others to join, and for any one collective step, "
            "before the run fails",
            type=positive_float,
            metavar="SECONDS",
        ),
    )

    def report(self) -> dict[str, Any]:
        """The settings as JSON values, for report.json."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    def resolved(self, images: int) -> TrainConfig:
        """These settings with each data-following default decided for `images` training
        images (before the validation hold-out); what the user set is kept."""
        split = self.validation_split
        if split is None:
            split = min(VALIDATION_FRACTION, VALIDATION_MAX / max(images, 1))
        batch = self.batch_size
        if batch is None:
            per_epoch = TARGET_STEPS / self.epochs  # steps each epoch should take
            fitted = images * (1 - split)
            batch = BATCH_RANGE[0]
            while batch * 2 <= BATCH_RANGE[1] and fitted / (batch * 2) >= per_epoch:
                batch *= 2
        augment = self.augment
        if augment is None:
            augment = images < AUGMENT_MAX_IMAGES and self.epochs >= AUGMENT_MIN_EPOCHS
        return dataclasses.replace(
            self, validation_split=round(split, 4), batch_size=batch, augment=augment
        )

    @property
    def augmenting(self) -> bool:
        """Whether augmentation runs (False until resolved() has decided a default)."""
        return bool(self.augment)

    @property
    def fit_verbose(self) -> int:
        return self.verbose if self.verbose is not None else (1 if sys.stdout.isatty() else 2)


def flag_of(name: str) -> str:
    meta = TrainConfig.__dataclass_fields__[name].metadata
    return str(meta["flag"] or "--" + name.replace("_", "-"))


def prog_name(argv0: str | None = None) -> str:
    """What the user typed: `cnnserve-train` for the console script, `python -m training` else."""
    base = os.path.basename(argv0 if argv0 is not None else sys.argv[0])
    if base in ("__main__.py", "-m", "-c", "") or base.startswith("python"):
        return "python -m training"
    return base


def add_options(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """A flag for each field of TrainConfig (or for those in `names`), made from its metadata."""
    for f in fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        meta = f.metadata
        assert f.default is not MISSING
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": meta["help"]}
        if meta["action"] is not None:
            kwargs["action"] = meta["action"]
            if meta["action"] is argparse.BooleanOptionalAction and f.default is not None:
                kwargs["help"] += f" (default: {'on' if f.default else 'off'})"
        else:
            if f.default is not None:
                kwargs["help"] += " (default: %(default)s)"
            for key in ("type", "choices", "metavar"):
                if meta[key] is not None:
                    kwargs[key] = meta[key]
        parser.add_argument(flag_of(f.name), **kwargs)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or prog_name(),
        description="Train the design-notes CNN (or the MLP baseline), evaluate it on the "
        "held-out test set and export it to models/<name>/<version>/model.onnx.",
    )
    add_options(parser)
    return parser


def parse(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))


def to_argv(config: TrainConfig, *, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The flags that make `config` again (those that differ from the defaults)."""
    argv: list[str] = []
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if f.name in leave_out or value == f.default:
            continue
        flag, action = flag_of(f.name), f.metadata["action"]
        if action is argparse.BooleanOptionalAction:
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif action in ("store_true", "store_false"):
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv
