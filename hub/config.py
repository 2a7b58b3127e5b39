"""The hub's configuration: one TOML file read into frozen dataclasses, validated at load.

Every error names the TOML key path and the file (DESIGN section 5 for the keys, section 8 for
the one-line error). Relative paths are resolved against the config file's folder, so the hub
behaves the same whatever directory systemd starts it in.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar
from urllib.parse import urlsplit

from hub.acl import AclPolicy, AclRules, AclTemplate
from hub.errors import ConfigError, InvalidValueError
from provisioning.identity import DEVICE_ID_PATTERN, is_valid_device_id, is_valid_trust_domain

__all__ = [
    "AuditConfig",
    "AuthConfig",
    "BindAddress",
    "ChecksConfig",
    "HubConfig",
    "LimitsConfig",
    "ListenerConfig",
    "MetricsConfig",
    "RevocationConfig",
    "load_config",
    "parse_bind",
]

DEFAULT_BIND = "0.0.0.0:8883"  # a gateway listens on every interface by default
DEFAULT_METRICS_BIND = "127.0.0.1:9883"
MAX_PACKET_BYTES = 268_435_460  # the largest MQTT packet: 1 + 4 length bytes + 268,435,455
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_T = TypeVar("_T")


class BindAddress(NamedTuple):
    """HOST:PORT to listen on; unpacks as ``(host, port)``. Port 0 lets the OS choose."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_bind(value: str) -> BindAddress:
    """Parse ``HOST:PORT`` or ``[IPv6]:PORT``; raise InvalidValueError saying what is wrong."""

    def bad(why: str) -> InvalidValueError:
        return InvalidValueError(f'"{value}" is not HOST:PORT: {why}')

    host, sep, port = value.rpartition(":")
    if not sep:
        raise bad("the port is missing")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f'"{host}" is not an IPv6 address') from None
    elif ":" in host:
        raise bad("write an IPv6 address in brackets, as in [::1]:8883")
    elif not host:
        raise bad("the host is missing")
    elif not _HOSTNAME_RE.match(host):
        raise bad(f'"{host}" is not a host name or an IP address')
    if not _PORT_RE.match(port) or int(port) > 65535:
        raise bad(f'the port must be a number from 0 to 65535, got "{port}"')
    return BindAddress(host, int(port))


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """[listener]: the mutual-TLS MQTT listener."""

    server_cert: Path
    server_key: Path
    client_ca: Path
    bind: BindAddress = field(default_factory=lambda: parse_bind(DEFAULT_BIND))
    handshake_timeout: float = 10.0
    min_tls: Literal["1.2", "1.3"] = "1.2"

    @property
    def min_tls_version(self) -> ssl.TLSVersion:
        """``min_tls`` as the value ``SSLContext.minimum_version`` takes."""
        return ssl.TLSVersion.TLSv1_3 if self.min_tls == "1.3" else ssl.TLSVersion.TLSv1_2


DEFAULT_FEED_CACHE = "fleet-state.json"  # beside the config file, when a feed is set
DEFAULT_MAX_AGE_SECONDS = 86_400.0


