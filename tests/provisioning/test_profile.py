"""The device certificate profile of DESIGN section 1, checked field by field."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.authority import Authority, initialize
from provisioning.config import PKIConfig
from provisioning.csr import CSRInput
from provisioning.issuer import SignOptions
from provisioning.profile import (
    DeviceTemplate,
    device_certificate,
    key_identifier,
    random_serial,
    validity,
)
from tests.provisioning.conftest import ORG, TRUST_DOMAIN
from tests.provisioning.csrs import make_csr, make_key


def _issue(authority: Authority, out: Path, csr: bytes, days: int | None = None
           ) -> x509.Certificate:
    [result] = authority.issuer().sign([CSRInput("t.csr", csr)],
                                       SignOptions(out_dir=out, days=days))
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


@pytest.mark.parametrize("urls", [False, True])
def test_template_builds_what_device_certificate_builds(tmp_path: Path, urls: bool) -> None:
    """The batch's DeviceTemplate and device_certificate make the same TBS, byte for byte."""
    root = tmp_path / "pki"
    extra = {"crl_url": "http://ca.test/crl", "ocsp_url": "http://ca.test/ocsp"} if urls else {}
    initialize(root, PKIConfig(trust_domain=TRUST_DOMAIN, organisation=ORG, **extra), None)
    with Authority(root) as authority:
        ca, config = authority.ca, authority.config
        not_before, not_after = validity(ca, 30, dt.datetime.now(dt.UTC))
        template = DeviceTemplate(ca, config, not_before, not_after)
        for i, kind in enumerate(("p256", "p384", "ed25519", "rsa2048", "p256")):
            key = make_key(kind).public_key()
            serial = random_serial()
            device_id = f"tmpl-{i}.{kind}"
            der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            made = template.certificate(device_id, key, serial,  # type: ignore[arg-type]
                                        der if i % 2 else None)
            want = device_certificate(ca, config, device_id, key,  # type: ignore[arg-type]
                                      serial, not_before, not_after)
            assert made.tbs_certificate_bytes == want.tbs_certificate_bytes
            made.verify_directly_issued_by(ca.cert)
        assert template._layout is not None  # later certificates did use the template


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


def test_template_that_would_build_otherwise_is_not_used(
        authority: Authority, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template whose build differs from device_certificate's falls back to it."""
    from provisioning import profile

    monkeypatch.setattr(profile, "_fixed_extensions", lambda cert: ([], []))  # loses EKU...
    ca, config = authority.ca, authority.config
    not_before, not_after = validity(ca, 30, dt.datetime.now(dt.UTC))
    template = DeviceTemplate(ca, config, not_before, not_after)
    for i in range(3):
        key = make_key().public_key()
        serial = random_serial()
        made = template.certificate(f"d{i}", key, serial)  # type: ignore[arg-type]
        want = device_certificate(ca, config, f"d{i}", key,  # type: ignore[arg-type]
                                  serial, not_before, not_after)
        assert made.tbs_certificate_bytes == want.tbs_certificate_bytes
    assert template._layout is None
