"""``fleet-provision policy show|set`` (issue 14): the fleet's policy in pki.toml, changed
atomically and audited with its old and new values."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from provisioning.config import load_config
from tests.provisioning.conftest import CliResult, fleet_provision

Cli = Callable[..., CliResult]


def _events(pki: Path, action: str) -> list[dict[str, object]]:
    with contextlib.closing(sqlite3.connect(pki / "registry.db")) as db:
        rows = db.execute("SELECT actor, detail FROM events WHERE action = ? ORDER BY id",
                          (action,)).fetchall()
    return [{"actor": actor, "detail": json.loads(detail)} for actor, detail in rows]


def test_show_prints_the_defaults(cli: Cli, pki_dir: Path) -> None:
    """A new fleet's policy: 365d, 1h, 24 hours; as columns and as JSON."""
    done = cli("policy", "show", "--pki", pki_dir, "--json")
    assert done.code == 0, done.err
    assert json.loads(done.out) == {"validity": "365d", "renew_grace": "1h",
                                    "crl_lifetime_hours": 24}
    table = cli("policy", "show", "--pki", pki_dir)
    rows = [line.split()[:2] for line in table.out.splitlines()]
    assert rows == [["key", "value"], ["validity", "365d"], ["renew_grace", "1h"],
                    ["crl_lifetime_hours", "24"]]


def test_set_rewrites_pki_toml_and_audits_old_and_new(cli: Cli, pki_dir: Path,
                                                      tmp_path: Path) -> None:
    """policy set validity=12h renew_grace=15m: pki.toml says so (mode kept, the other
    settings untouched), sign issues 12-hour certificates, and one policy.set event carries
    each changed key's from and to; the audit chain still verifies."""
    toml = pki_dir / "pki.toml"
    toml.chmod(0o640)
    before = load_config(toml)
    done = cli("policy", "set", "--pki", pki_dir, "validity=12h", "renew_grace=15m",
               "crl_lifetime_hours=24")
    assert done.code == 0, done.err
    assert "validity: 365d -> 12h" in done.err
    assert "renew_grace: 1h -> 15m" in done.err
    after = load_config(toml)
    assert (after.validity, after.renew_grace) == (dt.timedelta(hours=12),
                                                   dt.timedelta(minutes=15))
    assert (after.trust_domain, after.organisation, after.crl_lifetime_hours) == (
        before.trust_domain, before.organisation, before.crl_lifetime_hours)
    assert stat.S_IMODE(toml.stat().st_mode) == 0o640
    assert not [p for p in pki_dir.iterdir() if p.name.startswith(".pki.toml")]
    [event] = _events(pki_dir, "policy.set")
    assert event["actor"] == _events(pki_dir, "pki.init")[0]["actor"]
    assert event["detail"] == {"changes": {"validity": {"from": "365d", "to": "12h"},
                                           "renew_grace": {"from": "1h", "to": "15m"}},
                               "file": str(toml.absolute())}
    shown = cli("policy", "show", "--pki", pki_dir, "--json")
    assert json.loads(shown.out)["validity"] == "12h"
    verified = cli("audit", "verify", "--pki", pki_dir)
    assert verified.code == 0, verified.err


def test_setting_the_same_values_changes_nothing(cli: Cli, pki_dir: Path) -> None:
    """Values equal to the current ones leave pki.toml alone and audit nothing."""
    toml = pki_dir / "pki.toml"
    text = toml.read_text()
    done = cli("policy", "set", "--pki", pki_dir, "validity=365d", "renew_grace=60m")
    assert (done.code, done.err.strip()) == (0, "policy unchanged")
    assert toml.read_text() == text
    assert _events(pki_dir, "policy.set") == []


def test_an_old_default_days_file_is_rewritten_with_validity(cli: Cli, pki_dir: Path) -> None:
    """A pki.toml from before issue 14 becomes validity/renew_grace on its first set."""
    toml = pki_dir / "pki.toml"
    lines = [line for line in toml.read_text().splitlines()
             if not line.startswith(("validity", "renew_grace"))]
    toml.write_text("\n".join([*lines, "default_days = 30"]) + "\n")
    done = cli("policy", "set", "--pki", pki_dir, "renew_grace=2h")
    assert done.code == 0, done.err
    text = toml.read_text()
    assert "default_days" not in text
    assert 'validity = "30d"' in text
    assert 'renew_grace = "2h"' in text


@pytest.mark.parametrize(("pairs", "message"), [
    (["validity=10x"], "error: '10x' is not a duration; want <integer><unit>, unit s, m, h or "
                       "d (e.g. 90d, 12h, 10m, 30s) (validity)"),
    (["validity=30s"], "error: 30s is out of range (want 1m to 36500d) (validity)"),
    (["validity=10m"], "error: 1h is out of range (want 0s to the validity, 10m) "
                       "(renew_grace)"),
    (["renew_grace=400d"], "error: 400d is out of range (want 0s to the validity, 365d) "
                           "(renew_grace)"),
    (["crl_lifetime_hours=0"], "error: 0 is out of range (want 1-8784) (crl_lifetime_hours)"),
    (["crl_lifetime_hours=1d"], "error: '1d' is not a whole number of hours "
                                "(crl_lifetime_hours)"),
    (["trust_domain=evil.test"], "error: 'trust_domain' is not a policy key; want one of "
                                 "validity, renew_grace, crl_lifetime_hours (trust_domain)"),
    (["colour=blue"], "error: 'colour' is not a policy key; want one of validity, "
                      "renew_grace, crl_lifetime_hours (colour)"),
    (["validity"], "error: want KEY=VALUE, got 'validity' (policy set)"),
    (["validity=1d", "validity=2d"], "error: given twice (validity)"),
    (["renew_grace=5m", "validity=nope"], "error: 'nope' is not a duration; want "
     "<integer><unit>, unit s, m, h or d (e.g. 90d, 12h, 10m, 30s) (validity)"),
])
def test_bad_settings_are_refused_naming_the_key(cli: Cli, pki_dir: Path, pairs: list[str],
                                                 message: str) -> None:
    """An unknown key, a bad value, or a grace the validity cannot hold: exit 2, one line
    naming the KEY, pki.toml unchanged (all or none), nothing audited."""
    toml = pki_dir / "pki.toml"
    text = toml.read_text()
    done = cli("policy", "set", "--pki", pki_dir, *pairs)
    assert (done.code, done.err.strip()) == (2, message)
    assert toml.read_text() == text
    assert _events(pki_dir, "policy.set") == []


def test_setting_validity_and_grace_together_fits(cli: Cli, pki_dir: Path) -> None:
    """Going to minute-scale certificates needs the grace lowered in the same command."""
    done = cli("policy", "set", "--pki", pki_dir, "validity=10m", "renew_grace=2m")
    assert done.code == 0, done.err
    config = load_config(pki_dir / "pki.toml")
    assert (config.validity, config.renew_grace) == (dt.timedelta(minutes=10),
                                                    dt.timedelta(minutes=2))


def test_policy_through_the_console_script(pki_dir: Path) -> None:
    """The installed entry point: set, then show --json in a separate process."""
    done = fleet_provision("policy", "set", "--pki", pki_dir, "validity=90d")
    assert done.returncode == 0, done.stderr
    shown = fleet_provision("policy", "show", "--pki", pki_dir, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["validity"] == "90d"
    missing = fleet_provision("policy", "show", "--pki", pki_dir / "nope")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: no PKI here: pki.toml is missing")
