"""``fleet-provision issuing-ca rotate|retire|show`` on real files (DESIGN section 10, issue 14):
checked from outside with ``openssl verify`` and ``openssl crl``, and through the registry's
rows and audit chain."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import rotation
from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.issuer import SignOptions
from provisioning.serial import format_serial
from tests.provisioning.conftest import CliResult
from tests.provisioning.csrs import make_csr
from tests.provisioning.est_support import run

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl required")


def _sign(pki: Path, *device_ids: str, validity: dt.timedelta | None = None,
          ) -> dict[str, x509.Certificate]:
    with Authority(pki) as authority:
        made = authority.issuer().sign(
            [CSRInput(f"{d}.csr", make_csr(cn=d)) for d in device_ids],
            SignOptions(validity=validity))
    assert all(m.status == "issued" for m in made), made
    return {m.device_id or "": x509.load_pem_x509_certificate((m.pem or "").encode())
            for m in made}


def _write(folder: Path, name: str, cert: x509.Certificate) -> Path:
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _verifies(pki: Path, cert: Path) -> bool:
    """``openssl verify`` as a relying party that trusts the root and takes ca-chain.pem's
    intermediates as untrusted helpers."""
    done = run("openssl", "verify", "-CAfile", pki / "root-ca.pem", "-untrusted",
               pki / "ca-chain.pem", cert)
    return done.returncode == 0 and b": OK" in done.stdout


def _pems(path: Path, kind: bytes) -> list[bytes]:
    """Each PEM block of *kind* (CERTIFICATE, X509 CRL) in the file, in order."""
    text = path.read_bytes()
    begin, end = b"-----BEGIN " + kind + b"-----", b"-----END " + kind + b"-----"
    blocks = []
    while begin in text:
        start = text.index(begin)
        stop = text.index(end, start) + len(end)
        blocks.append(text[start:stop] + b"\n")
        text = text[stop:]
    return blocks


def _crls(pki: Path, tmp_path: Path) -> list[x509.CertificateRevocationList]:
    """crl.pem's CRLs, each checked by ``openssl crl -CAfile`` against ca-chain.pem."""
    found = []
    for i, block in enumerate(_pems(pki / "crl.pem", b"X509 CRL")):
        one = tmp_path / f"crl-{i}.pem"
        one.write_bytes(block)
        done = run("openssl", "crl", "-in", one, "-CAfile", pki / "ca-chain.pem", "-noout")
        assert done.returncode == 0, done.stderr
        assert b"verify OK" in done.stderr
        found.append(x509.load_pem_x509_crl(block))
    return found


def _rotate(cli: Callable[..., CliResult], pki: Path, *extra: str | Path) -> CliResult:
    done = cli("issuing-ca", "rotate", "--pki", pki, *extra)
    assert done.code == 0, done.err
    return done


