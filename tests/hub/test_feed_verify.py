"""Feed documents as the hub accepts them: only a client_ca CA's signature, for this gateway of
this fleet, moving forward; every other document refused with its named reason.

Documents are real: feeddoc's format, signed as the CA service signs (r || s) with keys loaded
from real PKI folders (the issuing CA, the root, another fleet's CA, a device).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from hub.errors import FeedGapError, FeedRefusedError
from hub.revocation import load_ca_bundle
from hub.revocation.feed_verify import REASONS, FeedVerifier
from provisioning.registry.feeddoc import Device, b64url, b64url_decode
from tests.hub.feed_support import (
    GATEWAY,
    Issued,
    Signer,
    delta,
    heartbeat,
    revoked,
    signed_by_device,
    snapshot,
    state,
)
from tests.integration.fleet import TRUST_DOMAIN, Fleet

V5 = state(5, {"d1": Device(group="ops", certificates={0xA1: "active"})}, {0xB2: revoked("d2")})
V7 = state(7, {"d1": Device(status="suspended")}, {0xB2: revoked("d2"), 0xC3: revoked("d3")})


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return Fleet.create(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def ca(fleet: Fleet) -> Signer:
    return Signer.issuing(fleet)


@pytest.fixture
def verifier(fleet: Fleet) -> FeedVerifier:
    return FeedVerifier(load_ca_bundle(fleet.ca), TRUST_DOMAIN, GATEWAY)


@pytest.fixture
def issued() -> Issued:
    return Issued()


def refused(verifier: FeedVerifier, body: bytes, version: int = 0,
            last_issued: str | None = None) -> FeedRefusedError:
    with pytest.raises(FeedRefusedError) as info:
        verifier.check(body, version, last_issued)
    assert info.value.reason in REASONS
    return info.value


def test_a_snapshot_signed_by_the_issuing_ca_is_accepted(
        verifier: FeedVerifier, ca: Signer, issued: Issued) -> None:
    """ES256 by the issuing key, x5c the issuing certificate of client_ca: parsed whole."""
    doc = verifier.check(ca.sign(snapshot(V5, issued.next())), 0, None)
    assert (doc.version, doc.base, doc.gateway, doc.trust_domain) == (5, 0, GATEWAY,
                                                                      TRUST_DOMAIN)
    assert doc.changes.devices["d1"] == V5.devices["d1"]
    assert doc.changes.revoked == dict(V5.revoked)


def test_es384_by_the_root_ca_of_client_ca_is_accepted(
        fleet: Fleet, verifier: FeedVerifier, issued: Issued) -> None:
    """A P-384 CA certificate of the bundle signs ES384 (RFC 7518 3.4: 48-byte r and s)."""
    key = load_pem_private_key((fleet.pki / "root-ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    root = Signer(key, x509.load_pem_x509_certificate((fleet.pki / "root-ca.pem").read_bytes()))
    doc = verifier.check(root.sign(snapshot(V5, issued.next())), 0, None)
    assert doc.version == 5


def test_a_tampered_payload_is_refused_signature(
        verifier: FeedVerifier, ca: Signer, issued: Issued) -> None:
    """One serial added to a signed payload: the signature no longer covers it."""
    envelope = json.loads(ca.sign(snapshot(V5, issued.next())))
    doc = json.loads(b64url_decode(envelope["payload"], "payload"))
    doc["revoked"] = {}  # the attacker lifts every revocation
    envelope["payload"] = b64url(json.dumps(doc).encode())
    assert refused(verifier, json.dumps(envelope).encode()).reason == "signature"


def test_a_truncated_body_is_refused_envelope(
        verifier: FeedVerifier, ca: Signer, issued: Issued) -> None:
    body = ca.sign(snapshot(V5, issued.next()))
    for cut in (0, 1, len(body) // 2, len(body) - 1):
        assert refused(verifier, body[:cut]).reason == "envelope"


def test_a_document_signed_by_another_ca_is_refused_signer(
        tmp_path: Path, verifier: FeedVerifier, issued: Issued) -> None:
    """Another fleet's issuing CA with its own certificate in x5c: not in client_ca."""
    other = Signer.issuing(Fleet.create(tmp_path / "other"))
    assert refused(verifier, other.sign(snapshot(V5, issued.next()))).reason == "signer"


def test_another_cas_signature_under_our_cas_certificate_is_refused_signature(
        tmp_path: Path, fleet: Fleet, verifier: FeedVerifier, issued: Issued) -> None:
    """x5c names our issuing CA, the key is another CA's: the signature does not verify."""
    other = Signer.issuing(Fleet.create(tmp_path / "other"))
    forged = Signer(other.key, Signer.issuing(fleet).cert)
    assert refused(verifier, forged.sign(snapshot(V5, issued.next()))).reason == "signature"


def test_a_device_key_with_its_certificate_is_refused_signer(
        fleet: Fleet, verifier: FeedVerifier, issued: Issued) -> None:
    """A device certificate chains to the CA, but only a CA certificate of client_ca signs."""
    device = signed_by_device(fleet, "signer-1")
    assert refused(verifier, device.sign(snapshot(V5, issued.next()))).reason == "signer"


