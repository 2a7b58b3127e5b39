"""The simulator's TLS (pyOpenSSL): the broker's identity is checked as ``ssl`` checks it."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme

from device_sim.errors import HandshakeError
from device_sim.transport import (
    Credentials,
    client_context,
    open_tls,
)


@asynccontextmanager
async def tls_server(cert: trustme.LeafCert, *, greeting: bytes = b"",
                     client_ca: trustme.CA | None = None) -> AsyncIterator[int]:
    """A loopback TLS server in a thread (blocking ``ssl``, so a refusal sends OpenSSL's
    alert): each client gets *greeting*, then the server waits for it to close."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(5)
            try:
                with context.wrap_socket(raw, server_side=True) as tls:
                    tls.sendall(greeting)
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def pem(ca: trustme.CA) -> str:
    return ca.cert_pem.bytes().decode()


async def read_all(stream: object, want: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    deadline = loop.time() + 5
    while len(data) < want and loop.time() < deadline:
        try:
            chunk = stream.recv(4096)  # type: ignore[attr-defined]
        except BlockingIOError:
            await asyncio.sleep(0.01)
            continue
        if not chunk:
            break
        data += chunk
    return data


def test_server_named_by_ip_and_dns() -> None:
    """A certificate for 127.0.0.1 and localhost is accepted under either name."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")

    async def main() -> None:
        async with tls_server(leaf, greeting=b"hello") as port:
            for host in ("127.0.0.1", "localhost"):
                opened = await open_tls(host, port, client_context(pem(ca),
                                                                   Credentials(None, None)))
                assert opened.version in ("TLSv1.2", "TLSv1.3")
                assert opened.tcp_s > 0
                assert opened.tls_s > 0
                assert await read_all(opened.sock, 5) == b"hello"
                opened.sock.close()

    asyncio.run(main())


def test_server_with_another_name_is_refused() -> None:
    """The check_hostname of ssl: a valid certificate for another name is not the broker."""
    ca = trustme.CA()
    leaf = ca.issue_cert("elsewhere.test")

    async def main() -> None:
        async with tls_server(leaf) as port:
            with pytest.raises(HandshakeError) as by_ip:
                await open_tls("127.0.0.1", port, client_context(pem(ca),
                                                                 Credentials(None, None)))
            with pytest.raises(HandshakeError) as by_name:
                await open_tls("localhost", port, client_context(pem(ca),
                                                                 Credentials(None, None)))
            assert by_ip.value.phase == "tls"
            assert by_ip.value.reason == "server certificate: IP address mismatch"
            assert by_name.value.reason == "server certificate: hostname mismatch"
            # check_hostname=False still checks the chain, not the name
            opened = await open_tls("127.0.0.1", port, client_context(
                pem(ca), Credentials(None, None), check_hostname=False))
            opened.sock.close()

    asyncio.run(main())


def test_server_from_an_untrusted_ca_is_refused() -> None:
    ca, other = trustme.CA(), trustme.CA()
    leaf = other.issue_cert("127.0.0.1")

    async def main() -> None:
        async with tls_server(leaf) as port:
            for check in (True, False):
                with pytest.raises(HandshakeError) as refused:
                    await open_tls("127.0.0.1", port, client_context(
                        pem(ca), Credentials(None, None), check_hostname=check))
                assert refused.value.reason.startswith("server certificate: unable to get "
                                                       "local issuer certificate")

    asyncio.run(main())


def test_client_certificate_is_presented(tmp_path: Path) -> None:
    """The device's chain and key reach a server that requires a client certificate; without
    one, the server's alert is kept as the stream's failure."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    device = ca.issue_cert("sim-00001")
    cert, key = tmp_path / "device.pem", tmp_path / "device.key"
    device.cert_chain_pems[0].write_to_path(str(cert))
    device.private_key_pem.write_to_path(str(key))

    async def main() -> None:
        async with tls_server(leaf, greeting=b"welcome", client_ca=ca) as port:
            opened = await open_tls("127.0.0.1", port, client_context(
                pem(ca), Credentials(cert, key)))
            assert await read_all(opened.sock, 7) == b"welcome"
            opened.sock.close()
            anonymous = await open_tls("127.0.0.1", port, client_context(
                pem(ca), Credentials(None, None)))
            assert anonymous.version == "TLSv1.3"  # the refusal comes after the handshake
            with pytest.raises(ConnectionError, match="certificate required"):
                await read_all(anonymous.sock, 1)
            assert anonymous.sock.failure == "tlsv13 alert certificate required"
            anonymous.sock.close()

    asyncio.run(main())


def test_missing_key_file_is_named(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = tmp_path / "device.pem"
    ca.issue_cert("sim-00001").cert_chain_pems[0].write_to_path(str(cert))
    with pytest.raises(FileNotFoundError, match=r"nope\.key"):
        client_context(pem(ca), Credentials(cert, tmp_path / "nope.key"))
