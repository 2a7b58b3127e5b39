"""The device certificate profile of DESIGN section 1, checked field by field."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from provisioning.authority import Authority, initialize
from provisioning.certder import Layout, cut
from provisioning.config import PKIConfig
from provisioning.csr import CSRInput
from provisioning.issuer import SignOptions
from provisioning.pki import IssuingCA
from provisioning.profile import (
    IssuablePublicKey,
    certificate_pem,
    device_certificate,
    key_identifier,
    random_serial,
    validity,
)
from provisioning.template import DeviceTemplate
from tests.provisioning.conftest import ORG, TRUST_DOMAIN
from tests.provisioning.csrs import make_csr, make_key


def _issue(authority: Authority, out: Path, csr: bytes, days: int | None = None
           ) -> x509.Certificate:
    lifetime = dt.timedelta(days=days) if days is not None else None
    [result] = authority.issuer().sign([CSRInput("t.csr", csr)],
                                       SignOptions(out_dir=out, validity=lifetime))
    assert result.status == "issued", result.reason
    pems = (out / f"{result.device_id}.pem").read_bytes()
    return x509.load_pem_x509_certificates(pems)[0]


def test_subject_san_and_usages(authority: Authority, tmp_path: Path) -> None:
    """CN = device id, O = the fleet's organisation, SPIFFE SAN URI, clientAuth, CA:FALSE."""
    cert = _issue(authority, tmp_path, make_csr(cn="sensor-7", organisation="Evil Corp"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sensor-7"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == ORG
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(
        f"spiffe://{TRUST_DOMAIN}/device/sensor-7")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False


def test_key_identifiers_chain_to_the_issuing_ca(authority: Authority, tmp_path: Path) -> None:
    """SKI is the device key's; AKI is the issuing CA's SKI."""
    cert = _issue(authority, tmp_path, make_csr())
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == authority.ca.ski.digest
    assert cert.issuer == authority.ca.cert.subject


def test_serial_is_random_positive_and_at_least_64_bits(authority: Authority,
                                                        tmp_path: Path) -> None:
    """RFC 5280 §4.1.2.2 and CA/B practice: unpredictable positive serials, never reused."""
    serials = [_issue(authority, tmp_path, make_csr(cn=f"d{i}")).serial_number
               for i in range(20)]
    assert all(s > 0 for s in serials)
    assert all(s.bit_length() >= 64 for s in serials)
    assert len(set(serials)) == 20


def test_validity_is_backdated_and_defaults_to_365_days(authority: Authority,
                                                        tmp_path: Path) -> None:
    """Not-before a few minutes back for skewed device clocks; 365 days by default."""
    before = dt.datetime.now(dt.UTC)
    cert = _issue(authority, tmp_path, make_csr())
    skew = before - cert.not_valid_before_utc
    assert dt.timedelta(minutes=1) < skew <= dt.timedelta(minutes=10)
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(life - dt.timedelta(days=365, minutes=5)) < dt.timedelta(seconds=5)


def test_days_option_sets_validity(authority: Authority, tmp_path: Path) -> None:
    """--days N overrides the PKI's default validity."""
    cert = _issue(authority, tmp_path, make_csr(), days=30)
    assert (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days in (29, 30)


def test_validity_never_outlives_the_issuing_ca(authority: Authority, tmp_path: Path) -> None:
    """A certificate past its CA's not-after could never verify: it is capped."""
    cert = _issue(authority, tmp_path, make_csr(), days=36500)
    assert cert.not_valid_after_utc == authority.ca.cert.not_valid_after_utc


def test_nothing_else_from_the_csr_is_copied(authority: Authority, tmp_path: Path) -> None:
    """A CSR asking for keyCertSign and extra SANs gets only the profile's extensions."""
    csr = make_csr(key_usage_cert_sign=True, ca=False,
                   san=[x509.DNSName("dev-1"),
                        x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/device/dev-1")])
    cert = _issue(authority, tmp_path, csr)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not ku.key_cert_sign
    assert not ku.crl_sign
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert {type(e.value).__name__ for e in cert.extensions} == {
        "SubjectAlternativeName", "ExtendedKeyUsage", "KeyUsage", "BasicConstraints",
        "SubjectKeyIdentifier", "AuthorityKeyIdentifier"}


def test_no_crl_or_ocsp_pointers_without_urls(authority: Authority, tmp_path: Path) -> None:
    """Without URLs in pki.toml there is nothing to point at."""
    cert = _issue(authority, tmp_path, make_csr())
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess)


def test_crl_and_ocsp_pointers_when_configured(tmp_path: Path) -> None:
    """pki.toml URLs become a CRL distribution point and an OCSP AIA entry."""
    root = tmp_path / "pki"
    initialize(root, PKIConfig(trust_domain=TRUST_DOMAIN, organisation=ORG,
                               crl_url="http://ca.test:8080/crl",
                               ocsp_url="http://ca.test:8080/ocsp"), None)
    with Authority(root) as authority:
        cert = _issue(authority, tmp_path, make_csr())
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name == [x509.UniformResourceIdentifier("http://ca.test:8080/crl")]
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [(d.access_method, d.access_location) for d in aia] == [
        (x509.AuthorityInformationAccessOID.OCSP,
         x509.UniformResourceIdentifier("http://ca.test:8080/ocsp"))]


def test_output_file_is_certificate_then_issuing_ca(authority: Authority,
                                                    tmp_path: Path) -> None:
    """OUT/<device-id>.pem holds the device certificate followed by the issuing CA."""
    _issue(authority, tmp_path, make_csr(cn="chain-dev"))
    certs = x509.load_pem_x509_certificates((tmp_path / "chain-dev.pem").read_bytes())
    assert len(certs) == 2
    assert certs[1] == authority.ca.cert


# Serials the template must encode as the builder does: the smallest, one octet below and at
# the sign bit (a leading 0x00), whole octets with the top bit set, the largest allowed.
EDGE_SERIALS = [1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 2**63, 2**64 - 1, 2**158,
                2**159 - 1]


def _serials(count: int) -> list[int]:
    """Random serials of every octet length from 1 to 20, half of them with the top bit of
    their first octet set, and the edge cases."""
    rng = random.Random(5280)
    serials = list(EDGE_SERIALS)
    for i in range(count):
        bits = 1 + i % 159
        serial = rng.getrandbits(bits) | 1 << (bits - 1)  # exactly *bits* long
        serials.append(serial)
    return serials


def _template(ca: IssuingCA, config: PKIConfig, **seams: Any,
              ) -> tuple[DeviceTemplate, dt.datetime, dt.datetime]:
    not_before, not_after = validity(ca, dt.timedelta(days=30), dt.datetime.now(dt.UTC))
    return DeviceTemplate(ca, config, not_before, not_after, **seams), not_before, not_after


@pytest.fixture(scope="module")
def device_keys() -> dict[str, IssuablePublicKey]:
    """One key of every issued type (RSA keys are slow to make)."""
    return {kind: make_key(kind).public_key()  # type: ignore[misc]
            for kind in ("p256", "p384", "rsa2048", "ed25519")}


@pytest.mark.parametrize("urls", [False, True])
def test_template_builds_what_device_certificate_builds(
        tmp_path: Path, urls: bool, device_keys: dict[str, IssuablePublicKey]) -> None:
    """The batch's DeviceTemplate and device_certificate make the same TBS, byte for byte:
    many serials (short ones, ones whose top bit forces a leading 0x00, the largest), device
    ids of 1 and 64 characters, P-256, P-384, RSA-2048 and Ed25519 device keys, with and
    without CRL and OCSP URLs. Every certificate verifies with the issuing CA's key, and all
    but the first are encoded by the template, not built by cryptography."""
    root = tmp_path / "pki"
    extra = {"crl_url": "http://ca.test/crl", "ocsp_url": "http://ca.test/ocsp"} if urls else {}
    initialize(root, PKIConfig(trust_domain=TRUST_DOMAIN, organisation=ORG, **extra), None)
    built = []

    def counting(*args: Any) -> x509.Certificate:
        built.append(args[2])
        return device_certificate(*args)

    ids = ["a", "d" * 64, "Z9", "sensor-0001", "x.y_z-0", "7" * 63]
    with Authority(root) as authority:
        ca, config = authority.ca, authority.config
        template, not_before, not_after = _template(ca, config, build=counting)
        for i, serial in enumerate(_serials(160)):
            kind = ("p256", "p384", "rsa2048", "ed25519")[i % 4]
            key = device_keys[kind]
            device_id = ids[i % len(ids)]
            spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            if i % 3:
                made = template.certificate(device_id, key, serial, spki if i % 2 else None)
                made_der = made.public_bytes(Encoding.DER)
            else:
                made_der = template.certificate_der(device_id, key, serial,
                                                    spki if i % 2 else None)
                made = x509.load_der_x509_certificate(made_der)
            want = device_certificate(ca, config, device_id, key, serial, not_before,
                                      not_after)
            assert made.tbs_certificate_bytes == want.tbs_certificate_bytes, (serial, kind)
            assert made_der == made.public_bytes(Encoding.DER)
            assert made.serial_number == serial
            assert made.signature_algorithm_oid == want.signature_algorithm_oid
            made.verify_directly_issued_by(ca.cert)
        assert template._layout is not None  # later certificates did use the template
        assert built == ["a"]  # only the first was built by cryptography


def test_template_refuses_what_the_builder_refuses(authority: Authority) -> None:
    """Serials that are not positive or not below 2^159, and a CN over 64 characters, are
    errors from the template as from device_certificate; ids that are not device ids are
    built by device_certificate."""
    ca, config = authority.ca, authority.config
    template, not_before, not_after = _template(ca, config)
    key = make_key().public_key()
    template.certificate("first", key, random_serial())  # type: ignore[arg-type]
    assert template._layout is not None
    for serial in (0, -1, 2**159, 2**160):
        with pytest.raises(ValueError, match="serial"):
            template.certificate_der("dev", key, serial)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="serial"):
            device_certificate(ca, config, "dev", key,  # type: ignore[arg-type]
                               serial, not_before, not_after)
    with pytest.raises(ValueError, match="length"):
        template.certificate("d" * 65, key, random_serial())  # type: ignore[arg-type]
    serial = random_serial()
    odd = template.certificate("not a device id", key, serial)  # type: ignore[arg-type]
    want = device_certificate(ca, config, "not a device id", key,  # type: ignore[arg-type]
                              serial, not_before, not_after)
    assert odd.tbs_certificate_bytes == want.tbs_certificate_bytes


@pytest.mark.parametrize("kind", ["p256", "p384", "ed25519", "rsa2048"])
def test_key_identifier_from_der_is_cryptographys(kind: str) -> None:
    """The SKI read from the SubjectPublicKeyInfo the issuer already has is from_public_key's;
    DER that is not an SPKI falls back to cryptography."""
    key = make_key(kind).public_key()
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    want = x509.SubjectKeyIdentifier.from_public_key(key)  # type: ignore[arg-type]
    assert key_identifier(key, der) == want  # type: ignore[arg-type]
    for broken in (b"", der[:-1], der + b"\x00", b"\x31" + der[1:], der[:2] + b"\x31"):
        assert key_identifier(key, broken) == want  # type: ignore[arg-type]


@pytest.mark.parametrize("part", ["version", "middle", "subject_head", "uri_prefix",
                                  "extensions_head", "extensions_tail",
                                  "signature_algorithm"])
def test_template_that_would_build_otherwise_is_not_used(
        authority: Authority, part: str) -> None:
    """A template whose bytes differ from device_certificate's in any part falls back to
    it: every certificate is then built by cryptography, and still the profile's."""
    def damaged(whole: bytes, config: PKIConfig) -> Layout:
        layout = cut(whole, config)
        assert layout is not None
        return dataclasses.replace(layout, **{part: getattr(layout, part)[:-1]})

    ca, config = authority.ca, authority.config
    template, not_before, not_after = _template(ca, config, cut=damaged)
    for i in range(3):
        key = make_key().public_key()
        serial = random_serial()
        made = template.certificate(f"d{i}", key, serial)  # type: ignore[arg-type]
        want = device_certificate(ca, config, f"d{i}", key,  # type: ignore[arg-type]
                                  serial, not_before, not_after)
        assert made.tbs_certificate_bytes == want.tbs_certificate_bytes
        made.verify_directly_issued_by(ca.cert)
    assert template._layout is None


def test_template_is_not_used_for_an_issuing_key_that_is_not_ec(tmp_path: Path) -> None:
    """The template signs with ECDSA-SHA256 only; an RSA issuing CA gets device_certificate
    (sha256WithRSAEncryption) for every certificate."""
    key = make_key("rsa2048")
    assert isinstance(key, rsa.RSAPrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RSA Issuing CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(random_serial())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    ca = IssuingCA(cert=cert, key=key)  # type: ignore[arg-type]
    template, _, _ = _template(ca, PKIConfig(trust_domain=TRUST_DOMAIN, organisation=ORG))
    for i in range(2):
        made = template.certificate(f"r{i}", make_key().public_key(),  # type: ignore[arg-type]
                                    random_serial())
        made.verify_directly_issued_by(cert)
        assert made.signature_algorithm_oid == SignatureAlgorithmOID.RSA_WITH_SHA256
    assert template._layout is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary required")
def test_openssl_accepts_a_template_certificate(authority: Authority, pki_dir: Path,
                                                tmp_path: Path) -> None:
    """``openssl x509 -text`` reads and ``openssl verify`` accepts a certificate the template
    encoded (the second of its template), with the profile's fields."""
    ca, config = authority.ca, authority.config
    template, _, _ = _template(ca, config)
    template.certificate("first", make_key().public_key(),  # type: ignore[arg-type]
                         random_serial())
    serial = 0x80 << 150  # top bit set: a leading 0x00 in the INTEGER
    der = template.certificate_der("sensor-42", make_key("p384").public_key(),  # type: ignore[arg-type]
                                   serial)
    assert template._layout is not None
    path = tmp_path / "sensor-42.pem"
    path.write_text(certificate_pem(der))
    verify = subprocess.run(["openssl", "verify", "-purpose", "sslclient", "-CAfile",
                             str(pki_dir / "ca-chain.pem"), str(path)],
                            capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert f"URI:spiffe://{TRUST_DOMAIN}/device/sensor-42" in text
    assert f"Subject: O={ORG}, CN=sensor-42" in text.replace(" = ", "=")
    assert f"{serial:x}"[:8] in text.replace(":", "")


def test_certificate_pem_is_cryptographys(authority: Authority,
                                          device_keys: dict[str, IssuablePublicKey]) -> None:
    """The issuer's PEM from the DER is cryptography's PEM byte for byte, for certificates
    of every key type (different lengths) and for any length around the 48-octet lines."""
    ca, config = authority.ca, authority.config
    template, _, _ = _template(ca, config)
    for i, key in enumerate(device_keys.values()):
        cert = template.certificate(f"pem-{i}", key, random_serial())
        der = cert.public_bytes(Encoding.DER)
        assert certificate_pem(der) == cert.public_bytes(Encoding.PEM).decode("ascii")
    for size in [*range(1, 100), 480, 481, 527, 528]:
        data = bytes(range(256)) * 3
        text = base64.b64encode(data[:size]).decode("ascii")
        lines = "".join(text[i:i + 64] + "\n" for i in range(0, len(text), 64))
        assert certificate_pem(data[:size]) == (
            f"-----BEGIN CERTIFICATE-----\n{lines}-----END CERTIFICATE-----\n")
