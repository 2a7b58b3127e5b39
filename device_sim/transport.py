"""TCP and TLS for one device, non-blocking on the event loop, each phase timed.

paho's ``connect()`` does TCP and the TLS handshake in one blocking call, so the simulator
opens the socket itself: ``loop.sock_connect`` for TCP, then ``do_handshake()`` on an
``SSLSocket`` made with ``do_handshake_on_connect=False``, retried whenever the loop says the
descriptor is readable or writable. The connected TLS socket is then handed to paho
(:mod:`device_sim.device`). With TLS 1.3 the client's handshake ends before the server has
checked the client certificate (RFC 8446 §4.4.2): a refused certificate shows up as an
alert on the first read, which :class:`DeviceSSLSocket` keeps for the report.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class DeviceSSLSocket(ssl.SSLSocket):
    """An SSLSocket that remembers the TLS error that ended it (an alert from the broker)."""

    failure: str | None = None

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except _WANT:
            raise
        except ssl.SSLError as exc:
            self.failure = tls_reason(exc)
            raise

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except _WANT:
            raise
        except ssl.SSLError as exc:
            self.failure = tls_reason(exc)
            raise


def tls_reason(exc: BaseException) -> str:
    """OpenSSL's reason in lower case words: 'tlsv13 alert certificate required'."""
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"server certificate: {exc.verify_message}"
    if reason:
        return str(reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


@dataclass(frozen=True)
class Credentials:
    """What a device presents: its certificate chain and key (both None: no certificate)."""

    cert: Path | None
    key: Path | None


def client_context(ca_pem: str, creds: Credentials, *, check_hostname: bool = True,
                   ) -> ssl.SSLContext:
    """One device's TLS context: the fleet's trust bundle and, if any, its own key pair."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_pem)
    # Every certificate in the bundle is trusted, so a chain may end at the issuing CA
    # (RFC 5280 §6.1: any trusted certificate can be the trust anchor): the root's P-384
    # signature on it need not be checked again on every handshake (-1.3 ms each).
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = check_hostname
    context.sslsocket_class = DeviceSSLSocket
    if creds.cert is not None and creds.key is not None:
        context.load_cert_chain(str(creds.cert), str(creds.key))
    return context


@dataclass(frozen=True)
class Opened:
    """A connected TLS socket and how long each phase took (seconds)."""

    sock: DeviceSSLSocket
    tcp_s: float
    tls_s: float
    version: str


class HandshakeError(Exception):
    """TCP or TLS failed; ``phase`` is 'tcp' or 'tls', ``reason`` is short and readable."""

    def __init__(self, phase: str, reason: str) -> None:
        super().__init__(f"{phase}: {reason}")
        self.phase = phase
        self.reason = reason


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
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


async def open_tls(host: str, port: int, context: ssl.SSLContext, *,
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
    tls: Any = None
    try:
        tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        fd = tls.fileno()
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await _ready(loop, fd, write=False)
            except ssl.SSLWantWriteError:
                await _ready(loop, fd, write=True)
    except (ssl.SSLError, ssl.CertificateError) as exc:
        (tls or sock).close()
        raise HandshakeError("tls", tls_reason(exc)) from None
    except OSError as exc:
        (tls or sock).close()
        raise HandshakeError("tls", exc.strerror or str(exc) or "connection closed") from None
    except BaseException:
        (tls or sock).close()
        raise
    done = time.perf_counter()
    assert isinstance(tls, DeviceSSLSocket)  # noqa: S101  (sslsocket_class above)
    return Opened(tls, tcp_done - start, done - tcp_done, tls.version() or "TLS")
