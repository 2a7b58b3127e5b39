"""The mutual-TLS listener: accept, hand-shake under a timeout, then give the broker a stream.

Sockets are accepted by hand, wrapped in a non-blocking ``ssl.SSLSocket`` and hand-shaken on
the loop (:mod:`hub.tlssocket`): the hub learns *why* OpenSSL refused a client (expired,
unknown issuer, wrong EKU, no certificate) and audits it, where ``start_server`` would only log
it at debug level, and OpenSSL sends the client its alert. Works the same on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from hub.tls import HandshakeRefusal, classify
from hub.tlssocket import TLSSocketTransport, handshake, wait_ready

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
RefusalHandler = Callable[[str, HandshakeRefusal], None]
READ_LIMIT = 2**16
ACCEPT_BURST = 256  # accepts per readiness event: a reconnect storm drains the backlog fast
# TLS handshakes computed at once. In a reconnect storm the rest wait their turn (their
# ClientHello already received), so a started handshake finishes in milliseconds instead of
# thousands sharing the CPU until every one of them hits handshake_timeout.
MAX_HANDSHAKES = 64


class TLSListener:
    """A listening socket whose every connection is upgraded to TLS with the hub's context."""

    def __init__(self, context: ssl.SSLContext, on_stream: StreamHandler,
                 on_refused: RefusalHandler, *, handshake_timeout: float = 10.0,
                 backlog: int = 4096, max_handshakes: int = MAX_HANDSHAKES) -> None:
        self._context = context
        self._on_stream = on_stream
        self._on_refused = on_refused
        self._timeout = handshake_timeout
        self._backlog = backlog
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_handshakes)

    async def start(self, host: str, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        infos = await self._loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                             flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(self._backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept_ready)

    def replace_context(self, context: ssl.SSLContext) -> None:
        """New handshakes use *context* (a rotated server certificate); live ones keep theirs."""
        self._context = context

    @property
    def port(self) -> int:
        assert self._sock is not None  # noqa: S101
        return int(self._sock.getsockname()[1])

    @property
    def connections(self) -> int:
        return len(self._tasks)

    def _accept_ready(self) -> None:
        assert self._sock is not None  # noqa: S101
        assert self._loop is not None  # noqa: S101
        for _ in range(ACCEPT_BURST):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: leave the rest in the backlog until descriptors free up.
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            conn.setblocking(False)
            task = self._loop.create_task(self._serve(conn, addr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, addr: object) -> None:
        assert self._loop is not None  # noqa: S101
        peer = _format_peer(addr)
        tls: ssl.SSLSocket | None = None
        try:
            # A slot is taken only once the ClientHello is there: a client that connects and
            # says nothing waits without holding one (and is dropped at handshake_timeout).
            async with asyncio.timeout(self._timeout):
                await wait_ready(self._loop, conn.fileno(), write=False)
            async with self._slots:
                tls = self._context.wrap_socket(conn, server_side=True,
                                                do_handshake_on_connect=False)
                await handshake(self._loop, tls, self._timeout)
        except asyncio.CancelledError:
            (tls or conn).close()
            raise
        except (OSError, TimeoutError, ConnectionError) as exc:  # ssl.SSLError is an OSError
            _close_after_alert(tls or conn)
            self._on_refused(peer, classify(exc))
            return
        del conn  # detached into the TLS socket
        reader = asyncio.StreamReader(limit=READ_LIMIT)
        protocol = _StreamProtocol(reader)
        transport = TLSSocketTransport(self._loop, tls, protocol)
        writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
        try:
            await self._on_stream(reader, writer)
        finally:
            if not transport.is_closing():
                transport.close()

    async def close(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class _StreamProtocol(asyncio.StreamReaderProtocol):
    """asyncio's, with a list for its drain waiters: an empty deque is 760 bytes a connection.

    ``FlowControlMixin`` only appends, removes and iterates them (3.11 to 3.13).
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        if isinstance(getattr(self, "_drain_waiters", None), collections.deque):
            self._drain_waiters: Any = []


def _close_after_alert(sock: socket.socket) -> None:
    """Close so that the alert OpenSSL just wrote reaches the client.

    Closing with unread bytes in the receive buffer makes the kernel send a reset, and the
    client may never read the alert before it: read what is there, send FIN, then close.
    """
    with contextlib.suppress(OSError, ValueError):
        raw = socket.socket(fileno=sock.fileno()) if isinstance(sock, ssl.SSLSocket) else sock
        try:
            raw.shutdown(socket.SHUT_WR)
            while raw.recv(65536):
                pass
        except OSError:
            pass
        finally:
            if raw is not sock:
                raw.detach()
    sock.close()


def _format_peer(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername)


def close_quietly(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
