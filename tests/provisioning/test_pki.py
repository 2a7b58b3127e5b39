"""The PKI folder: files, modes, encryption, refusing to overwrite, the root key offline."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.provisioning.conftest import CliResult
from tests.provisioning.csrs import make_csr

FILES = {"pki.toml", "root-ca.pem", "root-ca.key", "issuing-ca.pem", "issuing-ca.key",
         "ca-chain.pem", "crl.pem", "registry.db"}


def _init(cli: Callable[..., CliResult], pki: Path, *extra: str) -> CliResult:
    return cli("init", "--pki", pki, "--org", "Acme", "--trust-domain", "fleet.acme.test",
               *extra)


def test_init_creates_the_folder_of_design_section_2(tmp_path: Path,
                                                     cli: Callable[..., CliResult]) -> None:
    """Root EC P-384 20 years, issuing EC P-256 5 years pathlen 0, chain, keys 0600."""
    pki = tmp_path / "pki"
    assert _init(cli, pki).code == 0
    assert {p.name for p in pki.iterdir()} >= FILES
    for key in ("root-ca.key", "issuing-ca.key"):
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600
        assert (pki / key).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    root = x509.load_pem_x509_certificate((pki / "root-ca.pem").read_bytes())
    issuing = x509.load_pem_x509_certificate((pki / "issuing-ca.pem").read_bytes())
    root_key, issuing_key = root.public_key(), issuing.public_key()
    assert isinstance(root_key, ec.EllipticCurvePublicKey)
    assert isinstance(issuing_key, ec.EllipticCurvePublicKey)
    assert root_key.curve.name == "secp384r1"
    assert issuing_key.curve.name == "secp256r1"
    assert (root.not_valid_after_utc - root.not_valid_before_utc).days // 365 == 20
    assert (issuing.not_valid_after_utc - issuing.not_valid_before_utc).days // 365 == 5
    bc = issuing.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (bc.ca, bc.path_length) == (True, 0)
    issuing.verify_directly_issued_by(root)
    chain = x509.load_pem_x509_certificates((pki / "ca-chain.pem").read_bytes())
    assert chain == [issuing, root]


def test_registry_is_in_wal_mode(pki_dir: Path) -> None:
    """DESIGN section 2: the registry runs in WAL mode."""
    import sqlite3

    with sqlite3.connect(pki_dir / "registry.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_init_refuses_an_existing_pki(pki_dir: Path, cli: Callable[..., CliResult]) -> None:
    """An existing PKI is never overwritten; nothing in it changes."""
    before = {p.name: p.read_bytes() for p in pki_dir.iterdir() if p.is_file()}
    result = _init(cli, pki_dir)
    assert result.code == 2
    assert result.err == (f"error: a PKI already exists here (pki.toml); refusing to "
                          f"overwrite ({pki_dir})\n")
    assert {p.name: p.read_bytes() for p in pki_dir.iterdir() if p.is_file()} == before


def test_init_with_bad_trust_domain_leaves_nothing(tmp_path: Path,
                                                   cli: Callable[..., CliResult]) -> None:
    """Bad input to init is one line naming the option, and no folder is created."""
    result = cli("init", "--pki", tmp_path / "p", "--org", "A", "--trust-domain", "Bad_Domain")
    assert result.code == 2
    assert result.err.startswith("error: 'Bad_Domain' is not a valid trust domain")
    assert result.err.endswith("(--trust-domain)\n")
    assert not (tmp_path / "p").exists()


def test_encrypted_keys_need_the_passphrase(tmp_path: Path, cli: Callable[..., CliResult],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With --passphrase-env the CA keys are encrypted PKCS#8; signing needs the secret."""
    pki = tmp_path / "pki"
    monkeypatch.setenv("CA_PASS", "correct horse battery staple")
    assert _init(cli, pki, "--passphrase-env", "CA_PASS").code == 0
    for key in ("root-ca.key", "issuing-ca.key"):
        assert (pki / key).read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    csr = tmp_path / "d.csr"
    csr.write_bytes(make_csr(cn="d"))
    missing = cli("sign", "--pki", pki, csr)  # stdin is not a terminal under pytest
    assert missing.code == 2
    assert missing.err == ("error: CA key is encrypted: give its passphrase with "
                           f"--passphrase-env VAR ({pki / 'issuing-ca.key'})\n")
    monkeypatch.setenv("WRONG", "nope")
    wrong = cli("sign", "--pki", pki, "--passphrase-env", "WRONG", csr)
    assert (wrong.code, wrong.err) == (2, "error: wrong passphrase for CA key "
                                          f"({pki / 'issuing-ca.key'})\n")
    unset = cli("sign", "--pki", pki, "--passphrase-env", "NOT_SET_ANYWHERE", csr)
    assert (unset.code, unset.err) == (2, "error: environment variable NOT_SET_ANYWHERE is "
                                          "not set (--passphrase-env)\n")
    ok = cli("sign", "--pki", pki, "--passphrase-env", "CA_PASS", "--json", csr)
    assert ok.code == 0
    assert json.loads(ok.out)[0]["status"] == "issued"
    # Nothing was issued by the refused attempts.
    listed = json.loads(cli("devices", "--pki", pki, "--json").out)
    assert [d["device_id"] for d in listed] == ["d"]


def test_every_command_but_init_works_without_the_root_key(
        pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """The root key can be moved offline after init."""
    (pki_dir / "root-ca.key").unlink()
    (tmp_path / "d.csr").write_bytes(make_csr(cn="d"))
    assert cli("sign", "--pki", pki_dir, "--out", tmp_path, tmp_path / "d.csr").code == 0
    assert cli("server-cert", "--pki", pki_dir, "--name", "gw.local", "--ip", "127.0.0.1",
               "--out", tmp_path / "hub").code == 0
    assert cli("suspend", "--pki", pki_dir, "d").code == 0
    assert cli("resume", "--pki", pki_dir, "d").code == 0
    assert cli("revoke", "--pki", pki_dir, "d").code == 0
    assert cli("crl", "--pki", pki_dir).code == 0
    assert cli("devices", "--pki", pki_dir).code == 0
    assert cli("device", "--pki", pki_dir, "d").code == 0
    assert cli("audit", "verify", "--pki", pki_dir).code == 0


def test_pki_from_environment(pki_dir: Path, cli: Callable[..., CliResult],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """FLEET_PKI names the folder when --pki is not given."""
    monkeypatch.setenv("FLEET_PKI", str(pki_dir))
    assert cli("devices", "--json").out.strip() == "[]"


def test_server_cert(pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """server.pem carries serverAuth + clientAuth, the DNS name and IPs, then the chain;
    key is 0600 (the whole profile: test_server_cert.py)."""
    result = cli("server-cert", "--pki", pki_dir, "--name", "gw1.local", "--ip", "127.0.0.1",
                 "--ip", "::1", "--out", tmp_path)
    assert result.code == 0, result.err
    certs = x509.load_pem_x509_certificates((tmp_path / "server.pem").read_bytes())
    assert len(certs) == 2
    san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw1.local"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = certs[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                         x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600
    bad = cli("server-cert", "--pki", pki_dir, "--name", "gw", "--ip", "1.2.3", "--out",
              tmp_path / "x")
    assert (bad.code, bad.err) == (2, "error: '1.2.3' is not an IP address (--ip)\n")
