"""serving.metrics: model states through a real repository's lifecycle, cached call children, and
docs/metrics.md naming every metric registered."""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from harness import write_tiny_model
from serving.core.repository import BatchingOptions, ModelRepository, State
from serving.core.runtime import RuntimeOptions
from serving.metrics import Metrics


def states(metrics: Metrics, model: str, version: str) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        s.labels["state"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "cnnserve_model_state"
        for s in f.samples
        if s.labels["model"] == model and s.labels["version"] == version
    }


async def test_model_state_follows_load_refusal_and_removal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    write_tiny_model(tmp_path / "tiny" / "1" / "model.onnx")
    broken = tmp_path / "tiny" / "2" / "model.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not onnx")

    def on_state(name: str, version: int, state: State, seconds: float) -> None:
        metrics.set_state(name, version, state.value, seconds, 1_700_000_000.0)

    with ThreadPoolExecutor(2) as executor:
        repo = ModelRepository(
            tmp_path,
            runtime_options=RuntimeOptions(warmup_batch_sizes=(1,)),
            batching=BatchingOptions(),
            executor=executor,
            observer_for=metrics.observer_for,
            on_state=on_state,
        )
        with caplog.at_level(logging.INFO, logger="serving.core.repository"):
            await repo.scan()
            assert states(metrics, "tiny", "1")["READY"] == 1
            assert states(metrics, "tiny", "2") == {
                "LOADING": 0,
                "READY": 0,
                "FAILED": 1,
                "UNLOADED": 0,
            }
            # The refused file goes away: the version no longer reports a failure.
            broken.unlink()
            await repo.scan()
            assert states(metrics, "tiny", "2")["FAILED"] == 0
            assert states(metrics, "tiny", "2")["UNLOADED"] == 1
            assert states(metrics, "tiny", "1")["READY"] == 1
        await repo.close()

    events = {getattr(r, "event", None): r for r in caplog.records}
    refused = events["model_refused"]
    assert refused.levelno == logging.ERROR and not refused.exc_info
    assert "refused after" in refused.getMessage()
    assert events["model_ready"].__dict__["provider"] == "CPUExecutionProvider"
    assert "model_forgotten" in events
    # No `_created` series: only what the dashboard and docs/metrics.md name.
    assert "_created" not in generate_latest(metrics.registry).decode()


def test_count_call_reuses_labelled_children() -> None:
    m = Metrics()
    for _ in range(3):
        m.count_call("mnist", "1", "Predict", "OK", 0.001)
    m.count_call("mnist", "1", "Predict", "INVALID_ARGUMENT", 0.002)
    assert (
        m.registry.get_sample_value(
            "cnnserve_requests_total",
            {
                "model": "mnist",
                "version": "1",
                "method": "Predict",
                "code": "OK",
                "protocol": "grpc",
            },
        )
        == 3
    )
    assert (
        m.registry.get_sample_value(
            "cnnserve_request_duration_seconds_count",
            {"model": "mnist", "method": "Predict", "protocol": "grpc"},
        )
        == 4
    )
    inflight = m.inflight_for("Predict")
    assert inflight is m.inflight_for("Predict")
    inflight.inc()
    inflight.inc()
    inflight.dec()
    assert m.registry.get_sample_value("cnnserve_inflight_requests", {"method": "Predict"}) == 1
    assert len(m._call_children) == 2


def test_every_metric_of_ours_is_documented() -> None:
    """docs/metrics.md names every cnnserve_* family the server registers (a new metric goes
    into metrics.py and docs/metrics.md together), and nothing that no longer exists."""
    from harness import ROOT

    docs = (ROOT / "docs" / "metrics.md").read_text()
    ours = {
        family.name
        for family in Metrics().registry.collect()
        if family.name.startswith("cnnserve_")
    }
    assert ours, "no cnnserve_ metric registered"
    missing = {name for name in ours if name not in docs}
    assert not missing, f"not in docs/metrics.md: {sorted(missing)}"
    documented = set(re.findall(r"cnnserve_[a-z_]+[a-z]", docs))
    suffixes = ("_total", "_bucket", "_count", "_sum", "_created")
    stale = {
        name
        for name in documented
        if name not in ours and not any(name.removesuffix(s) in ours for s in suffixes)
    }
    assert not stale, f"documented but not registered: {sorted(stale)}"