@dataclass(frozen=True, slots=True)
class RevocationConfig:
    """[revocation]: where revoked serials come from; ``crl`` is a file or an http(s) URL.

    ``feed`` is the CA service's fleet-state feed (DESIGN section 9), an https URL; when it is
    set, ``feed_cert``/``feed_key`` (the hub's gateway certificate, default the listener's) and
    ``feed_cache`` (default ``fleet-state.json`` beside the config) are set too.
    """

    registry: Path | None = None
    crl_file: Path | None = None
    crl_url: str | None = None
    refresh_seconds: float = 1.0
    feed: str | None = None
    feed_cert: Path | None = None
    feed_key: Path | None = None
    feed_cache: Path | None = None
    max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS

    @property
    def configured(self) -> bool:
        """At least one source is named."""
        return any(x is not None for x in (self.registry, self.crl_file, self.crl_url,
                                           self.feed))

    @property
    def lists_devices(self) -> bool:
        """A source that knows devices (password hashes, groups, certificates) is named."""
        return self.registry is not None or self.feed is not None


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """[auth]: checks after the certificate; the username is never part of identity.

    ``trust_domain`` None: learnt at start from the registry, or else from the hub's own
    gateway certificate (``spiffe://<domain>/gateway/<name>``); see :mod:`hub.trust`.
    """

    client_id: Literal["must-match"] = "must-match"
    password: bool = False
    trust_domain: str | None = None
    registered_only: bool = False  # admit only serials the registry or the feed lists


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """[limits]: what one connection or device may cost the gateway (DESIGN section 5).

    Rates are per device, a token bucket holding ``2x`` the rate (one second's burst on top).
    """

    max_packet_bytes: int = 262_144
    max_topic_bytes: int = 1024
    max_subscriptions: int = 64
    publish_rate: float = 100.0
    publish_bytes_rate: int = 524_288
    on_rate_limit: Literal["drop", "disconnect"] = "drop"
    max_retained_per_device: int = 100
    max_retained_bytes: int = 1_048_576
    max_pending_tls: int = 16


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """[audit]: the store of every connect decision, ACL denial and kick."""

    path: Path


CHECK_ACTIONS = ("report", "quarantine")
DEFAULT_CURVES = ("secp256r1", "secp384r1", "secp521r1")
KNOWN_CURVES = ("secp192r1", "secp224r1", "secp256r1", "secp384r1", "secp521r1", "secp256k1",
                "brainpoolP256r1", "brainpoolP384r1", "brainpoolP512r1")
DEFAULT_QUARANTINE = "quarantine.json"  # beside the config file


@dataclass(frozen=True, slots=True)
class ChecksConfig:
    """[checks]: the audit checks the hub runs on what it sees (DESIGN section 11).

    ``action`` "quarantine" closes and refuses a certificate a misuse check found (shared,
    client-id conflict, revoked still connected, unregistered, weak key); the two expiry
    checks only ever report. ``quarantine_file`` keeps the quarantined serials across restarts.
    """

    action: Literal["report", "quarantine"] = "report"
    warn_days: int = 30
    shared_window_seconds: float = 60.0
    min_rsa_bits: int = 2048
    curves: tuple[str, ...] = DEFAULT_CURVES
    quarantine_file: Path | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """[metrics]: Prometheus /metrics and /healthz; None when the section has no bind."""

    bind: BindAddress | None = None


@dataclass(frozen=True, slots=True)
class HubConfig:
    """The whole configuration; ``source`` is the file it came from (None for ``--pki``)."""

    listener: ListenerConfig
    revocation: RevocationConfig
    audit: AuditConfig
    auth: AuthConfig = field(default_factory=AuthConfig)
    acl: AclPolicy = field(default_factory=AclPolicy)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    source: Path | None = None

    @classmethod
    def from_pki(cls, pki_dir: Path | str, bind: BindAddress | str | None = None) -> HubConfig:
        """Defaults for ``fleet-hub serve --pki DIR [--bind HOST:PORT]``."""
        pki = Path(pki_dir)
        if not pki.is_dir():
            raise ConfigError(pki, "--pki", "no such directory")
        if isinstance(bind, str):
            try:
                bind = parse_bind(bind)
            except InvalidValueError as exc:
                raise ConfigError(None, "--bind", str(exc)) from exc
        files = {}
        for name, hint in [
            ("server.pem", "; make it with fleet-provision server-cert"),
            ("server.key", "; make it with fleet-provision server-cert"),
            ("ca-chain.pem", ""),
        ]:
            problem = _file_problem(pki / name)
            if problem is not None:
                raise ConfigError(pki, "--pki", f"{problem}{hint}")
            files[name] = pki / name
        registry, crl = pki / "registry.db", pki / "crl.pem"
        if not registry.is_file() and not crl.is_file():
            raise ConfigError(pki, "--pki", "no registry.db or crl.pem: the hub needs one to "
                              "learn of revocations")
        trust_domain = _pki_trust_domain(pki / "pki.toml")
        return cls(
            listener=ListenerConfig(
                files["server.pem"], files["server.key"], files["ca-chain.pem"],
                bind=parse_bind(DEFAULT_BIND) if bind is None else bind,
            ),
            revocation=RevocationConfig(
                registry=registry if registry.is_file() else None,
                crl_file=crl if crl.is_file() else None,
            ),
            audit=AuditConfig(pki / "hub-audit.db"),
            auth=AuthConfig(trust_domain=trust_domain),
            acl=AclPolicy.default(),
            metrics=MetricsConfig(parse_bind(DEFAULT_METRICS_BIND)),
            checks=ChecksConfig(quarantine_file=pki / "hub-quarantine.json"),
        )


