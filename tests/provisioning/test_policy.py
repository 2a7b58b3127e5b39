"""CSR policy: every bad CSR a factory line can produce is refused with its reason."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from provisioning import der
from provisioning.policy import CSRContext, check, signature_valid
from tests.provisioning.conftest import TRUST_DOMAIN, CliResult
from tests.provisioning.csrs import PrivateKey, make_csr, make_key, tamper

SPIFFE = f"spiffe://{TRUST_DOMAIN}/device/dev-1"


def _cert_pem(authority_dir: Path) -> bytes:
    return (authority_dir / "issuing-ca.pem").read_bytes()


BAD: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "rsa-1024": (lambda _: make_csr(key=make_key("rsa1024")), "key-size: got RSA 1024 bits"),
    "dsa": (lambda _: make_csr(key=make_key("dsa")), "key-type: got DSA key"),
    "secp256k1": (lambda _: make_csr(key=make_key("secp256k1")),
                  "key-type: got EC curve secp256k1"),
    "p521": (lambda _: make_csr(key=make_key("p521")), "key-type: got EC curve secp521r1"),
    "ed448": (lambda _: make_csr(key=make_key("ed448")), "key-type: got Ed448 key"),
    "tampered": (lambda _: tamper(make_csr()), "bad-signature: CSR signature does not verify"),
    "ca-true": (lambda _: make_csr(ca=True), "ca-requested: CSR asks for BasicConstraints "
                "CA:TRUE"),
    "cn-invalid": (lambda _: make_csr(cn="dev 1/../x"), "bad-cn: CN 'dev 1/../x' is not a "
                   "valid device id"),
    "cn-too-long": (lambda _: make_csr(cn="d" * 65), "bad-cn: CN"),
    "cn-missing": (lambda _: make_csr(cn=None, organisation="x"), "bad-cn: subject has 0 CN"),
    "two-cns": (lambda _: make_csr(extra_cns=("dev-2",)), "bad-cn: subject has 2 CN"),
    "san-other-device": (
        lambda _: make_csr(san=[x509.UniformResourceIdentifier(
            f"spiffe://{TRUST_DOMAIN}/device/dev-2")]),
        "san-mismatch: SAN URI 'spiffe://fleet.test/device/dev-2' contradicts CN 'dev-1'"),
    "san-other-domain": (
        lambda _: make_csr(san=[x509.UniformResourceIdentifier(
            "spiffe://evil.test/device/dev-1")]), "san-mismatch: SAN URI"),
    "san-dns": (lambda _: make_csr(san=[x509.DNSName("gateway.example.com")]),
                "san-mismatch: SAN DNS 'gateway.example.com' contradicts CN 'dev-1'"),
    "san-email": (lambda _: make_csr(san=[x509.RFC822Name("a@b.c")]),
                  "san-mismatch: SAN entry"),
    "subject-not-utf8": (lambda _: _request(make_key(), der.sequence(
        _rdn(CN, 0x0C, b"dev-\xff"))).public_bytes(Encoding.PEM),
                         "bad-cn: subject cannot be read: error parsing asn1 value"),
    "empty": (lambda _: b"", "empty file"),
    "whitespace": (lambda _: b"  \n\n", "empty file"),
    "text": (lambda _: b"hello, I am not a CSR\n", "not a CSR: text"),
    "binary-blob": (lambda _: bytes(range(256)) * 4, "not a CSR: binary data"),
    "der-garbage": (lambda _: b"\x30\x82\x01\x00" + b"\x00" * 300,
                    "not a CSR: binary data that is not DER PKCS#10"),
    "certificate-pem": (_cert_pem, "not a CSR: found a PEM CERTIFICATE block"),
    "too-large": (lambda _: make_csr() + b"\n" * (64 * 1024), "file too large"),
    "two-csrs": (lambda _: make_csr(cn="dev-1") + make_csr(cn="dev-2"),
                 "2 CSRs in one file, want exactly 1"),
    "csr-plus-key": (lambda _: make_csr() + b"-----BEGIN PRIVATE KEY-----\nAA==\n"
                     b"-----END PRIVATE KEY-----\n", "2 PEM blocks in one file"),
    "truncated-pem": (lambda _: make_csr()[:200] + b"\n-----END CERTIFICATE REQUEST-----\n",
                      "malformed PEM CSR"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_csr_is_rejected_with_its_reason_while_the_good_one_is_issued(
    name: str, pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """Each bad CSR is refused with a precise reason, exit 1, and the batch goes on."""
    make, reason = BAD[name]
    bad = tmp_path / f"{name}.csr"
    bad.write_bytes(make(pki_dir))
    good = tmp_path / "good.csr"
    good.write_bytes(make_csr(cn="good-device"))
    result = cli("sign", "--pki", pki_dir, "--out", tmp_path / "out", "--json", bad, good)
    assert result.code == 1
    rows = {r["source"]: r for r in json.loads(result.out)}
    assert rows[str(bad)]["status"] == "rejected"
    assert reason in rows[str(bad)]["reason"]
    assert rows[str(bad)]["serial"] is None
    assert rows[str(good)]["status"] == "issued"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good-device.pem"]


@pytest.mark.parametrize("kind", ["p256", "p384", "ed25519", "rsa2048"])
def test_allowed_key_types_are_issued(kind: str, pki_dir: Path, tmp_path: Path,
                                      cli: Callable[..., CliResult]) -> None:
    """EC P-256/P-384, Ed25519 and RSA 2048+ are accepted (DESIGN section 1)."""
    csr = tmp_path / "d.csr"
    csr.write_bytes(make_csr(cn=f"dev-{kind}", key=make_key(kind)))
    result = cli("sign", "--pki", pki_dir, "--out", tmp_path, "--json", csr)
    assert result.code == 0, result.err
    assert json.loads(result.out)[0]["status"] == "issued"


def test_rsa_8192_is_accepted_and_above_is_refused(pki_dir: Path, tmp_path: Path,
                                                   cli: Callable[..., CliResult]) -> None:
    """The RSA ceiling is 8192 bits: a larger key is refused with its size."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    # 8200 bits is not a multiple of 8 of a common size but cryptography generates it.
    big = tmp_path / "big.csr"
    big.write_bytes(make_csr(cn="big", key=rsa.generate_private_key(65537, 8200)))
    result = cli("sign", "--pki", pki_dir, "--out", tmp_path, "--json", big)
    assert result.code == 1
    assert "got RSA 8200 bits" in json.loads(result.out)[0]["reason"]


