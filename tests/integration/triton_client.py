"""Calls through Triton's own Python client (`tritonclient.grpc`), made in a child process.

tritonclient's generated modules register Triton's protos (package `inference`) in protobuf's
default descriptor pool, and so do our serving.pb.inference modules: the two cannot be imported
into one process (protobuf refuses the second with "duplicate symbol"). The tests therefore run
these functions in a spawned worker process that never imports serving.pb, and get plain values
back. tritonclient is imported inside the functions, so that the tests can import this module
(to hand its functions to the worker) without loading it; nothing here may import `serving`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

INPUT, OUTPUT = "image", "probabilities"


@contextmanager
def client(target: str) -> Iterator[Any]:
    import tritonclient.grpc as tc

    c = tc.InferenceServerClient(target)
    try:
        yield c
    finally:
        c.close()


def health(target: str, models: list[str]) -> dict[str, Any]:
    with client(target) as c:
        return {
            "live": c.is_server_live(),
            "ready": c.is_server_ready(),
            "models": {m: c.is_model_ready(m) for m in models},
        }


def metadata(target: str, model: str) -> dict[str, Any]:
    with client(target) as c:
        return {
            "server": c.get_server_metadata(as_json=True),
            "model": c.get_model_metadata(model, as_json=True),
            "config": c.get_model_config(model, as_json=True)["config"],
            "index": c.get_model_repository_index(as_json=True)["models"],
        }


def statistics(target: str, model: str = "") -> list[dict[str, Any]]:
    with client(target) as c:
        stats: list[dict[str, Any]] = c.get_inference_statistics(model, as_json=True)["model_stats"]
        return stats


def _inputs(x: np.ndarray) -> list[Any]:
    """The one input, typed after the array (float32: FP32, uint8: UINT8, float64: FP64...)."""
    import tritonclient.grpc as tc
    from tritonclient.utils import np_to_triton_dtype

    inp = tc.InferInput(INPUT, list(x.shape), np_to_triton_dtype(x.dtype))
    inp.set_data_from_numpy(x)
    return [inp]


def infer(
    target: str, model: str, x: np.ndarray, class_count: int = 0, request_id: str = ""
) -> dict[str, Any]:
    """One ModelInfer call; the output as numpy (BYTES for classification) and the response."""
    import tritonclient.grpc as tc

    outputs = [tc.InferRequestedOutput(OUTPUT, class_count=class_count)] if class_count else None
    with client(target) as c:
        result = c.infer(model, _inputs(x), outputs=outputs, request_id=request_id)
        return {"output": result.as_numpy(OUTPUT), "response": result.get_response(as_json=True)}


def infer_error(
    target: str, model: str, x: np.ndarray, output: str | None = None
) -> tuple[str, str]:
    """A call that must fail: (status, message) of tritonclient's InferenceServerException."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    outputs = [tc.InferRequestedOutput(output)] if output else None
    with client(target) as c:
        try:
            c.infer(model, _inputs(x), outputs=outputs)
        except InferenceServerException as exc:
            return str(exc.status()), str(exc.message())
    raise AssertionError(f"ModelInfer on {model!r} succeeded; expected an error")


def stream_infer(
    target: str, model: str, streams: list[list[tuple[str, np.ndarray]]]
) -> list[list[tuple[str, Any]]]:
    """Each list of (request id, images) over a stream of its own (`start_stream` /
    `async_stream_infer`), all streams at once; per stream, the answers in the order they came:
    (response id, probabilities) or ("", error message)."""
    import queue
    import threading

    def run(messages: list[tuple[str, np.ndarray]], out: list[tuple[str, Any]]) -> None:
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        with client(target) as c:
            c.start_stream(callback=lambda result, error: answers.put((result, error)))
            for request_id, x in messages:
                c.async_stream_infer(model, _inputs(x), request_id=request_id)
            for _ in messages:
                result, error = answers.get(timeout=60)
                if error is not None:
                    out.append(("", str(error.message())))
                else:
                    out.append((result.get_response().id, result.as_numpy(OUTPUT)))
            c.stop_stream()

    results: list[list[tuple[str, Any]]] = [[] for _ in streams]
    threads = [
        threading.Thread(target=run, args=(messages, out))
        for messages, out in zip(streams, results, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def stream_then_cancel(target: str, model: str, x: np.ndarray, messages: int) -> None:
    """Send `messages` requests on a stream and cancel it without waiting for the answers."""
    with client(target) as c:
        c.start_stream(callback=lambda result, error: None)
        for i in range(messages):
            c.async_stream_infer(model, _inputs(x), request_id=str(i))
        c.stop_stream(cancel_requests=True)
