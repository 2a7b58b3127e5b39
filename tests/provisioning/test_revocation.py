"""Revoke, suspend, resume: registry state, audit events and the published CRL agree."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from provisioning.serial import format_serial
from tests.provisioning.conftest import CliResult
from tests.provisioning.csrs import make_csr, make_key


def _crl(pki: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())


def _number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def _entries(pki: Path) -> dict[str, x509.ReasonFlags | None]:
    out: dict[str, x509.ReasonFlags | None] = {}
    for entry in _crl(pki):
        try:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reason = None
        out[format_serial(entry.serial_number)] = reason
    return out


@pytest.fixture
def fleet(pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> dict[str, str]:
    """Three issued devices; returns device id -> serial."""
    for cn in ("d1", "d2", "d3"):
        (tmp_path / f"{cn}.csr").write_bytes(make_csr(cn=cn))
    result = cli("sign", "--pki", pki_dir, "--out", tmp_path / "o", "--json", tmp_path)
    return {r["device_id"]: r["serial"] for r in json.loads(result.out)}


def test_init_publishes_an_empty_crl(pki_dir: Path) -> None:
    """A fresh PKI has a signed, empty CRL #1 so a hub can start at once."""
    crl = _crl(pki_dir)
    assert len(crl) == 0
    assert _number(crl) == 1


def test_revoke_lists_serial_with_reason_and_bumps_the_crl_number(
        pki_dir: Path, fleet: dict[str, str], cli: Callable[..., CliResult]) -> None:
    """revoke rewrites crl.pem with the serial, its RFC 5280 reason, and CRL number + 1."""
    before = _number(_crl(pki_dir))
    result = cli("revoke", "--pki", pki_dir, "d1", "--reason", "keyCompromise")
    assert result.code == 0, result.err
    assert _entries(pki_dir) == {fleet["d1"]: x509.ReasonFlags.key_compromise}
    assert _number(_crl(pki_dir)) == before + 1
    device = json.loads(cli("device", "--pki", pki_dir, "d1", "--json").out)
    assert device["status"] == "revoked"
    assert device["certificates"][0]["status"] == "revoked"
    assert device["certificates"][0]["reason"] == "keyCompromise"


@pytest.mark.parametrize(("typed", "flag"), [
    ("unspecified", None),
    ("key-compromise", x509.ReasonFlags.key_compromise),
    ("CESSATIONOFOPERATION", x509.ReasonFlags.cessation_of_operation),
    ("superseded", x509.ReasonFlags.superseded),
    ("affiliation_changed", x509.ReasonFlags.affiliation_changed),
    ("privilegeWithdrawn", x509.ReasonFlags.privilege_withdrawn),
])
def test_reason_names(typed: str, flag: x509.ReasonFlags | None, pki_dir: Path,
                      fleet: dict[str, str], cli: Callable[..., CliResult]) -> None:
    """RFC 5280 reason names, forgiving case and separators; unspecified has no reasonCode."""
    assert cli("revoke", "--pki", pki_dir, "d2", "--reason", typed).code == 0
    assert _entries(pki_dir) == {fleet["d2"]: flag}


def test_unknown_reason_is_a_usage_error(pki_dir: Path, fleet: dict[str, str],
                                         cli: Callable[..., CliResult]) -> None:
    """A typo in --reason changes nothing and says which names exist."""
    result = cli("revoke", "--pki", pki_dir, "d1", "--reason", "stolen")
    assert result.code == 2
    assert result.err.startswith("error: unknown revocation reason 'stolen'; want one of "
                                 "unspecified, keyCompromise")
    assert result.err.endswith("(--reason)\n")
    assert _entries(pki_dir) == {}


def test_revoke_one_serial_leaves_the_device_active(
        pki_dir: Path, tmp_path: Path, fleet: dict[str, str],
        cli: Callable[..., CliResult]) -> None:
    """--serial revokes that certificate only; the renewed one stays good."""
    (tmp_path / "d1.csr").write_bytes(make_csr(cn="d1", key=make_key()))
    cli("sign", "--pki", pki_dir, "--renew", "--out", tmp_path / "o", tmp_path / "d1.csr")
    old = fleet["d1"]
    result = cli("revoke", "--pki", pki_dir, "d1", "--serial", old.upper(), "--reason",
                 "superseded")
    assert result.code == 0, result.err
    assert _entries(pki_dir) == {old: x509.ReasonFlags.superseded}
    device = json.loads(cli("device", "--pki", pki_dir, "d1", "--json").out)
    assert device["status"] == "active"
    assert [c["status"] for c in device["certificates"]] == ["revoked", "active"]


def test_revoke_unknown_device_or_serial(pki_dir: Path, fleet: dict[str, str],
                                         cli: Callable[..., CliResult]) -> None:
    """Naming what does not exist is exit 1 with one line, and publishes nothing."""
    before = _number(_crl(pki_dir))
    nobody = cli("revoke", "--pki", pki_dir, "ghost")
    assert (nobody.code, nobody.err) == (1, "error: no device 'ghost' in the registry "
                                            "(ghost)\n")
    wrong = cli("revoke", "--pki", pki_dir, "d1", "--serial", fleet["d2"])
    assert wrong.code == 1
    assert wrong.err == (f"error: device 'd1' has no certificate with serial {fleet['d2']} "
                         "(--serial)\n")
    assert _number(_crl(pki_dir)) == before


