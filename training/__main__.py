"""`python -m training --dataset mnist --epochs 5 ...`: train, evaluate, export, report."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ chatter out of the log

import argparse
import json
import logging
import sys
from pathlib import Path

from training import datasets
from training.train import LR_SCHEDULES, OPTIMIZERS, TrainConfig


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive whole number, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m training",
        description="Train the design-notes CNN (or the MLP baseline), evaluate it on the "
        "held-out test set and export it to models/<name>/<version>/model.onnx.",
    )
    p.add_argument("--dataset", choices=datasets.DATASETS, default=defaults.dataset)
    p.add_argument("--data-dir", type=Path, help="folder with IDX .gz, npz or CIFAR-10 batches")
    p.add_argument("--arch", choices=("cnn", "mlp"), default=defaults.architecture)
    p.add_argument("--epochs", type=_positive_int, default=defaults.epochs)
    p.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    p.add_argument("--learning-rate", type=_positive_float, default=defaults.learning_rate)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=defaults.lr_schedule)
    p.add_argument("--validation-split", type=_fraction, default=defaults.validation_split)
    p.add_argument("--no-shuffle", action="store_true", help="keep the training order")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--early-stopping",
        type=int,
        default=defaults.early_stopping,
        metavar="PATIENCE",
        help="stop after this many epochs without a better validation accuracy and keep the "
        "best epoch's weights (0: off)",
    )
    p.add_argument(
        "--train-limit", type=_positive_int, help="use a random subset of training images"
    )
    p.add_argument("--test-limit", type=_positive_int, help="use a random subset of test images")
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--name", help="model name in the repository (default: the dataset, +_mlp)")
    p.add_argument("--no-download", action="store_true", help="never try Keras's own download")
    p.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        help="Keras fit verbosity: 1 = progress bar (default on a terminal), 2 = a line per epoch",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # TensorFlow is imported only now, so that --help and flag errors are instant.
    from training.export import ExportError, export
    from training.train import scale_images, train, write_report

    config = TrainConfig(
        dataset=args.dataset,
        architecture=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule,
        validation_split=args.validation_split,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        early_stopping=args.early_stopping,
        verbose=args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2),
    )
    try:
        ds = datasets.load(args.dataset, args.data_dir, allow_download=not args.no_download)
    except datasets.DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ds = datasets.subset(ds, args.train_limit, args.test_limit, seed=args.seed)
    print(f"dataset: {ds.describe()}")
    result = train(ds, config)
    print(
        f"test accuracy: {result.test_accuracy:.4f} ({len(ds.x_test):,} test images; weights of "
        f"epoch {result.best_epoch} of {len(result.epoch_seconds)})"
    )
    name = args.name or (ds.name if args.arch == "cnn" else f"{ds.name}_{args.arch}")
    metadata = {
        "name": name,
        "dataset": ds.name,
        "data_source": ds.source,
        "architecture": args.arch,
        "class_names": json.dumps(ds.class_names),
        "test_accuracy": f"{result.test_accuracy:.6f}",
        "test_images": str(len(ds.x_test)),
        "train_images": str(len(ds.x_train)),
        "epochs": str(config.epochs),
        "best_epoch": str(result.best_epoch),
    }
    try:
        path, parity = export(
            result.model,
            models_dir=args.models_dir,
            name=name,
            metadata=metadata,
            x_check=scale_images(ds.x_test[:2000]),
            write_extras=lambda folder: write_report(result, config, ds, folder),
        )
    except ExportError as exc:
        print(f"error: export refused: {exc}", file=sys.stderr)
        return 1
    print(
        f"parity: {parity.images} test images, max |keras - onnx| {parity.max_abs_diff:.2e}, "
        f"argmax mismatches {parity.argmax_mismatches}"
    )
    print(f"exported: {path}")
    print(f"report:   {path.parent / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
