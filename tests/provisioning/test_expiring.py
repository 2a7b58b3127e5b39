"""``fleet-provision expiring --within DURATION`` (issue 14): the device certificates in
service and the CA certificates that expire within the window, expired ones flagged."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

import provisioning.issuer
from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.serial import format_serial
from provisioning.signing import SignOptions
from provisioning.timefmt import iso, utcnow
from tests.provisioning.conftest import ORG, CliResult, fleet_provision
from tests.provisioning.csrs import make_csr

Cli = Callable[..., CliResult]


def _sign(cli: Cli, pki: Path, tmp_path: Path, cn: str, *options: str) -> str:
    csr = tmp_path / f"{cn}-{len(list(tmp_path.glob('*.csr')))}.csr"
    csr.write_bytes(make_csr(cn=cn))
    done = cli("sign", "--pki", pki, "--out", tmp_path / "out", "--json", *options, csr)
    assert done.code == 0, done.err
    [row] = json.loads(done.out)
    return str(row["serial"])


def _expired(pki: Path, monkeypatch: pytest.MonkeyPatch, cn: str) -> str:
    """A 1-day certificate issued (by the real issuer, into the real registry) 2 days ago."""
    two_days_ago = utcnow() - dt.timedelta(days=2)
    with monkeypatch.context() as patch, Authority(pki) as authority:
        patch.setattr(provisioning.issuer, "utcnow", lambda: two_days_ago)
        [made] = authority.issuer().sign([CSRInput(f"{cn}.csr", make_csr(cn=cn))],
                                         SignOptions(validity=dt.timedelta(days=1)))
    assert made.status == "issued"
    assert made.serial is not None
    return made.serial


@pytest.fixture
def fleet(cli: Cli, pki_dir: Path, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Devices of every case; the serial of each certificate by name."""
    serials = {
        "soon": _sign(cli, pki_dir, tmp_path, "soon", "--validity", "10m"),
        "later": _sign(cli, pki_dir, tmp_path, "later", "--validity", "90d"),
        "revoked": _sign(cli, pki_dir, tmp_path, "revoked", "--validity", "10m"),
        "held": _sign(cli, pki_dir, tmp_path, "held", "--validity", "10m"),
        # 9 minutes, so it sorts before "soon" whatever second each was signed in.
        "old": _sign(cli, pki_dir, tmp_path, "renewed", "--validity", "9m"),
        "expired": _expired(pki_dir, monkeypatch, "expired"),
    }
    serials["new"] = _sign(cli, pki_dir, tmp_path, "renewed", "--validity", "20m", "--renew")
    assert cli("revoke", "--pki", pki_dir, "revoked").code == 0
    assert cli("suspend", "--pki", pki_dir, "held").code == 0
    return serials


def test_lists_certificates_in_service_within_the_window(cli: Cli, pki_dir: Path,
                                                         fleet: dict[str, str]) -> None:
    """--within 1h: the 10- and 20-minute certificates (the renewed device's superseded one
    too) and the one that expired yesterday, flagged, soonest first; not the 90-day one, nor
    the revoked or held ones, nor the CAs. Exit 0: findings are not errors."""
    done = cli("expiring", "--pki", pki_dir, "--within", "1h", "--json")
    assert done.code == 0, done.err
    rows = json.loads(done.out)
    assert [(r["device_id"], r["serial"], r["status"], r["kind"], r["expired"])
            for r in rows] == [
        ("expired", fleet["expired"], "active", "device", True),
        ("renewed", fleet["old"], "superseded", "device", False),
        ("soon", fleet["soon"], "active", "device", False),
        ("renewed", fleet["new"], "active", "device", False),
    ]
    with Authority(pki_dir) as authority:
        for row in rows:
            cert = authority.registry.certificate(row["serial"])
            assert cert is not None
            assert row["not_after"] == cert.not_after
    assert "4 certificate(s) expire within 1h" in done.err
    assert "1 already expired" in done.err


def test_the_table_has_device_serial_not_after_status(cli: Cli, pki_dir: Path,
                                                      fleet: dict[str, str]) -> None:
    """Without --json: aligned columns, whole serials, and how long is left or since when
    it has been expired."""
    done = cli("expiring", "--pki", pki_dir, "--within", "15m")
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert lines[0].split() == ["device", "serial", "not", "after", "status", "left"]
    cells = [line.split() for line in lines[1:]]
    assert [(c[0], c[1], c[3]) for c in cells] == [
        ("expired", fleet["expired"], "active"), ("renewed", fleet["old"], "superseded"),
        ("soon", fleet["soon"], "active")]
    assert " ".join(cells[0][4:]).startswith("expired 1d")
    assert cells[0][4:][-1] == "ago"
    assert cells[2][4] in ("9m", "10m")


def test_ca_certificates_in_the_window_are_listed(cli: Cli, pki_dir: Path) -> None:
    """The issuing CA (5 years) within 1900 days, the root (20 years) within 7400: status
    "ca", kind "ca", their names, no device id."""
    with Authority(pki_dir) as authority:
        issuing, root = authority.ca.cert, x509.load_pem_x509_certificate(
            authority.paths.root_cert.read_bytes())
    done = cli("expiring", "--pki", pki_dir, "--within", "1900d", "--json")
    assert done.code == 0, done.err
    assert json.loads(done.out) == [{
        "device_id": None, "serial": format_serial(issuing.serial_number),
        "not_after": iso(issuing.not_valid_after_utc), "status": "ca", "kind": "ca",
        "expired": False, "name": f"{ORG} Fleet Issuing CA"}]
    both = json.loads(cli("expiring", "--pki", pki_dir, "--within", "7400d", "--json").out)
    assert [(r["name"], r["serial"]) for r in both] == [
        (f"{ORG} Fleet Issuing CA", format_serial(issuing.serial_number)),
        (f"{ORG} Fleet Root CA", format_serial(root.serial_number))]
    table = cli("expiring", "--pki", pki_dir, "--within", "1900d")
    assert table.out.splitlines()[1].startswith(f"{ORG} Fleet Issuing CA  ")
    assert table.out.splitlines()[1].split()[5:8] == [
        format_serial(issuing.serial_number), iso(issuing.not_valid_after_utc), "ca"]


def test_nothing_within_the_window_is_an_empty_list(pki_dir: Path) -> None:
    """A new fleet, the console script as installed: [] and exit 0."""
    done = fleet_provision("expiring", "--pki", pki_dir, "--within", "30d", "--json")
    assert (done.returncode, json.loads(done.stdout)) == (0, [])
    assert "0 certificate(s) expire within 30d" in done.stderr


@pytest.mark.parametrize(("within", "message"), [
    ("1y", "error: '1y' is not a duration; want <integer><unit>, unit s, m, h or d (e.g. "
           "90d, 12h, 10m, 30s) (--within)"),
    ("36501d", "error: 36501d is out of range (want 0s to 36500d) (--within)"),
])
def test_a_bad_window_is_a_usage_error(cli: Cli, pki_dir: Path, within: str,
                                       message: str) -> None:
    """One line naming --within, exit 2."""
    done = cli("expiring", "--pki", pki_dir, "--within", within)
    assert (done.code, done.err.strip()) == (2, message)
