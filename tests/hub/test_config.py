"""Loading hub.toml: DESIGN section 5's keys, defaults, path resolution and exact error lines."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import pytest

from device_sim.lab import hub_toml
from hub.acl import AclPolicy, AclRules
from hub.config import (
    AuditConfig,
    AuthConfig,
    BindAddress,
    ChecksConfig,
    HubConfig,
    LimitsConfig,
    ListenerConfig,
    MetricsConfig,
    RevocationConfig,
    load_config,
    parse_bind,
)
from hub.errors import ConfigError, HubError, InvalidValueError

ANY_HOST = "0.0.0.0"  # noqa: S104 - DESIGN's default bind is every interface

LISTENER = """\
[listener]
server_cert = "pki/server.pem"
server_key = "pki/server.key"
client_ca = "pki/ca-chain.pem"
"""

FEED = "https://ca.example.com:8443/feed"
DESIGN_EXAMPLE = hub_toml()  # DESIGN section 5's example, files under pki/ (device_sim.lab)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder holding a PKI subfolder with the files the listener needs."""
    pki = tmp_path / "pki"
    pki.mkdir()
    for name in ("server.pem", "server.key", "ca-chain.pem", "registry.db", "crl.pem"):
        (pki / name).write_text("placeholder\n")
    return tmp_path