def test_der_csr_is_accepted(pki_dir: Path, tmp_path: Path,
                             cli: Callable[..., CliResult]) -> None:
    """A DER-encoded PKCS#10 (as some device SDKs write it) is read like PEM."""
    csr = tmp_path / "d.csr"
    csr.write_bytes(make_csr(cn="der-dev", der=True))
    result = cli("sign", "--pki", pki_dir, "--out", tmp_path, "--json", csr)
    assert result.code == 0, result.err
    assert json.loads(result.out)[0]["device_id"] == "der-dev"


def test_matching_san_is_accepted(pki_dir: Path, tmp_path: Path,
                                  cli: Callable[..., CliResult]) -> None:
    """A SAN that repeats the CN's own identity does not contradict it."""
    csr = tmp_path / "d.csr"
    csr.write_bytes(make_csr(san=[x509.UniformResourceIdentifier(SPIFFE),
                                  x509.DNSName("dev-1")]))
    result = cli("sign", "--pki", pki_dir, "--out", tmp_path, "--json", csr)
    assert result.code == 0, result.err


def test_manifest_limits_issuance_to_listed_devices(pki_dir: Path, tmp_path: Path,
                                                    cli: Callable[..., CliResult]) -> None:
    """With --manifest, a CSR for a device not on the production list is refused."""
    manifest = tmp_path / "line7.txt"
    manifest.write_text("# line 7, shift 2\nsensor-1\n\nsensor-2  # spare\n")
    for cn in ("sensor-1", "sensor-9"):
        (tmp_path / f"{cn}.csr").write_bytes(make_csr(cn=cn))
    result = cli("sign", "--pki", pki_dir, "--manifest", manifest, "--out", tmp_path / "o",
                 "--json", tmp_path)
    assert result.code == 1
    rows = {r["device_id"]: r for r in json.loads(result.out)}
    assert rows["sensor-1"]["status"] == "issued"
    assert rows["sensor-9"]["status"] == "rejected"
    assert rows["sensor-9"]["reason"] == ("not-in-manifest: device 'sensor-9' is not in the "
                                          "manifest")


def test_bad_manifest_is_a_usage_error_naming_the_line(pki_dir: Path, tmp_path: Path,
                                                       cli: Callable[..., CliResult]) -> None:
    """A manifest with an invalid id stops before anything is issued (exit 2)."""
    manifest = tmp_path / "m.txt"
    manifest.write_text("ok-1\nnot ok\n")
    (tmp_path / "a.csr").write_bytes(make_csr(cn="ok-1"))
    result = cli("sign", "--pki", pki_dir, "--manifest", manifest, tmp_path / "a.csr")
    assert result.code == 2
    assert result.err == (f"error: manifest line 2: 'not ok' is not a valid device id "
                          f"(want [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}, 1-64 characters) "
                          f"({manifest})\n")
    assert not (pki_dir / "certs").exists() or not any((pki_dir / "certs").iterdir())


# -- the policy's own reading of the request's DER ---------------------------------------------


def _request(key: PrivateKey, subject: bytes, spki: bytes | None = None,
             algorithm: hashes.HashAlgorithm | None = None) -> x509.CertificateSigningRequest:
    """A CSR with this exact subject Name (and SubjectPublicKeyInfo) DER, signed by *key*:
    what cryptography's builder would not write."""
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    spki = spki or key.public_key().public_bytes(Encoding.DER,
                                                 PublicFormat.SubjectPublicKeyInfo)
    info = der.sequence(der.integer(0), subject, spki, der.explicit(0, b""))
    algorithm = algorithm or hashes.SHA256()
    oids = {"sha256": "1.2.840.10045.4.3.2", "sha384": "1.2.840.10045.4.3.3"}
    signature = key.sign(info, ec.ECDSA(algorithm))
    return x509.load_der_x509_csr(der.sequence(info, der.sequence(der.oid(oids[algorithm.name])),
                                               der.bit_string(signature)))


