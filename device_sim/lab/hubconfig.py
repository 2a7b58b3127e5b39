"""hub.toml from one template: DESIGN section 5's example, changed by layers of overrides.

:data:`DESIGN_EXAMPLE` is the example of DESIGN section 5 with its files under a PKI folder
(``pki/`` unless told); ``tests/hub/test_config.py`` loads it and checks every value, so the
template cannot drift from the contract. A layer is a nested mapping of sections and keys:
a mapping deep-merges into what is there, any other value replaces it, None removes it::

    hub_toml("pki", LOOPBACK, {"auth": {"trust_domain": "fleet.test"},
                               "limits": {"publish_rate": 1000}, "acl": {"groups": None}})

The text is written here only: the quickstart, the tests' fleets and the benchmarks use it.
So is stock amqtt's YAML (:func:`amqtt_yaml`), for the tests and benchmarks that run it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

Table = dict[str, Any]
Layer = Mapping[str, Any] | None

DESIGN_EXAMPLE: Final[Mapping[str, Mapping[str, Any]]] = {
    "listener": {"bind": "0.0.0.0:8883", "server_cert": "server.pem",
                 "server_key": "server.key", "client_ca": "ca-chain.pem"},
    "revocation": {"registry": "registry.db", "crl": "crl.pem", "refresh_seconds": 1},
    "auth": {"client_id": "must-match", "password": False},
    "acl": {"publish": ["devices/{device_id}/#"],
            "subscribe": ["devices/{device_id}/#", "fleet/broadcast/#"],
            "groups": {"operators": {"subscribe": ["#"]}}},
    "audit": {"path": "hub-audit.db"},
    "metrics": {"bind": "127.0.0.1:9883"},
    "limits": {"max_packet_bytes": 262144, "max_topic_bytes": 1024, "max_subscriptions": 64,
               "publish_rate": 100, "publish_bytes_rate": 524288, "on_rate_limit": "drop",
               "max_retained_per_device": 100, "max_retained_bytes": 1048576,
               "max_pending_tls": 16},
}
"""DESIGN section 5's hub.toml; the file names of [listener] and [revocation] are in the PKI
folder (DESIGN section 2), the audit store beside the config."""

_PKI_FILES: Final = (("listener", "server_cert"), ("listener", "server_key"),
                     ("listener", "client_ca"), ("revocation", "registry"),
                     ("revocation", "crl"))

LOOPBACK: Final[Mapping[str, Mapping[str, Any]]] = {
    "listener": {"bind": "127.0.0.1:0"}, "metrics": {"bind": "127.0.0.1:0"}}
"""Listener and metrics on free loopback ports (the ready line names both)."""


QUICKSTART_CHECKS: Final[Mapping[str, Any]] = {
    "action": "report", "warn_days": 1, "shared_window_seconds": 60}
"""The quickstart's [checks] (DESIGN section 11): report only, so the defender scenarios'
clones keep being admitted; warn_days 1, so a device certificate of an hour (the
``expiring-soon`` scenario's) is reported and the fleet's year-long ones are not."""


def merge(base: Mapping[str, Any], layer: Layer) -> Table:
    """*base* with *layer* over it (a new table; neither argument changes)."""
    out: Table = {key: merge(value, {}) if isinstance(value, Mapping) else value
                  for key, value in base.items()}
    for key, value in (layer or {}).items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping):
            current = out.get(key)
            out[key] = merge(current if isinstance(current, Mapping) else {}, value)
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def hub_settings(pki: str | Path = "pki", *layers: Layer) -> Table:
    """DESIGN's example with its PKI files under *pki*, then each layer in turn."""
    settings = merge(DESIGN_EXAMPLE, None)
    for section, key in _PKI_FILES:
        settings[section][key] = str(Path(pki) / settings[section][key])
    for layer in layers:
        settings = merge(settings, layer)
    return settings


def hub_toml(pki: str | Path = "pki", *layers: Layer) -> str:
    """The text of :func:`hub_settings` (relative paths resolve against the config's folder)."""
    return render(hub_settings(pki, *layers))


def write_hub_config(root: Path, pki: Path, *, refresh: float = 0.5,
                     subscribe: tuple[str, ...] = ("devices/{device_id}/#",
                                                   "fleet/broadcast/#"),
                     name: str = "hub.toml", layers: tuple[Layer, ...] = ()) -> Path:
    """hub.toml for a loopback hub on a free port, watching the PKI's registry and CRL.

    The quickstart's policy: every device its own topics (and *subscribe*), no group rules,
    no [limits] (the hub's defaults, DESIGN's); the audit store in *root*; [checks] that
    report (:data:`QUICKSTART_CHECKS`).
    """
    path = root / name
    path.write_text(hub_toml(pki, LOOPBACK, {
        "revocation": {"refresh_seconds": refresh},
        "acl": {"subscribe": list(subscribe), "groups": None},
        "audit": {"path": str(root / "hub-audit.db")}, "limits": None,
        "checks": dict(QUICKSTART_CHECKS)}, *layers))
    return path


# -- TOML text ---------------------------------------------------------------------------------

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def render(settings: Mapping[str, Any]) -> str:
    """TOML for nested tables of strings, numbers, booleans, paths and lists of them."""
    lines: list[str] = []
    _table(lines, (), settings)
    return "\n".join(lines) + "\n"


def _table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any]) -> None:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    if path and (scalars or not tables):
        if lines:
            lines.append("")
        lines.append("[" + ".".join(_key(part) for part in path) + "]")
    lines.extend(f"{_key(key)} = {_value(value)}" for key, value in scalars)
    for key, value in tables:
        _table(lines, (*path, key), value)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def amqtt_yaml(pki: Path, port: int, plugins: Mapping[str, Mapping[str, object]]) -> str:
    """Stock amqtt's YAML: one TLS listener ``default`` on 127.0.0.1:*port* with the PKI's
    server certificate and CA bundle (amqtt asks for a client certificate, CERT_OPTIONAL),
    then *plugins*: each plugin's dotted name and its settings (strings, numbers, booleans)."""
    lines = ["listeners:", "  default:", "    type: tcp", f"    bind: 127.0.0.1:{port}",
             "    ssl: true", f"    certfile: {pki / 'server.pem'}",
             f"    keyfile: {pki / 'server.key'}", f"    cafile: {pki / 'ca-chain.pem'}",
             "plugins:"]
    for name, settings in plugins.items():
        lines.append(f"  {name}:")
        lines.extend(f"    {key}: {_yaml(value)}" for key, value in settings.items())
    return "\n".join(lines) + "\n"


def _yaml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
