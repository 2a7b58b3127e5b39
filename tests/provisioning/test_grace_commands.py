"""DESIGN section 10: any write command may run the superseded sweep, and every one that opens
the registry for writing does, first (issue 14). A certificate whose renew_grace is over is
revoked with reason superseded by the next such command, the CRL re-signed with it; a command
that needs no CA key (group set, token...) sweeps only when the issuing key opens without a
passphrase, and never fails for it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from provisioning.authority import Authority
from provisioning.serial import parse_serial
from tests.provisioning.conftest import CliResult
from tests.provisioning.csrs import make_csr
from tests.provisioning.test_grace import _renew

COMMANDS: dict[str, tuple[str, ...]] = {
    "sign": ("sign", "{csr}"),
    "revoke": ("revoke", "bystander"),
    "suspend": ("suspend", "bystander"),
    "group set": ("group", "set", "--group", "g1", "bystander"),
    "token create": ("token", "create", "line9"),
    "password clear": ("password", "clear", "bystander"),
}


def _past_grace(authority: Authority, serial: str) -> None:
    """Make the renewal long ago (the grace counts from superseded_at)."""
    with authority.registry.write("test") as tx:
        tx.execute("UPDATE certificates SET superseded_at = '2000-01-01T00:00:00Z' "
                   "WHERE serial = ?", (serial,))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_write_command_revokes_what_is_past_its_grace_first(
        command: str, pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """The certificate is revoked (superseded, actor policy) and crl.pem lists it with that
    reason, after a command that has nothing to do with it; the command still did its job."""
    with Authority(pki_dir) as authority:
        old, new = _renew(authority, "renewer")
        _renew(authority, "bystander")
        _past_grace(authority, old)
    csr = tmp_path / "other.csr"
    csr.write_bytes(make_csr(cn="other"))
    args = [a.replace("{csr}", str(csr)) for a in COMMANDS[command]]
    done = cli(*args, "--pki", pki_dir)
    assert done.code == 0, done.err
    assert "revoked 1 superseded certificate(s)" in done.err
    with Authority(pki_dir) as authority:
        row = authority.registry.certificate(old)
        actor = authority.registry.conn.execute(
            "SELECT actor FROM events WHERE action = 'certificate.revoke' AND serial = ?",
            (old,)).fetchone()
        assert authority.registry.certificate(new).status == "active"  # type: ignore[union-attr]
    assert row is not None
    assert (row.status, row.reason) == ("revoked", "superseded")
    assert actor == ("policy",)
    crl = x509.load_pem_x509_crl((pki_dir / "crl.pem").read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(parse_serial(old))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason \
        is x509.ReasonFlags.superseded


def test_nothing_due_costs_no_transaction(pki_dir: Path, cli: Callable[..., CliResult]) -> None:
    """With nothing past its grace the command writes only its own event (the sweep's look is
    a read) and says nothing about a sweep."""
    with Authority(pki_dir) as authority:
        _renew(authority, "renewer")
        head = authority.registry.count_events("certificate.revoke")
    done = cli("token", "create", "line9", "--pki", pki_dir)
    assert done.code == 0
    assert "superseded" not in done.err
    with Authority(pki_dir) as authority:
        assert authority.registry.count_events("certificate.revoke") == head


def test_a_keyless_command_leaves_the_sweep_when_the_key_is_encrypted(
        tmp_path: Path, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch) -> None:
    """group set on a PKI with an encrypted issuing key: done, nothing revoked (it cannot
    re-sign the CRL); the next command with the passphrase sweeps."""
    monkeypatch.setenv("CA_PASS", "s3cret")
    pki = tmp_path / "enc"
    assert cli("init", "--pki", pki, "--org", "O", "--trust-domain", "t.example",
               "--passphrase-env", "CA_PASS").code == 0
    with Authority(pki, b"s3cret") as authority:
        old, _ = _renew(authority, "renewer")
        _past_grace(authority, old)
    done = cli("group", "set", "--pki", pki, "--group", "g1", "renewer")
    assert done.code == 0, done.err
    with Authority(pki) as authority:
        assert authority.registry.certificate(old).status == "superseded"  # type: ignore[union-attr]
    assert cli("crl", "--pki", pki, "--passphrase-env", "CA_PASS").code == 0
    with Authority(pki) as authority:
        assert authority.registry.certificate(old).status == "revoked"  # type: ignore[union-attr]
