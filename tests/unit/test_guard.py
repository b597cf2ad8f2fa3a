"""serving.grpc.guard's log filter: gRPC's traceback for a status sent to a client that had gone."""

from __future__ import annotations

import logging

import pytest


def test_a_status_sent_to_a_gone_client_is_a_debug_line_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """gRPC's own log line for a status it could not send to a client that had just gone
    (grpc.aio's race between the client's cancel and the server's abort) is demoted to debug;
    other errors of that logger stay."""
    from grpc._cython import cygrpc  # type: ignore[attr-defined]

    import serving.grpc.guard  # noqa: F401  (installs the filter)

    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    with caplog.at_level(logging.DEBUG):
        try:
            raise cygrpc.ExecuteBatchError("Failed execute_batch")
        except cygrpc.ExecuteBatchError:
            grpc_log.exception("ExecuteBatchError raised in core by servicer method [/x/Predict]")
        grpc_log.error("something else")
    by_level = {(r.name, r.levelname, r.getMessage()) for r in caplog.records}
    assert ("grpc._cython.cygrpc", "ERROR", "something else") in by_level
    assert not any(r.exc_info for r in caplog.records)
    assert any(
        r.levelname == "DEBUG" and "the client had gone" in r.getMessage() for r in caplog.records
    )
