"""The issuer check (contract C1): a device certificate is admitted only from an allowed
intermediate, whatever chain it sends. Real certificates of a real PKI, a real TLS listener."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hub.cabundle import BundleWatcher
from hub.config import ListenerConfig
from hub.issuers import ANY_UNDER_ROOT, allowed_issuers, issuer_name
from hub.listener import TLSListener
from hub.revocation import load_ca_bundle
from hub.tls import HandshakeRefusal, server_context
from provisioning.pki import IssuingCA
from tests.hub.cabundle_support import leaf_from, second_intermediate
from tests.integration.fleet import Device, Fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return Fleet.create(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def foreign(fleet: Fleet) -> IssuingCA:
    """A CA the fleet's root signed that client_ca does not list."""
    return second_intermediate(fleet.pki)


def _certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def test_issuer_name_is_the_issuer_field_of_the_der(fleet: Fleet, foreign: IssuingCA) -> None:
    leaf = _certs(fleet.device("reader-1").cert)[0]
    root = x509.load_pem_x509_certificate((fleet.pki / "root-ca.pem").read_bytes())
    for cert in (leaf, foreign.cert, root):
        assert issuer_name(cert.public_bytes(Encoding.DER)) == cert.issuer.public_bytes()
    der = leaf.public_bytes(Encoding.DER)
    assert issuer_name(b"") is None
    assert issuer_name(b"\x30\x03\x02\x01\x01") is None  # a SEQUENCE holding no TBS
    assert issuer_name(der[:40]) is None  # cut inside the issuer


def test_the_allowed_issuers_are_the_intermediates_of_the_trust(fleet: Fleet,
                                                                foreign: IssuingCA) -> None:
    chain = _certs(fleet.ca)  # issuing CA + root
    issuing = next(c for c in chain if c.subject != c.issuer)
    root = next(c for c in chain if c.subject == c.issuer)
    assert allowed_issuers(chain) == frozenset({issuing.subject.public_bytes()})
    assert allowed_issuers([root]) is ANY_UNDER_ROOT
    assert allowed_issuers([*chain, foreign.cert]) == frozenset(
        {issuing.subject.public_bytes(), foreign.cert.subject.public_bytes()})


class _Listener:
    """A TLSListener on a client_ca; records refusals and the streams it hands on."""

    def __init__(self, fleet: Fleet, client_ca: Path) -> None:
        self.refused: list[HandshakeRefusal] = []
        self.streams = 0
        context = server_context(ListenerConfig(server_cert=fleet.pki / "server.pem",
                                                server_key=fleet.pki / "server.key",
                                                client_ca=client_ca))
        self.listener = TLSListener(context, self._on_stream,
                                    lambda _peer, why: self.refused.append(why))

    async def _on_stream(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        self.streams += 1
        writer.write(b"hello")  # the stream got through: the client reads this
        await writer.drain()
        await reader.read(1)

    async def outcome(self, fleet: Fleet, device: Device) -> bytes:
        """What a device reads after its handshake: b"hello" when let through, b"" when
        closed (a refusal after the handshake)."""
        context = ssl.create_default_context(cafile=str(fleet.ca))
        context.load_cert_chain(str(device.cert), str(device.key))
        reader, writer = await asyncio.open_connection("127.0.0.1", self.listener.port,
                                                       ssl=context,
                                                       server_hostname="localhost")
        try:
            return await asyncio.wait_for(reader.read(5), 10)
        except (ConnectionError, ssl.SSLError):
            return b""
        finally:
            writer.close()


def _run(fleet: Fleet, client_ca: Path, *devices: Device) -> tuple[list[bytes],
                                                                    list[HandshakeRefusal]]:
    async def main() -> tuple[list[bytes], list[HandshakeRefusal]]:
        hub = _Listener(fleet, client_ca)
        await hub.listener.start("127.0.0.1", 0)
        try:
            return [await hub.outcome(fleet, d) for d in devices], hub.refused
        finally:
            await hub.listener.close()
    return asyncio.run(main())


def test_a_leaf_of_a_foreign_intermediate_under_our_root_is_refused_unknown_issuer(
        fleet: Fleet, foreign: IssuingCA, tmp_path: Path) -> None:
    """It verifies through the root (it sends its intermediate), yet its issuer is not one
    of client_ca's intermediates: closed after the handshake, refused with who it was."""
    stranger = leaf_from(fleet.pki, foreign, "stranger-1", tmp_path, chain=True)
    ours = fleet.device("ours-1")
    outcomes, refused = _run(fleet, fleet.ca, stranger, ours)
    assert outcomes == [b"", b"hello"]
    [refusal] = refused
    assert refusal.reason == "unknown-issuer"
    assert foreign.cert.subject.rfc4514_string() in refusal.detail
    assert refusal.identity is not None
    assert refusal.identity.device_id == "stranger-1"
    assert refusal.identity.serial_hex == stranger.serial


def test_a_root_only_client_ca_admits_any_intermediate_under_it(
        fleet: Fleet, foreign: IssuingCA, tmp_path: Path) -> None:
    root_only = tmp_path / "root-only.pem"
    root_only.write_bytes((fleet.pki / "root-ca.pem").read_bytes())
    stranger = leaf_from(fleet.pki, foreign, "stranger-2", tmp_path, chain=True)
    ours = fleet.device("ours-2")  # sign writes the issuing CA after the leaf
    outcomes, refused = _run(fleet, root_only, stranger, ours)
    assert outcomes == [b"hello", b"hello"]
    assert refused == []


def test_both_intermediates_in_client_ca_admit_both(fleet: Fleet, foreign: IssuingCA,
                                                     tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(fleet.ca.read_bytes() + foreign.cert.public_bytes(Encoding.PEM))
    newcomer = leaf_from(fleet.pki, foreign, "newcomer-1", tmp_path)  # its leaf alone
    outcomes, refused = _run(fleet, both, newcomer, fleet.device("ours-3"))
    assert outcomes == [b"hello", b"hello"]
    assert refused == []


def test_a_root_only_client_ca_is_said_loudly_at_start(fleet: Fleet, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    root_only = tmp_path / "root-only.pem"
    root_only.write_bytes((fleet.pki / "root-ca.pem").read_bytes())
    caplog.set_level(logging.INFO, "hub.cabundle")
    BundleWatcher(root_only, load_ca_bundle)
    BundleWatcher(fleet.ca, load_ca_bundle)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "hub.cabundle"]
    assert said[0][0] == logging.WARNING
    assert "holds no intermediate (a root only)" in said[0][1]
    assert said[1][0] == logging.INFO
    assert "device certificates are admitted from 'CN=" in said[1][1]
