"""A TLS transport over a non-blocking ``ssl.SSLSocket``: OpenSSL reads and writes the socket.

asyncio's and uvloop's TLS transports run OpenSSL over memory BIOs and keep a 256 KiB read
buffer per connection: 38.5 KiB of resident memory per idle TLS connection under uvloop, on
this machine, before any MQTT state. An ``SSLSocket`` driven by ``loop.add_reader`` costs
26.4 KiB (same certificates, same load; see docs/gateway.md), and OpenSSL sends its alert
itself when it refuses a handshake, so a device learns *why* it was refused.

Writes are gathered and flushed once per loop iteration: a burst of small MQTT packets for
one subscriber becomes one TLS record and one ``send``, not one per packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterable
from typing import Any

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
READ_CHUNK = 65536
RECORD = 16384  # one TLS record per send: a retried send then repeats exactly one record
FLUSH_AT = 64 * 1024  # gathered bytes that are sent at once rather than at the end of the pass
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


async def handshake(loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket,
                    timeout: float) -> None:
    """The server side of the TLS handshake on *sock*, within *timeout* seconds."""
    fd = sock.fileno()
    async with asyncio.timeout(timeout):
        while True:
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                await wait_ready(loop, fd, write=False)
            except ssl.SSLWantWriteError:
                await wait_ready(loop, fd, write=True)
            else:
                return


async def wait_ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    """Until *fd* is readable (or writable): one watcher, removed again when it fired."""
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await waiter
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


def transport_of(writer: object) -> asyncio.WriteTransport | None:
    """The transport under an amqtt ``StreamWriterAdapter`` (None for other writers)."""
    return getattr(getattr(writer, "_writer", None), "transport", None)


class TLSSocketTransport(asyncio.Transport):
    """The subset of ``asyncio.Transport`` that streams (and amqtt) use."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket,
                 protocol: asyncio.Protocol, *, peername: object = None) -> None:
        """*peername* is the address ``accept()`` gave: asked again here, a client that reset
        right after its handshake makes ``getpeername()`` fail with ENOTCONN."""
        super().__init__()
        self._loop = loop
        self._sock: ssl.SSLSocket | None = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        if peername is None:
            with contextlib.suppress(OSError):
                peername = sock.getpeername()
        self._peername = peername
        self._buffer = bytearray()
        self._flush_scheduled = False
        self._writer_on = False
        self._reading = False
        self._paused_reading = False
        self._protocol_paused = False
        self._closing = False
        self._lost = False
        protocol.connection_made(self)
        self.resume_reading()

    # -- information ------------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock = self._sock
        if name == "peername":
            return self._peername
        if sock is None:
            return default
        if name in ("ssl_object", "socket"):
            return sock
        if name == "sslcontext":
            return sock.context
        if name == "sockname":
            return sock.getsockname()
        if name == "peercert":
            return sock.getpeercert()
        if name == "cipher":
            return sock.cipher()
        return default

    def is_closing(self) -> bool:
        return self._closing

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    # -- reading ----------------------------------------------------------------------------

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        self._paused_reading = True
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        self._paused_reading = False
        if not self._reading and not self._closing and self._sock is not None:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reading = True
            if self._sock.pending():
                self._loop.call_soon(self._read_ready)

    def _read_ready(self) -> None:
        sock = self._sock
        got = 0
        while sock is not None and not self._paused_reading and got < 4 * READ_CHUNK:
            try:
                data = sock.recv(READ_CHUNK)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                return  # OpenSSL wants to write (a key update): the next flush will
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            if not data:
                self._eof()
                return
            got += len(data)
            self._protocol.data_received(data)
            sock = self._sock
        if sock is not None and not self._paused_reading and sock.pending():
            self._loop.call_soon(self._read_ready)  # decrypted data left: no fd event for it

    def _eof(self) -> None:
        with contextlib.suppress(Exception):
            self._protocol.eof_received()
        self.close()  # TLS has no half-close, whatever the protocol would like

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._sock is None or not data:
            return
        self._buffer += data
        if self._writer_on:
            pass  # the socket is full: the writer callback sends when it has room
        elif len(self._buffer) >= FLUSH_AT:
            self._flush()  # a burst: hand it to the kernel now, not at the end of the pass
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        self._check_high_water()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return LOW_WATER, HIGH_WATER

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return  # fixed limits: every connection of the hub is alike

    def _flush(self) -> None:
        self._flush_scheduled = False
        sock = self._sock
        buffer = self._buffer
        while sock is not None and buffer:
            try:
                # Views released before anything else happens: an exception's traceback keeps
                # ssl's frame and its argument alive, and a live view makes the buffer's
                # clear() in _finish raise BufferError (the socket then leaked).
                with memoryview(buffer) as view, view[:RECORD] as record:
                    sent = sock.send(record)
            except ssl.SSLWantWriteError:
                if not self._writer_on:
                    self._loop.add_writer(self._fd, self._flush)
                    self._writer_on = True
                return
            except ssl.SSLWantReadError:
                return  # renegotiation is off in TLS 1.3; the next read resumes it
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            del buffer[:sent]
        if self._writer_on:
            self._loop.remove_writer(self._fd)
            self._writer_on = False
        if self._protocol_paused and len(buffer) <= LOW_WATER:
            self._protocol_paused = False
            with contextlib.suppress(Exception):
                self._protocol.resume_writing()
        if self._closing and not buffer:
            self._finish(None, goodbye=True)

    def _check_high_water(self) -> None:
        if not self._protocol_paused and len(self._buffer) > HIGH_WATER:
            self._protocol_paused = True
            with contextlib.suppress(Exception):
                self._protocol.pause_writing()

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Flush what is queued, send close_notify, close the socket; no wait for the peer."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._buffer or self._sock is None:
            self._finish(None, goodbye=True)
        elif not self._flush_scheduled and not self._writer_on:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def abort(self) -> None:
        self._closing = True
        self._stop_reading()
        self._finish(None, goodbye=False)

    def _fatal(self, exc: BaseException) -> None:
        self._closing = True
        self._stop_reading()
        self._finish(_broken(exc) if isinstance(exc, Exception) else None, goodbye=False)

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _finish(self, exc: Exception | None, *, goodbye: bool) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._writer_on:
                self._loop.remove_writer(self._fd)
                self._writer_on = False
            try:
                self._buffer.clear()
            except BufferError:  # a view still exported: drop the buffer, close all the same
                self._buffer = bytearray()
            if goodbye:
                # One SSL_shutdown call writes close_notify; the peer's answer is not awaited.
                with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                    sock.unwrap()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if not self._lost:
            self._lost = True
            self._loop.call_soon(self._protocol.connection_lost, exc)


def _broken(exc: Exception) -> Exception:
    """What the protocol hears when the peer broke the connection: a ConnectionError.

    An SSL error (``SSLEOFError``: the peer closed TCP without close_notify, mid-write) reaches
    ``drain()``, and amqtt's packet writer handles ConnectionResetError and BrokenPipeError
    only: anything else escapes its connection task as "Task exception was never retrieved"
    (the fuzz test's seed 1111 under load). The original stays as the cause.
    """
    if isinstance(exc, ConnectionError):
        return exc
    broken = ConnectionResetError(f"TLS connection broken: {exc}")
    broken.__cause__ = exc
    return broken
