"""--validity DURATION (issue 14): sign, init (the fleet's default), server-cert and EST issue
certificates of days, hours or minutes; --days N stays as --validity Nd."""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from provisioning.authority import Authority
from provisioning.config import load_config
from provisioning.profile import BACKDATE
from tests.provisioning.conftest import ORG, TRUST_DOMAIN, CliResult, fleet_provision
from tests.provisioning.csrs import make_csr
from tests.provisioning.est_support import (
    Server,
    basic,
    enroll_body,
    issued,
    make_pki,
    request,
)

Cli = Callable[..., CliResult]
# Issue and check happen within this of each other (the CLI's start-up included).
SLACK = dt.timedelta(seconds=30)


def _sign(cli: Cli, pki: Path, tmp_path: Path, cn: str, *options: str) -> x509.Certificate:
    csr = tmp_path / f"{cn}.csr"
    csr.write_bytes(make_csr(cn=cn))
    done = cli("sign", "--pki", pki, "--out", tmp_path / "out", *options, csr)
    assert done.code == 0, done.err
    return x509.load_pem_x509_certificates((tmp_path / "out" / f"{cn}.pem").read_bytes())[0]


def _ends_about(cert: x509.Certificate, lifetime: dt.timedelta, before: dt.datetime) -> None:
    """not_after = issue time + lifetime (issue time between *before* and now)."""
    after = dt.datetime.now(dt.UTC)
    assert before + lifetime - dt.timedelta(seconds=1) <= cert.not_valid_after_utc
    assert cert.not_valid_after_utc <= after + lifetime


def test_sign_validity_10m_gives_a_ten_minute_certificate(cli: Cli, pki_dir: Path,
                                                          tmp_path: Path) -> None:
    """sign --validity 10m: not_after is now + 10m to the second, back-dated by a tenth of
    that (1m), not the 5 minutes a year-long certificate gets."""
    before = dt.datetime.now(dt.UTC)
    cert = _sign(cli, pki_dir, tmp_path, "short-1", "--validity", "10m")
    _ends_about(cert, dt.timedelta(minutes=10), before)
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert span == dt.timedelta(minutes=11)


def test_sign_validity_1m_is_not_cut_to_the_minute(cli: Cli, pki_dir: Path,
                                                   tmp_path: Path) -> None:
    """The shortest validity still lives its minute from the second it is issued: the
    start is not rounded down to the minute as a year-long certificate's is."""
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert = _sign(cli, pki_dir, tmp_path, "short-2", "--validity", "1m")
    assert cert.not_valid_after_utc >= before + dt.timedelta(minutes=1)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(seconds=66)


def test_long_certificates_keep_the_five_minute_backdate(cli: Cli, pki_dir: Path,
                                                         tmp_path: Path) -> None:
    """90d (and any validity of 50 minutes or more) is back-dated the full 5 minutes."""
    cert = _sign(cli, pki_dir, tmp_path, "long-1", "--validity", "90d")
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert span == dt.timedelta(days=90) + BACKDATE


def test_days_is_an_alias_of_validity_in_days(cli: Cli, pki_dir: Path,
                                              tmp_path: Path) -> None:
    """sign --days 2 is sign --validity 2d."""
    by_days = _sign(cli, pki_dir, tmp_path, "alias-1", "--days", "2")
    by_validity = _sign(cli, pki_dir, tmp_path, "alias-2", "--validity", "2d")
    assert (by_days.not_valid_after_utc - by_days.not_valid_before_utc
            == by_validity.not_valid_after_utc - by_validity.not_valid_before_utc
            == dt.timedelta(days=2) + BACKDATE)


@pytest.mark.parametrize(("command", "args", "message"), [
    ("sign", ["--days", "2", "--validity", "2d", "x.csr"],
     "error: --days N is --validity Nd: give one of them (--days)"),
    ("sign", ["--validity", "30s", "x.csr"],
     "error: 30s is out of range (want 1m to 36500d) (--validity)"),
    ("sign", ["--validity", "36501d", "x.csr"],
     "error: 36501d is out of range (want 1m to 36500d) (--validity)"),
    ("sign", ["--validity", "1y", "x.csr"],
     "error: '1y' is not a duration; want <integer><unit>, unit s, m, h or d (e.g. 90d, "
     "12h, 10m, 30s) (--validity)"),
    ("server-cert", ["--name", "gw1", "--out", "srv", "--days", "1", "--validity", "1d"],
     "error: --days N is --validity Nd: give one of them (--days)"),
    ("server-cert", ["--name", "gw1", "--out", "srv", "--validity", "0m"],
     "error: 0s is out of range (want 1m to 36500d) (--validity)"),
    ("init", ["--org", "O", "--trust-domain", "t.test", "--validity", "10"],
     "error: '10' is not a duration; want <integer><unit>, unit s, m, h or d (e.g. 90d, "
     "12h, 10m, 30s) (--validity)"),
    ("init", ["--org", "O", "--trust-domain", "t.test", "--validity", "10m",
              "--renew-grace", "1h"],
     "error: 1h is out of range (want 0s to the validity, 10m) (--renew-grace)"),
    ("init", ["--org", "O", "--trust-domain", "t.test", "--days", "3", "--validity", "3d"],
     "error: --days N is --validity Nd: give one of them (--days)"),
])
def test_bad_validity_is_a_one_line_usage_error(cli: Cli, pki_dir: Path, tmp_path: Path,
                                                command: str, args: list[str],
                                                message: str) -> None:
    """Both spellings at once, a bad duration or one out of range: exit 2, one line naming
    the option, nothing issued or created."""
    pki = pki_dir if command != "init" else tmp_path / "new-pki"
    done = cli(command, "--pki", pki, *args)
    assert (done.code, done.err.strip()) == (2, message)
    assert not (tmp_path / "new-pki").exists()
    assert not (tmp_path / "srv").exists()


