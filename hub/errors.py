"""The one exception tree of the hub package.

    HubError                 every expected failure; ``str()`` is the user-facing line
    ├── ConfigError          the hub's configuration is unusable: names the key path and the file
    ├── InvalidValueError    a topic, filter, ACL pattern or address is malformed (a ValueError)
    ├── MalformedPacketError a client's bytes are not MQTT: its connection is closed
    ├── RevocationError      the revocation watcher cannot start (no source loads, no CA bundle)
    │   └── SourceError      one source cannot be used now; never escapes the source's poll:
    │       │                the source is reported down and its last good list kept
    │       ├── FeedRefusedError  a fleet-state feed document refused (reason: envelope,
    │       │                signer, signature, format, trust-domain, gateway, rollback, replay)
    │       └── FeedGapError a feed delta that does not build on the version in force: the
    │                        hub asks for a snapshot (not a refusal)
    ├── BundleError          a changed client_ca bundle is refused (unreadable, no PEM
    │                        certificate, one that is not a CA): the bundle in force stays
    ├── MetricsError         the metrics endpoint cannot be served (its address cannot be bound)
    ├── QuarantineError      the quarantine file of [checks] cannot be read or written (names it)
    └── AuditError           the audit store cannot be opened, read or written in time (names
                             the file); hub.audit re-exports it

Authentication and ACL refusals are not exceptions: they are decisions (data) that the broker
applies, logs and audits.
"""

from __future__ import annotations

from pathlib import Path


class HubError(Exception):
    """Root of every expected failure; the CLI catches it once and prints ``error: <str>``."""


class ConfigError(HubError):
    """A config value is wrong: ``<key>: <message> (<file>)``.

    *key* is the TOML key path (``acl.publish[1]``), or an option name such as ``--bind``, or
    empty when the file as a whole is at fault (unreadable, not TOML). *path* is the config file
    (or the PKI folder for ``--pki`` defaults); None when there is no file to name.
    """

    def __init__(self, path: Path | str | None, key: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.key = key
        self.message = message

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}" if self.key else self.message
        return f"{text} ({self.path})" if self.path is not None else text


class InvalidValueError(HubError, ValueError):
    """A topic, filter, ACL pattern or HOST:PORT is malformed; the message says why."""


class MalformedPacketError(HubError):
    """A client sent bytes that are not MQTT 3.1.1 [MQTT-4.8.0-1]; the message says how."""


class RevocationError(HubError):
    """The revocation watcher cannot start: no configured source could be loaded (one line)."""


class SourceError(RevocationError):
    """A revocation source cannot be used now; the message says why, in one line."""


class FeedRefusedError(SourceError):
    """A feed document the hub will not apply; ``reason`` names the rule it broke."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"refused a document ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


class FeedGapError(SourceError):
    """A feed delta that does not build on the version in force: ask for a snapshot."""


class BundleError(HubError):
    """A changed ``client_ca`` bundle cannot be put in force; the message says why, in one line."""


class MetricsError(HubError):
    """The metrics endpoint cannot be served (the address cannot be bound)."""


class QuarantineError(HubError):
    """The quarantine file (``[checks] quarantine_file``) cannot be read or written; names it."""


class AuditError(HubError):
    """The audit store cannot be opened, read or written in time; names the file."""
