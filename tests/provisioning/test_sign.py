"""Issuance semantics: idempotent re-submission, renewal, and devices that may not enroll."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

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
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool) -> None:
    """New, existing and stale-temporary cases, with O_TMPFILE and with a named temporary."""
    from provisioning.issuer import _FileWriter

    if not unnamed:
        monkeypatch.setattr(_FileWriter, "_UNNAMED", 0)
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.pem").write_text("old contents")
    (out / f".stale.pem.{os.getpid()}.tmp").write_text("left by a killed run")
    (out / "stale.pem").write_text("older contents")
    writer = _FileWriter(b"CHAIN\n")
    try:
        for name in ("new", "old", "stale"):
            writer.write(str(out / f"{name}.pem"), f"PEM of {name}\n")
    finally:
        writer.close()
    for name in ("new", "old", "stale"):
        assert (out / f"{name}.pem").read_bytes() == f"PEM of {name}\nCHAIN\n".encode()
        assert (out / f"{name}.pem").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["new.pem", "old.pem", "stale.pem"]