def test_a_certificate_one_bit_off_the_bundles_is_refused_signer(
        verifier: FeedVerifier, ca: Signer, issued: Issued) -> None:
    """x5c must be byte for byte a bundle certificate, not one with the same name."""
    body = json.loads(ca.sign(snapshot(V5, issued.next())))
    header = json.loads(b64url_decode(body["protected"], "protected"))
    der = base64.b64decode(header["x5c"][0])
    header["x5c"] = [base64.b64encode(der[:-1] + bytes([der[-1] ^ 1])).decode()]
    body["protected"] = b64url(json.dumps(header).encode())
    assert refused(verifier, json.dumps(body).encode()).reason == "signer"


@pytest.mark.parametrize("alg", ["none", "HS256", "RS256", "EdDSA"])
def test_an_algorithm_other_than_es256_or_es384_is_refused_envelope(
        verifier: FeedVerifier, ca: Signer, issued: Issued, alg: str) -> None:
    assert refused(verifier, ca.sign(snapshot(V5, issued.next()), alg=alg)).reason == "envelope"


def test_es384_claimed_for_a_p256_signer_is_refused_signature(
        verifier: FeedVerifier, ca: Signer, issued: Issued) -> None:
    body = ca.sign(snapshot(V5, issued.next()), alg="ES384")
    assert refused(verifier, body).reason == "signature"


def test_a_der_signature_instead_of_r_s_is_refused_signature(
        verifier: FeedVerifier, ca: Signer, issued: Issued) -> None:
    """RFC 7518 3.4: r || s, 64 bytes for ES256; an ASN.1 DER signature is not one."""
    envelope = json.loads(ca.sign(snapshot(V5, issued.next())))
    signing_input = f"{envelope['protected']}.{envelope['payload']}".encode()
    envelope["signature"] = b64url(ca.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    assert refused(verifier, json.dumps(envelope).encode()).reason == "signature"


def test_a_malformed_document_signed_by_the_ca_is_refused_format(
        verifier: FeedVerifier, ca: Signer, issued: Issued) -> None:
    doc = snapshot(V5, issued.next())
    doc["version"] = "five"
    assert refused(verifier, ca.sign(doc)).reason == "format"


def test_another_trust_domain_is_refused(verifier: FeedVerifier, ca: Signer,
                                         issued: Issued) -> None:
    other = state(5, trust_domain="other.test")
    assert refused(verifier, ca.sign(snapshot(other, issued.next()))).reason == "trust-domain"


def test_a_document_served_to_another_gateway_is_refused(
        verifier: FeedVerifier, ca: Signer, issued: Issued) -> None:
    body = ca.sign(snapshot(V5, issued.next(), gateway="gw-other"))
    assert refused(verifier, body).reason == "gateway"


def test_a_snapshot_below_the_version_in_force_is_refused_rollback(
        verifier: FeedVerifier, ca: Signer, issued: Issued) -> None:
    """Version 5 when 7 is in force; the same version again is fine (a re-sync)."""
    first = issued.next()
    assert refused(verifier, ca.sign(snapshot(V5, issued.next())), 7, first).reason == "rollback"
    assert verifier.check(ca.sign(snapshot(V7, issued.next())), 7, first).version == 7


def test_a_document_issued_no_later_than_the_last_is_refused_replay(
        verifier: FeedVerifier, ca: Signer, issued: Issued) -> None:
    """The same heartbeat twice: its issued is not after the one accepted."""
    when = issued.next()
    body = ca.sign(heartbeat(V7, when))
    assert verifier.check(body, 7, None).heartbeat
    assert refused(verifier, body, 7, when).reason == "replay"
    assert refused(verifier, ca.sign(heartbeat(V7, issued.next())), 7, "2099-01-01T00:00:00.000Z",
                   ).reason == "replay"


def test_a_delta_that_does_not_build_on_the_version_in_force_is_a_gap(
        verifier: FeedVerifier, ca: Signer, issued: Issued) -> None:
    """A delta 5 -> 7 when 6 is in force: not a refusal, the hub asks for a snapshot."""
    body = ca.sign(delta(V5, V7, issued.next()))
    with pytest.raises(FeedGapError):
        verifier.check(body, 6, None)
    doc = verifier.check(body, 5, None)
    assert (doc.base, doc.version) == (5, 7)
    assert doc.changes.revoked[0xC3] == revoked("d3")


def test_the_signer_must_be_a_ca_certificate_even_in_the_bundle(
        fleet: Fleet, ca: Signer, issued: Issued) -> None:
    """A client_ca bundle that (wrongly) holds a device certificate still does not let that
    device sign: only certificates with BasicConstraints ca=True are signers."""
    device = signed_by_device(fleet, "signer-2")
    bundle = [*load_ca_bundle(fleet.ca), device.cert]
    verifier = FeedVerifier(bundle, TRUST_DOMAIN, GATEWAY)
    assert refused(verifier, device.sign(snapshot(V5, issued.next()))).reason == "signer"
    assert verifier.check(ca.sign(snapshot(V5, issued.next())), 0, None).version == 5
