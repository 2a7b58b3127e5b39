"""Issuance semantics: idempotent re-submission, renewal, and devices that may not enroll."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.issuer import Issuer, SignOptions
from provisioning.profile import random_serial
from provisioning.registry.transactions import Transaction
from provisioning.serial import format_serial
from tests.provisioning.conftest import CliResult
from tests.provisioning.csrs import make_csr, make_key


def _sign(cli: Callable[..., CliResult], pki: Path, *args: str | Path) -> tuple[int, list[dict]]:
    result = cli("sign", "--pki", pki, "--json", *args)
    return result.code, json.loads(result.out)


def test_resubmitting_the_same_csr_returns_the_existing_certificate(
        pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """Same device id and key: status "existing", same serial, no second row."""
    csr = tmp_path / "a.csr"
    csr.write_bytes(make_csr(cn="dev-a"))
    code1, [first] = _sign(cli, pki_dir, "--out", tmp_path / "o", csr)
    (tmp_path / "o" / "dev-a.pem").unlink()
    code2, [second] = _sign(cli, pki_dir, "--out", tmp_path / "o", csr)
    assert (code1, code2) == (0, 0)
    assert first["status"] == "issued"
    assert second == {**first, "status": "existing"}
    assert (tmp_path / "o" / "dev-a.pem").is_file()  # re-written for the factory station
    rows = sqlite3.connect(pki_dir / "registry.db").execute(
        "SELECT count(*) FROM certificates").fetchone()[0]
    assert rows == 1


def test_new_key_for_a_device_with_a_certificate_needs_renew(
        pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """A second key for the same device is refused; --renew issues it and supersedes the old."""
    old, new = tmp_path / "old.csr", tmp_path / "new.csr"
    old.write_bytes(make_csr(cn="dev-r", key=make_key()))
    new.write_bytes(make_csr(cn="dev-r", key=make_key()))
    _, [first] = _sign(cli, pki_dir, "--out", tmp_path, old)
    code, [refused] = _sign(cli, pki_dir, "--out", tmp_path, new)
    assert code == 1
    assert refused["status"] == "rejected"
    assert refused["reason"].startswith("has-certificate: device 'dev-r' already has active "
                                        f"certificate {first['serial']}")
    code, [renewed] = _sign(cli, pki_dir, "--out", tmp_path, "--renew", new)
    assert code == 0
    assert renewed["status"] == "issued"
    shown = json.loads(cli("device", "--pki", pki_dir, "dev-r", "--json").out)
    statuses = {c["serial"]: c["status"] for c in shown["certificates"]}
    assert statuses == {first["serial"]: "superseded", renewed["serial"]: "active"}
    listed = json.loads(cli("devices", "--pki", pki_dir, "--json").out)
    assert listed[0]["serial"] == renewed["serial"]


def test_renew_refuses_a_key_the_device_has_used(
        pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """DESIGN 10: --renew with the key of a superseded certificate is rejected
    (renew-key-reused, audited); the same CSRs again stay idempotent: the renewal's CSR
    with --renew, the first CSR without, each returns its own certificate."""
    old, new = tmp_path / "old.csr", tmp_path / "new.csr"
    old.write_bytes(make_csr(cn="dev-k", key=make_key()))
    new.write_bytes(make_csr(cn="dev-k", key=make_key()))
    _, [first] = _sign(cli, pki_dir, "--out", tmp_path / "o", old)
    _, [renewed] = _sign(cli, pki_dir, "--out", tmp_path / "o", "--renew", new)
    assert renewed["status"] == "issued"
    code, [reused] = _sign(cli, pki_dir, "--out", tmp_path / "o", "--renew", old)
    assert code == 1
    assert reused["status"] == "rejected"
    assert reused["reason"] == (
        "renew-key-reused: this key is the key of the device's certificate "
        f"{first['serial']} (superseded); a renewal needs a key the device has never used: "
        "make a new key")
    code, [again] = _sign(cli, pki_dir, "--out", tmp_path / "o", "--renew", new)
    assert (code, again["status"], again["serial"]) == (0, "existing", renewed["serial"])
    code, [resubmitted] = _sign(cli, pki_dir, "--out", tmp_path / "o", old)
    assert (code, resubmitted["status"], resubmitted["serial"]) == (0, "existing",
                                                                     first["serial"])
    events = sqlite3.connect(pki_dir / "registry.db").execute(
        "SELECT device_id, detail FROM events WHERE action = 'certificate.renew.refuse'"
    ).fetchall()
    assert [(d, json.loads(detail)["reason"]) for d, detail in events] == [
        ("dev-k", reused["reason"])]


def test_renew_needs_the_current_certificate_active(authority: Authority) -> None:
    """A device whose current certificate is held (its hold lifted by hand, the device
    active again) cannot renew it: renew-not-active."""
    [made] = authority.issuer().sign([CSRInput("a.csr", make_csr(cn="dev-h"))], SignOptions())
    with authority.registry.write("test") as tx:
        tx.execute("UPDATE certificates SET status = 'on_hold' WHERE serial = ?",
                   (made.serial,))
    [refused] = authority.issuer().sign([CSRInput("b.csr", make_csr(cn="dev-h"))],
                                        SignOptions(renew=True))
    assert refused.status == "rejected"
    assert refused.reason == (f"renew-not-active: certificate {made.serial} is on_hold; "
                              "want the device's active certificate")


def test_revoked_and_suspended_devices_cannot_enroll(
        pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """A revoked device is refused new certificates; so is a suspended one until resumed."""
    for cn in ("dev-x", "dev-s"):
        (tmp_path / f"{cn}.csr").write_bytes(make_csr(cn=cn))
    _sign(cli, pki_dir, "--out", tmp_path / "o", tmp_path)
    assert cli("revoke", "--pki", pki_dir, "dev-x").code == 0
    assert cli("suspend", "--pki", pki_dir, "dev-s").code == 0
    for cn in ("dev-x", "dev-s"):
        (tmp_path / f"{cn}.csr").write_bytes(make_csr(cn=cn))  # a fresh key
    code, rows = _sign(cli, pki_dir, "--out", tmp_path / "o", "--renew", tmp_path)
    assert code == 1
    reasons = {r["device_id"]: r["reason"] for r in rows}
    assert reasons["dev-x"].startswith("device-revoked: device 'dev-x' is revoked")
    assert reasons["dev-s"].startswith("device-suspended: device 'dev-s' is suspended")


def test_group_is_recorded(pki_dir: Path, tmp_path: Path,
                           cli: Callable[..., CliResult]) -> None:
    """--group puts the device in a group, shown by devices --json."""
    (tmp_path / "g.csr").write_bytes(make_csr(cn="dev-g"))
    _sign(cli, pki_dir, "--group", "operators", "--out", tmp_path, tmp_path / "g.csr")
    listed = json.loads(cli("devices", "--pki", pki_dir, "--json").out)
    assert listed == [{"device_id": "dev-g", "status": "active", "group": "operators",
                       "serial": listed[0]["serial"], "not_after": listed[0]["not_after"]}]
    assert listed[0]["not_after"].endswith("Z")
    int(listed[0]["serial"], 16)


def test_sign_defaults_out_to_pki_certs(pki_dir: Path, tmp_path: Path,
                                        cli: Callable[..., CliResult]) -> None:
    """Without --out the certificates land in PKI/certs."""
    (tmp_path / "d.csr").write_bytes(make_csr(cn="dev-d"))
    assert cli("sign", "--pki", pki_dir, tmp_path / "d.csr").code == 0
    cert = x509.load_pem_x509_certificates((pki_dir / "certs" / "dev-d.pem").read_bytes())[0]
    assert cert.subject.rfc4514_string().startswith("CN=dev-d")


def test_folder_input_reads_only_csr_files(pki_dir: Path, tmp_path: Path,
                                           cli: Callable[..., CliResult]) -> None:
    """A folder contributes *.csr/*.req/*.p10 files; issued .pem files are not read back."""
    (tmp_path / "a.csr").write_bytes(make_csr(cn="a"))
    (tmp_path / "b.req").write_bytes(make_csr(cn="b"))
    (tmp_path / "notes.txt").write_text("not a csr")
    code, rows = _sign(cli, pki_dir, "--out", tmp_path, tmp_path)
    assert code == 0
    assert sorted(r["device_id"] for r in rows) == ["a", "b"]
    code, rows = _sign(cli, pki_dir, "--out", tmp_path, tmp_path)
    assert [r["status"] for r in rows] == ["existing", "existing"]


def test_missing_file_is_rejected_not_fatal(pki_dir: Path, tmp_path: Path,
                                            cli: Callable[..., CliResult]) -> None:
    """A path that does not exist is one rejected input; the others are still issued."""
    (tmp_path / "a.csr").write_bytes(make_csr(cn="a"))
    code, rows = _sign(cli, pki_dir, "--out", tmp_path, tmp_path / "nope.csr",
                       tmp_path / "a.csr")
    assert code == 1
    assert rows[0] == {"source": str(tmp_path / "nope.csr"), "device_id": None,
                       "status": "rejected", "serial": None, "reason": "no such file"}
    assert rows[1]["status"] == "issued"


def test_unwritable_output_is_one_error_and_the_next_sign_finishes_it(
        pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """A file that cannot be written: a one-line error; the promise is kept and fulfilled."""
    (tmp_path / "w.csr").write_bytes(make_csr(cn="dev-w"))
    out = tmp_path / "o"
    (out / "dev-w.pem").mkdir(parents=True)  # the rename onto it must fail
    result = cli("sign", "--pki", pki_dir, "--out", out, tmp_path / "w.csr")
    assert result.code != 0
    tmp_name = out.absolute() / f".dev-w.pem.{os.getpid()}.tmp"
    assert result.err.startswith("error: cannot write certificate file: Is a directory")
    assert result.err.rstrip().endswith(f"({tmp_name})")
    assert not tmp_name.exists()
    assert list(out.glob(".*.tmp")) == []
    (out / "dev-w.pem").rmdir()
    code, [row] = _sign(cli, pki_dir, "--out", out, tmp_path / "w.csr")
    assert (code, row["status"]) == (0, "existing")
    pem = (out / "dev-w.pem").read_bytes()
    assert x509.load_pem_x509_certificates(pem)[1].subject == x509.load_pem_x509_certificate(
        (pki_dir / "issuing-ca.pem").read_bytes()).subject
    assert (out / "dev-w.pem").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("unnamed", [True, False])
def test_output_files_are_written_whole_and_replace_older_ones(
        tmp_path: Path, unnamed: bool) -> None:
    """New, existing and stale-temporary cases, with O_TMPFILE and with a named temporary."""
    from provisioning.certfiles import FileWriter

    out = tmp_path / "o"
    out.mkdir()
    (out / "old.pem").write_text("old contents")
    (out / f".stale.pem.{os.getpid()}.tmp").write_text("left by a killed run")
    (out / "stale.pem").write_text("older contents")
    writer = FileWriter(b"CHAIN\n", unnamed=unnamed)
    try:
        for name in ("new", "old", "stale"):
            writer.write(str(out / f"{name}.pem"), f"PEM of {name}\n")
    finally:
        writer.close()
    for name in ("new", "old", "stale"):
        assert (out / f"{name}.pem").read_bytes() == f"PEM of {name}\nCHAIN\n".encode()
        assert (out / f"{name}.pem").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["new.pem", "old.pem", "stale.pem"]


def _registry_agrees(authority: Authority, out: Path) -> dict[str, str]:
    """Every certificate row's fingerprint and PEM are the certificate's own, each device's
    file is its newest PEM plus the chain, each issue event names a row, and the chain
    verifies; returns device id -> newest serial."""
    conn = authority.registry.conn
    rows = conn.execute("SELECT serial, device_id, fingerprint, pem FROM certificates "
                        "ORDER BY rowid").fetchall()
    newest = {}
    for serial, device_id, fingerprint, pem in rows:
        cert = x509.load_pem_x509_certificate(pem.encode())
        assert format_serial(cert.serial_number) == serial
        assert fingerprint == cert.fingerprint(hashes.SHA256()).hex()
        assert pem == cert.public_bytes(serialization.Encoding.PEM).decode()
        cert.verify_directly_issued_by(authority.ca.cert)
        newest[device_id] = pem
    for device_id, pem in newest.items():
        assert (out / f"{device_id}.pem").read_bytes() == pem.encode() + authority.ca.chain_pem
    events = sorted(s for (s,) in conn.execute(
        "SELECT serial FROM events WHERE action = 'certificate.issue'"))
    assert events == sorted(serial for serial, *_ in rows)
    assert authority.registry.verify_audit().ok
    return {device_id: serial for serial, device_id, *_ in rows}  # the newest wins


def test_serial_collision_is_reminted_and_never_reused(
        authority: Authority, tmp_path: Path) -> None:
    """A serial taken already, in the registry or earlier in the same chunk, fails the
    chunk's one INSERT statement: the chunk is rolled back whole and decided again row by
    row, re-minting each colliding certificate with a fresh serial before its audit event
    and file name it. Every serial stays unique and registry, files and audit agree."""
    out = tmp_path / "out"
    [first] = authority.issuer().sign([CSRInput("t.csr", make_csr(cn="taken"))],
                                      SignOptions(out_dir=out))
    taken, twice = int(first.serial or "", 16), 0x5EED_0000_0000_0001
    queued = [taken, twice, twice]  # the registry's serial, then one serial two times
    drawn: list[int] = []

    def serials() -> int:
        drawn.append(queued.pop(0) if queued else random_serial())
        return drawn[-1]

    committed: list[Transaction] = []
    issuer = Issuer(authority.registry, authority.ca, authority.config, serials=serials)
    results = issuer.sign(
        [CSRInput(f"{i}.csr", make_csr(cn=f"dev-{i}")) for i in range(4)],
        SignOptions(out_dir=out), in_transaction=committed.append)
    # Four minted, then the two that collided minted again: only deciding row by row
    # re-mints, and only after the batched insert collided; one transaction committed.
    assert len(drawn) == 6
    assert len(committed) == 1
    assert [r.status for r in results] == ["issued"] * 4
    serials = [r.serial for r in results]
    assert first.serial not in serials
    assert len(set(serials)) == 4
    assert serials.count(format_serial(twice)) == 1
    assert _registry_agrees(authority, out) == {
        "taken": first.serial, **{r.device_id: r.serial for r in results}}


def test_renewing_twice_in_one_chunk_supersedes_the_chunks_own_certificate(
        authority: Authority, tmp_path: Path) -> None:
    """Two new keys for one device in one --renew batch: the second supersedes the first,
    whose row the chunk has not inserted yet when the second is decided."""
    out = tmp_path / "out"
    csrs = [CSRInput(f"{i}.csr", make_csr(cn="dev-2x", key=make_key())) for i in range(2)]
    results = authority.issuer().sign(csrs, SignOptions(out_dir=out, renew=True))
    assert [r.status for r in results] == ["issued", "issued"]
    statuses = dict(authority.registry.conn.execute("SELECT serial, status FROM certificates"))
    assert statuses == {results[0].serial: "superseded", results[1].serial: "active"}
    _registry_agrees(authority, out)
