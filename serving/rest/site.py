"""The REST port's listening side: our accept loop (the process's connection budget) under
aiohttp's HTTP/1.1 handler, and a deadline for each request head, which aiohttp lacks.

aiohttp's own site (`web.TCPSite`) accepts through asyncio's accept loop, which takes every
connection it can and, once the process is out of file descriptors, logs an error each time
it is woken (millions of lines under a flood). Here `connections.Acceptor` accepts instead:
within the port's share a connection goes to aiohttp (through asyncio's TLS when configured),
beyond it it is closed at once.

The head deadline: a new connection must deliver its TLS handshake and its first request head
within `head_timeout_s` of being accepted; on a kept-alive connection, the next head must be
complete within `head_timeout_s` of its first byte (a connection idle between requests is
aiohttp's keep-alive timeout's business). A body is bounded by the handlers' read timeout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from serving.connections import Acceptor, Lease, Share, close_now, listen

log = logging.getLogger(__name__)

# asyncio's TLS protocol zeroes a 256 KiB read buffer for each connection it is handed, before a
# byte of the handshake is read: above glibc's mmap threshold, so fresh pages every time, which
# made a flood of half-open handshakes costly in loop time and memory (bench/REST.md). A
# handshake reads into a page; once it is done, the connection gets asyncio's size back (a
# smaller one slowed large bodies down).
HANDSHAKE_READ_BUFFER = 4 * 1024
TLS_READ_BUFFER = sslproto.SSLProtocol.max_size


class _TLS(sslproto.SSLProtocol):
    """asyncio's TLS protocol, whose read buffer (`max_size`) starts at a page."""

    max_size = HANDSHAKE_READ_BUFFER


def _close(conn: socket.socket, transport: asyncio.Transport | None) -> None:
    """Close with a reset; the transport (when there is one yet) first lets go of the socket,
    so that the loop watches no closed descriptor."""
    if transport is not None:
        transport.abort()
    close_now(conn)


class HeadTimedHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol, closed when a request head is not complete in time, and
    giving its place in the port's share back when the connection ends.

    It reads three fields of aiohttp's handler (`_messages`: heads parsed and not yet
    handled; `_request_in_progress`; `_force_close`): tests/unit/test_connections.py fails
    if an aiohttp upgrade renames them."""

    __slots__ = ("_deadline", "_head_timeout_s", "_head_timer", "_lease", "_on_timeout")

    def __init__(
        self,
        manager: web.Server,
        *,
        lease: Lease,
        deadline: float,
        head_timeout_s: float,
        on_timeout: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._lease = lease
        self._deadline = deadline  # loop time by which the first head must be complete
        self._head_timeout_s = head_timeout_s
        self._on_timeout = on_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timer = self._loop.call_at(self._deadline, self._head_late)
        self._lease.idle = self._idle
        self._lease.evict = self._evict

    def _idle(self) -> bool:
        """No request under way: waiting for a head (or the rest of one), or for the next."""
        return not self._request_in_progress and not self._messages

    def _evict(self) -> None:
        """Closed at once, without TLS's goodbye, to make room in a full share."""
        transport = self.transport
        if transport is not None:
            transport.abort()
        self.force_close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._disarm()  # a head is complete: the handler's own limits take over
        elif data and self._head_timer is None and not self._force_close:
            self._head_timer = self._loop.call_later(self._head_timeout_s, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._messages or self._request_in_progress or self._force_close:
            return
        self._on_timeout()
        self.force_close()

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._lease.release()
        super().connection_lost(exc)


def _always() -> bool:
    return True


class BudgetedSite(web.BaseSite):
    """A TCP site of an AppRunner whose connections are accepted by `connections.Acceptor`."""

    __slots__ = (
        "_acceptor",
        "_handler_args",
        "_head_timeout_s",
        "_host",
        "_on_closed",
        "_pending",
        "_port",
        "_reuse_port",
        "_share",
    )

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        reuse_port: bool,
        share: Share,
        head_timeout_s: float,
        handler_args: dict[str, Any],
        on_closed: Callable[[str], None],
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._share = share
        self._head_timeout_s = head_timeout_s
        self._handler_args = handler_args  # what the runner's own handlers would be given
        self._on_closed = on_closed  # a connection closed by us: "limit", "header_timeout"...
        self._acceptor: Acceptor | None = None
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        return self._acceptor.port if self._acceptor is not None else self._port

    async def start(self) -> None:
        await super().start()
        sock = listen(self._host, self._port, self._reuse_port)
        self._acceptor = Acceptor(sock, self._share, self._serve, self._on_closed)

    def _serve(self, conn: socket.socket, lease: Lease) -> None:
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        handler = HeadTimedHandler(
            server,
            loop=loop,
            lease=lease,
            deadline=loop.time() + self._head_timeout_s,
            head_timeout_s=self._head_timeout_s,
            on_timeout=lambda: self._on_closed("header_timeout"),
            **self._handler_args,
        )
        task = loop.create_task(self._connect(conn, handler, lease))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

        def evict_unstarted() -> None:  # a task cancelled before it runs runs nothing at all
            task.cancel()
            close_now(conn)

        lease.idle = _always  # until the handler has it: a handshake, no request yet
        lease.evict = evict_unstarted

    async def _connect(self, conn: socket.socket, handler: HeadTimedHandler, lease: Lease) -> None:
        """Hands the socket to asyncio's transport (which does the TLS handshake, within the
        head deadline); a failed or late handshake gives the lease back here, as the handler
        never saw the connection."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        lease.evict = task.cancel  # from here on, the except clauses below close the socket
        transport: asyncio.Transport | None = None
        try:
            if self._ssl_context is None:
                await loop.connect_accepted_socket(lambda: handler, conn)
                return
            # What `connect_accepted_socket(ssl=...)` does, with `_TLS` in place of asyncio's.
            handshake = loop.create_future()
            tls = _TLS(
                loop,
                handler,
                self._ssl_context,
                handshake,
                server_side=True,
                ssl_handshake_timeout=self._head_timeout_s,  # type: ignore[arg-type]  # a float works
                ssl_shutdown_timeout=self._head_timeout_s,
            )
            transport, _ = await loop.connect_accepted_socket(lambda: tls, conn)
            await handshake
            tls.max_size = TLS_READ_BUFFER  # type: ignore[misc]  # read by each get_buffer()
        except (OSError, ssl.SSLError, EOFError, TimeoutError) as exc:
            lease.release()
            _close(conn, transport)
            self._on_closed("handshake")
            log.debug("REST connection closed during its TLS handshake: %r", exc)
        except asyncio.CancelledError:  # evicted, or the site stopped
            lease.release()
            _close(conn, transport)
            raise

    async def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
        for task in list(self._pending):
            task.cancel()
        await super().stop()
