"""TCP and TLS for one device, non-blocking on the event loop, each phase timed.

paho's ``connect()`` does TCP and the TLS handshake in one blocking call, so the simulator
opens the connection itself: ``loop.sock_connect`` for TCP, then the TLS handshake retried
whenever the loop says the descriptor is readable or writable. The connected stream is then
handed to paho (:mod:`device_sim.device`). With TLS 1.3 the client's handshake ends before
the server has checked the client certificate (RFC 8446 §4.4.2): a refused certificate shows
up as an alert on the first read, which :class:`TLSStream` keeps for the report.

TLS runs on pyOpenSSL, that is on the OpenSSL inside cryptography's wheel, not on the system
OpenSSL behind Python's ``ssl`` module: with OpenSSL 3.0 (Debian 12, and the Python here) a
client handshake costs about 1.6 ms of CPU, with cryptography's OpenSSL (3.5 and later)
about 0.9 ms. The simulator must not be the bottleneck of the load test it runs.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL, crypto

from device_sim.errors import HandshakeError

_lib = Binding.lib  # X509_VERIFY_PARAM_*: pyOpenSSL has no call for hostname checking
GROUPS = b"X25519:P-256:P-384"  # the key exchanges a device offers


def tls_reason(exc: BaseException) -> str:
    """OpenSSL's reason in lower case words: 'tlsv13 alert certificate required'."""
    if isinstance(exc, SSL.SysCallError):  # (errno, text), or (-1, 'Unexpected EOF')
        code = exc.args[0] if exc.args else -1
        if isinstance(code, int) and code > 0:
            return os.strerror(code)
        return "connection closed"
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        reasons = [str(r[2]) for r in exc.args[0] if isinstance(r, tuple) and len(r) == 3]
        if reasons:
            return reasons[-1].lower().replace("_", " ")
    return str(exc) or type(exc).__name__


@dataclass(frozen=True)
class Credentials:
    """What a device presents: its certificate chain and key (both None: no certificate)."""

    cert: Path | None
    key: Path | None


@functools.lru_cache(maxsize=8)
def _trust_anchors(ca_pem: str) -> tuple[crypto.X509, ...]:
    """The bundle's certificates, parsed once per process and shared by every device."""
    return tuple(crypto.X509.from_cryptography(c)
                 for c in x509.load_pem_x509_certificates(ca_pem.encode("ascii")))


@dataclass(frozen=True)
class ClientTLS:
    """One device's TLS settings: a context with the trust bundle and its own key pair."""

    context: SSL.Context
    check_hostname: bool


