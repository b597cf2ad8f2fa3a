"""`python -m training --dataset mnist --epochs 5 ...` (or `cnnserve-train`): train, evaluate,
export, report; `--workers N` or TF_CONFIG for MultiWorkerMirroredStrategy."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ chatter out of the log

import dataclasses
import json
import logging
import re
import sys

import numpy as np

from training import datasets
from training.cluster import ClusterError, Role, role_from_tf_config, run_local_workers
from training.config import parse, to_argv

# The line of a TensorFlow error that says what happened to the peer.
PEER_HINT = re.compile(r"unhealthy|heartbeat|aborted|deadline|timed out|unavailable|connect", re.I)


def main(argv: list[str] | None = None) -> int:
    config = parse(argv)
    if config.workers > 1:
        if "TF_CONFIG" in os.environ:
            print("error: --workers starts its own cluster; unset TF_CONFIG", file=sys.stderr)
            return 2
        return run_local_workers(to_argv(config, leave_out=("workers",)), config.workers)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # a line per collective otherwise
    role: Role | None = None
    if config.distributed or "TF_CONFIG" in os.environ:
        try:
            role = role_from_tf_config(os.environ.get("TF_CONFIG", ""))
        except ClusterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        config = dataclasses.replace(config, distributed=True)
        print(f"role: {role.describe()}; cluster {', '.join(role.addresses)}", flush=True)
    try:
        ds = datasets.load(config.dataset, config.data_dir, allow_download=config.download)
    except datasets.DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ds = datasets.subset(ds, config.train_limit, config.test_limit, seed=config.seed)
    print(f"dataset: {ds.describe()}", flush=True)
    if config.shuffle_labels:
        ds = datasets.shuffle_labels(ds, seed=config.seed)
        print("labels: the training labels are shuffled (--shuffle-labels)", flush=True)
    config = config.resolved(len(ds.x_train))  # the defaults that follow the data, decided
    print(
        f"settings: batch {config.batch_size}, validation split {config.validation_split:g}, "
        f"augmentation {'on' if config.augmenting else 'off'} (flags: {' '.join(to_argv(config))})",
        flush=True,
    )
    # TensorFlow is imported only now, so that --help and flag errors are instant.
    from training.export import ExportError, Int8Request, export
    from training.train import evaluate, fit, plain_copy, scale_images, train, write_report

    if role is None:
        result = train(ds, config)
    else:
        from training.distribute import PEER_ERRORS, make_strategy

        try:
            strategy = make_strategy(role, config.worker_timeout)
            print(f"cluster ready: {role.describe()}", flush=True)
            fitted = fit(ds, config, strategy)
        except PEER_ERRORS as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            telling = [line for line in lines if PEER_HINT.search(line)]
            first = (telling or lines or [type(exc).__name__])[0]
            print(
                f"error: {role.describe()}: training stopped, a peer died or stopped answering "
                f"(--worker-timeout {config.worker_timeout:g} s): {first}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        if not role.is_chief:
            print(f"done: {role.describe()} writes nothing; the chief exports", flush=True)
            return 0
        fitted.net = plain_copy(fitted.net, ds, config.architecture)
        result = evaluate(fitted, ds, config, workers=role.workers)
    print(
        f"test accuracy: {result.test_accuracy:.4f} ({len(ds.x_test):,} test images; weights of "
        f"epoch {result.best_epoch} of {len(result.epoch_seconds)})"
    )
    name = config.name or (ds.name if config.architecture == "cnn" else f"{ds.name}_mlp")
    metadata = {
        "name": name,
        "dataset": ds.name,
        "data_source": ds.source,
        "architecture": config.architecture,
        "class_names": json.dumps(ds.class_names),
        "test_accuracy": f"{result.test_accuracy:.6f}",
        "test_images": str(len(ds.x_test)),
        "train_images": str(len(ds.x_train)),
        "epochs": str(config.epochs),
        "best_epoch": str(result.best_epoch),
        "augmentation": "on" if config.augmenting else "off",
        "workers": str(result.workers),
    }
    if config.shuffle_labels:
        metadata["labels"] = "shuffled"
    int8 = None
    if config.int8:
        from training.quantize import CALIBRATION_IMAGES

        rng = np.random.default_rng(config.seed)
        pick = rng.choice(len(ds.x_train), min(CALIBRATION_IMAGES, len(ds.x_train)), replace=False)
        int8 = Int8Request(
            name=f"{name}_int8",
            calibration=scale_images(ds.x_train[np.sort(pick)]),  # training images only
            x_test=scale_images(ds.x_test),
            y_test=ds.y_test,
        )
    try:
        done = export(
            result.model,
            models_dir=config.models_dir,
            name=name,
            metadata=metadata,
            x_check=scale_images(ds.x_test[:2000]),
            write_extras=lambda folder, found: write_report(result, config, ds, folder, found),
            int8=int8,
        )
    except ExportError as exc:
        print(f"error: export refused: {exc}", file=sys.stderr)
        return 1
    parity = done.parity
    print(
        f"parity: {parity.images} test images, max |keras - onnx| {parity.max_abs_diff:.2e}, "
        f"argmax mismatches {parity.argmax_mismatches}"
    )
    print(f"exported: {done.path}")
    if done.int8 is not None:
        speeds = ", ".join(
            f"batch {s.batch} {s.speedup:.2f}x ({s.int8_ms:.3f} ms against {s.fp32_ms:.3f})"
            for s in done.int8.speeds
        )
        print(f"int8:     {done.int8.verdict()}; one thread, {speeds}")
    if done.int8_path is not None:
        print(f"exported: {done.int8_path}")
    elif done.int8_error is not None:
        print(f"int8:     not written, quantization failed: {done.int8_error}")
    print(f"report:   {done.path.parent / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