def test_init_validity_is_the_fleet_default(cli: Cli, tmp_path: Path) -> None:
    """init --validity 12h writes validity = "12h" (renew_grace 1h) and sign then issues
    12-hour certificates without being told."""
    pki = tmp_path / "pki"
    done = cli("init", "--pki", pki, "--org", ORG, "--trust-domain", TRUST_DOMAIN,
               "--validity", "12h")
    assert done.code == 0, done.err
    raw = tomllib.loads((pki / "pki.toml").read_text())
    assert (raw["validity"], raw["renew_grace"]) == ("12h", "1h")
    assert "default_days" not in raw
    before = dt.datetime.now(dt.UTC)
    cert = _sign(cli, pki, tmp_path, "fleet-1")
    _ends_about(cert, dt.timedelta(hours=12), before)


def test_init_short_validity_and_grace(tmp_path: Path) -> None:
    """init --validity 10m without --renew-grace: the grace is cut to the validity; given, it
    is kept. Run as the console script does."""
    done = fleet_provision("init", "--pki", tmp_path / "a", "--org", ORG, "--trust-domain",
                           TRUST_DOMAIN, "--validity", "10m")
    assert done.returncode == 0, done.stderr
    config = load_config(tmp_path / "a" / "pki.toml")
    assert (config.validity, config.renew_grace) == (dt.timedelta(minutes=10),
                                                    dt.timedelta(minutes=10))
    done = fleet_provision("init", "--pki", tmp_path / "b", "--org", ORG, "--trust-domain",
                           TRUST_DOMAIN, "--days", "30", "--renew-grace", "90s")
    assert done.returncode == 0, done.stderr
    config = load_config(tmp_path / "b" / "pki.toml")
    assert (config.validity, config.renew_grace) == (dt.timedelta(days=30),
                                                    dt.timedelta(seconds=90))


def test_an_old_pki_toml_with_default_days_still_signs(cli: Cli, pki_dir: Path,
                                                       tmp_path: Path) -> None:
    """A PKI made before issue 14 (default_days = 7, no validity) issues 7-day certificates."""
    toml = pki_dir / "pki.toml"
    lines = [line for line in toml.read_text().splitlines()
             if not line.startswith(("validity", "renew_grace"))]
    toml.write_text("\n".join([*lines, "default_days = 7"]) + "\n")
    cert = _sign(cli, pki_dir, tmp_path, "old-1")
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc
            == dt.timedelta(days=7) + BACKDATE)


def test_server_cert_validity(cli: Cli, pki_dir: Path, tmp_path: Path) -> None:
    """server-cert --validity 2h: the hub's certificate lives two hours."""
    before = dt.datetime.now(dt.UTC)
    done = cli("server-cert", "--pki", pki_dir, "--name", "gw1.local", "--ip", "127.0.0.1",
               "--out", tmp_path / "srv", "--validity", "2h")
    assert done.code == 0, done.err
    cert = x509.load_pem_x509_certificates((tmp_path / "srv" / "server.pem").read_bytes())[0]
    _ends_about(cert, dt.timedelta(hours=2), before)


def test_est_issues_with_the_fleet_validity(tmp_path: Path) -> None:
    """The enrollment service issues with pki.toml's validity: a 10-minute fleet enrolls a
    device over EST simpleenroll and gets a 10-minute certificate."""
    pki = make_pki(tmp_path, validity=dt.timedelta(minutes=10),
                   renew_grace=dt.timedelta(minutes=2))
    with Authority(pki) as authority:
        secret = authority.create_token("line7")
    server = Server(pki)
    try:
        before = dt.datetime.now(dt.UTC)
        answer = request(server, "POST", "/.well-known/est/simpleenroll",
                         enroll_body(make_csr(cn="est-short")),
                         {"Content-Type": "application/pkcs10",
                          "Authorization": basic("line7", secret)}, pki=pki)
        cert = issued(answer)
    finally:
        assert server.stop() == 0
    _ends_about(cert, dt.timedelta(minutes=10), before)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(minutes=11)
