"""fleet-hub's command line: one-line errors, exit codes, check and events."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from provisioning.authority import Authority, initialize
from provisioning.config import PKIConfig


def _hub(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hub.cli", *map(str, args)],
                          capture_output=True, text=True, check=False, cwd=cwd, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    initialize(root, PKIConfig(trust_domain="fleet.test", organisation="T"), None)
    return root


def _config(tmp_path: Path, pki: Path, extra: str = "") -> Path:
    path = tmp_path / "hub.toml"
    path.write_text(f"""
[listener]
bind = "127.0.0.1:8883"
server_cert = "{pki}/server.pem"
server_key = "{pki}/server.key"
client_ca = "{pki}/ca-chain.pem"
[revocation]
registry = "{pki}/registry.db"
[audit]
path = "{tmp_path}/audit.db"
{extra}
""")
    return path


def test_check_accepts_a_good_config(pki: Path, tmp_path: Path) -> None:
    """check validates without serving and summarises what it would do."""
    with Authority(pki) as authority:
        authority.server_cert("localhost", ["127.0.0.1"], pki)
    done = _hub("check", "--config", _config(tmp_path, pki))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("config ok: listen 127.0.0.1:8883")
    assert "limits: packet 262144 B, topic 1024 B, 64 subscriptions, 100 msg/s" in done.stdout


def test_check_refuses_bad_limits(pki: Path, tmp_path: Path) -> None:
    """`check` validates [limits]: exit 2, one line naming the key."""
    with Authority(pki) as authority:
        authority.server_cert("localhost", ["127.0.0.1"], pki)
    config = _config(tmp_path, pki, extra="[limits]\nmax_subscriptions = 0\n")
    done = _hub("check", "--config", config)
    assert done.returncode == 2
    assert done.stderr == ("error: limits.max_subscriptions: want an integer from 1 to 65535, "
                           f"got 0 ({config})\n")


def test_bad_config_is_one_line_naming_the_key(pki: Path, tmp_path: Path) -> None:
    """A missing server certificate is exit 2 with the key path and the file."""
    config = _config(tmp_path, pki)
    done = _hub("check", "--config", config)
    assert done.returncode == 2
    assert done.stderr.startswith("error: listener.server_cert: ")
    assert done.stderr.rstrip().endswith(f"({config})")
    assert done.stderr.count("\n") == 1


def test_unknown_key_is_refused(pki: Path, tmp_path: Path) -> None:
    """Typos are errors, not silently ignored settings."""
    with Authority(pki) as authority:
        authority.server_cert("localhost", ["127.0.0.1"], pki)
    done = _hub("check", "--config", _config(tmp_path, pki, "[auth]\npasword = true\n"))
    assert done.returncode == 2
    assert "auth.pasword" in done.stderr


def test_serve_pki_without_server_cert_says_how_to_make_one(pki: Path) -> None:
    """serve --pki on a folder with no server.pem points at fleet-provision server-cert."""
    done = _hub("serve", "--pki", pki, "--bind", "127.0.0.1:0")
    assert done.returncode == 2
    assert "fleet-provision server-cert" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_needs_a_config_or_pki(tmp_path: Path) -> None:
    """serve with neither --config nor --pki is a usage error."""
    done = _hub("serve", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: --config: missing")


def test_events_on_a_missing_store_and_bad_since(pki: Path, tmp_path: Path) -> None:
    """events without a store is exit 1; an unreadable --since is exit 2."""
    with Authority(pki) as authority:
        authority.server_cert("localhost", ["127.0.0.1"], pki)
    config = _config(tmp_path, pki)
    done = _hub("events", "--config", config)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ")
    assert "audit" in done.stderr
    done = _hub("events", "--config", config, "--since", "yesterday-ish")
    assert done.returncode == 2
    assert done.stderr.startswith("error: --since: ")


def test_check_names_the_feeds_gateway(pki: Path, tmp_path: Path) -> None:
    """With a feed, check reads the gateway name from feed_cert's SPIFFE URI (default: the
    listener's server.pem from server-cert)."""
    with Authority(pki) as authority:
        authority.server_cert("localhost", ["127.0.0.1"], pki)
    config = _config(tmp_path, pki, '[auth]\nregistered_only = true\n').read_text()
    config = config.replace("[revocation]\n", '[revocation]\nfeed = "https://ca.test:8443/feed"\n')
    (tmp_path / "hub.toml").write_text(config)
    done = _hub("check", "--config", tmp_path / "hub.toml")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("feed: https://ca.test:8443/feed as gateway localhost of "
                                  f"fleet.test, cache {tmp_path / 'fleet-state.json'}, max age "
                                  "86400 s\n")


def test_check_refuses_a_feed_cert_without_a_gateway_uri(pki: Path, tmp_path: Path) -> None:
    """A feed_cert that names no spiffe://<domain>/gateway/<name> is exit 2 naming
    revocation.feed_cert: the CA serves each document to one gateway by that name."""
    with Authority(pki) as authority:
        authority.server_cert("localhost", ["127.0.0.1"], pki)
    config = _config(tmp_path, pki).read_text().replace(
        "[revocation]\n", '[revocation]\nfeed = "https://ca.test:8443/feed"\n'
        f'feed_cert = "{pki}/ca-chain.pem"\nfeed_key = "{pki}/server.key"\n')
    (tmp_path / "hub.toml").write_text(config)
    done = _hub("check", "--config", tmp_path / "hub.toml")
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: revocation.feed_cert: {pki}/ca-chain.pem carries no "
                                  "(single) SAN URI spiffe://<trust-domain>/gateway/<name>")
    assert done.stderr.count("\n") == 1


def test_serve_refuses_a_trust_domain_that_is_not_the_feed_certificates(
        pki: Path, tmp_path: Path) -> None:
    """The feed's documents are checked against feed_cert's domain: another configured
    domain is exit 2 naming auth.trust_domain, before the CA is asked anything."""
    with Authority(pki) as authority:
        authority.server_cert("localhost", ["127.0.0.1"], pki)
    config = _config(tmp_path, pki, '[auth]\ntrust_domain = "other.test"\n').read_text()
    config = config.replace(f'registry = "{pki}/registry.db"',
                            'feed = "https://127.0.0.1:9/feed"')
    (tmp_path / "hub.toml").write_text(config)
    done = _hub("serve", "--config", tmp_path / "hub.toml")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "error: auth.trust_domain: other.test (from auth.trust_domain) is not the trust domain "
        f"of revocation.feed_cert (fleet.test) ({tmp_path / 'hub.toml'})")
