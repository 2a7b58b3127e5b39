"""The hub's TLS listener under handshake squatters: real sockets, our real CA, both loops.

Squatters connect from other loopback addresses (127.0.0.2, ...) than the devices, so what
is tested is that they hold no handshake slot, not the per-address cap.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from hub.config import ListenerConfig
from hub.listener import TLSListener
from hub.tls import HandshakeRefusal, server_context
from tests.integration.fleet import Device, Fleet

Run = Callable[[Callable[[], Awaitable[None]]], None]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return Fleet.create(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def device(fleet: Fleet) -> Device:
    return fleet.device("sensor-1")


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    def runner(main: Callable[[], Awaitable[None]]) -> None:
        async def wrapped() -> None:
            await asyncio.wait_for(main(), 60)

        if request.param == "uvloop":
            uvloop.run(wrapped())
        else:
            asyncio.run(wrapped())
    return runner


class _Audit:
    """The audit seam: what the listener asked to record."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def record(self, event: str, *, device_id: str | None = None, serial: str | None = None,
               peer: str | None = None, reason: str | None = None) -> None:
        self.rows.append({"event": event, "device_id": device_id, "serial": serial,
                          "peer": peer, "reason": reason})


class _Hub:
    """A TLSListener with the hub's server context; streams are read until EOF."""

    def __init__(self, fleet: Fleet, **options: Any) -> None:
        self.refused: list[tuple[str, HandshakeRefusal]] = []
        self.peers: list[object] = []
        self.streams_done = 0
        self.stream_ended = asyncio.Event()
        self.audit = _Audit()
        context = server_context(ListenerConfig(server_cert=fleet.pki / "server.pem",
                                                server_key=fleet.pki / "server.key",
                                                client_ca=fleet.ca))
        options.setdefault("handshake_timeout", 10.0)
        self.listener = TLSListener(context, self._on_stream,
                                    lambda peer, why: self.refused.append((peer, why)),
                                    audit=self.audit, **options)
        self.squatters: list[socket.socket] = []

    async def _on_stream(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername"))
        try:
            while await reader.read(65536):
                pass
        except OSError:
            pass
        self.streams_done += 1
        self.stream_ended.set()

    async def __aenter__(self) -> _Hub:
        await self.listener.start("127.0.0.1", 0)
        self.port = self.listener.port
        return self

    async def __aexit__(self, *exc: object) -> None:
        _close_all(self.squatters)
        await self.listener.close()

    async def squat(self, source: str, first: bytes = b"\x16") -> socket.socket:
        """A client from *source* that sends *first* and then nothing (closed at the end)."""
        sock = await _open(self.port, source, first)
        self.squatters.append(sock)
        return sock


def _client_context(fleet: Fleet, device: Device) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(fleet.ca))
    context.load_cert_chain(str(device.cert), str(device.key))
    return context