def test_suspend_puts_on_hold_and_resume_lifts_it(
        pki_dir: Path, fleet: dict[str, str], cli: Callable[..., CliResult]) -> None:
    """suspend lists the serial as certificateHold; resume removes it from the next CRL."""
    assert cli("suspend", "--pki", pki_dir, "d3").code == 0
    assert _entries(pki_dir) == {fleet["d3"]: x509.ReasonFlags.certificate_hold}
    assert json.loads(cli("devices", "--pki", pki_dir, "--status", "suspended",
                          "--json").out)[0]["device_id"] == "d3"
    held = _number(_crl(pki_dir))
    assert cli("resume", "--pki", pki_dir, "d3").code == 0
    assert _entries(pki_dir) == {}
    assert _number(_crl(pki_dir)) == held + 1
    device = json.loads(cli("device", "--pki", pki_dir, "d3", "--json").out)
    assert device["status"] == "active"
    assert device["certificates"][0]["status"] == "active"


def test_revoking_a_suspended_device_keeps_it_revoked(
        pki_dir: Path, fleet: dict[str, str], cli: Callable[..., CliResult]) -> None:
    """A hold turns into a revocation; resume cannot undo a revocation."""
    cli("suspend", "--pki", pki_dir, "d3")
    assert cli("revoke", "--pki", pki_dir, "d3", "--reason", "keyCompromise").code == 0
    assert _entries(pki_dir) == {fleet["d3"]: x509.ReasonFlags.key_compromise}
    result = cli("resume", "--pki", pki_dir, "d3")
    assert result.code == 2
    assert "device 'd3' is revoked; a revocation cannot be resumed" in result.err


def test_crl_command_numbers_monotonically_and_writes_out(
        pki_dir: Path, tmp_path: Path, fleet: dict[str, str],
        cli: Callable[..., CliResult]) -> None:
    """Each crl call signs a new CRL with a higher number, also written to --out."""
    cli("revoke", "--pki", pki_dir, "d1")
    numbers = []
    for _ in range(3):
        assert cli("crl", "--pki", pki_dir, "--out", tmp_path / "pub.pem").code == 0
        numbers.append(_number(_crl(pki_dir)))
    assert numbers == sorted(set(numbers))
    assert (tmp_path / "pub.pem").read_bytes() == (pki_dir / "crl.pem").read_bytes()
    crl = _crl(pki_dir)
    assert crl.next_update_utc is not None
    assert (crl.next_update_utc - crl.last_update_utc).total_seconds() == 24 * 3600


def test_crl_number_survives_a_registry_behind_the_file(
        pki_dir: Path, fleet: dict[str, str], cli: Callable[..., CliResult]) -> None:
    """If a crash left crl.pem ahead of the registry, the next number is still higher."""
    import sqlite3

    cli("crl", "--pki", pki_dir)
    on_disk = _number(_crl(pki_dir))
    with sqlite3.connect(pki_dir / "registry.db") as db:
        db.execute("UPDATE meta SET value = '1' WHERE key = 'crl_number'")
    cli("crl", "--pki", pki_dir)
    assert _number(_crl(pki_dir)) == on_disk + 1


def test_revoke_several_devices_is_one_crl_and_all_or_nothing(
        pki_dir: Path, fleet: dict[str, str], cli: Callable[..., CliResult]) -> None:
    """Several DEVICE_IDs: one transaction, one new CRL; an unknown id revokes none."""
    before = _number(_crl(pki_dir))
    failed = cli("revoke", "--pki", pki_dir, "d1", "ghost", "d2")
    assert (failed.code, failed.err) == (1, "error: no device 'ghost' in the registry "
                                            "(ghost)\n")
    assert _entries(pki_dir) == {}
    assert _number(_crl(pki_dir)) == before
    result = cli("revoke", "--pki", pki_dir, "d1", "d2", "d1", "--reason", "keyCompromise")
    assert result.code == 0, result.err
    assert _entries(pki_dir) == {fleet["d1"]: x509.ReasonFlags.key_compromise,
                                 fleet["d2"]: x509.ReasonFlags.key_compromise}
    assert _number(_crl(pki_dir)) == before + 1
    assert result.err.count("crl.pem is CRL #") == 2  # one line per device, d1 once
    again = cli("revoke", "--pki", pki_dir, "d1", "d3")
    assert again.code == 0
    assert "nothing to revoke: d1" in again.err
    assert set(_entries(pki_dir)) == set(fleet.values())
    assert cli("audit", "verify", "--pki", pki_dir).code == 0
    serial_with_many = cli("revoke", "--pki", pki_dir, "d1", "d2", "--serial", fleet["d1"])
    assert serial_with_many.code == 2
    assert serial_with_many.err.endswith("(--serial)\n")
