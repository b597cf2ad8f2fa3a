"""A short soak (harness/soak.py; `make soak` runs 5 minutes): mixed valid and invalid traffic
at concurrency 32 against the real server, with streams on both streaming methods beside it.
Zero unexpected outcomes, zero lost responses (a message on a stream included), and the
server's resident memory after the warm-up grows less than 10% by the end."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from harness import ServerProcess, scrape
from harness.fuzz import STREAM_INFER, STREAM_PREDICT, Code
from harness.soak import MAX_GROWTH, soak
from harness.soak_traffic import Traffic

pytestmark = pytest.mark.slow

MESSAGE_MB = 2


def test_short_soak_mixed_traffic(trained_repo: Path) -> None:
    with ServerProcess(trained_repo, ["--max-message-mb", str(MESSAGE_MB)]) as proc:
        assert proc.proc is not None
        traffic = Traffic(
            "fashion", trained_repo / "fashion" / "1" / "model.onnx", MESSAGE_MB << 20
        )
        result = asyncio.run(
            soak(proc.target, traffic, pid=proc.proc.pid, seconds=15, warmup=5, concurrency=32)
        )
        print(result.summary())
        assert result.sent == result.answered > 1000, result.summary()
        assert result.lost == 0 and not result.unexpected, result.summary()
        assert result.growth < MAX_GROWTH, result.summary()
        kinds = {kind for kind, _ in result.outcomes}
        assert {"predict", "infer_v2", "classify", "bomb", "garbage", "oversized"} <= kinds
        streamed = {
            "PredictStream/predict",
            "PredictStream/garbage",
            "PredictStream/nan",
            "PredictStream/unknown_model",
            "ModelStreamInfer/infer_v2",
            "ModelStreamInfer/garbage_v2",
            "ModelStreamInfer/bad_shape_v2",
        }
        assert streamed <= kinds, kinds
        assert {method for method, _ in result.streams} == {"PredictStream", "ModelStreamInfer"}
        assert {code for _, code in result.streams} == {"OK"}, result.summary()
        stream_answers = sum(n for (k, _), n in result.outcomes.items() if "/" in k)
        assert stream_answers > 500, result.summary()
        metrics = scrape(proc.metrics_port)
        inflight = [
            s.value
            for name in ("cnnserve_inflight_requests", "cnnserve_inflight_streams")
            for s in metrics.matching(name)
        ]
        assert inflight and not any(inflight)
        calls = metrics.by("cnnserve_requests_total", "method", "code")
        assert not {code for _, code in calls} & {"INTERNAL", "UNKNOWN"}, calls
        assert {"PredictStream", "ModelStreamInfer"} <= {method for method, _ in calls}

        # The checks themselves: streams whose expectations are wrong are counted unexpected.
        for method in (STREAM_PREDICT, STREAM_INFER):
            valid, invalid = traffic.stream[method]
            traffic.stream[method] = (
                [dataclasses.replace(valid[0], check=lambda data: False)],
                [dataclasses.replace(m, expect=Code.OK) for m in invalid],
            )
        sabotaged = asyncio.run(
            soak(
                proc.target,
                traffic,
                pid=None,
                seconds=2,
                warmup=1,
                concurrency=0,
                stream_workers=2,
                stream_messages=8,
            )
        )
        labels = set(sabotaged.unexpected)
        assert {
            "PredictStream/predict: OK (wrong answer)",
            "ModelStreamInfer/infer_v2: OK (wrong answer)",
        } <= labels, labels
        assert "PredictStream/nan: INVALID_ARGUMENT" in labels, labels
        assert not sabotaged.passed
    assert proc.proc.returncode == 0
    assert "Traceback" not in proc.logs()
