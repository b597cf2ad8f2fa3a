"""Serving pieces on their own: config, codec, images, top-k, batcher, runtime, repository."""

from __future__ import annotations

import asyncio
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import write_tiny_model
from serving import config
from serving.core import images
from serving.core.batching import Batcher
from serving.core.dataplane import DataPlane, Limits, top_k
from serving.core.repository import BatchingOptions, ModelRepository, State
from serving.core.runtime import (
    ModelLoadError,
    ModelRuntime,
    RuntimeOptions,
    resolve_providers,
    run_in_fixed_batches,
)
from serving.core.summary import summarize
from serving.cores import available_cores, cpu_quota
from serving.errors import InvalidArgument, NotFound, Unavailable
from serving.grpc import cnnserve_messages as codec
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.tensors import TensorError


def test_config_precedence_flag_env_default() -> None:
    s = config.load(["--port", "7000"], {"CNNSERVE_PORT": "9", "CNNSERVE_MAX_BATCH_SIZE": "8"})
    assert s.port == 7000 and s.max_batch_size == 8 and s.metrics_port == 8002
    assert config.load([], {"CNNSERVE_BATCHING": "false"}).batching is False


def test_config_errors_name_the_variable() -> None:
    with pytest.raises(config.ConfigError, match="CNNSERVE_PORT='x'"):
        config.load([], {"CNNSERVE_PORT": "x"})
    with pytest.raises(config.ConfigError, match="CNNSERVE_PROVIDER='tpu': allowed cpu, cuda"):
        config.load([], {"CNNSERVE_PROVIDER": "tpu"})
    with pytest.raises(config.ConfigError, match="--max-batch-size"):
        config.load(["--max-batch-size", "0"], {})


TENSOR_REFUSALS = (InvalidArgument, TensorError)


def test_codec_decodes_without_copy_and_checks_lengths() -> None:
    # A tensor's own dtype, shape and bytes are checked in serving.tensors (TensorError, which
    # the API layer answers as INVALID_ARGUMENT); the protocol's dtype names in the codec.
    x = np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)
    t = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=x.shape, data=x.tobytes())
    assert np.array_equal(codec.decode_tensor(t), x)
    t.data = t.data[:-1]
    with pytest.raises(TENSOR_REFUSALS, match=r"needs 72 bytes, received 71"):
        codec.decode_tensor(t)
    with pytest.raises(TENSOR_REFUSALS, match="DATA_TYPE_UNSPECIFIED not accepted"):
        codec.decode_tensor(pb.Tensor(shape=[1], data=b"\0"))
    with pytest.raises(TENSOR_REFUSALS, match="negative"):
        codec.decode_tensor(pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[-1, 2], data=b""))
    with pytest.raises(TENSOR_REFUSALS, match="rank 0"):
        codec.decode_tensor(pb.Tensor(dtype=pb.DATA_TYPE_UINT8, data=b""))


def test_codec_roundtrip_encode() -> None:
    y = np.random.default_rng(0).random((4, 10), dtype=np.float32)
    t = codec.encode_tensor(y)
    assert list(t.shape) == [4, 10] and np.array_equal(codec.decode_tensor(t, "probabilities"), y)


def test_top_k_orders_best_first() -> None:
    p = np.array([[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.05, 0.15]], dtype=np.float32)
    top = top_k(p, 3)
    assert top.indices.tolist() == [[1, 2, 0], [0, 3, 1]] or top.indices.tolist() == [
        [1, 2, 3],
        [0, 3, 1],
    ]
    assert top.scores[0, 0] == pytest.approx(0.5)
    assert top_k(p, 99).indices.shape == (2, 4)
    assert top_k(p, 1).indices.tolist() == [[1], [0]]