async def _open(port: int, source: str, first: bytes = b"") -> socket.socket:
    """A plain TCP connection from *source* (a loopback address) that sends *first*."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setblocking(False)
        sock.bind((source, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
        if first:
            await loop.sock_sendall(sock, first)
    except BaseException:
        sock.close()
        raise
    return sock


async def _device_handshake(fleet: Fleet, device: Device, port: int,
                            source: str = "127.0.0.1") -> None:
    """A device's mutual-TLS handshake from *source*; closed again at once."""
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=_client_context(fleet, device), server_hostname="localhost",
        local_addr=(source, 0))
    writer.close()
    await writer.wait_closed()


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for *condition* (the listener's own counters), looking every few milliseconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed or reset *sock* (EOF or ECONNRESET on read)."""
    try:
        return await asyncio.get_running_loop().sock_recv(sock, 1) == b""
    except ConnectionResetError:
        return True


async def _refused(port: int, source: str) -> bool:
    """Whether a connection from *source* that sends one byte is closed by the server (the
    reset may already reach the connect or the send)."""
    try:
        sock = await _open(port, source, b"\x16")
    except ConnectionResetError:
        return True
    try:
        return await _closed_by_server(sock)
    finally:
        sock.close()


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def test_silent_and_partial_clients_hold_no_handshake_slot(fleet: Fleet, device: Device,
                                                           run: Run) -> None:
    """40 clients that sent one byte or half a ClientHello, 4 slots: a device still gets in.

    Issue 11 defect 1: any byte took a slot, so 4 squatters locked everyone out until their
    handshake_timeout (10 s here); now a slot waits for the whole first record.
    """
    async def main() -> None:
        async with _Hub(fleet, max_handshakes=4, max_pending_tls=16) as hub:
            header = bytes([0x16, 3, 1]) + (300).to_bytes(2, "big")
            for i in range(40):
                await hub.squat(f"127.0.0.{2 + i // 4}",
                                b"\x16" if i % 2 else header + b"\x01" + bytes(99))
            await _until(lambda: hub.listener.connections == 40)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.wait_for(_device_handshake(fleet, device, hub.port), 5)
            assert loop.time() - started < 2
            await asyncio.wait_for(hub.stream_ended.wait(), 5)
            assert hub.refused == []  # the squatters are still waiting, none was refused
            assert hub.listener.pending_tls == 40
            _close_all(hub.squatters)
            await _until(lambda: hub.listener.pending_tls == 0)
            assert {why.reason for _, why in hub.refused} == {"tls-error"}

    run(main)


def test_over_max_pending_tls_one_address_is_reset_and_audited_once(
        fleet: Fleet, device: Device, run: Run) -> None:
    """4 pending from 127.0.0.3 with max_pending_tls 4: its next 50 are reset at once, one
    audit record (limit, pending-tls); other addresses are untouched, and once one of the 4
    goes away 127.0.0.3 may connect again."""
    async def main() -> None:
        async with _Hub(fleet, max_pending_tls=4) as hub:
            for _ in range(4):
                await hub.squat("127.0.0.3")
            await _until(lambda: hub.listener.pending_tls == 4)
            for _ in range(50):
                assert await asyncio.wait_for(_refused(hub.port, "127.0.0.3"), 2)
            assert hub.listener.refused_over_limit == 50
            assert [(r["event"], r["reason"]) for r in hub.audit.rows] == \
                [("limit", "pending-tls")]
            assert str(hub.audit.rows[0]["peer"]).startswith("127.0.0.3:")
            await asyncio.wait_for(_device_handshake(fleet, device, hub.port, "127.0.0.4"), 5)
            hub.squatters[0].close()
            await _until(lambda: hub.listener.pending_tls == 3)
            await asyncio.wait_for(_device_handshake(fleet, device, hub.port, "127.0.0.3"), 5)
            await _until(lambda: hub.streams_done == 2)
            assert len(hub.audit.rows) == 1

    run(main)


@pytest.mark.parametrize(("first", "detail"), [
    (b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd", "not a TLS handshake record"),
    (bytes([0x16, 3, 1, 0xFF, 0xFF]), "first TLS record of 65535 bytes"),
    (bytes([0x16, 3, 1, 0, 0]), "first TLS record of 0 bytes"),
    (bytes([0x16, 3, 3, 0, 4, 0x02, 0, 0, 0]), "not a ClientHello"),
])
def test_what_cannot_open_tls_is_refused_at_once(fleet: Fleet, run: Run, first: bytes,
                                                 detail: str) -> None:
    """Plain MQTT, a record no peer may send, a ServerHello: closed without waiting for more."""
    async def main() -> None:
        async with _Hub(fleet) as hub:
            sock = await hub.squat("127.0.0.5", first)
            assert await asyncio.wait_for(_closed_by_server(sock), 2)
            await _until(lambda: len(hub.refused) == 1)
            [(peer, why)] = hub.refused
            assert peer.startswith("127.0.0.5:")
            assert why.reason == "tls-error"
            assert detail in why.detail

    run(main)


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


async def _handshake_then_reset(fleet: Fleet, device: Device, port: int) -> object:
    """Hand-shake over memory BIOs, then send the last flight and RST in one go.

    Nothing yields between the client's Finished and its reset, so the server reads both
    together: its handshake succeeds on a connection that is already gone (the fuzzers' case).
    Returns the client's address.
    """
    loop = asyncio.get_running_loop()
    raw = socket.socket()
    raw.setblocking(False)
    await loop.sock_connect(raw, ("127.0.0.1", port))
    address = raw.getsockname()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = _client_context(fleet, device).wrap_bio(incoming, outgoing,
                                                  server_hostname="localhost")
    while True:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            if outgoing.pending:
                await loop.sock_sendall(raw, outgoing.read())
            data = await loop.sock_recv(raw, 65536)
            assert data, "the server closed during the handshake"
            incoming.write(data)
        else:
            break
    raw.send(outgoing.read())  # Certificate, CertificateVerify, Finished: a few hundred bytes
    _reset(raw)
    return address


def test_a_client_that_resets_right_after_its_handshake_leaves_nothing(
        fleet: Fleet, device: Device, run: Run) -> None:
    """Issue 11 defect 15: getpeername() after the handshake failed with ENOTCONN, the task
    died with a traceback and the socket was left to the garbage collector. Now: the stream
    sees the address accept() gave and its end; no error, no refusal, no descriptor left."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        async with _Hub(fleet) as hub:
            before = _open_fds()
            addresses = []
            for n in range(1, 11):
                addresses.append(await _handshake_then_reset(fleet, device, hub.port))
                await _until(lambda n=n: hub.streams_done == n, 5)
            await _until(lambda: hub.listener.connections == 0)
            assert hub.peers == addresses
            assert hub.refused == []
            assert errors == []
            assert _open_fds() == before

    run(main)