def _pki_trust_domain(path: Path) -> str | None:
    """``trust_domain`` from a PKI folder's pki.toml; None when it has none to give."""
    try:
        value = tomllib.loads(path.read_text("utf-8")).get("trust_domain")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    if not isinstance(value, str) or not is_valid_trust_domain(value):
        return None
    return value


def _file_problem(path: Path) -> str | None:
    if not path.exists():
        return f"no such file: {path}"
    if not path.is_file():
        return f"not a file: {path}"
    if not os.access(path, os.R_OK):
        return f"not readable: {path}"
    return None


def _key_part(name: str) -> str:
    return name if _BARE_KEY_RE.match(name) else json.dumps(name, ensure_ascii=False)


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    kinds: list[tuple[type, str]] = [(str, "string"), (int, "integer"), (float, "float")]
    for kind, name in kinds:
        if isinstance(value, kind):
            return f'{name} "{value}"' if kind is str else f"{name} {value}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


class _Table:
    """One TOML table: typed getters whose errors carry the key path; unknown keys refused."""

    def __init__(
        self, file: Path, prefix: str, data: Mapping[str, object], known: tuple[str, ...]
    ) -> None:
        self.source, self.prefix, self.data = file, prefix, data
        self.base = file.parent.absolute()
        for key in data:
            if key not in known:
                what = "key" if prefix else "section"
                wanted = ", ".join(sorted(known)) or "none"
                raise self.error(key, f"unknown {what} (want one of: {wanted})")

    def path_of(self, key: str, index: int | None = None) -> str:
        """The key path as the user reads it: ``acl.groups.operators.subscribe[0]``."""
        path = f"{self.prefix}.{_key_part(key)}" if self.prefix else _key_part(key)
        return path if index is None else f"{path}[{index}]"

    def error(self, key: str, message: str, index: int | None = None) -> ConfigError:
        return ConfigError(self.source, self.path_of(key, index), message)

    def get(self, key: str, kind: type[_T], want: str, default: _T | None = None) -> _T | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # TOML `1` is a fine number of seconds
        # TOML booleans are Python ints: never let `true` pass for a number.
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        raise self.error(key, f"want {want}, got {_describe(value)}")

    def required(self, key: str, kind: type[_T], want: str) -> _T:
        value = self.get(key, kind, want)
        if value is None:
            raise self.error(key, f"missing (want {want})")
        return value

    def table(self, key: str, known: tuple[str, ...]) -> _Table:
        value = self.get(key, dict, "a table", {})
        return _Table(self.source, self.path_of(key), value or {}, known)

    def path(self, key: str) -> Path | None:
        value = self.get(key, str, "a path")
        if value is None:
            return None
        if not value:
            raise self.error(key, "want a path, got an empty string")
        return self.base / value  # an absolute value replaces the base

    def file(self, key: str) -> Path:
        """A path that must name a readable file now: a typo is caught at load, not at serve."""
        self.required(key, str, "a path to a PEM file")
        path = self.path(key)
        assert path is not None  # noqa: S101 - required() has just checked it is set
        if (problem := _file_problem(path)) is not None:
            raise self.error(key, problem)
        return path

    def seconds(self, key: str, default: float) -> float:
        value = self.get(key, float, "a number of seconds", default)
        if value is None or not math.isfinite(value) or value <= 0:
            got = _describe(self.data.get(key))
            raise self.error(key, f"want a number of seconds above 0, got {got}")
        return value

    def bind(self, key: str, default: str | None) -> BindAddress | None:
        value = self.get(key, str, 'a string "HOST:PORT"', default)
        return None if value is None else self.convert(key, parse_bind, value)

    def convert(
        self, key: str, make: Callable[[str], _T], value: str, index: int | None = None
    ) -> _T:
        try:
            return make(value)
        except InvalidValueError as exc:
            raise self.error(key, str(exc), index) from exc


