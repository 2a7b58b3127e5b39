"""The CLI surface: one-line errors with where, exit codes 0/1/2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.provisioning.conftest import fleet_provision
from tests.provisioning.csrs import make_csr


@pytest.mark.parametrize(("args", "message"), [
    (["sign", "--pki", "{tmp}/none", "x.csr"],
     "error: no PKI here: the folder does not exist ({tmp}/none)"),
    (["sign", "--pki", "{pki}"], "error: Missing argument 'CSR_OR_DIR...'. (fleet-provision sign)"),
    (["frobnicate"], "error: No such command 'frobnicate'. (fleet-provision)"),
    (["sign", "--pki", "{pki}", "--days", "0", "x.csr"],
     "error: 0 days is out of range (want 1-36500) (--days)"),
    (["devices", "--pki", "{pki}", "--status", "lost"],
     "error: unknown status 'lost'; want one of active, suspended, revoked (--status)"),
    (["sign", "--pki", "{pki}", "--group", "bad group", "x.csr"],
     "error: group 'bad group' is not valid (same rules as a device id) (--group)"),
])
def test_usage_errors_are_one_line_exit_2(args: list[str], message: str, pki_dir: Path,
                                          tmp_path: Path) -> None:
    """Bad invocations print exactly one line on stderr and exit 2."""
    fill = {"tmp": str(tmp_path), "pki": str(pki_dir)}
    done = fleet_provision(*[a.format(**fill) for a in args], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == message.format(**fill) + "\n"
    assert done.stdout == ""


def test_broken_registry_is_one_line(pki_dir: Path, tmp_path: Path) -> None:
    """A corrupt registry file is reported, not dumped as a traceback."""
    (pki_dir / "registry.db").write_bytes(b"this is not sqlite" * 100)
    for suffix in ("-wal", "-shm"):
        (pki_dir / f"registry.db{suffix}").unlink(missing_ok=True)
    done = fleet_provision("devices", "--pki", pki_dir)
    assert done.returncode == 1
    assert done.stderr.startswith("error: registry cannot be opened: file is not a database")
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1


def test_mixed_batch_exits_1_and_reports_each(pki_dir: Path, tmp_path: Path) -> None:
    """Exit 1 when some input was rejected while the rest was issued (DESIGN section 4)."""
    (tmp_path / "ok.csr").write_bytes(make_csr(cn="ok"))
    (tmp_path / "bad.csr").write_bytes(b"garbage")
    done = fleet_provision("sign", "--pki", pki_dir, "--out", tmp_path / "o", tmp_path)
    assert done.returncode == 1
    assert "rejected" in done.stdout
    assert "issued" in done.stdout
    assert done.stderr.strip() == f"1 issued, 0 existing, 1 rejected; certificates in " \
                                  f"{tmp_path / 'o'}"


def test_help_lists_every_command(tmp_path: Path) -> None:
    """--help shows the commands of DESIGN section 4 that exist in this release."""
    done = fleet_provision("--help", cwd=tmp_path)
    assert done.returncode == 0
    for name in ("init", "server-cert", "sign", "revoke", "suspend", "resume", "crl",
                 "devices", "device", "audit", "policy", "expiring"):
        assert name in done.stdout