def _write(site: Path, text: str) -> Path:
    path = site / "hub.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_designs_example_loads(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DESIGN section 5's example loads, with paths resolved against the config's folder."""
    path = _write(site, DESIGN_EXAMPLE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not depend on the working directory
    pki = site / "pki"
    assert load_config(path) == HubConfig(
        listener=ListenerConfig(
            server_cert=pki / "server.pem",
            server_key=pki / "server.key",
            client_ca=pki / "ca-chain.pem",
            bind=BindAddress(ANY_HOST, 8883),
        ),
        revocation=RevocationConfig(registry=pki / "registry.db", crl_file=pki / "crl.pem"),
        audit=AuditConfig(site / "hub-audit.db"),
        auth=AuthConfig(client_id="must-match", password=False),
        acl=AclPolicy.default(),
        metrics=MetricsConfig(BindAddress("127.0.0.1", 9883)),
        checks=ChecksConfig(quarantine_file=site / "quarantine.json"),
        source=path,
    )


def test_checks_defaults_and_keys(site: Path) -> None:
    """[checks] (DESIGN section 11): report, 30 days, 60 s; every key read as written."""
    assert load_config(_write(site, LISTENER)).checks == ChecksConfig(
        "report", 30, 60.0, 2048, ("secp256r1", "secp384r1", "secp521r1"),
        site / "quarantine.json")
    config = load_config(_write(site, LISTENER + """
[checks]
action = "quarantine"
warn_days = 7
shared_window_seconds = 30
min_rsa_bits = 3072
curves = ["secp384r1"]
quarantine_file = "state/q.json"
"""))
    assert config.checks == ChecksConfig("quarantine", 7, 30.0, 3072, ("secp384r1",),
                                         site / "state" / "q.json")


def test_relative_config_path_resolves_against_its_folder(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config named relative to the working directory still yields absolute paths."""
    _write(site, LISTENER)
    monkeypatch.chdir(site)
    config = load_config("hub.toml")
    assert config.listener.server_cert == site / "pki" / "server.pem"
    assert config.audit.path == site / "hub-audit.db"
    assert config.source == Path("hub.toml")


def test_defaults(site: Path) -> None:
    """Only [listener]'s files are required; everything else has a documented default."""
    config = load_config(_write(site, LISTENER))
    assert config.listener.bind == BindAddress(ANY_HOST, 8883)
    assert config.listener.handshake_timeout == 10.0
    assert config.listener.min_tls == "1.2"
    assert config.listener.min_tls_version is ssl.TLSVersion.TLSv1_2
    assert config.revocation == RevocationConfig(None, None, None, 1.0)
    assert config.auth == AuthConfig("must-match", password=False)
    assert config.acl == AclPolicy()  # deny everything
    assert config.audit.path == site / "hub-audit.db"
    assert config.metrics.bind is None
    assert config.limits == LimitsConfig()
    assert config.limits.max_packet_bytes == 262144
    assert config.limits.publish_rate == 100.0
    assert config.limits.on_rate_limit == "drop"
    assert config.limits.max_pending_tls == 16


def test_limits_and_trust_domain(site: Path) -> None:
    """Every [limits] key and [auth] trust_domain are read as written."""
    config = load_config(_write(site, LISTENER + """
[auth]
trust_domain = "fleet.acme.com"

[limits]
max_packet_bytes = 1000
max_topic_bytes = 100
max_subscriptions = 3
publish_rate = 2.5
publish_bytes_rate = 4096
on_rate_limit = "disconnect"
max_retained_per_device = 0
max_retained_bytes = 10
max_pending_tls = 1
"""))
    assert config.auth.trust_domain == "fleet.acme.com"
    assert config.limits == LimitsConfig(1000, 100, 3, 2.5, 4096, "disconnect", 0, 10, 1)


def test_password_needs_a_registry(site: Path) -> None:
    """A CRL carries no password hashes: password = true on a CRL-only gateway is refused."""
    text = LISTENER + '[revocation]\ncrl = "pki/crl.pem"\n[auth]\npassword = true\n'
    path = _write(site, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith("auth.password: true needs revocation.registry or "
                                      "revocation.feed")
    ok = LISTENER + '[revocation]\nregistry = "pki/registry.db"\n[auth]\npassword = true\n'
    assert load_config(_write(site, ok)).auth.password is True
    fed = LISTENER + f'[revocation]\nfeed = "{FEED}"\n[auth]\npassword = true\n'
    assert load_config(_write(site, fed)).auth.password is True


def test_registered_only_needs_a_registry_or_a_feed(site: Path) -> None:
    """A CRL lists no device's certificates: registered_only on a CRL-only gateway is refused;
    with a registry or a feed it is read."""
    path = _write(site, LISTENER + '[revocation]\ncrl = "pki/crl.pem"\n'
                  "[auth]\nregistered_only = true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith("auth.registered_only: true needs revocation.registry "
                                      "or revocation.feed")
    assert load_config(_write(site, LISTENER)).auth.registered_only is False
    for source in ('registry = "pki/registry.db"', f'feed = "{FEED}"'):
        text = LISTENER + f"[revocation]\n{source}\n[auth]\nregistered_only = true\n"
        assert load_config(_write(site, text)).auth.registered_only is True


def test_feed_defaults_to_the_listeners_certificate_and_a_cache_beside_the_config(
        site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With only `feed` set: feed_cert/feed_key are the listener's, feed_cache is
    fleet-state.json in the config's folder, max_age_seconds one day (DESIGN section 9)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(_write(site, LISTENER + f'[revocation]\nfeed = "{FEED}"\n'))
    pki = site / "pki"
    assert config.revocation == RevocationConfig(
        feed=FEED, feed_cert=pki / "server.pem", feed_key=pki / "server.key",
        feed_cache=site / "fleet-state.json", max_age_seconds=86400.0)
    assert config.revocation.configured


def test_feed_keys_as_written(site: Path) -> None:
    """DESIGN section 9's example: every feed key read, paths against the config's folder."""
    (site / "gw.pem").write_text("placeholder\n")
    (site / "gw.key").write_text("placeholder\n")
    config = load_config(_write(site, LISTENER + f"""
[revocation]
feed = "{FEED}"
feed_cert = "gw.pem"
feed_key = "gw.key"
feed_cache = "state/fleet-state.json"
max_age_seconds = 3600
"""))
    assert config.revocation == RevocationConfig(
        feed=FEED, feed_cert=site / "gw.pem", feed_key=site / "gw.key",
        feed_cache=site / "state" / "fleet-state.json", max_age_seconds=3600.0)


def test_from_pki_reads_the_trust_domain(site: Path) -> None:
    (site / "pki" / "pki.toml").write_text('trust_domain = "fleet.example.org"\n')
    assert HubConfig.from_pki(site / "pki").auth.trust_domain == "fleet.example.org"


def test_optional_values(site: Path) -> None:
    """Every optional key is read: timeouts, TLS 1.3, a CRL URL, absolute paths, groups."""
    audit = site / "abs" / "audit.db"
    text = LISTENER + f"""\
bind = "[::1]:0"
handshake_timeout = 2.5
min_tls = "1.3"

[revocation]
registry = "pki/registry.db"
crl = "https://ca.example.com/crl.der"
refresh_seconds = 0.25

[auth]
password = true

[acl]
publish = ["devices/{{device_id}}/#"]

[acl.groups.line-7]
publish = ["lines/{{group}}/{{device_id}}"]

[acl.groups.empty]

[audit]
path = "{audit}"

[metrics]
bind = "localhost:9100"
"""
    config = load_config(_write(site, text))
    assert config.listener.bind == BindAddress("::1", 0)
    assert config.listener.handshake_timeout == 2.5
    assert config.listener.min_tls_version is ssl.TLSVersion.TLSv1_3
    assert config.revocation == RevocationConfig(
        registry=site / "pki" / "registry.db", crl_url="https://ca.example.com/crl.der",
        refresh_seconds=0.25,
    )
    assert config.auth.password is True
    assert config.acl.groups == {
        "line-7": AclRules.of(publish=["lines/{group}/{device_id}"]),
        "empty": AclRules(),
    }
    assert config.acl.may_publish("d1", "line-7", "lines/line-7/d1")
    assert config.audit.path == audit
    assert config.metrics.bind == BindAddress("localhost", 9100)


def test_config_is_frozen(site: Path) -> None:
    """The loaded config cannot be changed behind the hub's back."""
    config = load_config(_write(site, LISTENER))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.auth = AuthConfig(password=True)  # type: ignore[misc]


BAD_CONFIGS = [
    pytest.param(
        LISTENER + '[acl]\npublish = ["devices/{device_id}/#", "devices/#/x"]\n',
        'acl.publish[1]: "devices/#/x" is not a valid topic filter: \'#\' must be last',
        id="bad-filter",
    ),
    pytest.param(
        LISTENER + '[acl]\nsubscribe = ["devices/{id}/#"]\n',
        'acl.subscribe[0]: "devices/{id}/#" uses the unknown placeholder {id} '
        "(want {device_id} or {group})",
        id="unknown-placeholder",
    ),
    pytest.param(
        LISTENER + "[acl]\nsubscribe = [1]\n",
        "acl.subscribe[0]: want a topic filter string, got integer 1",
        id="filter-not-a-string",
    ),
    pytest.param(
        LISTENER + '[acl]\npublish = "devices/#"\n',
        'acl.publish: want an array of topic filters, got string "devices/#"',
        id="filters-not-an-array",
    ),
    pytest.param(
        LISTENER + '[acl.groups.operators]\nsubscribe = ["$SYS/#"]\n',
        'acl.groups.operators.subscribe[0]: "$SYS/#" can never be granted: '
        "$SYS is closed to devices",
        id="group-sys",
    ),
    pytest.param(
        LISTENER + '[acl.groups.operators]\nsubscibe = ["#"]\n',
        "acl.groups.operators.subscibe: unknown key (want one of: publish, subscribe)",
        id="group-unknown-key",
    ),
    pytest.param(
        LISTENER + '[acl.groups."night shift"]\nsubscribe = ["#"]\n',
        'acl.groups."night shift": not a group name (want [A-Za-z0-9][A-Za-z0-9._-]{0,63})',
        id="group-bad-name",
    ),
    pytest.param(
        LISTENER + "[acl]\ngroups = 3\n",
        "acl.groups: want a table of [acl.groups.NAME] sections, got integer 3",
        id="groups-not-a-table",
    ),
    pytest.param(
        LISTENER + "[listner]\n",
        "listner: unknown section (want one of: acl, audit, auth, checks, limits, listener, "
        "metrics, revocation)",
        id="unknown-section",
    ),
    pytest.param(
        LISTENER + 'bnid = "0.0.0.0:1"\n',
        "listener.bnid: unknown key (want one of: bind, client_ca, handshake_timeout, min_tls, "
        "server_cert, server_key)",
        id="unknown-key",
    ),
    pytest.param(
        'listener = "0.0.0.0:8883"\n',
        'listener: want a table, got string "0.0.0.0:8883"',
        id="section-not-a-table",
    ),
    pytest.param(
        '[listener]\nserver_key = "pki/server.key"\nclient_ca = "pki/ca-chain.pem"\n',
        "listener.server_cert: missing (want a path to a PEM file)",
        id="missing-key",
    ),
    pytest.param(
        "",
        "listener.server_cert: missing (want a path to a PEM file)",
        id="empty-file",
    ),
    pytest.param(
        LISTENER.replace("server.key", "sever.key"),
        "listener.server_key: no such file: {site}/pki/sever.key",
        id="missing-file",
    ),
    pytest.param(
        LISTENER.replace("pki/ca-chain.pem", "pki"),
        "listener.client_ca: not a file: {site}/pki",
        id="directory-not-file",
    ),
    pytest.param(
        LISTENER.replace('"pki/server.pem"', '""'),
        "listener.server_cert: want a path, got an empty string",
        id="empty-path",
    ),
    pytest.param(
        LISTENER + "bind = 8883\n",
        'listener.bind: want a string "HOST:PORT", got integer 8883',
        id="bind-wrong-type",
    ),
    pytest.param(
        LISTENER + 'bind = "0.0.0.0:99999"\n',
        'listener.bind: "0.0.0.0:99999" is not HOST:PORT: '
        'the port must be a number from 0 to 65535, got "99999"',
        id="bad-port",
    ),
    pytest.param(
        LISTENER + 'bind = "::1:8883"\n',
        'listener.bind: "::1:8883" is not HOST:PORT: '
        "write an IPv6 address in brackets, as in [::1]:8883",
        id="ipv6-without-brackets",
    ),
    pytest.param(
        LISTENER + "[metrics]\nbind = \"metrics host:9883\"\n",
        'metrics.bind: "metrics host:9883" is not HOST:PORT: '
        '"metrics host" is not a host name or an IP address',
        id="metrics-bad-host",
    ),
    pytest.param(
        LISTENER + 'min_tls = "1.1"\n',
        'listener.min_tls: want "1.2" or "1.3", got "1.1"',
        id="min-tls",
    ),
    pytest.param(
        LISTENER + "min_tls = 1.3\n",
        'listener.min_tls: want the string "1.2" or "1.3", got float 1.3',
        id="min-tls-number",
    ),
    pytest.param(
        LISTENER + "handshake_timeout = -1\n",
        "listener.handshake_timeout: want a number of seconds above 0, got integer -1",
        id="negative-timeout",
    ),
    pytest.param(
        LISTENER + "[revocation]\nrefresh_seconds = 0\n",
        "revocation.refresh_seconds: want a number of seconds above 0, got integer 0",
        id="zero-refresh",
    ),
    pytest.param(
        LISTENER + "[revocation]\nrefresh_seconds = nan\n",
        "revocation.refresh_seconds: want a number of seconds above 0, got float nan",
        id="nan-refresh",
    ),
    pytest.param(
        LISTENER + "[revocation]\nrefresh_seconds = true\n",
        "revocation.refresh_seconds: want a number of seconds, got boolean true",
        id="bool-is-not-a-number",
    ),
    pytest.param(
        LISTENER + '[revocation]\ncrl = "ftp://ca.example.com/crl.pem"\n',
        'revocation.crl: want a path or an http(s) URL, got "ftp://ca.example.com/crl.pem"',
        id="crl-bad-scheme",
    ),
    pytest.param(
        LISTENER + '[revocation]\nfeed = "http://ca.example.com/feed"\n',
        'revocation.feed: want an https URL such as "https://ca.example.com:8443/feed", got '
        '"http://ca.example.com/feed"',
        id="feed-not-https",
    ),
    pytest.param(
        LISTENER + '[revocation]\nfeed = "ca.example.com/feed"\n',
        'revocation.feed: want an https URL such as "https://ca.example.com:8443/feed", got '
        '"ca.example.com/feed"',
        id="feed-no-scheme",
    ),
    pytest.param(
        LISTENER + f'[revocation]\nfeed = "{FEED}"\nfeed_cert = "pki/server.pem"\n',
        "revocation.feed_key: missing: set it with revocation.feed_cert, or neither (both "
        "default to the listener's server_cert and server_key)",
        id="feed-cert-without-key",
    ),
    pytest.param(
        LISTENER + f'[revocation]\nfeed = "{FEED}"\nfeed_cert = "pki/gw.pem"\n'
        'feed_key = "pki/server.key"\n',
        "revocation.feed_cert: no such file: {site}/pki/gw.pem",
        id="feed-cert-missing",
    ),
    pytest.param(
        LISTENER + '[revocation]\nfeed_cache = "x.json"\n',
        "revocation.feed_cache: only with revocation.feed (set the feed's URL)",
        id="feed-cache-without-feed",
    ),
    pytest.param(
        LISTENER + f'[revocation]\nfeed = "{FEED}"\nmax_age_seconds = 0\n',
        "revocation.max_age_seconds: want a number of seconds above 0, got integer 0",
        id="max-age-zero",
    ),
    pytest.param(
        LISTENER + '[auth]\nregistered_only = "yes"\n',
        'auth.registered_only: want true or false, got string "yes"',
        id="registered-only-not-bool",
    ),
    pytest.param(
        LISTENER + '[auth]\nclient_id = "any"\n',
        'auth.client_id: want "must-match" (the only mode), got "any"',
        id="client-id-mode",
    ),
    pytest.param(
        LISTENER + '[auth]\npassword = "yes"\n',
        'auth.password: want true or false, got string "yes"',
        id="password-not-bool",
    ),
    pytest.param(
        LISTENER + '[auth]\ntrust_domain = "Fleet.Acme"\n',
        'auth.trust_domain: "Fleet.Acme" is not a trust domain (want a lowercase DNS-like '
        "name such as fleet.acme.com)",
        id="trust-domain",
    ),
    pytest.param(
        LISTENER + "[limits]\nmax_packet_bytes = 10\n",
        "limits.max_packet_bytes: want an integer from 64 to 268435460, got 10",
        id="packet-too-small",
    ),
    pytest.param(
        LISTENER + "[limits]\nmax_packet_bytes = 1000\nmax_topic_bytes = 2000\n",
        "limits.max_topic_bytes: 2000 is above max_packet_bytes (1000): no packet could "
        "carry such a topic",
        id="topic-above-packet",
    ),
    pytest.param(
        LISTENER + "[limits]\npublish_rate = 0\n",
        "limits.publish_rate: want messages per second above 0, got 0.0",
        id="rate-zero",
    ),
    pytest.param(
        LISTENER + "[limits]\nmax_subscriptions = true\n",
        "limits.max_subscriptions: want an integer from 1 to 65535, got boolean true",
        id="subscriptions-bool",
    ),
    pytest.param(
        LISTENER + '[limits]\non_rate_limit = "block"\n',
        'limits.on_rate_limit: want "drop" or "disconnect", got "block"',
        id="rate-action",
    ),
    pytest.param(
        LISTENER + "[limits]\nmax_pending_tls = 0\n",
        "limits.max_pending_tls: want an integer from 1 to 65535, got 0",
        id="pending-tls-zero",
    ),
    pytest.param(
        LISTENER + "[limits]\nmax_bytes = 1\n",
        "limits.max_bytes: unknown key (want one of: max_packet_bytes, max_pending_tls, "
        "max_retained_bytes, max_retained_per_device, max_subscriptions, max_topic_bytes, "
        "on_rate_limit, publish_bytes_rate, publish_rate)",
        id="limits-unknown-key",
    ),
    pytest.param(
        LISTENER + "[audit]\npath = 1\n",
        "audit.path: want a path, got integer 1",
        id="audit-path-type",
    ),
    pytest.param(
        LISTENER + "[audit]\nfile = \"x.db\"\n",
        "audit.file: unknown key (want one of: path)",
        id="audit-unknown-key",
    ),
    pytest.param(
        LISTENER + '[checks]\naction = "kick"\n',
        'checks.action: want "report" or "quarantine", got "kick"', id="checks-action"),
    pytest.param(
        LISTENER + "[checks]\nwarn_days = -1\n",
        "checks.warn_days: want a number of days from 0 to 3650, got -1", id="checks-warn-days"),
    pytest.param(
        LISTENER + "[checks]\nshared_window_seconds = 0\n",
        "checks.shared_window_seconds: want a number of seconds above 0, got integer 0",
        id="checks-window"),
    pytest.param(
        LISTENER + "[checks]\nmin_rsa_bits = 512\n",
        "checks.min_rsa_bits: want a number of bits from 1024 to 16384, got 512",
        id="checks-rsa-bits"),
    pytest.param(
        LISTENER + '[checks]\ncurves = ["secp256r1", "p256"]\n',
        "checks.curves[1]: want one of secp192r1, secp224r1, secp256r1, secp384r1, secp521r1, "
        'secp256k1, brainpoolP256r1, brainpoolP384r1, brainpoolP512r1, got string "p256"',
        id="checks-curve"),
    pytest.param(
        LISTENER + "[checks]\nwindow = 5\n",
        "checks.window: unknown key (want one of: action, curves, min_rsa_bits, "
        "quarantine_file, shared_window_seconds, warn_days)", id="checks-unknown-key"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_bad_configs_name_the_key_and_the_file(site: Path, text: str, message: str) -> None:
    """Each bad config is one ConfigError line: `<key path>: <what is wrong> (<file>)`."""
    path = _write(site, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{message.replace('{site}', str(site))} ({path})"
    assert info.value.path == path
    assert "\n" not in str(info.value)


def test_unreadable_config(tmp_path: Path) -> None:
    """A missing config file is named, without a key path."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"cannot read the config: No such file or directory ({path})"
    assert info.value.key == ""


def test_invalid_toml(tmp_path: Path) -> None:
    """A TOML syntax error keeps tomllib's line and column."""
    path = tmp_path / "hub.toml"
    path.write_text("[listener\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith("the config is not valid TOML: ")
    assert "line 1" in str(info.value)
    assert str(info.value).endswith(f"({path})")


def test_config_not_utf8(tmp_path: Path) -> None:
    """A config that is not UTF-8 text is refused with the reason."""
    path = tmp_path / "hub.toml"
    path.write_bytes(b"[listener]\nbind = \"\xff\"\n")
    with pytest.raises(ConfigError, match=r"^the config is not UTF-8 text: invalid start byte"):
        load_config(path)


# ---------------------------------------------------------------------------------------------
# parse_bind


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:8883", (ANY_HOST, 8883)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("localhost:1883", ("localhost", 1883)),
        ("hub.example.com:65535", ("hub.example.com", 65535)),
        ("[::1]:8883", ("::1", 8883)),
        ("[::]:8883", ("::", 8883)),
        ("[fe80::1%eth0]:8883", ("fe80::1%eth0", 8883)),
    ],
)
def test_parse_bind(value: str, expected: tuple[str, int]) -> None:
    """HOST:PORT and [IPv6]:PORT parse to (host, port) and print back the same."""
    bind = parse_bind(value)
    assert bind == expected
    host, port = bind
    assert (host, port) == expected
    assert str(bind) == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("8883", "the port is missing"),
        ("localhost", "the port is missing"),
        (":8883", "the host is missing"),
        ("localhost:", 'the port must be a number from 0 to 65535, got ""'),
        ("localhost:http", 'the port must be a number from 0 to 65535, got "http"'),
        ("localhost:-1", 'the port must be a number from 0 to 65535, got "-1"'),
        ("localhost:+80", 'the port must be a number from 0 to 65535, got "+80"'),
        ("localhost:65536", 'the port must be a number from 0 to 65535, got "65536"'),
        ("localhost: 80", 'the port must be a number from 0 to 65535, got " 80"'),
        ("::1:8883", "write an IPv6 address in brackets, as in [::1]:8883"),
        ("[1.2.3.4]:8883", '"1.2.3.4" is not an IPv6 address'),
        ("[zz]:8883", '"zz" is not an IPv6 address'),
        ("bad_host:1", '"bad_host" is not a host name or an IP address'),
        ("-lead.example:1", '"-lead.example" is not a host name or an IP address'),
    ],
)
def test_parse_bind_refuses(value: str, why: str) -> None:
    """A bad address says what is wrong with it."""
    with pytest.raises(InvalidValueError) as info:
        parse_bind(value)
    assert str(info.value) == f'"{value}" is not HOST:PORT: {why}'


# ---------------------------------------------------------------------------------------------
# HubConfig.from_pki


def test_from_pki_defaults(site: Path) -> None:
    """`serve --pki DIR` draws every file from the PKI folder, with DESIGN's default ACL."""
    pki = site / "pki"
    assert HubConfig.from_pki(pki) == HubConfig(
        listener=ListenerConfig(
            pki / "server.pem", pki / "server.key", pki / "ca-chain.pem",
            bind=BindAddress(ANY_HOST, 8883),
        ),
        revocation=RevocationConfig(registry=pki / "registry.db", crl_file=pki / "crl.pem"),
        audit=AuditConfig(pki / "hub-audit.db"),
        acl=AclPolicy.default(),
        metrics=MetricsConfig(BindAddress("127.0.0.1", 9883)),
        checks=ChecksConfig(quarantine_file=pki / "hub-quarantine.json"),
    )


def test_from_pki_bind(site: Path) -> None:
    """--bind overrides the listener address, as a string or a BindAddress."""
    pki = site / "pki"
    assert HubConfig.from_pki(pki, "127.0.0.1:0").listener.bind == ("127.0.0.1", 0)
    assert HubConfig.from_pki(pki, BindAddress("::1", 1)).listener.bind == ("::1", 1)


def test_from_pki_with_a_crl_only(site: Path) -> None:
    """A gateway holding the CA bundle and a CRL, but no registry, still gets a config."""
    (site / "pki" / "registry.db").unlink()
    revocation = HubConfig.from_pki(site / "pki").revocation
    assert revocation.registry is None
    assert revocation.crl_file == site / "pki" / "crl.pem"


@pytest.mark.parametrize(
    ("remove", "bind", "message"),
    [
        ("server.pem", None,
         "--pki: no such file: {pki}/server.pem; make it with fleet-provision server-cert ({pki})"),
        ("server.key", None,
         "--pki: no such file: {pki}/server.key; make it with fleet-provision server-cert ({pki})"),
        ("ca-chain.pem", None, "--pki: no such file: {pki}/ca-chain.pem ({pki})"),
        (None, "hub.local", '--bind: "hub.local" is not HOST:PORT: the port is missing'),
    ],
)
def test_from_pki_refuses(site: Path, remove: str | None, bind: str | None, message: str) -> None:
    """A PKI folder without the hub's files, or a bad --bind, is one clear line."""
    pki = site / "pki"
    if remove:
        (pki / remove).unlink()
    with pytest.raises(ConfigError) as info:
        HubConfig.from_pki(pki, bind)
    assert str(info.value) == message.format(pki=pki)


def test_from_pki_needs_a_revocation_source(site: Path) -> None:
    """Without registry.db or crl.pem the hub could never learn of a revocation: refused."""
    pki = site / "pki"
    (pki / "registry.db").unlink()
    (pki / "crl.pem").unlink()
    with pytest.raises(ConfigError) as info:
        HubConfig.from_pki(pki)
    assert str(info.value) == (
        f"--pki: no registry.db or crl.pem: the hub needs one to learn of revocations ({pki})"
    )


def test_from_pki_missing_folder(tmp_path: Path) -> None:
    """A --pki folder that does not exist is named."""
    with pytest.raises(ConfigError) as info:
        HubConfig.from_pki(tmp_path / "nope")
    assert str(info.value) == f"--pki: no such directory ({tmp_path / 'nope'})"


# ---------------------------------------------------------------------------------------------
# ConfigError


@pytest.mark.parametrize(
    ("path", "key", "message", "expected"),
    [
        ("hub.toml", "acl.publish[1]", "bad", "acl.publish[1]: bad (hub.toml)"),
        ("hub.toml", "", "not TOML", "not TOML (hub.toml)"),
        (None, "--bind", "bad", "--bind: bad"),
    ],
)
def test_config_error_text(path: str | None, key: str, message: str, expected: str) -> None:
    """ConfigError keeps its fields and prints `<key>: <message> (<file>)`."""
    error = ConfigError(path, key, message)
    assert (error.path, error.key, error.message) == (path, key, message)
    assert str(error) == expected
    assert isinstance(error, HubError)