_SECTIONS = ("listener", "revocation", "auth", "acl", "audit", "metrics", "limits",
             "checks")


def load_config(path: Path | str) -> HubConfig:
    """Read and validate a hub.toml; raise ConfigError naming the key path and the file."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read the config: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "", f"the config is not UTF-8 text: {exc.reason}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"the config is not valid TOML: {exc}") from exc
    root = _Table(file, "", data, _SECTIONS)
    for section in _SECTIONS:
        root.get(section, dict, "a table")
    listener = _listener(root)
    revocation = _revocation(root, listener)
    auth = _auth(root)
    if auth.password and not revocation.lists_devices:
        # The password hashes live in the registry (and its feed) only: a CRL-only gateway
        # would refuse every device.
        raise ConfigError(
            file, "auth.password",
            "true needs revocation.registry or revocation.feed (the password hashes are in "
            "the registry and its feed; a CRL carries none, so every device would be refused)")
    if auth.registered_only and not revocation.lists_devices:
        raise ConfigError(
            file, "auth.registered_only",
            "true needs revocation.registry or revocation.feed (they list each device's "
            "certificates; a CRL lists only refused ones, so every device would be refused)")
    return HubConfig(
        listener=listener,
        revocation=revocation,
        auth=auth,
        acl=_acl(root),
        audit=AuditConfig(root.table("audit", ("path",)).path("path") or _default_audit(file)),
        metrics=MetricsConfig(root.table("metrics", ("bind",)).bind("bind", None)),
        limits=_limits(root),
        checks=_checks(root),
        source=file,
    )


def _default_audit(file: Path) -> Path:
    return file.parent.absolute() / "hub-audit.db"


def _listener(root: _Table) -> ListenerConfig:
    keys = ("bind", "server_cert", "server_key", "client_ca", "handshake_timeout", "min_tls")
    table = root.table("listener", keys)
    min_tls = table.get("min_tls", str, 'the string "1.2" or "1.3"', "1.2")
    if min_tls not in ("1.2", "1.3"):
        raise table.error("min_tls", f'want "1.2" or "1.3", got "{min_tls}"')
    return ListenerConfig(
        server_cert=table.file("server_cert"),
        server_key=table.file("server_key"),
        client_ca=table.file("client_ca"),
        bind=table.bind("bind", DEFAULT_BIND) or parse_bind(DEFAULT_BIND),
        handshake_timeout=table.seconds("handshake_timeout", 10.0),
        min_tls="1.3" if min_tls == "1.3" else "1.2",
    )


def _revocation(root: _Table, listener: ListenerConfig) -> RevocationConfig:
    table = root.table("revocation", ("registry", "crl", "refresh_seconds", "feed", "feed_cert",
                                      "feed_key", "feed_cache", "max_age_seconds"))
    crl = table.get("crl", str, "a path or an http(s) URL")
    crl_file: Path | None = None
    crl_url: str | None = None
    if crl is not None and "://" in crl:
        url = urlsplit(crl)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise table.error("crl", f'want a path or an http(s) URL, got "{crl}"')
        crl_url = crl
    elif crl is not None:
        crl_file = table.path("crl")
    feed = _feed(table, listener)
    return RevocationConfig(
        registry=table.path("registry"),
        crl_file=crl_file,
        crl_url=crl_url,
        refresh_seconds=table.seconds("refresh_seconds", 1.0),
        feed=feed.url,
        feed_cert=feed.cert,
        feed_key=feed.key,
        feed_cache=feed.cache,
        max_age_seconds=table.seconds("max_age_seconds", DEFAULT_MAX_AGE_SECONDS),
    )


class _Feed(NamedTuple):
    url: str | None = None
    cert: Path | None = None
    key: Path | None = None
    cache: Path | None = None


def _feed(table: _Table, listener: ListenerConfig) -> _Feed:
    """The feed's keys (DESIGN section 9): all set when ``feed`` is, else none of them."""
    feed = table.get("feed", str, "an https URL")
    if feed is None:
        for key in ("feed_cert", "feed_key", "feed_cache"):
            if key in table.data:
                raise table.error(key, "only with revocation.feed (set the feed's URL)")
        return _Feed()
    url = urlsplit(feed)
    if url.scheme != "https" or not url.hostname:
        # The feed is how the gateway learns who may connect: never over plain http.
        raise table.error("feed", f'want an https URL such as "https://ca.example.com:8443/'
                          f'feed", got "{feed}"')
    if ("feed_cert" in table.data) != ("feed_key" in table.data):
        given, missing = (("feed_cert", "feed_key") if "feed_cert" in table.data
                          else ("feed_key", "feed_cert"))
        raise table.error(missing, f"missing: set it with revocation.{given}, or neither "
                          "(both default to the listener's server_cert and server_key)")
    given_cert = "feed_cert" in table.data
    return _Feed(feed,
                 table.file("feed_cert") if given_cert else listener.server_cert,
                 table.file("feed_key") if given_cert else listener.server_key,
                 table.path("feed_cache") or table.base / DEFAULT_FEED_CACHE)


