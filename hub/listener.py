"""The mutual-TLS listener: accept, hand-shake under a timeout, then give the broker a stream.

Sockets are accepted by hand, wrapped in a non-blocking ``ssl.SSLSocket`` and hand-shaken on
the loop (:mod:`hub.tlssocket`): the hub learns *why* OpenSSL refused a client (expired,
unknown issuer, wrong EKU, no certificate) and audits it, where ``start_server`` would only log
it at debug level, and OpenSSL sends the client its alert. Works the same on asyncio and uvloop.

What a connection costs before it is past TLS (DESIGN section 5): a descriptor and a timer
until its first TLS record, the ClientHello, is whole in the kernel's buffer (the kernel wakes
us only then: ``SO_RCVLOWAT``); only then one of ``max_handshakes`` slots. At most
``max_pending_tls`` connections per source address may be short of a finished handshake; the
next one from that address is reset at once and audited (``limit``/``pending-tls``) once per
address every ``LIMIT_AUDIT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import resource
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from cryptography import x509

from hub.identity import DeviceIdentity, identity_from_der
from hub.issuers import AllowedIssuers, issuer_name
from hub.tls import RECORD_HEADER_BYTES, HandshakeRefusal, classify, client_hello_size
from hub.tlssocket import TLSSocketTransport, handshake, wait_ready

log = logging.getLogger("hub")

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
RefusalHandler = Callable[[str, HandshakeRefusal], None]
READ_LIMIT = 2**16
ACCEPT_BURST = 256  # accepts per readiness event: a reconnect storm drains the backlog fast
# TLS handshakes computed at once. In a reconnect storm the rest wait their turn (their
# ClientHello already received), so a started handshake finishes in milliseconds instead of
# thousands sharing the CPU until every one of them hits handshake_timeout.
MAX_HANDSHAKES = 64
MAX_PENDING_TLS = 16  # DESIGN section 5's default for [limits] max_pending_tls
LIMIT_AUDIT_SECONDS = 10.0  # one audit record and log line per refusing address and period
ACCEPT_RETRY_SECONDS = 0.1  # out of descriptors: look at the backlog again after this
_TCP_ESTABLISHED = 1  # tcp_info.tcpi_state (linux/tcp_states.h)
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, leaves no TIME_WAIT


class AuditSink(Protocol):
    """Where limit refusals are recorded (``hub.audit.AuditStore``)."""

    def record(self, event: str, *, device_id: str | None = None, serial: str | None = None,
               peer: str | None = None, reason: str | None = None) -> None: ...


class TLSListener:
    """A listening socket whose every connection is upgraded to TLS with the hub's context."""

    def __init__(self, context: ssl.SSLContext, on_stream: StreamHandler,
                 on_refused: RefusalHandler, *, handshake_timeout: float = 10.0,
                 backlog: int = 4096, max_handshakes: int = MAX_HANDSHAKES,
                 max_pending_tls: int = MAX_PENDING_TLS, audit: AuditSink | None = None) -> None:
        self._context = context
        self._on_stream = on_stream
        self._on_refused = on_refused
        self._timeout = handshake_timeout
        self._backlog = backlog
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_handshakes)
        self._max_pending = max_pending_tls
        self._pending: dict[str, int] = {}  # source address -> connections not past TLS
        self._audit = audit
        self._limit_noted: dict[str, float] = {}  # source address -> when last audited
        self._refused_over_limit = 0
        self._accept_paused = False
        self._accept_noted = -LIMIT_AUDIT_SECONDS

    async def start(self, host: str, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        raise_nofile_limit()
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
        """Accepted connections whose task still runs: the TLS handshake, then the stream
        handler until the connection ends.

        Not used by the hub itself (``fleet_hub_connections`` counts admitted connections, from
        the gatekeeper); the listener tests wait on it to know that every connection was
        accepted (a squatter counts from accept(), before any handshake) and that every task
        has finished (0 after the resets).
        """
        return len(self._tasks)

    @property
    def pending_tls(self) -> int:
        """Connections accepted and not yet past the TLS handshake."""
        return sum(self._pending.values())

    @property
    def refused_over_limit(self) -> int:
        """Connections reset because their address had ``max_pending_tls`` pending already."""
        return self._refused_over_limit

    def _accept_ready(self) -> None:
        assert self._sock is not None  # noqa: S101
        assert self._loop is not None  # noqa: S101
        for _ in range(ACCEPT_BURST):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(exc)
                    return
                raise
            source = _source(addr)
            pending = self._pending.get(source, 0)
            if pending >= self._max_pending:
                _reset(conn)
                self._over_limit(source, addr)
                continue
            self._pending[source] = pending + 1
            conn.setblocking(False)
            task = self._loop.create_task(self._serve(conn, addr, source))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors: leave the rest in the backlog and look again a little later.

        The listening socket stays readable while its backlog is full; watching it meanwhile
        would spin the loop at 100% CPU instead of serving the connections that hold the fds.
        """
        assert self._sock is not None  # noqa: S101
        assert self._loop is not None  # noqa: S101
        if self._accept_paused:
            return
        self._accept_paused = True
        self._loop.remove_reader(self._sock.fileno())
        self._loop.call_later(ACCEPT_RETRY_SECONDS, self._resume_accepting)
        now = time.monotonic()
        if now - self._accept_noted >= LIMIT_AUDIT_SECONDS:
            self._accept_noted = now
            log.warning("accept paused: %s (%d connections open; raise LimitNOFILE)",
                        exc.strerror, len(self._tasks))

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)
            self._accept_ready()

    def _over_limit(self, source: str, addr: object) -> None:
        """Audit and log a refusing address once per period, not once per refused connection."""
        self._refused_over_limit += 1
        now = time.monotonic()
        last = self._limit_noted.get(source)
        if last is not None and now - last < LIMIT_AUDIT_SECONDS:
            return
        if len(self._limit_noted) >= 4096:  # many addresses: forget those whose period ended
            self._limit_noted = {a: t for a, t in self._limit_noted.items()
                                 if now - t < LIMIT_AUDIT_SECONDS}
        self._limit_noted[source] = now
        peer = _format_peer(addr)
        log.warning("refusing connections from %s: %d already short of a TLS handshake "
                    "(max_pending_tls); audited once per %g s", source, self._max_pending,
                    LIMIT_AUDIT_SECONDS)
        if self._audit is not None:
            self._audit.record("limit", peer=peer, reason="pending-tls")

    def _settled(self, source: str) -> None:
        count = self._pending.get(source, 0) - 1
        if count > 0:
            self._pending[source] = count
        else:
            self._pending.pop(source, None)

    async def _serve(self, conn: socket.socket, addr: object, source: str) -> None:
        assert self._loop is not None  # noqa: S101
        peer = _format_peer(addr)
        try:
            tls = await self._secure(conn, peer)
        finally:
            self._settled(source)
        if tls is None:
            return
        reader = asyncio.StreamReader(limit=READ_LIMIT)
        protocol = _StreamProtocol(reader)
        # The address from accept(): getpeername() fails with ENOTCONN once a client that
        # finished its handshake has reset the connection.
        transport = TLSSocketTransport(self._loop, tls, protocol, peername=addr)
        writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
        try:
            await self._on_stream(reader, writer)
        finally:
            if not transport.is_closing():
                transport.close()

    async def _secure(self, conn: socket.socket, peer: str) -> ssl.SSLSocket | None:
        """The TLS socket once hand-shaken; None when refused (closed, reported)."""
        assert self._loop is not None  # noqa: S101
        tls: ssl.SSLSocket | None = None
        try:
            async with asyncio.timeout(self._timeout):
                refusal = await self._client_hello(conn)
            if refusal is None:
                async with self._slots:
                    context = self._context  # its trust and its issuers, as one
                    tls = context.wrap_socket(conn, server_side=True,
                                              do_handshake_on_connect=False)
                    await handshake(self._loop, tls, self._timeout)
                refusal = issuer_refusal(tls, getattr(context, "allowed_issuers", None))
                if refusal is not None:
                    _close_after_alert(tls)
                    self._on_refused(peer, refusal)
                    return None
        except asyncio.CancelledError:
            (tls or conn).close()
            raise
        except (OSError, TimeoutError, ConnectionError) as exc:  # ssl.SSLError is an OSError
            _close_after_alert(tls or conn)
            self._on_refused(peer, classify(exc))
            return None
        if refusal is not None:
            conn.close()
            self._on_refused(peer, refusal)
            return None
        return tls

    async def _client_hello(self, conn: socket.socket) -> HandshakeRefusal | None:
        """Wait, holding no slot, until the client's first TLS record is whole in the kernel.

        ``SO_RCVLOWAT`` makes the socket readable only once that many bytes are buffered (or
        the peer closed), so a client that sends a byte and goes silent costs no wake-up.
        """
        assert self._loop is not None  # noqa: S101
        fd = conn.fileno()
        want = RECORD_HEADER_BYTES
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
        while True:
            await wait_ready(self._loop, fd, write=False)
            head = conn.recv(want, socket.MSG_PEEK)
            if want == RECORD_HEADER_BYTES and len(head) == want:
                size = client_hello_size(head)
                if isinstance(size, HandshakeRefusal):
                    return size
                want = size
                head = conn.recv(want, socket.MSG_PEEK)
            if len(head) >= want:
                size = client_hello_size(head)  # now also sees the handshake message's type
                if isinstance(size, HandshakeRefusal):
                    return size
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                return None
            if not head or _peer_gone(conn):
                return HandshakeRefusal("tls-error", f"closed after {len(head)} bytes, before "
                                        "its ClientHello was complete")
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)

    async def close(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def issuer_refusal(tls: ssl.SSLSocket, allowed: AllowedIssuers) -> HandshakeRefusal | None:
    """``unknown-issuer`` unless the verified leaf's issuer is one of *allowed* (None: any).

    One DER copy of the leaf, a walk to its issuer field and a set lookup; the certificate is
    parsed only to say whom a refusal concerns.
    """
    if allowed is None:
        return None
    try:
        der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):  # reset under us: the stream's first read will say so
        return None
    if der is None:
        return None
    if issuer_name(der) in allowed:
        return None
    found = identity_from_der(der)
    identity = found if isinstance(found, DeviceIdentity) else None
    try:
        issuer = x509.load_der_x509_certificate(der).issuer.rfc4514_string()
    except ValueError:
        issuer = "(unreadable)"
    return HandshakeRefusal("unknown-issuer", f"issuer {issuer!r} is not an allowed "
                            "intermediate (client_ca, or the feed's issuers)", identity)


class _StreamProtocol(asyncio.StreamReaderProtocol):
    """asyncio's, with a list for its drain waiters: an empty deque is 760 bytes a connection.

    ``FlowControlMixin`` only appends, removes and iterates them (3.11 to 3.13).
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        if isinstance(getattr(self, "_drain_waiters", None), collections.deque):
            self._drain_waiters: list[asyncio.Future[None]] = []


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


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    sock.close()


def _peer_gone(sock: socket.socket) -> bool:
    """Whether a socket that woke short of its low-water mark was closed by the peer.

    Readable below ``SO_RCVLOWAT`` means FIN or RST (tcp_poll), bar a spurious wake-up, which
    leaves the connection ESTABLISHED. Without TCP_INFO every short wake-up counts as gone.
    """
    if not hasattr(socket, "TCP_INFO"):
        return True
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except OSError:
        return True
    return state[0] != _TCP_ESTABLISHED


def _source(addr: object) -> str:
    """The source address of an accepted connection (its host, without the port)."""
    return str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the new soft limit.

    A client that squats on a connection costs the hub a descriptor until handshake_timeout,
    and a shell's soft limit is often 1,024 (systemd's LimitNOFILE sets both). Go's runtime
    does the same at start; the hub uses epoll, never select(), so no FD_SETSIZE applies.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("RLIMIT_NOFILE stays at %d: %s", soft, exc)
            return soft
        return target
    return soft


def _format_peer(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername)
