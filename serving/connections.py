"""The process's connections: one budget from its open-file limit, shared out between the ports.

Every connection holds a file descriptor, and so do model files, the /metrics endpoint, logs
and ONNX Runtime. Left alone, one port's clients can take every descriptor the process may
open: then the other port cannot accept, the model repository cannot be read and the accept
loop fails (and logs) as fast as it is woken. So the budget is the open-file limit less a
reserve for everything that is not a connection, split between the gRPC and REST ports; a
port beyond its share closes a new connection as soon as it has accepted it.

Nothing here knows a protocol: `Share` counts one port's connections, `Acceptor` is an accept
loop over a listening socket that refuses beyond the share, backs off when the process is out
of descriptors anyway, and logs both at most once per interval (`Throttled`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Descriptors kept back from connections: model files being read (ONNX Runtime maps each one
# while it loads), the repository scan, /metrics and its clients, logs, gRPC's and the event
# loop's own wake-up descriptors, and the interpreter's. An idle server holds about 60.
RESERVED_FILES = 256
UNLIMITED = 1 << 20  # the budget when the open-file limit is infinite
MIN_SHARE = 16  # a port gets at least this many from the limit, however small it is
LOG_INTERVAL_S = 10.0
# After accept() failed for want of descriptors: the pending connection stays in the backlog,
# so the listening socket stays readable; wait this long before trying again (asyncio's own
# delay) rather than spin.
ACCEPT_RETRY_S = 1.0
OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPTS_PER_WAKEUP = 32  # then the loop turns: under a flood gRPC calls wait behind 32 new
# connections, not 128 (a health check over TLS took 1.6 s with 128 a turn, 0.3 s with 16;
# fewer a turn drain a backlog, where new REST clients wait, more slowly)
EVICTION_SCAN = 64


def open_file_limit() -> int | None:
    """The soft RLIMIT_NOFILE of this process, or None when it has none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