def _auth(root: _Table) -> AuthConfig:
    table = root.table("auth", ("client_id", "password", "trust_domain", "registered_only"))
    client_id = table.get("client_id", str, 'the string "must-match"', "must-match")
    if client_id != "must-match":
        raise table.error("client_id", f'want "must-match" (the only mode), got "{client_id}"')
    password = table.get("password", bool, "true or false", False)
    registered_only = table.get("registered_only", bool, "true or false", False)
    trust_domain = table.get("trust_domain", str, "a trust domain such as fleet.acme.com")
    if trust_domain is not None and not is_valid_trust_domain(trust_domain):
        raise table.error("trust_domain", f'"{trust_domain}" is not a trust domain (want a '
                          "lowercase DNS-like name such as fleet.acme.com)")
    return AuthConfig(client_id="must-match", password=bool(password),
                      trust_domain=trust_domain, registered_only=bool(registered_only))


def _limits(root: _Table) -> LimitsConfig:
    defaults = LimitsConfig()
    keys = ("max_packet_bytes", "max_topic_bytes", "max_subscriptions", "publish_rate",
            "publish_bytes_rate", "on_rate_limit", "max_retained_per_device",
            "max_retained_bytes", "max_pending_tls")
    table = root.table("limits", keys)

    def count(key: str, low: int, high: int) -> int:
        default = getattr(defaults, key)
        value = table.get(key, int, f"an integer from {low} to {high}", default)
        if value is None or not low <= value <= high:
            raise table.error(key, f"want an integer from {low} to {high}, got {value}")
        return int(value)

    rate = table.get("publish_rate", float, "messages per second above 0",
                     defaults.publish_rate)
    if rate is None or not math.isfinite(rate) or rate <= 0:
        raise table.error("publish_rate", f"want messages per second above 0, got {rate}")
    action = table.get("on_rate_limit", str, '"drop" or "disconnect"', defaults.on_rate_limit)
    if action not in ("drop", "disconnect"):
        raise table.error("on_rate_limit", f'want "drop" or "disconnect", got "{action}"')
    max_packet = count("max_packet_bytes", 64, MAX_PACKET_BYTES)
    max_topic = count("max_topic_bytes", 1, 65535)
    if max_topic > max_packet:
        raise table.error("max_topic_bytes", f"{max_topic} is above max_packet_bytes "
                          f"({max_packet}): no packet could carry such a topic")
    return LimitsConfig(
        max_packet_bytes=max_packet,
        max_topic_bytes=max_topic,
        max_subscriptions=count("max_subscriptions", 1, 65535),
        publish_rate=rate,
        publish_bytes_rate=count("publish_bytes_rate", 1, 2**40),
        on_rate_limit="disconnect" if action == "disconnect" else "drop",
        max_retained_per_device=count("max_retained_per_device", 0, 10**9),
        max_retained_bytes=count("max_retained_bytes", 0, 2**40),
        max_pending_tls=count("max_pending_tls", 1, 65535),
    )