def test_rotate_makes_a_new_issuer_that_signs_while_the_old_certificates_still_verify(
        pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """After rotate: issuing-ca.pem is a new P-256 intermediate, pathlen 0, distinct subject,
    same root; the old pair is under retiring/; ca-chain.pem = new, old, root; a new
    certificate is the new CA's and verifies through the chain, and so does one issued
    before; crl.pem holds one CRL per issuer (new first), each verifying with openssl and
    listing only its own revoked certificates; the registry records each row's issuer and
    the audit chain holds issuing-ca.rotate."""
    old_ca = x509.load_pem_x509_certificate((pki_dir / "issuing-ca.pem").read_bytes())
    before = _sign(pki_dir, "pre-1", "pre-2")
    done = _rotate(cli, pki_dir)
    assert "Issuing CA 2" in done.err
    new_ca = x509.load_pem_x509_certificate((pki_dir / "issuing-ca.pem").read_bytes())
    root = x509.load_pem_x509_certificate((pki_dir / "root-ca.pem").read_bytes())
    assert new_ca.subject != old_ca.subject
    assert new_ca.issuer == root.subject
    new_ca.verify_directly_issued_by(root)
    bc = new_ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (bc.ca, bc.path_length) == (True, 0)
    assert new_ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    kept = pki_dir / "retiring" / f"issuing-ca-{format_serial(old_ca.serial_number)}.pem"
    assert x509.load_pem_x509_certificate(kept.read_bytes()) == old_ca
    assert kept.with_suffix(".key").stat().st_mode & 0o777 == 0o600
    assert (pki_dir / "issuing-ca.key").stat().st_mode & 0o777 == 0o600
    assert [x509.load_pem_x509_certificate(b) for b in
            _pems(pki_dir / "ca-chain.pem", b"CERTIFICATE")] == [new_ca, old_ca, root]

    after = _sign(pki_dir, "post-1")["post-1"]
    assert after.issuer == new_ca.subject
    after.verify_directly_issued_by(new_ca)
    assert _verifies(pki_dir, _write(tmp_path, "post-1", after))
    assert _verifies(pki_dir, _write(tmp_path, "pre-1", before["pre-1"]))

    assert cli("revoke", "--pki", pki_dir, "pre-2").code == 0
    assert cli("revoke", "--pki", pki_dir, "post-1").code == 0
    new_crl, old_crl = _crls(pki_dir, tmp_path)
    assert (new_crl.issuer, old_crl.issuer) == (new_ca.subject, old_ca.subject)
    assert [r.serial_number for r in new_crl] == [after.serial_number]
    assert [r.serial_number for r in old_crl] == [before["pre-2"].serial_number]

    with Authority(pki_dir) as authority:
        rows = dict(authority.registry.conn.execute(
            "SELECT device_id, issuer_key_id FROM certificates").fetchall())
        events = authority.registry.conn.execute(
            "SELECT serial, detail FROM events WHERE action = 'issuing-ca.rotate'").fetchall()
        assert authority.registry.verify_audit().ok
    old_id = old_ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    new_id = new_ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert rows == {"pre-1": old_id.digest.hex(), "pre-2": old_id.digest.hex(),
                    "post-1": new_id.digest.hex()}
    [(serial, detail)] = events
    assert serial == format_serial(new_ca.serial_number)
    assert json.loads(detail)["previous"] == format_serial(old_ca.serial_number)


def test_rotate_without_the_root_key_names_the_option_and_changes_nothing(
        pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """The root key moved offline: one line naming --root-key, exit 2, every file as it was;
    with --root-key pointing at where it went, the rotation goes through."""
    offline = tmp_path / "usb" / "root-ca.key"
    offline.parent.mkdir()
    (pki_dir / "root-ca.key").rename(offline)
    files = {p.name: p.read_bytes() for p in pki_dir.iterdir() if p.is_file()
             and p.suffix != ".db" and "registry" not in p.name}
    refused = cli("issuing-ca", "rotate", "--pki", pki_dir)
    assert refused.code == 2
    assert refused.err.count("\n") == 1
    assert "--root-key" in refused.err
    assert refused.err.startswith("error: no root CA key at ")
    assert files == {p.name: p.read_bytes() for p in pki_dir.iterdir() if p.is_file()
                     and p.suffix != ".db" and "registry" not in p.name}
    assert not (pki_dir / "retiring").exists()
    _rotate(cli, pki_dir, "--root-key", offline)
    assert (pki_dir / "retiring").is_dir()


def test_rotate_with_an_encrypted_pki_reads_the_root_passphrase_from_its_option(
        tmp_path: Path, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch) -> None:
    """init --passphrase-env encrypts both keys; rotate takes the issuing passphrase for the
    root too unless --root-passphrase-env names another; a wrong one is one line naming
    that option; the new issuing key is encrypted like the old one."""
    monkeypatch.setenv("CA_PASS", "correct horse")
    monkeypatch.setenv("WRONG", "battery staple")
    pki = tmp_path / "enc"
    assert cli("init", "--pki", pki, "--org", "O", "--trust-domain", "t.example",
               "--passphrase-env", "CA_PASS").code == 0
    wrong = cli("issuing-ca", "rotate", "--pki", pki, "--passphrase-env", "CA_PASS",
                "--root-passphrase-env", "WRONG")
    assert wrong.code == 2
    assert "--root-passphrase-env" in wrong.err
    assert wrong.err.count("\n") == 1
    _rotate(cli, pki, "--passphrase-env", "CA_PASS")
    assert b"ENCRYPTED" in (pki / "issuing-ca.key").read_bytes().split(b"\n", 1)[0]
    assert cli("crl", "--pki", pki, "--passphrase-env", "CA_PASS").code == 0
    assert len(_crls(pki, tmp_path)) == 2


def test_retire_is_refused_while_the_old_issuer_has_certificates_in_service(
        pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """retire: exit 1 and one line with the count while an old certificate is active or
    held; a second rotate is refused meanwhile; once they are revoked, retire drops the old
    CA: its certificate kept in retired/, its key gone, chain and crl.pem the new one's
    only; issuing-ca show follows along; the audit chain holds issuing-ca.retire."""
    old_ca = x509.load_pem_x509_certificate((pki_dir / "issuing-ca.pem").read_bytes())
    _sign(pki_dir, "old-1", "old-2")
    _rotate(cli, pki_dir)
    new_ca = x509.load_pem_x509_certificate((pki_dir / "issuing-ca.pem").read_bytes())
    _sign(pki_dir, "new-1")
    assert cli("suspend", "--pki", pki_dir, "old-2").code == 0

    shown = cli("issuing-ca", "show", "--pki", pki_dir, "--json")
    assert [(r["status"], r["certificates"]) for r in json.loads(shown.out)] == [
        ("current", 1), ("retiring", 2)]
    refused = cli("issuing-ca", "retire", "--pki", pki_dir)
    assert refused.code == 1
    assert refused.err.count("\n") == 1
    assert refused.err.startswith("error: 2 certificate(s) issued by Test Org Fleet Issuing "
                                  "CA are still in service")
    again = cli("issuing-ca", "rotate", "--pki", pki_dir)
    assert again.code == 1
    assert "retire it first" in again.err
    assert len(_pems(pki_dir / "ca-chain.pem", b"CERTIFICATE")) == 3

    assert cli("revoke", "--pki", pki_dir, "old-1", "old-2").code == 0
    done = cli("issuing-ca", "retire", "--pki", pki_dir)
    assert done.code == 0, done.err
    serial = format_serial(old_ca.serial_number)
    assert not (pki_dir / "retiring").exists()
    assert list((pki_dir / "retired").iterdir()) == [
        pki_dir / "retired" / f"issuing-ca-{serial}.pem"]
    root = x509.load_pem_x509_certificate((pki_dir / "root-ca.pem").read_bytes())
    assert [x509.load_pem_x509_certificate(b) for b in
            _pems(pki_dir / "ca-chain.pem", b"CERTIFICATE")] == [new_ca, root]
    [crl] = _crls(pki_dir, tmp_path)
    assert crl.issuer == new_ca.subject
    assert len(crl) == 0
    shown = cli("issuing-ca", "show", "--pki", pki_dir, "--json")
    assert [r["status"] for r in json.loads(shown.out)] == ["current"]
    assert "nothing to retire" in cli("issuing-ca", "retire", "--pki", pki_dir).err
    with Authority(pki_dir) as authority:
        assert authority.registry.count_events("issuing-ca.retire") == 1
        assert authority.registry.verify_audit().ok
    _rotate(cli, pki_dir)  # the next rotation: generation 3
    assert "Issuing CA 3" in x509.load_pem_x509_certificate(
        (pki_dir / "issuing-ca.pem").read_bytes()).subject.rfc4514_string()


def test_retire_counts_expired_old_certificates_as_not_needed(
        pki_dir: Path, cli: Callable[..., CliResult]) -> None:
    """An old certificate past its not-after needs nothing: retire goes through."""
    _sign(pki_dir, "short-1", validity=dt.timedelta(minutes=1))
    _rotate(cli, pki_dir)
    with Authority(pki_dir) as authority, authority.registry.write("test") as tx:
        tx.execute("UPDATE certificates SET not_after = '2000-01-01T00:00:00Z'")
    assert cli("issuing-ca", "retire", "--pki", pki_dir).code == 0


def test_a_rotation_that_fails_before_its_commit_puts_every_file_back(
        pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the new files were written (the CRL cannot be signed here) leaves
    the PKI folder as it was: same issuing pair, chain and CRL, no retiring/ files, no
    audit event."""

    before = {p: p.read_bytes() for p in pki_dir.iterdir() if p.suffix in (".pem", ".key")}

    def broken(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(rotation, "publish_crl", broken)
    with Authority(pki_dir) as authority, pytest.raises(OSError, match="disk full"):
        rotation.rotate(authority, pki_dir / "root-ca.key", None)
    assert before == {p: p.read_bytes() for p in pki_dir.iterdir()
                      if p.suffix in (".pem", ".key")}
    assert list((pki_dir / "retiring").iterdir()) == []
    with Authority(pki_dir) as authority:
        assert authority.registry.count_events("issuing-ca.rotate") == 0


def test_an_issuing_key_that_is_not_its_certificates_pair_is_one_line(
        pki_dir: Path, cli: Callable[..., CliResult]) -> None:
    """What a rotate cut between its key and its certificate would leave: every command that
    loads the issuing CA says so in one line (exit 2) instead of signing with a mismatch."""
    other = ec.generate_private_key(ec.SECP256R1())
    (pki_dir / "issuing-ca.key").write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    done = cli("crl", "--pki", pki_dir)
    assert done.code == 2
    assert done.err.count("\n") == 1
    assert "not the pair of its certificate" in done.err


def test_a_process_holding_the_cas_never_takes_an_uncommitted_rotation(
        pki_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process (the service's worker) that sees ca-chain.pem change while a rotation
    is still in its transaction waits for the registry's lock: the rotation fails and puts
    the files back, and that process still holds the old issuing CA, never the new one."""
    worker = Authority(pki_dir)
    old = worker.ca
    outcome: list[bool] = []
    reader = threading.Thread(target=lambda: outcome.append(worker.refresh_cas()))

    def failing_publish(*_: object, **__: object) -> None:
        # The new files are in place, the transaction is open: the worker looks now.
        reader.start()
        reader.join(timeout=0.5)  # it waits on the lock (it cannot finish before we do)
        assert reader.is_alive()
        raise OSError("disk full")

    monkeypatch.setattr(rotation, "publish_crl", failing_publish)
    with Authority(pki_dir) as authority, pytest.raises(OSError, match="disk full"):
        rotation.rotate(authority, pki_dir / "root-ca.key", None)
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert worker.ca.cert == old.cert
    worker.close()
