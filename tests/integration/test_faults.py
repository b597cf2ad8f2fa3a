"""Faults on the real server: corrupt and truncated model files, a vanished repository, SIGTERM,
cancellations and deadlines under concurrent load, and a real ONNX model that fails inside ONNX
Runtime for some inputs. No mocks; every wait polls with a bound."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest

from harness import ServerProcess, copy_repository, scrape
from serving.client import Client
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc
from serving.pb.inference import grpc_predict_v2_pb2 as v2
from serving.pb.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from tests.helpers import cpu_session, expected_probabilities, metric, metric_or_none, wait_for

pytestmark = pytest.mark.slow


def inflight(proc: ServerProcess, method: str | None = None) -> float:
    """Calls being handled now (of one method, or all)."""
    labels = {} if method is None else {"method": method}
    return metric(proc, "cnnserve_inflight_requests", **labels)


def logged(proc: ServerProcess, text: str) -> bool:
    return text in proc.logs()


def predict_inflight(proc: ServerProcess, at_least: int) -> float | None:
    n = inflight(proc, "Predict")
    return n if n >= at_least else None


def state_is(proc: ServerProcess, version: int, state: str) -> bool:
    value = metric_or_none(
        proc, "cnnserve_model_state", model="fashion", version=str(version), state=state
    )
    return value == 1.0


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)


# ------------------------------------------------------------------ bad model files


def test_corrupt_and_truncated_versions_are_refused_while_the_old_one_serves(
    trained_repo: Path, tmp_path: Path, images: np.ndarray
) -> None:
    repo = copy_repository(trained_repo, tmp_path / "models")
    good = repo / "fashion" / "1" / "model.onnx"
    expected = expected_probabilities(cpu_session(good), images)
    data = good.read_bytes()
    with ServerProcess(repo, ["--poll-seconds", "0.5"]) as proc, Client(proc.target) as client:
        assert state_is(proc, 1, "READY")
        # v2: cut in half; v3: the right size, but garbage after the first kilobyte
        for version, content in (
            (2, data[: len(data) // 2]),
            (3, data[:1024] + np.random.default_rng(0).bytes(len(data) - 1024)),
        ):
            staging = repo / "fashion" / f".{version}"
            staging.mkdir()
            (staging / "model.onnx").write_bytes(content)
            staging.rename(repo / "fashion" / str(version))  # appears whole to the poller
            refused = f"model fashion v{version} refused"
            wait_for(f"v{version} FAILED", partial(state_is, proc, version, "FAILED"), 30)
            wait_for(f"v{version} in the log", partial(logged, proc, refused), 60)
            result = client.predict("fashion", images)
            assert result.version == 1
            assert result.probabilities is not None
            np.testing.assert_allclose(result.probabilities, expected, rtol=0, atol=1e-6)
            assert client.health("fashion") == "SERVING" and client.health() == "SERVING"
        statuses = {v.version: v for v in client.list_models().models[0].versions}
        assert statuses[1].state == "READY"
        assert statuses[2].state == statuses[3].state == "FAILED"
        assert "model.onnx" in statuses[2].reason and "model.onnx" in statuses[3].reason
        # A fixed file under the same version is picked up (its signature changed).
        fixed = repo / "fashion" / "2" / ".model.onnx"
        fixed.write_bytes(data)
        fixed.rename(repo / "fashion" / "2" / "model.onnx")
        wait_for("v2 READY", lambda: state_is(proc, 2, "READY"), 30)
        assert client.predict("fashion", images).version == 2
        assert state_is(proc, 3, "FAILED")
    assert proc.proc is not None and proc.proc.returncode == 0


def test_repository_that_vanishes_keeps_what_is_loaded(
    trained_repo: Path, tmp_path: Path, images: np.ndarray
) -> None:
    """The repository folder renamed away (as root, chmod 000 would not stop the server from
    reading it, so the test renames; it also does chmod when not root): the server logs it and
    keeps serving what it has. The model's own folder removed: that model unloads (by design)
    and comes back with its folder."""
    repo = copy_repository(trained_repo, tmp_path / "models")
    away = tmp_path / "elsewhere"
    with ServerProcess(repo, ["--poll-seconds", "0.5"]) as proc, Client(proc.target) as client:
        repo.rename(away)
        wait_for("the unreadable repository in the log", lambda: "unreadable" in proc.logs(), 30)
        assert client.predict("fashion", images).version == 1
        assert client.health() == "SERVING" and state_is(proc, 1, "READY")
        away.rename(repo)
        if os.geteuid() != 0:
            (repo / "fashion").chmod(0)
            try:
                wait_for(
                    "the unreadable folder in the log", lambda: "model folder" in proc.logs(), 60
                )
                assert client.predict("fashion", images).version == 1
            finally:
                (repo / "fashion").chmod(0o755)
        hidden = repo / ".fashion-away"
        (repo / "fashion").rename(hidden)
        wait_for("fashion unloaded", lambda: client.health("fashion") == "NOT_SERVING", 30)
        with pytest.raises(grpc.RpcError) as info:
            client.predict("fashion", images)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert client.health() == "NOT_SERVING"  # no model left to serve
        hidden.rename(repo / "fashion")
        wait_for("fashion back", lambda: client.health("fashion") == "SERVING", 30)
        assert client.predict("fashion", images).version == 1
        assert client.health() == "SERVING"
    assert "model fashion v1 unloaded: removed from the repository" in proc.logs()


# ------------------------------------------------------------------ shutdown and cancellation under load


def _heavy(n: int) -> pb.PredictRequest:
    x = np.full((n, 28, 28, 1), 7, np.uint8)
    return pb.PredictRequest(
        model="fashion",
        images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=x.shape, data=x.tobytes()),
        omit_probabilities=True,
    )


def test_sigterm_under_concurrent_load_drains_then_refuses(
    trained_repo: Path, images: np.ndarray
) -> None:
    """Long Predict calls in flight plus 8 clients hammering small calls (Classify and the Open
    Inference Protocol) when SIGTERM arrives: every call the server had accepted is answered,
    the long calls it had accepted end OK, every other call OK or UNAVAILABLE (refused once the
    server drains; never INTERNAL, and CANCELLED only in gRPC's own race, below), and the process
    exits 0 well within the grace period."""
    grace = 30.0
    # Bounds wide enough that admission control lets every call in: this is about draining.
    bounds = ["--max-queue-images", "1000000", "--max-inflight-mb", "8192"]
    proc = ServerProcess(
        trained_repo, ["--grace-seconds", str(grace), "--max-request-batch", "4096", *bounds]
    ).start()
    heavy = _heavy(4096)
    classify = pb.ClassifyRequest(
        model="fashion",
        images=[
            pb.Image(pixels=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[28, 28], data=bytes(784)))
        ],
    )
    infer = v2.ModelInferRequest(model_name="fashion")
    infer.inputs.add(name="image", datatype="UINT8", shape=images.shape)
    infer.raw_input_contents.append(images.tobytes())
    heavy_codes: list[str] = []
    small_codes: Counter[str] = Counter()
    try:
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.CnnServeStub(channel)
            v2_stub = v2_grpc.GRPCInferenceServiceStub(channel)

            def long_call() -> None:
                try:
                    stub.Predict(heavy, timeout=120)
                    heavy_codes.append("OK")
                except grpc.RpcError as err:
                    heavy_codes.append(err.code().name)

            def hammer(i: int) -> None:
                while True:
                    try:
                        if i % 2:
                            stub.Classify(classify, timeout=60)
                        else:
                            v2_stub.ModelInfer(infer, timeout=60)
                        small_codes["OK"] += 1
                    except grpc.RpcError as err:
                        small_codes[err.code().name] += 1
                        if err.code() == grpc.StatusCode.UNAVAILABLE:
                            return

            stub.Predict(_heavy(1), timeout=60)
            with ThreadPoolExecutor(18) as pool:
                hammers = [pool.submit(hammer, i) for i in range(8)]
                longs = [pool.submit(long_call) for _ in range(10)]
                accepted = wait_for(
                    "5 long calls in flight", partial(predict_inflight, proc, 5), 60
                )
                proc.signal(signal.SIGTERM)
                for f in [*longs, *hammers]:
                    f.result(timeout=120)
        assert proc.proc is not None
        assert proc.proc.wait(grace + 30) == 0
    finally:
        proc.stop()
    assert set(heavy_codes) <= {"OK", "UNAVAILABLE"}, (heavy_codes, proc.logs())
    assert heavy_codes.count("OK") >= accepted, (accepted, heavy_codes)
    # The one exception gRPC itself makes: a small call its core accepts in the instant before
    # the drained server stops ends CANCELLED (grpc/grpc#41785; the server stops only once no
    # call is left in Python). Seen about once in 7,500 calls, at most once per client here.
    assert set(small_codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, small_codes
    assert small_codes["CANCELLED"] <= len(hammers), small_codes
    assert small_codes["OK"] > 0 and small_codes["UNAVAILABLE"] == 8, small_codes
    stopped = [line for line in proc.logs().splitlines() if "stopped in" in line]
    assert stopped and float(stopped[-1].split("stopped in ")[1].rstrip("s")) < grace
    assert "Traceback" not in proc.logs()


def test_cancellations_and_deadlines_under_load_leak_nothing(
    trained_repo: Path, images: np.ndarray, fashion_model: Path
) -> None:
    expected = expected_probabilities(cpu_session(fashion_model), images)
    heavy = _heavy(1024)
    codes: Counter[str] = Counter()
    with ServerProcess(trained_repo) as proc, grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.CnnServeStub(channel)
        classify = pb.ClassifyRequest(
            model="fashion",
            images=[
                pb.Image(
                    pixels=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[28, 28], data=bytes(784))
                )
            ]
            * 64,
        )

        def client(i: int) -> None:
            rng = np.random.default_rng(i)
            for j in range(12):
                request = heavy if j % 3 == 0 else _heavy(int(rng.integers(1, 64)))
                try:
                    if j % 4 == 0:  # cancelled by the client after a moment
                        future = stub.Predict.future(request, timeout=30)
                        time.sleep(float(rng.uniform(0, 0.02)))
                        future.cancel()
                        future.result(timeout=30)
                    elif j % 4 == 1:
                        stub.Classify(classify, timeout=float(rng.uniform(0.001, 0.05)))
                    else:
                        stub.Predict(request, timeout=float(rng.uniform(0.001, 0.2)))
                    codes["OK"] += 1
                except grpc.FutureCancelledError:
                    codes["CANCELLED"] += 1
                except grpc.RpcError as err:
                    codes[err.code().name] += 1

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(client, range(16)))
        # UNAVAILABLE: refused by admission control when 16 clients fill the queue.
        assert set(codes) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE"}, codes
        assert codes["DEADLINE_EXCEEDED"] and codes["CANCELLED"], codes
        wait_for("no call in flight", lambda: inflight(proc) == 0, 30)
        # Nor any request data still counted against the budget.
        wait_for("no bytes held", lambda: metric_or_none(proc, "cnnserve_inflight_bytes") == 0, 30)
        with Client(proc.target) as good:
            result = good.predict("fashion", images)
        assert result.probabilities is not None
        np.testing.assert_allclose(result.probabilities, expected, rtol=0, atol=1e-6)
        assert inflight(proc) == 0
        answered = scrape(proc.metrics_port).by("cnnserve_requests_total", "code")
        assert not {code for (code,) in answered} & {"INTERNAL", "UNKNOWN"}, answered
    logs = proc.logs()
    for leak in ("Traceback", "Task was destroyed", "never retrieved", "still running at unload"):
        assert leak not in logs, logs


# ------------------------------------------------------------------ a model that fails inside ONNX Runtime


def write_poisoned_model(path: Path) -> Path:
    """A real 4x4x1 -> 3 classifier whose graph also gathers from its bias at an index computed
    from the input: ReduceMax(image) * 1000. Zeros (the warm-up) gather index 0; any image
    with a bright pixel asks for index ~1000 of 3, and ONNX Runtime's Gather raises."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.5, (16, 3)).astype(np.float32)
    bias = rng.normal(0, 0.1, 3).astype(np.float32)
    const = numpy_helper.from_array
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits0"]),
        helper.make_node("ReduceMax", ["image"], ["peak"], keepdims=0),
        helper.make_node("Mul", ["peak", "thousand"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["B", "index"], ["picked"], axis=0),
        helper.make_node("Mul", ["picked", "zero"], ["nothing"]),
        helper.make_node("Add", ["logits0", "nothing"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "poisoned",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4, 4, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        [
            const(weights, "W"),
            const(bias, "B"),
            const(np.array(1000.0, np.float32), "thousand"),
            const(np.array(0.0, np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(
        model,
        {
            "dataset": "poison",
            "class_names": json.dumps(["a", "b", "c"]),
            "input_scale": repr(1 / 255),
        },
    )
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def test_runtime_exception_is_internal_for_that_call_only(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_poisoned_model(repo / "poison" / "1" / "model.onnx")
    dark = np.zeros((1, 4, 4, 1), np.uint8)
    bright = np.full((1, 4, 4, 1), 255, np.uint8)
    with (
        ServerProcess(repo, ["--max-queue-delay-ms", "200"]) as proc,
        Client(proc.target) as client,
    ):
        assert client.predict("poison", dark).version == 1
        with pytest.raises(grpc.RpcError) as info:
            client.predict("poison", bright)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        message = info.value.details() or ""
        assert message.startswith("internal error in Predict: ") and "Gather" in message, message
        infer = v2.ModelInferRequest(model_name="poison")
        infer.inputs.add(name="image", datatype="UINT8", shape=[1, 4, 4, 1])
        infer.raw_input_contents.append(bright.tobytes())
        with grpc.insecure_channel(proc.target) as channel, pytest.raises(grpc.RpcError) as v2_info:
            v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer, timeout=30)
        assert v2_info.value.code() == grpc.StatusCode.INTERNAL
        assert "internal error in ModelInfer" in (v2_info.value.details() or "")

        # Batched together (200 ms to fill a batch), the poisoned calls fail alone: the good
        # ones beside them are answered.
        def call(x: np.ndarray) -> str:
            try:
                client.predict("poison", x)
                return "OK"
            except grpc.RpcError as err:
                return err.code().name

        with ThreadPoolExecutor(25) as pool:
            # Good calls alone do batch at this concurrency (only successful runs are counted).
            assert list(pool.map(call, [dark] * 25)) == ["OK"] * 25
            sizes = metric_or_none(proc, "cnnserve_batch_size_sum", model="poison", version="1")
            runs = metric_or_none(proc, "cnnserve_batch_size_count", model="poison", version="1")
            assert sizes is not None and runs is not None and sizes > runs
            batch = [bright if i % 5 == 0 else dark for i in range(25)]
            results = list(pool.map(call, batch))
        assert results == ["INTERNAL" if i % 5 == 0 else "OK" for i in range(25)], results
        assert client.health("poison") == "SERVING"
        assert client.predict("poison", dark).version == 1
        internal = metric_or_none(
            proc,
            "cnnserve_requests_total",
            model="poison",
            version="1",
            method="Predict",
            code="INTERNAL",
        )
        assert internal == 6
    assert proc.proc is not None and proc.proc.returncode == 0
    assert "Predict poison failed" in proc.logs()  # logged with its traceback
    shutil.rmtree(repo)