def _png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_images_convert_channels_and_size() -> None:
    rgb = np.zeros((40, 30, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    img = images.open_encoded(_png(rgb, "RGB"), 0, 10_000)
    out = images.fit(img, (28, 28, 1))
    assert out.shape == (28, 28, 1) and out.dtype == np.uint8
    assert int(out[0, 0, 0]) == 76  # ITU-R 601 luma of pure red
    gray = images.fit(images.from_pixels(np.full((28, 28), 9, np.uint8), 0), (32, 32, 3))
    assert gray.shape == (32, 32, 3) and set(np.unique(gray)) == {9}


def test_images_refuse_garbage_bombs_and_empties() -> None:
    with pytest.raises(InvalidArgument, match="image 3: cannot decode"):
        images.open_encoded(b"not an image at all", 3, 10_000)
    with pytest.raises(InvalidArgument, match="image 0: empty"):
        images.open_encoded(b"", 0, 10_000)
    big = _png(np.zeros((200, 200), np.uint8), "L")
    with pytest.raises(InvalidArgument, match=r"image 1: 200x200 = 40,000 pixels, over the limit"):
        images.open_encoded(big, 1, 10_000)
    truncated = _png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), "L")[:200]
    with pytest.raises(InvalidArgument, match="image 2"):
        images.open_encoded(truncated, 2, 10_000)


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2, limits.cpu: 2
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 cores: rounded up
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_cpu_quota_reads_the_container_limit(
    tmp_path: Path, files: dict[str, str], cores: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == cores


def test_available_cores_is_within_the_affinity() -> None:
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


def test_runtime_contract_and_fallback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_tiny_model(tmp_path / "m.onnx")
    rt = ModelRuntime(path, RuntimeOptions(provider="cpu", warmup_batch_sizes=(1, 2, 3)))
    assert rt.info.input_shape == (4, 4, 1) and rt.info.num_classes == 3
    assert rt.info.class_names == ["class0", "class1", "class2"]
    x = np.full((2, 4, 4, 1), 255, np.uint8)
    assert np.array_equal(rt.prepare(x), np.ones((2, 4, 4, 1), np.float32))
    assert rt.run(rt.prepare(x)).shape == (2, 3)
    assert resolve_providers("cuda") == ["CPUExecutionProvider"]
    assert "falling back to cpu" in caplog.text


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 11])
def test_fixed_batches_pad_and_split_without_changing_rows(tmp_path: Path, n: int) -> None:
    """What the CUDA path does (run_in_fixed_batches), checked on the CPU: every run the
    session sees has exactly 4 images, and each caller's row comes back unchanged."""
    rt = ModelRuntime(write_tiny_model(tmp_path / "m.onnx"), RuntimeOptions(provider="cpu"))
    assert rt.fixed_batch == 0  # only CUDA pads
    x = np.random.default_rng(n).random((n, 4, 4, 1), dtype=np.float32)
    seen: list[tuple[int, ...]] = []

    def run(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.shape)
        return rt.run(batch)

    got = run_in_fixed_batches(run, x, 4)
    assert seen == [(4, 4, 4, 1)] * -(-n // 4)
    np.testing.assert_allclose(got, rt.run(x), rtol=0, atol=1e-7)


def test_runtime_refuses_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelLoadError, match=r"bad\.onnx"):
        ModelRuntime(bad, RuntimeOptions())


def test_summary_of_a_plain_dense_graph(tmp_path: Path) -> None:
    s = summarize(write_tiny_model(tmp_path / "m.onnx"))
    assert [(layer.kind, layer.parameters) for layer in s.layers] == [("Flatten", 0), ("Dense", 51)]
    assert s.layers[1].formula == "(16 + 1) * 3 = 51" and s.layers[1].activation == "softmax"
    assert s.dense_neuron_parameters == 17


async def test_batcher_coalesces_concurrent_requests() -> None:
    sizes: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        out: np.ndarray = x.reshape(len(x), -1).sum(axis=1, keepdims=True).astype(np.float32)
        return out

    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(run, pool, max_batch_size=8, max_delay_s=0.05)
        inputs = [np.full((1, 2), i, np.float32) for i in range(8)]
        outs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.close()
    assert [float(o[0, 0]) for o in outs] == [2.0 * i for i in range(8)]
    assert sizes == [8]


