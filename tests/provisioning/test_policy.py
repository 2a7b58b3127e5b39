"""CSR policy: every bad CSR a factory line can produce is refused with its reason."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from tests.provisioning.conftest import TRUST_DOMAIN, CliResult
from tests.provisioning.csrs import make_csr, make_key, tamper

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
