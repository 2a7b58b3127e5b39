"""Enrollment tokens and device passwords: shown once, stored hashed, audited, migrated."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.identity import verify_password
from provisioning.issuer import SignOptions
from provisioning.registry import SCHEMA_VERSION, Registry
from tests.provisioning.conftest import CliResult, fleet_provision
from tests.provisioning.csrs import make_csr


def _rows(pki: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(pki / "registry.db") as conn:
        return list(conn.execute(sql))


def test_create_prints_the_secret_once_and_stores_only_a_hash(
        pki_dir: Path, cli: Callable[..., CliResult]) -> None:
    """--json prints exactly {"name", "secret"}; the registry holds a scrypt hash of it."""
    result = cli("token", "create", "--pki", pki_dir, "line7", "--json")
    assert result.code == 0, result.err
    printed = json.loads(result.out)
    assert set(printed) == {"name", "secret"}
    assert printed["name"] == "line7"
    secret = printed["secret"]
    assert len(secret) == 43  # 32 bytes, URL-safe base64 without padding
    assert set(secret) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    [(name, stored, created, revoked)] = _rows(
        pki_dir, "SELECT name, hash, created_at, revoked_at FROM tokens")
    assert (name, revoked) == ("line7", None)
    assert created
    assert isinstance(stored, str)
    assert stored.startswith("scrypt$")
    assert secret not in stored
    assert verify_password(secret, stored)
    raw = (pki_dir / "registry.db").read_bytes() + (pki_dir / "registry.db-wal").read_bytes()
    assert secret.encode() not in raw


def test_create_without_json_prints_the_bare_secret(pki_dir: Path,
                                                    cli: Callable[..., CliResult]) -> None:
    """Without --json stdout is the secret alone, ready for a script to capture."""
    result = cli("token", "create", "--pki", pki_dir, "line8")
    assert result.code == 0
    secret = result.out.strip()
    assert len(secret) == 43
    assert "shown only now" in result.err
    [(stored,)] = _rows(pki_dir, "SELECT hash FROM tokens WHERE name = 'line8'")
    assert verify_password(secret, str(stored))


def test_each_create_and_revoke_is_audited(pki_dir: Path,
                                           cli: Callable[..., CliResult]) -> None:
    """token.create and token.revoke events name the token, never the secret."""
    secret = json.loads(cli("token", "create", "--pki", pki_dir, "t1", "--json").out)["secret"]
    assert cli("token", "revoke", "--pki", pki_dir, "t1").code == 0
    events = _rows(pki_dir, "SELECT action, detail FROM events WHERE action LIKE 'token.%' "
                            "ORDER BY id")
    assert events == [("token.create", '{"name":"t1"}'), ("token.revoke", '{"name":"t1"}')]
    assert all(secret not in str(e) for e in _rows(pki_dir, "SELECT * FROM events"))
    [(revoked_at,)] = _rows(pki_dir, "SELECT revoked_at FROM tokens")
    assert revoked_at is not None
    assert cli("audit", "verify", "--pki", pki_dir).code == 0


def test_duplicate_name_is_one_line_exit_1(pki_dir: Path) -> None:
    """A second token with a taken name (revoked or not) is refused; the first is unchanged."""
    assert fleet_provision("token", "create", "--pki", pki_dir, "dup").returncode == 0
    again = fleet_provision("token", "create", "--pki", pki_dir, "dup")
    assert again.returncode == 1
    assert again.stderr == "error: token 'dup' already exists (dup)\n"
    assert again.stdout == ""
    fleet_provision("token", "revoke", "--pki", pki_dir, "dup")
    reused = fleet_provision("token", "create", "--pki", pki_dir, "dup")
    assert reused.returncode == 1
    assert "revoked; token names are never reused" in reused.stderr
    assert len(_rows(pki_dir, "SELECT * FROM tokens")) == 1


def test_revoke_unknown_is_exit_1_and_revoke_twice_is_harmless(
        pki_dir: Path, cli: Callable[..., CliResult]) -> None:
    """Revoking a token that does not exist fails; revoking a revoked one changes nothing."""
    unknown = fleet_provision("token", "revoke", "--pki", pki_dir, "nope")
    assert unknown.returncode == 1
    assert unknown.stderr == "error: no enrollment token 'nope' in the registry (nope)\n"
    cli("token", "create", "--pki", pki_dir, "t2")
    assert cli("token", "revoke", "--pki", pki_dir, "t2").code == 0
    twice = cli("token", "revoke", "--pki", pki_dir, "t2")
    assert twice.code == 0
    assert "already revoked" in twice.err
    assert len(_rows(pki_dir, "SELECT * FROM events WHERE action = 'token.revoke'")) == 1


@pytest.mark.parametrize("name", ["has:colon", "has space", "", ".dot-first", "x" * 65])
def test_bad_names_are_usage_errors(pki_dir: Path, name: str) -> None:
    """Token names follow the device-id rules (HTTP Basic splits user and password at ':')."""
    done = fleet_provision("token", "create", "--pki", pki_dir, name)
    assert done.returncode == 2
    assert done.stderr.startswith("error: token name ")
    assert done.stderr.count("\n") == 1


def test_a_v1_registry_is_migrated_to_v2(pki_dir: Path) -> None:
    """A registry written before tokens existed gains the table on first open, data intact."""
    with Authority(pki_dir) as authority:
        authority.issuer().sign([CSRInput("a.csr", make_csr(cn="old-dev"))], SignOptions())
    with sqlite3.connect(pki_dir / "registry.db") as conn:
        conn.execute("DROP TABLE tokens")
        conn.execute("DROP INDEX certificates_superseded")  # v3's
        conn.execute("ALTER TABLE certificates DROP COLUMN superseded_at")  # v3's
        conn.execute("ALTER TABLE certificates DROP COLUMN issuer_key_id")  # v4's
        conn.execute("PRAGMA user_version = 1")
    with Registry(pki_dir / "registry.db") as registry:
        version = registry.conn.execute("PRAGMA user_version").fetchone()[0]
        assert version == SCHEMA_VERSION == 4
        assert registry.device("old-dev") is not None
        assert registry.verify_audit().ok
    done = fleet_provision("token", "create", "--pki", pki_dir, "after-migration")
    assert done.returncode == 0, done.stderr


# -- device passwords (the hub's optional MQTT second factor) ---------------------------------

@pytest.fixture
def device(pki_dir: Path) -> str:
    with Authority(pki_dir) as authority:
        authority.issuer().sign([CSRInput("d.csr", make_csr(cn="sensor-7"))], SignOptions())
    return "sensor-7"


def test_password_set_from_env_stores_a_hash_and_clear_removes_it(
        pki_dir: Path, device: str, monkeypatch: pytest.MonkeyPatch,
        cli: Callable[..., CliResult]) -> None:
    """password set hashes the value of --password-env; clear empties it; both audited."""
    monkeypatch.setenv("DEV_PW", "correct horse")
    result = cli("password", "set", "--pki", pki_dir, device, "--password-env", "DEV_PW")
    assert result.code == 0, result.err
    [(stored,)] = _rows(pki_dir, f"SELECT password_hash FROM devices WHERE device_id = '{device}'")
    assert isinstance(stored, str)
    assert verify_password("correct horse", stored)
    assert not verify_password("wrong", stored)
    assert cli("password", "clear", "--pki", pki_dir, device).code == 0
    assert _rows(pki_dir, f"SELECT password_hash FROM devices WHERE device_id = '{device}'") \
        == [(None,)]
    actions = [a for (a,) in _rows(pki_dir, "SELECT action FROM events WHERE action LIKE "
                                            "'device.password.%' ORDER BY id")]
    assert actions == ["device.password.set", "device.password.clear"]


def test_password_without_env_or_terminal_is_a_usage_error(pki_dir: Path, device: str) -> None:
    """No --password-env and stdin not a terminal: exit 2, nothing stored."""
    done = fleet_provision("password", "set", "--pki", pki_dir, device, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr == ("error: no password: give --password-env VAR, or run on a "
                           "terminal to be prompted (--password-env)\n")
    assert _rows(pki_dir, "SELECT password_hash FROM devices") == [(None,)]


def test_password_env_unset_or_empty_is_a_usage_error(pki_dir: Path, device: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A named but missing, or empty, variable is refused with the option named."""
    monkeypatch.delenv("NOT_SET_PW", raising=False)
    missing = fleet_provision("password", "set", "--pki", pki_dir, device,
                              "--password-env", "NOT_SET_PW")
    assert missing.returncode == 2
    assert missing.stderr == "error: environment variable NOT_SET_PW is not set (--password-env)\n"
    monkeypatch.setenv("EMPTY_PW", "")
    empty = fleet_provision("password", "set", "--pki", pki_dir, device,
                            "--password-env", "EMPTY_PW")
    assert empty.returncode == 2
    assert empty.stderr == "error: the password is empty (--password-env)\n"


def test_password_for_unknown_device_is_exit_1(pki_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """set and clear name the device that is not in the registry."""
    monkeypatch.setenv("DEV_PW", "x")
    for args in (["set", "--password-env", "DEV_PW"], ["clear"]):
        done = fleet_provision("password", args[0], "--pki", pki_dir, "ghost", *args[1:])
        assert done.returncode == 1
        assert done.stderr == f"error: no device 'ghost' in the registry ({pki_dir})\n"


def test_help_lists_the_enrollment_commands(tmp_path: Path) -> None:
    """--help shows token, password and serve next to the CA commands."""
    done = fleet_provision("--help", cwd=tmp_path)
    assert done.returncode == 0
    for name in ("token", "password", "serve"):
        assert name in done.stdout