async def test_batcher_cuts_a_request_where_a_batch_is_full_and_skips_cancelled() -> None:
    sizes: list[int] = []
    gate = asyncio.Event()

    def run(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        return x[:, :1].copy()

    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(run, pool, max_batch_size=4, max_delay_s=0.0)
        a = asyncio.ensure_future(batcher.submit(np.ones((3, 1), np.float32)))
        b = asyncio.ensure_future(batcher.submit(np.ones((3, 1), np.float32) * 2))
        c = asyncio.ensure_future(batcher.submit(np.ones((1, 1), np.float32) * 3))
        c.cancel()
        gate.set()
        ra, rb = await asyncio.gather(a, b)
        await batcher.close()
    assert ra.tolist() == [[1.0]] * 3 and rb.tolist() == [[2.0]] * 3
    assert sizes == [4, 2]  # 3 + 3 > 4: b's first row fills the first run; c never ran


async def _repo(root: Path, **kw: object) -> ModelRepository:
    return ModelRepository(
        root,
        runtime_options=RuntimeOptions(warmup_batch_sizes=(1,)),
        batching=BatchingOptions(enabled=True, max_batch_size=8),
        executor=ThreadPoolExecutor(2),
        **kw,  # type: ignore[arg-type]
    )


async def test_repository_versions_reload_and_refusal(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "tiny" / "1" / "model.onnx", seed=1)
    states: list[tuple[str, int, State]] = []
    loading: list[str] = []

    def on_state(name: str, version: int, state: State, _: float) -> None:
        states.append((name, version, state))
        if state is State.LOADING and version == 1:
            # Checked at the moment loading begins: a tiny model loads in about a millisecond.
            try:
                repo.get("tiny")
            except Unavailable as exc:
                loading.append(str(exc))

    repo = await _repo(tmp_path, on_state=on_state)
    await repo.scan()
    assert loading and "no version ready yet" in loading[0]
    assert repo.get("tiny").version == 1
    with pytest.raises(NotFound, match="available models: tiny"):
        repo.get("other")

    write_tiny_model(tmp_path / "tiny" / "2" / "model.onnx", seed=2)
    await repo.scan()
    assert repo.get("tiny").version == 2 and repo.get("tiny", 1).version == 1

    (tmp_path / "tiny" / "3").mkdir()
    (tmp_path / "tiny" / "3" / "model.onnx").write_bytes(b"corrupt")
    await repo.scan()
    assert repo.get("tiny").version == 2  # the refused version never replaces the serving one
    status = {s.version: s for s in repo.statuses()["tiny"]}
    assert status[3].state is State.FAILED and "model.onnx" in status[3].reason
    with pytest.raises(NotFound, match="version 3 failed"):
        repo.get("tiny", 3)
    await repo.close()


async def test_data_plane_validates_shapes_and_limits(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "tiny" / "1" / "model.onnx")
    repo = await _repo(tmp_path)
    await repo.scan()
    plane = DataPlane(repo, Limits(max_request_batch=4, max_image_pixels=1000))
    served = plane.resolve("tiny")
    with pytest.raises(InvalidArgument, match=r"\[2, 5, 4, 1\] .* expected \[N, 4, 4, 1\]"):
        await plane.predict(served, np.zeros((2, 5, 4, 1), np.uint8))
    with pytest.raises(InvalidArgument, match="batch of 5 images is over the limit of 4"):
        await plane.predict(served, np.zeros((5, 4, 4, 1), np.uint8))
    with pytest.raises(InvalidArgument, match="empty batch"):
        await plane.predict(served, np.zeros((0, 4, 4, 1), np.uint8))
    with pytest.raises(InvalidArgument, match="NaN"):
        await plane.predict(served, np.full((1, 4, 4, 1), np.nan, np.float32))
    out = await plane.predict(served, np.zeros((3, 4, 4, 1), np.uint8), top=2)
    assert out.probabilities.shape == (3, 3) and np.allclose(out.probabilities.sum(axis=1), 1.0)
    assert out.top is not None and out.top.indices.shape == (3, 2)
    assert (await plane.predict(served, np.zeros((1, 4, 4, 1), np.uint8))).top is None
    with pytest.raises(InvalidArgument, match="version must be >= 0"):
        plane.resolve("tiny", -1)
    await repo.close()
