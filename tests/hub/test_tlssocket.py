"""The hub's TLS transport over a non-blocking SSLSocket: real sockets, real TLS, both loops."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import select
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hub.tlssocket import LOW_WATER, TLSSocketTransport, handshake

Run = Callable[[Callable[[], Awaitable[None]]], None]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    def runner(main: Callable[[], Awaitable[None]]) -> None:
        async def wrapped() -> None:
            await asyncio.wait_for(main(), 30)

        if request.param == "uvloop":
            uvloop.run(wrapped())
        else:
            asyncio.run(wrapped())
    return runner


class _Pair:
    """One server-side TLSSocketTransport (with a StreamReader) and an asyncio TLS client."""

    server_reader: asyncio.StreamReader
    server_writer: asyncio.StreamWriter
    transport: TLSSocketTransport
    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    lost: asyncio.Future[Any]


async def _pair(certs: tuple[Path, Path], *, limit: int = 2**16) -> _Pair:
    loop = asyncio.get_running_loop()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(certs[0]), str(certs[1]))
    client_ctx = ssl.create_default_context(cafile=str(certs[0]))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    # Small kernel buffers, so that "the peer does not read" shows within a few hundred KiB.
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    client.setblocking(False)

    async def open_client() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        await loop.sock_connect(client, ("127.0.0.1", port))
        return await asyncio.open_connection(sock=client, ssl=client_ctx,
                                             server_hostname="localhost")

    connecting = asyncio.ensure_future(open_client())
    conn, _ = await loop.sock_accept(listener)
    listener.close()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    conn.setblocking(False)
    tls = server_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
    await handshake(loop, tls, 10)
    pair = _Pair()
    pair.lost = loop.create_future()
    pair.server_reader = asyncio.StreamReader(limit=limit)

    class Protocol(asyncio.StreamReaderProtocol):
        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            if not pair.lost.done():
                pair.lost.set_result(exc)

    protocol = Protocol(pair.server_reader)
    pair.transport = TLSSocketTransport(loop, tls, protocol)
    pair.server_writer = asyncio.StreamWriter(pair.transport, protocol, pair.server_reader, loop)
    pair.client_reader, pair.client_writer = await connecting
    return pair


async def _done(*pairs: _Pair) -> None:
    """Close both ends (uvloop refuses to close a loop with descriptors still watched)."""
    for pair in pairs:
        pair.transport.abort()
        pair.client_writer.close()
        with contextlib.suppress(Exception):
            await pair.client_writer.wait_closed()


def test_bytes_cross_both_ways_complete_and_in_order(certs: tuple[Path, Path], run: Run) -> None:
    """1 MiB up in 4 KiB writes (the reader pauses and resumes), 10,000 small packets down."""
    async def main() -> None:
        pair = await _pair(certs, limit=8192)
        up = bytes(range(256)) * 4096

        async def receive(total: int) -> bytes:
            got = bytearray()
            while len(got) < total:
                chunk = await pair.server_reader.read(65536)
                assert chunk, "EOF too early"
                got += chunk
            return bytes(got)

        receiving = asyncio.ensure_future(receive(len(up)))
        for i in range(0, len(up), 4096):
            pair.client_writer.write(up[i:i + 4096])
            await pair.client_writer.drain()
        assert await receiving == up
        down = [b"%05d:" % n + b"m" * (n % 200) for n in range(10_000)]
        reading = asyncio.ensure_future(pair.client_reader.readexactly(sum(map(len, down))))
        for chunk in down:
            pair.server_writer.write(chunk)
        await pair.server_writer.drain()
        assert await reading == b"".join(down)
        assert pair.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        await _done(pair)

    run(main)


def test_a_peer_that_does_not_read_pauses_the_writer(certs: tuple[Path, Path], run: Run) -> None:
    """Past the high-water mark drain() waits; it resumes once the peer reads."""
    async def main() -> None:
        pair = await _pair(certs)
        block = b"x" * 65536
        drained = asyncio.Event()

        async def writer() -> None:
            for _ in range(64):  # 4 MiB: more than any socket buffer
                pair.server_writer.write(block)
                await pair.server_writer.drain()
            drained.set()

        task = asyncio.ensure_future(writer())
        await asyncio.sleep(0.5)
        assert not drained.is_set()
        assert pair.transport.get_write_buffer_size() > LOW_WATER
        got = await pair.client_reader.readexactly(64 * len(block))
        await asyncio.wait_for(drained.wait(), 10)
        await task
        assert got == block * 64
        await _done(pair)

    run(main)


def test_close_flushes_then_says_goodbye(certs: tuple[Path, Path], run: Run) -> None:
    """close(): queued bytes go out, then close_notify: the client reads a clean EOF."""
    async def main() -> None:
        pair = await _pair(certs)
        pair.server_writer.write(b"last words")
        pair.transport.close()
        assert pair.transport.is_closing()
        assert await pair.client_reader.read() == b"last words"  # EOF without an error
        assert await pair.lost is None
        await _done(pair)

    run(main)


def test_abort_and_peer_eof_end_the_connection(certs: tuple[Path, Path], run: Run) -> None:
    async def main() -> None:
        pair = await _pair(certs)
        pair.client_writer.write(b"bye")
        pair.client_writer.close()
        assert await pair.server_reader.read() == b"bye"  # then EOF
        assert await pair.lost is None
        other = await _pair(certs)
        other.transport.abort()
        assert await other.lost is None
        try:
            leftover = await other.client_reader.read()
        except (ConnectionError, ssl.SSLError):
            leftover = b""
        assert leftover == b""
        await _done(pair, other)

    run(main)


def test_handshake_times_out_on_a_silent_client(certs: tuple[Path, Path], run: Run) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(str(certs[0]), str(certs[1]))
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        client = socket.create_connection(listener.getsockname())
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(False)
        tls = server_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        started = loop.time()
        with pytest.raises(TimeoutError):
            await handshake(loop, tls, 0.3)
        assert 0.25 < loop.time() - started < 2
        tls.close()
        client.close()
        listener.close()

    run(main)


def _open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST, as a device that loses power and reboots."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _blocking_client_pair(certs: tuple[Path, Path]) -> tuple[
        TLSSocketTransport, asyncio.Future[Exception | None], ssl.SSLSocket]:
    """A server-side transport and a blocking TLS client socket the test resets at will."""
    loop = asyncio.get_running_loop()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(certs[0]), str(certs[1]))
    client_ctx = ssl.create_default_context(cafile=str(certs[0]))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)

        def client() -> ssl.SSLSocket:
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
            raw.connect(listener.getsockname())
            return client_ctx.wrap_socket(raw, server_hostname="localhost")

        connecting = asyncio.ensure_future(asyncio.to_thread(client))
        conn, addr = await loop.sock_accept(listener)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    conn.setblocking(False)
    tls = server_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
    await handshake(loop, tls, 10)
    peer = await connecting
    lost: asyncio.Future[Exception | None] = loop.create_future()

    class Protocol(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.set_result(exc)

    return TLSSocketTransport(loop, tls, Protocol(), peername=addr), lost, peer


@pytest.mark.parametrize("path", ["write", "writer-callback"])
def test_a_peer_that_resets_while_the_hub_writes_leaks_no_descriptor(
        certs: tuple[Path, Path], run: Run, path: str) -> None:
    """A peer that vanishes with 400 KB on its way: the failed send closes the socket.

    ``write``: the reset is already there when a burst is written (the flush inside write()
    fails); ``writer-callback``: the peer stopped reading, the socket is full and reading paused
    (the writer callback's flush fails). 20 drops each; the descriptors open afterwards are
    those open before, no exception reaches the loop, and the protocol hears of every drop.
    """
    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        before = _open_fds()
        for _ in range(20):
            transport, lost, peer = await _blocking_client_pair(certs)
            if path == "write":
                fd = transport.get_extra_info("socket").fileno()
                _reset(peer)
                assert select.select([fd], [], [], 5)[0], "the reset did not arrive"
                transport.write(b"x" * 400_000)
            else:
                transport.pause_reading()  # a busy handler: only the writer callback is left
                transport.write(b"x" * 400_000)
                assert transport.get_write_buffer_size() > 0  # the peer's buffers are full
                _reset(peer)
            assert isinstance(await asyncio.wait_for(lost, 5), OSError)
            assert transport.is_closing()
        assert _open_fds() == before
        assert errors == []

    run(main)


def test_a_peer_that_closes_without_close_notify_is_a_connection_reset(
        certs: tuple[Path, Path], run: Run) -> None:
    """TCP closed under TLS (no close_notify) is told as ConnectionResetError, caused by the
    SSL error: amqtt's packet writer handles ConnectionError, and an SSLEOFError escaped its
    connection task (the fuzz test, seed 1111, once under load)."""
    async def main() -> None:
        transport, lost, peer = await _blocking_client_pair(certs)
        transport.pause_reading()  # a busy handler: the EOF is not read, the next write meets it
        fd = transport.get_extra_info("socket").fileno()
        socket.socket.close(peer)  # the descriptor only: no SSL_shutdown, no close_notify
        assert select.select([fd], [], [], 5)[0], "the FIN did not arrive"
        for _ in range(1000):  # the first write may still fit the kernel's buffers
            if lost.done():
                break
            transport.write(b"x" * 65536)
            await asyncio.sleep(0)
        exc = await asyncio.wait_for(lost, 5)
        assert isinstance(exc, ConnectionResetError), repr(exc)
        assert isinstance(exc.__cause__, ssl.SSLError), repr(exc.__cause__)
        assert transport.is_closing()

    run(main)