def _rdn(oid: str, tag: int, value: bytes) -> bytes:
    return der.set_of(der.sequence(der.oid(oid), der.tlv(tag, value)))


CN, ORG, COUNTRY = "2.5.4.3", "2.5.4.10", "2.5.4.6"
SUBJECTS = {
    "cn": [_rdn(CN, 0x0C, b"dev-1")],
    "o-cn": [_rdn(ORG, 0x0C, b"Factory"), _rdn(CN, 0x0C, b"dev-1")],
    "c-o-cn-printable": [_rdn(COUNTRY, 0x13, b"DE"), _rdn(ORG, 0x13, b"Factory"),
                         _rdn(CN, 0x13, b"dev-1")],
    "cn-ia5": [_rdn(CN, 0x16, b"dev-1")],
    "two-cns": [_rdn(CN, 0x0C, b"dev-1"), _rdn(CN, 0x0C, b"dev-2")],
    "none": [],
    "no-cn": [_rdn(ORG, 0x0C, b"Factory")],
    "cn-utf8-text": [_rdn(CN, 0x0C, "gerät-1".encode())],
    "cn-too-long": [_rdn(CN, 0x0C, b"d" * 65)],
    "cn-empty": [_rdn(CN, 0x0C, b"")],
    # left to cryptography:
    "cn-bmp": [_rdn(CN, 0x1E, "dev-1".encode("utf-16-be"))],
    "cn-universal": [_rdn(CN, 0x1C, "dev-1".encode("utf-32-be"))],
    "cn-t61": [_rdn(CN, 0x14, b"dev-1")],
    "multi-valued-rdn": [der.set_of(der.sequence(der.oid(CN), der.tlv(0x0C, b"dev-1")),
                                    der.sequence(der.oid(ORG), der.tlv(0x0C, b"Factory")))],
    "o-not-utf8": [_rdn(ORG, 0x0C, b"\xff\xfe"), _rdn(CN, 0x0C, b"dev-1")],
    "cn-not-utf8": [_rdn(CN, 0x0C, b"dev-\xff")],
}


def _cryptographys(csr: x509.CertificateSigningRequest) -> list[str] | ValueError:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            attrs = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        return exc
    return [str(a.value) for a in attrs]


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_common_names_are_cryptographys(name: str) -> None:
    """The CNs the policy reads from the request's DER are the ones cryptography's subject
    gives, for every subject form; where cryptography raises, so does the policy."""
    csr = _request(make_key(), der.sequence(*SUBJECTS[name]))
    ctx = CSRContext(csr, TRUST_DOMAIN, None)
    want = _cryptographys(csr)
    if isinstance(want, ValueError):
        with pytest.raises(ValueError, match=re.escape(str(want))):
            _ = ctx.common_names
    else:
        assert ctx.common_names == want


@pytest.mark.parametrize("kind", ["p256", "p384", "ed25519", "rsa2048", "p256-compressed"])
def test_spki_der_is_cryptographys_and_the_signature_is_checked_alike(kind: str) -> None:
    """The SubjectPublicKeyInfo the issuer hashes and puts in the certificate is the one
    public_bytes writes, also for a CSR that sends its point compressed; the signature
    check agrees with is_signature_valid, for good and for broken signatures."""
    subject = der.sequence(_rdn(CN, 0x0C, b"dev-1"))
    key = make_key(kind.removesuffix("-compressed"))
    if kind == "p256-compressed":
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        point = key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
        spki = der.sequence(der.sequence(der.oid(der.ID_EC_PUBLIC_KEY), der.oid(der.SECP256R1)),
                            der.bit_string(point))
        csr = _request(key, subject, spki)
    else:
        csr = x509.load_pem_x509_csr(make_csr(key=key))
    ctx = CSRContext(csr, TRUST_DOMAIN, None)
    want = csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert ctx.spki_der == want
    assert csr.is_signature_valid
    assert check(ctx) is None
    # the same request with its signature broken: flipped bits, or not even DER
    whole = csr.public_bytes(Encoding.DER)
    for broken in (whole[:-1] + bytes([whole[-1] ^ 1]),
                   whole[:-8] + b"\x30\x06\x02\x01\x01\x02\x01\x01"):
        bad = x509.load_der_x509_csr(broken)
        assert not bad.is_signature_valid
        rejection = signature_valid(CSRContext(bad, TRUST_DOMAIN, None))
        assert str(rejection) == "bad-signature: CSR signature does not verify"


def test_other_signature_algorithms_are_left_to_cryptography() -> None:
    """A P-256 key signing with ECDSA-SHA384 is checked by is_signature_valid, and passes."""
    key = make_key()
    csr = _request(key, der.sequence(_rdn(CN, 0x0C, b"dev-1")), algorithm=hashes.SHA384())
    assert csr.signature_algorithm_oid.dotted_string == "1.2.840.10045.4.3.3"
    assert check(CSRContext(csr, TRUST_DOMAIN, None)) is None
