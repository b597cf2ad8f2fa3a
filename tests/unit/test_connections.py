"""The connection budget's arithmetic, a share's eviction order, the throttled log, and the
aiohttp internals the REST port's head deadline reads."""

from __future__ import annotations

import functools
import logging

import pytest
from aiohttp.web_protocol import RequestHandler

from serving.connections import EVICTION_SCAN, RESERVED_FILES, UNLIMITED, Budget, Share, Throttled


def test_the_budget_is_the_open_file_limit_less_the_reserve_split_between_the_ports() -> None:
    assert Budget.of(0, True, 2048) == Budget(2048 - RESERVED_FILES, 896, 896)
    assert Budget.of(0, False, 2048) == Budget(1792, 1792, 0)
    assert Budget.of(0, True, None).total == UNLIMITED
    assert Budget.of(100, True, 2048) == Budget(100, 50, 50)  # --max-connections, as given
    assert Budget.of(5000, True, 2048).total == 1792  # never past what the limit allows
    assert Budget.of(4, False, 2048).grpc == 4
    assert Budget.of(0, True, 100).total == 32  # a tiny limit still takes connections


def test_a_full_share_evicts_its_oldest_idle_connection() -> None:
    share = Share("REST", 3)
    leases = [lease for _ in range(3) if (lease := share.take()) is not None]
    assert len(leases) == 3
    evicted: list[int] = []
    for i, lease in enumerate(leases):
        lease.idle = (lambda: False) if i == 0 else (lambda: True)  # the oldest is in a request
        lease.evict = functools.partial(evicted.append, i)
    assert share.take() is not None and evicted == [1]
    assert share.held == 3 and share.evictions == 1
    leases[1].release()  # given back twice (evicted, then its connection lost): counted once
    assert share.held == 3
    busy = Share("REST", EVICTION_SCAN + 1)
    for _ in range(EVICTION_SCAN + 1):
        assert busy.take() is not None  # never idle: nothing to evict
    assert busy.take() is None and busy.held == EVICTION_SCAN + 1


def test_throttled_logs_once_per_interval_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttled = Throttled(logging.getLogger("t"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for t in range(25):
            now[0] = float(t)
            throttled.log(logging.WARNING, "full")
    assert [r.getMessage() for r in caplog.records] == [
        "full",
        "full (9 more like it in the last 10 s)",
        "full (9 more like it in the last 10 s)",
    ]


def test_aiohttp_still_has_what_the_head_deadline_reads() -> None:
    """serving.rest.site reads these of aiohttp's handler; an upgrade that renames them must
    fail here, not leave slow clients unbounded."""
    for name in ("_messages", "_request_in_progress", "_force_close", "_loop"):
        assert name in RequestHandler.__slots__ or any(
            name in getattr(base, "__slots__", ()) for base in RequestHandler.__mro__
        ), name
