"""`python -m training.compare` (`make compare`): the CNN against the MLP baseline, as the design
notes argue it: weights per first-layer neuron, parameters, test accuracy, and accuracy on the
test images shifted by 1-4 pixels in each direction, with and without augmentation.

Both models train on the same data with the same budget (epochs, batch, seed, schedule), and
are scored on the very same shifted images. Writes compare.json, compare.md (the table) and
compare.png (accuracy against shift) to --out.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import dataclasses
import hashlib
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from training import datasets
from training.config import TrainConfig, add_options

SHIFTS = (1, 2, 3, 4)
DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
SHARED_OPTIONS = (
    "dataset",
    "data_dir",
    "epochs",
    "batch_size",
    "optimizer",
    "learning_rate",
    "lr_schedule",
    "validation_split",
    "seed",
    "early_stopping",
    "train_limit",
    "test_limit",
    "download",
    "verbose",
)
RUNS = (("cnn", False), ("mlp", False), ("cnn", True), ("mlp", True))


def shift(x: npt.NDArray[np.uint8], dy: int, dx: int) -> npt.NDArray[np.uint8]:
    """Move every image by (dy, dx) pixels; what leaves the frame is lost, the rest is black."""
    h, w = x.shape[1:3]
    out = np.zeros_like(x)
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def shifted_sets(x: npt.NDArray[np.uint8]) -> dict[tuple[int, str], npt.NDArray[np.uint8]]:
    """The test images moved by each distance in each direction: made once, scored by all."""
    return {
        (n, name): shift(x, dy * n, dx * n) for n in SHIFTS for name, (dy, dx) in DIRECTIONS.items()
    }


def first_layer_weights_per_neuron(architecture: str, shape: tuple[int, int, int]) -> int:
    """A dense neuron sees every input value; a 3x3 conv filter sees 3x3xC of them (+1 bias)."""
    h, w, c = shape
    return h * w * c + 1 if architecture == "mlp" else 3 * 3 * c + 1


def accuracy(model: Any, x: npt.NDArray[np.uint8], y: npt.NDArray[np.int64]) -> float:
    from training.train import scale_images

    probabilities = model.predict(scale_images(x), batch_size=512, verbose=0)
    return float((probabilities.argmax(axis=1) == y).mean())


def run(base: TrainConfig, out: Path) -> dict[str, Any]:
    from training.train import train

    ds = datasets.load(base.dataset, base.data_dir, allow_download=base.download)
    ds = datasets.subset(ds, base.train_limit, base.test_limit, seed=base.seed)
    print(f"dataset: {ds.describe()}", flush=True)
    base = base.resolved(len(ds.x_train))  # one batch and validation split for all four
    sets = shifted_sets(ds.x_test)
    digest = hashlib.sha256(b"".join(sets[k].tobytes() for k in sorted(sets))).hexdigest()
    rows = []
    for architecture, augment in RUNS:
        config = dataclasses.replace(base, architecture=architecture, augment=augment)
        print(f"training {architecture}, augmentation {'on' if augment else 'off'}", flush=True)
        result = train(ds, config)
        by_direction = {
            f"{n}px_{name}": accuracy(result.model, images, ds.y_test)
            for (n, name), images in sets.items()
        }
        rows.append(
            {
                "architecture": architecture,
                "augment": augment,
                "parameters": int(result.model.count_params()),
                "weights_per_first_layer_neuron": first_layer_weights_per_neuron(
                    architecture, ds.input_shape
                ),
                "test_accuracy": result.test_accuracy,
                "shifted_accuracy": {
                    str(n): statistics.fmean(by_direction[f"{n}px_{d}"] for d in DIRECTIONS)
                    for n in SHIFTS
                },
                "shifted_accuracy_by_direction": by_direction,
                "epochs_run": len(result.epoch_seconds),
                "median_epoch_seconds": statistics.median(result.epoch_seconds),
            }
        )
        print(f"  {table_row(rows[-1])}", flush=True)
    report = {
        "dataset": ds.name,
        "data_source": ds.source,
        "train_images": len(ds.x_train),
        "test_images": len(ds.x_test),
        "config": {k: v for k, v in base.report().items() if k not in ("architecture", "augment")},
        "shifts": list(SHIFTS),
        "directions": list(DIRECTIONS),
        "shifted_images_sha256": digest,  # one set of shifted images for every model
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "compare.md").write_text(table(report) + "\n")
    plot(report, out / "compare.png")
    return report


HEADER = (
    "| model | augmentation | parameters | weights per first-layer neuron | test accuracy | "
    + " | ".join(f"shifted {n} px" for n in SHIFTS)
    + " | epoch time |"
)


def table_row(row: dict[str, Any]) -> str:
    shifted = " | ".join(f"{row['shifted_accuracy'][str(n)]:.2%}" for n in SHIFTS)
    return (
        f"| {row['architecture'].upper()} | {'on' if row['augment'] else 'off'} | "
        f"{row['parameters']:,} | {row['weights_per_first_layer_neuron']:,} | "
        f"{row['test_accuracy']:.2%} | {shifted} | {row['median_epoch_seconds']:.1f} s |"
    )


def table(report: dict[str, Any]) -> str:
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    lines += [table_row(row) for row in report["rows"]]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in report["rows"]:
        xs = [0, *SHIFTS]
        ys = [row["test_accuracy"], *(row["shifted_accuracy"][str(n)] for n in SHIFTS)]
        style = "-" if row["augment"] else "--"
        color = "tab:blue" if row["architecture"] == "cnn" else "tab:orange"
        marker = "o" if row["architecture"] == "cnn" else "s"
        label = f"{row['architecture'].upper()}, augmentation {'on' if row['augment'] else 'off'}"
        ax.plot(xs, ys, style, color=color, marker=marker, label=label)
    ax.set_xlabel("shift of the test images (pixels; mean over up, down, left, right)")
    ax.set_ylabel("test accuracy")
    ax.set_xticks([0, *SHIFTS])
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(
        f"{report['dataset']}: {report['train_images']:,} training images, "
        f"{report['config']['epochs']} epochs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.compare",
        description="Train the CNN and the MLP baseline on the same data with the same budget, "
        "with and without augmentation; write a table and a plot of parameters, test accuracy "
        "and accuracy on shifted test images.",
    )
    add_options(parser, SHARED_OPTIONS)
    parser.add_argument("--out", type=Path, default=Path("models/compare"), help="output folder")
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        report = run(TrainConfig(**args), out)
    except datasets.DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(report))
    print(f"written: {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
