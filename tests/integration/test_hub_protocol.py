"""Protocol hygiene stock amqtt lacks: keep-alive is enforced, silent clients lose their slot."""

from __future__ import annotations

import socket
import ssl
import struct
import time

from tests.integration.fleet import Device, Fleet, RunningHub


def _tls(hub: RunningHub, fleet: Fleet, device: Device) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(fleet.ca))
    context.check_hostname = False
    context.load_cert_chain(str(device.cert), str(device.key))
    raw = socket.create_connection(("127.0.0.1", hub.port), timeout=10)
    return context.wrap_socket(raw)


def _connect_packet(client_id: str, keepalive: int) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, by hand: no client library to ping for us."""
    cid = client_id.encode()
    body = (struct.pack("!H", 4) + b"MQTT" + bytes([4, 0x02]) + struct.pack("!H", keepalive)
            + struct.pack("!H", len(cid)) + cid)
    return bytes([0x10, len(body)]) + body


def _closed_within(sock: ssl.SSLSocket, seconds: float) -> float | None:
    """Seconds until the hub closes the connection, or None if it stays open."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(1024):
            pass
    except TimeoutError:
        return None
    except (ConnectionError, ssl.SSLError):
        pass
    return time.monotonic() - start


def test_keepalive_is_enforced(fleet: Fleet, hub: RunningHub) -> None:
    """keep-alive 1 s and then silence: the hub disconnects after about 1.5 x keep-alive."""
    device = fleet.device("silent-after-connect")
    with _tls(hub, fleet, device) as sock:
        sock.sendall(_connect_packet(device.device_id, keepalive=1))
        assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
        waited = _closed_within(sock, 6.0)
    assert waited is not None, "still connected after 6 s of silence with keep-alive 1 s"
    assert waited < 4.0


def test_client_that_never_sends_connect_is_dropped(fleet: Fleet, hub: RunningHub) -> None:
    """TLS done, no CONNECT: the slot is freed after handshake_timeout (5 s in these tests)."""
    device = fleet.device("silent-before-connect")
    with _tls(hub, fleet, device) as sock:
        waited = _closed_within(sock, 10.0)
    assert waited is not None, "a client that sent nothing held its connection for 10 s"
    assert waited < 8.0