@dataclass(frozen=True)
class Budget:
    """Connections the process may hold at once, and each port's share of them."""

    total: int
    grpc: int
    http: int  # 0 when the REST port is off

    @classmethod
    def of(cls, max_connections: int, http: bool, limit: int | None) -> Budget:
        """`max_connections` (0: derived) bounded by what `limit` open files leave after the
        reserve; split evenly when both ports listen, so neither can starve the other."""
        allowed = UNLIMITED if limit is None else max(2 * MIN_SHARE, limit - RESERVED_FILES)
        total = min(max_connections, allowed) if max_connections else allowed
        if not http:
            return cls(total, total, 0)
        http_share = max(1, total // 2)
        return cls(total, max(1, total - http_share), http_share)


class Throttled:
    """A log line at most once per interval; the ones held back are counted in the next."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._last = -float("inf")
        self._held_back = 0

    def log(self, level: int, message: str, *args: object) -> bool:
        """Logs `message` (with how many were held back since the last line) or counts it."""
        now = self.clock()
        if now - self._last < self.interval_s:
            self._held_back += 1
            return False
        if self._held_back:
            message += f" ({self._held_back} more like it in the last {now - self._last:.0f} s)"
        self.logger.log(level, message, *args)
        self._last = now
        self._held_back = 0
        return True


class Lease:
    """One accepted connection's place in its port's share, given back once.

    Its owner says whether the connection is idle (`idle`: no request under way, so closing
    it loses nothing a client would not retry) and how to close it (`evict`); a full share
    closes its oldest idle connection to take a new one in."""

    __slots__ = ("_share", "evict", "idle")

    def __init__(self, share: Share) -> None:
        self._share: Share | None = share
        self.idle: Callable[[], bool] = _never
        self.evict: Callable[[], object] = _nothing

    def release(self) -> None:
        share, self._share = self._share, None
        if share is not None:
            share.held -= 1
            share._leases.pop(self, None)


def _never() -> bool:
    return False


def _nothing() -> None:
    pass


class Share:
    """One port's share of the budget: the connections open now, oldest first.

    When it is full, a new connection takes the place of the oldest idle one (one waiting for
    its TLS handshake, its request head, or its next request): a flood of connections that
    say nothing then only ever holds the share for a while, and a client whose request comes
    at once is still served. Only a share full of requests under way refuses."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.held = 0
        self.evictions = 0
        self._leases: dict[Lease, None] = {}  # insertion-ordered: the oldest first

    def take(self) -> Lease | None:
        if self.held >= self.limit and not self._evict_one():
            return None
        self.held += 1
        lease = Lease(self)
        self._leases[lease] = None
        return lease

    def _evict_one(self) -> bool:
        """Close the oldest idle connection, looking at no more than EVICTION_SCAN of them
        (the busy ones seen go to the back, so repeated scans move on): bounded work for each
        connection accepted, however large the share."""
        for _ in range(min(EVICTION_SCAN, len(self._leases))):
            lease = next(iter(self._leases))
            if lease.idle():
                evict = lease.evict
                lease.release()
                evict()
                self.evictions += 1
                return True
            del self._leases[lease]
            self._leases[lease] = None
        return False

    def get(self) -> float:  # for a gauge read at scrape time
        return float(self.held)


def close_now(sock: socket.socket) -> None:
    """Close with a reset: the client learns at once, and no TIME_WAIT is left here."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A non-blocking listening TCP socket on host:port (IPv6 when host has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server(
        (host, port), family=family, backlog=socket.SOMAXCONN, reuse_port=reuse_port
    )
    sock.setblocking(False)
    return sock


class Acceptor:
    """An accept loop on the event loop: each connection within the share goes to `serve`
    with its lease (which `serve` must release when the connection ends); one beyond it is
    closed at once, unless an idle one can make room, and reported to `on_refused` (with the
    reason: "limit", "evicted", "accept_error")."""

    def __init__(
        self,
        sock: socket.socket,
        share: Share,
        serve: Callable[[socket.socket, Lease], None],
        on_refused: Callable[[str], None],
    ) -> None:
        self.sock = sock
        self.share = share
        self._serve = serve
        self._on_refused = on_refused
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._refusals = Throttled(log)
        self._failures = Throttled(log)
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._accept)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_FILES:
                    self._out_of_files(exc)
                    return
                continue  # ECONNABORTED and the like: that client is gone, take the next
            evictions = self.share.evictions
            lease = self.share.take()
            if self.share.evictions != evictions:
                self._on_refused("evicted")
                self._refusals.log(
                    logging.WARNING,
                    "%s port: %d connections open, its share of the budget; closing the oldest "
                    "idle ones to take new ones in (--max-connections)",
                    self.share.name,
                    self.share.limit,
                )
            if lease is None:
                close_now(conn)
                self._on_refused("limit")
                self._refusals.log(
                    logging.WARNING,
                    "%s port: %d connections open, its share of the budget; closing new ones "
                    "at once (--max-connections)",
                    self.share.name,
                    self.share.limit,
                )
                continue
            conn.setblocking(False)
            try:
                self._serve(conn, lease)
            except Exception:
                lease.release()
                close_now(conn)
                log.exception("%s port: cannot serve a new connection", self.share.name)

    def _out_of_files(self, exc: OSError) -> None:
        """Stop accepting for a while; the pending connections wait in the kernel's backlog."""
        self._on_refused("accept_error")
        self._failures.log(
            logging.ERROR,
            "%s port: accept() failed (%s) with %d connections of this port open; retrying in "
            "%.0f s",
            self.share.name,
            exc.strerror,
            self.share.held,
            ACCEPT_RETRY_S,
        )
        self._loop.remove_reader(self.sock.fileno())
        self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._accept)
            self._accept()

    def close(self) -> None:
        """Stop accepting and close the listening socket (open connections stay)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
