"""Training overhead: our `training.train.train` against a plain `model.fit` on the same data.

Both fit the same CNN on the same images with the same settings; the figure is the ratio of
their median epoch times (first epoch excluded: it includes graph tracing; the median, because
a busy machine stretches single epochs of either). Every epoch time is printed too. Run:
`make bench-train`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from training import datasets
from training.model import build_cnn
from training.train import TrainConfig, scale_images, train


def plain_fit(ds: datasets.Dataset, config: TrainConfig) -> list[float]:
    keras.utils.set_random_seed(config.seed)
    model = build_cnn(ds.input_shape)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    x = scale_images(ds.x_train)
    seconds = []

    class Timer(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: object = None) -> None:
            seconds.append(time.perf_counter() - self.t)

    model.fit(x, ds.y_train, epochs=config.epochs, batch_size=config.batch_size, verbose=0,
              validation_split=config.validation_split, shuffle=True, callbacks=[Timer()])  # fmt: skip
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="alternate the two this many times")
    args = p.parse_args()
    ds = datasets.subset(datasets.load(args.dataset, allow_download=False), args.images, 1000)
    config = TrainConfig(dataset=args.dataset, epochs=args.epochs, verbose=0).resolved(
        len(ds.x_train)
    )
    ours: list[float] = []
    plain: list[float] = []
    for _ in range(args.rounds):  # interleaved, so drift on a noisy machine hits both alike
        ours += train(ds, config).epoch_seconds[1:]
        plain += plain_fit(ds, config)[1:]
    ratio = float(np.median(ours) / np.median(plain))
    print(json.dumps({"images": len(ds.x_train), "epochs": args.epochs, "rounds": args.rounds,
                      "ours_epoch_s": [round(s, 2) for s in ours],
                      "plain_fit_epoch_s": [round(s, 2) for s in plain],
                      "ours_median_s": round(float(np.median(ours)), 3),
                      "plain_fit_median_s": round(float(np.median(plain)), 3),
                      "ratio_of_medians": round(ratio, 3),
                      "ratio_of_means": round(float(np.mean(ours) / np.mean(plain)), 3)},
                     indent=2))  # fmt: skip
    print(
        f"training.train epoch time is {ratio:.1%} of a plain model.fit ({'ok' if ratio <= 1.05 else 'over 5%'})"
    )


if __name__ == "__main__":
    main()
