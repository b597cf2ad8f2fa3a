"""serving.config: flags over environment over defaults, and errors that name what was wrong."""

from __future__ import annotations

import pytest

from serving import config


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
