"""What a changing batch size costs on CUDA: one session, batches of 1..16 images in random order.

    .venv/bin/python bench/cuda_shapes.py models/mnist/1/model.onnx   (a GPU, onnxruntime-gpu)

Dynamic batching hands ONNX Runtime a different batch size on almost every run. On the CPU that
costs nothing; on CUDA each Conv re-plans with cuDNN whenever its input shape changes. This
prints, per cuDNN algorithm search mode: runs in random sizes on the loading thread, on a new
thread, on four threads at once, and the same sizes padded to one fixed batch (what
`serving.core.runtime.run_in_fixed_batches` does for the server). bench/CUDA.md has the figures.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from serving.core.runtime import run_in_fixed_batches

FIXED = 64


def session(model: str, search: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    options = {"use_tf32": "0", "cudnn_conv_algo_search": search}
    return ort.InferenceSession(
        model, so, providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    )


def timed(run: Callable[[np.ndarray], object], batches: Iterable[np.ndarray]) -> list[float]:
    out = []
    for x in batches:
        started = time.perf_counter()
        run(x)
        out.append(time.perf_counter() - started)
    return out


def report(name: str, seconds: list[float]) -> None:
    s = sorted(seconds)
    print(
        f"{name:44s} runs={len(s)} p50={1e3 * s[len(s) // 2]:.2f} ms "
        f"p99={1e3 * s[int(len(s) * 0.99)]:.2f} ms max={1e3 * s[-1]:.1f} ms",
        flush=True,
    )


def main(model: str) -> int:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"no CUDA here: onnxruntime offers {ort.get_available_providers()}")
    probe = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()[0]
    h, w, c = (int(d) for d in probe.shape[1:])
    rng = np.random.default_rng(0)
    batches = [rng.random((int(n), h, w, c), dtype=np.float32) for n in rng.integers(1, 17, 400)]
    for search in ("EXHAUSTIVE", "HEURISTIC"):
        s = session(model, search)
        name = probe.name

        def run(x: np.ndarray, s: ort.InferenceSession = s, name: str = name) -> np.ndarray:
            out: np.ndarray = s.run(None, {name: x})[0]
            return out

        started = time.perf_counter()
        for n in range(1, FIXED + 1):  # every size warmed, as the server's warm-up does
            run(np.zeros((n, h, w, c), np.float32))
        print(f"{search}: warm-up of batch sizes 1..{FIXED}: {time.perf_counter() - started:.2f} s")
        report(f"{search} sizes 1..16, loading thread", timed(run, batches))
        with ThreadPoolExecutor(1) as fresh:  # a thread that has never run the session
            report(
                f"{search} sizes 1..16, a new thread", fresh.submit(timed, run, batches).result()
            )
        with ThreadPoolExecutor(4) as pool:
            parts = pool.map(lambda i, r=run: timed(r, batches[i::4]), range(4))
            report(f"{search} sizes 1..16, 4 threads at once", [t for p in parts for t in p])
        report(
            f"{search} sizes 1..16 padded to {FIXED}",
            timed(lambda x: run_in_fixed_batches(run, x, FIXED), batches),
        )
        report(f"{search} batch 1 only", timed(run, [batches[0][:1]] * 400))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} MODEL.onnx")
    raise SystemExit(main(sys.argv[1]))
