"""A short soak (bench/soak.py; `make soak` runs 5 minutes): mixed valid and invalid traffic
at concurrency 32 against the real server. Zero unexpected outcomes, zero lost responses, and
the server's resident memory after the warm-up grows less than 10% by the end."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest

from bench.soak import MAX_GROWTH, Traffic, soak
from tests.support import ServerProcess

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
        url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        inflight = [
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("cnnserve_inflight_requests{")
        ]
        assert inflight and not any(inflight)
        assert 'code="INTERNAL"' not in text and 'code="UNKNOWN"' not in text
    assert proc.proc.returncode == 0
    assert "Traceback" not in proc.logs()
