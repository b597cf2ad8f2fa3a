"""serving.logs: the JSON formatter's fields and exceptions."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from serving import logs


def test_json_formatter_writes_extra_fields_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("tests.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("model %s ready", "m", extra={"event": "model_ready", "path": Path("/x")})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "model m ready" and first["level"] == "warning"
    assert (first["event"], first["path"]) == ("model_ready", "/x")
    assert "args" not in first and "msg" not in first
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]