def client_context(ca_pem: str, creds: Credentials, *, check_hostname: bool = True,
                   ) -> ClientTLS:
    """One device's TLS: the fleet's trust bundle and, if any, its own key pair.

    Raises ``OSError`` for a missing file and ``SSL.Error`` for a key that does not match.
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_verify(SSL.VERIFY_PEER)
    store = context.get_cert_store()
    assert store is not None  # noqa: S101  (a new context always has one)
    for anchor in _trust_anchors(ca_pem):
        store.add_cert(anchor)
    # Every certificate in the bundle is trusted, so a chain may end at the issuing CA
    # (RFC 5280 §6.1: any trusted certificate can be the trust anchor): the root's P-384
    # signature on it need not be checked again on every handshake.
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    # What device TLS stacks (mbedTLS, wolfSSL) offer, X25519 first: not OpenSSL 3.5's
    # default, which adds a post-quantum hybrid key share (ML-KEM-768, 1.2 KB) that the
    # client pays for on every handshake and today's brokers do not pick.
    if _lib.SSL_CTX_set1_curves_list(context._context, GROUPS) != 1:  # no pyOpenSSL call
        raise SSL.Error(f"cannot offer the groups {GROUPS.decode()}")
    if creds.cert is not None and creds.key is not None:
        for path in (creds.cert, creds.key):
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
        context.use_certificate_chain_file(str(creds.cert))
        context.use_privatekey_file(str(creds.key))
        context.check_privatekey()
    return ClientTLS(context, check_hostname)


class TLSStream:
    """The connected TLS stream as paho uses a socket: ``recv``, ``send``, ``close``.

    pyOpenSSL's "try again" errors become the ``BlockingIOError`` paho waits on, a clean or
    abrupt end of the stream becomes ``b""`` (as ``ssl.SSLSocket`` with ragged EOFs
    suppressed), and a TLS error (the broker's alert) is kept in :attr:`failure` and raised
    as ``ConnectionError``.
    """

    __slots__ = ("_conn", "_sock", "failure", "version")

    def __init__(self, conn: SSL.Connection, sock: socket.socket) -> None:
        self._conn = conn
        self._sock = sock
        self.failure: str | None = None
        self.version = conn.get_protocol_version_name()

    def fileno(self) -> int:
        return self._sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def pending(self) -> int:
        return self._conn.pending()

    def recv(self, bufsize: int) -> bytes:
        try:
            return self._conn.recv(bufsize)
        except (SSL.WantReadError, SSL.WantWriteError):
            raise BlockingIOError from None
        except SSL.ZeroReturnError:
            return b""
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] == -1:  # EOF without close_notify
                return b""
            raise self._failed(exc) from None
        except SSL.Error as exc:
            raise self._failed(exc) from None

    def send(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self._conn.send(data)
        except (SSL.WantReadError, SSL.WantWriteError):
            raise BlockingIOError from None
        except SSL.Error as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: SSL.Error) -> ConnectionError:
        self.failure = tls_reason(exc)
        return ConnectionError(self.failure)

    def close(self) -> None:
        self._sock.close()


@dataclass(frozen=True)
class Opened:
    """A connected TLS stream and how long each phase took (seconds)."""

    sock: TLSStream
    tcp_s: float
    tls_s: float
    version: str


async def wait_ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    """Until *fd* is readable (or writable): one reader or writer, removed on return."""
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await waiter
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _expect_peer(conn: SSL.Connection, host: str) -> None:
    """SNI, and the server certificate must name *host* (a DNS name or an IP address),
    checked by OpenSSL during the handshake as ``ssl``'s ``check_hostname`` does."""
    param = _lib.SSL_get0_param(conn._ssl)  # pyOpenSSL has no call for this
    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        name = host.encode("idna")
        conn.set_tlsext_host_name(name)
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))
    else:
        ok = _lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    if ok != 1:
        raise HandshakeError("tls", f"cannot check the server's name {host!r}")


def _verify_failure(conn: SSL.Connection, exc: SSL.Error) -> str:
    """'server certificate: certificate has expired' when our check of the server failed."""
    code = _lib.SSL_get_verify_result(conn._ssl)  # pyOpenSSL has no call for this
    if code != 0:
        text = Binding.ffi.string(_lib.X509_verify_cert_error_string(code)).decode()
        return f"server certificate: {text}"
    return tls_reason(exc)


async def open_tls(host: str, port: int, tls: ClientTLS, *,
                   source: str | None = None) -> Opened:
    """TCP connect then TLS handshake, both driven by the running loop; raises HandshakeError."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    sock.setblocking(False)
    # MQTT packets are small: without TCP_NODELAY, CONNECT can wait for the ACK of
    # the TLS Finished (Nagle + delayed ACK add ~40 ms on loopback).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.perf_counter()
    try:
        if source is not None:
            sock.bind((source, 0))
        await loop.sock_connect(sock, (host, port))
    except OSError as exc:
        sock.close()
        raise HandshakeError("tcp", exc.strerror or str(exc)) from None
    except BaseException:
        sock.close()
        raise
    tcp_done = time.perf_counter()
    conn = SSL.Connection(tls.context, sock)
    conn.set_connect_state()
    try:
        if tls.check_hostname:
            _expect_peer(conn, host)
        fd = sock.fileno()
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                await wait_ready(loop, fd, write=False)
            except SSL.WantWriteError:
                await wait_ready(loop, fd, write=True)
    except SSL.SysCallError as exc:
        sock.close()
        raise HandshakeError("tls", tls_reason(exc)) from None
    except SSL.Error as exc:
        sock.close()
        raise HandshakeError("tls", _verify_failure(conn, exc)) from None
    except BaseException:
        sock.close()
        raise
    done = time.perf_counter()
    stream = TLSStream(conn, sock)
    return Opened(stream, tcp_done - start, done - tcp_done, stream.version)