def _checks(root: _Table) -> ChecksConfig:
    table = root.table("checks", ("action", "warn_days", "shared_window_seconds",
                                  "min_rsa_bits", "curves", "quarantine_file"))
    defaults = ChecksConfig()
    action = table.get("action", str, '"report" or "quarantine"', defaults.action)
    if action not in CHECK_ACTIONS:
        raise table.error("action", f'want "report" or "quarantine", got "{action}"')
    warn_days = table.get("warn_days", int, "a number of days from 0 to 3650",
                          defaults.warn_days)
    if warn_days is None or not 0 <= warn_days <= 3650:
        raise table.error("warn_days", f"want a number of days from 0 to 3650, got {warn_days}")
    bits = table.get("min_rsa_bits", int, "a number of bits from 1024 to 16384",
                     defaults.min_rsa_bits)
    if bits is None or not 1024 <= bits <= 16384:
        raise table.error("min_rsa_bits", f"want a number of bits from 1024 to 16384, got {bits}")
    listed = table.get("curves", list, "an array of curve names", list(defaults.curves))
    curves = []
    for index, curve in enumerate(listed or []):
        if not isinstance(curve, str) or curve not in KNOWN_CURVES:
            got = _describe(curve)
            raise table.error("curves", f"want one of {', '.join(KNOWN_CURVES)}, got {got}",
                              index)
        curves.append(curve)
    return ChecksConfig(
        action="quarantine" if action == "quarantine" else "report",
        warn_days=int(warn_days),
        shared_window_seconds=table.seconds("shared_window_seconds",
                                            defaults.shared_window_seconds),
        min_rsa_bits=int(bits),
        curves=tuple(curves),
        quarantine_file=table.path("quarantine_file") or table.base / DEFAULT_QUARANTINE,
    )


def _rules(table: _Table) -> AclRules:
    lists = []
    for key in ("publish", "subscribe"):
        patterns = table.get(key, list, "an array of topic filters", []) or []
        templates = []
        for index, pattern in enumerate(patterns):
            if not isinstance(pattern, str):
                want = f"want a topic filter string, got {_describe(pattern)}"
                raise table.error(key, want, index)
            templates.append(table.convert(key, AclTemplate, pattern, index))
        lists.append(tuple(templates))
    return AclRules(*lists)


def _acl(root: _Table) -> AclPolicy:
    table = root.table("acl", ("publish", "subscribe", "groups"))
    defaults = _rules(table)
    listed = table.get("groups", dict, "a table of [acl.groups.NAME] sections", {}) or {}
    groups_table = _Table(table.source, table.path_of("groups"), listed, tuple(listed))
    groups = {}
    for name in listed:
        # `fleet-provision sign --group` takes a group by the device-id rule (DESIGN section 1).
        if not is_valid_device_id(name):
            raise groups_table.error(name, f"not a group name (want {DEVICE_ID_PATTERN})")
        groups[name] = _rules(groups_table.table(name, ("publish", "subscribe")))
    return AclPolicy(defaults, groups)
