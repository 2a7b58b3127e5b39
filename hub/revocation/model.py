"""What the hub refuses and how a revocation source looks from outside: values, no I/O.

:class:`Snapshot` is what the gatekeeper decides with, :func:`refusal` the decision;
:class:`SourceData` is one source's last good data, :class:`SourceHealth` what ``/healthz`` and
``/metrics`` show of it, :class:`SourceState` what ``on_source`` hears once per change.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

__all__ = [
    "EMPTY_SNAPSHOT",
    "Snapshot",
    "SourceCallback",
    "SourceData",
    "SourceHealth",
    "SourceState",
    "iso_utc",
    "one_line",
    "refusal",
    "unregistered",
]

_DEVICE_REASONS: Final = {"suspended": "device-suspended", "revoked": "device-revoked"}
_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The refused serials and devices at one moment; replaced wholesale, never mutated.

    ``groups`` (device id -> group, registry and feed only) is beyond the revocation contract:
    it is there because they are the hub's only sources for the ACL's ``{group}``.
    ``certificates`` (device id -> its valid serials: active or superseded) is what
    ``[auth] registered_only`` admits; None when no source lists certificates.
    """

    revoked: Mapping[int, str]  # serial -> "revoked" | "on-hold"
    devices: Mapping[str, str]  # device id -> "suspended" | "revoked"; active devices absent
    password_hashes: Mapping[str, str]  # device id -> stored hash; registry and feed only
    version: int  # +1 on every content change
    groups: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    certificates: Mapping[str, frozenset[int]] | None = None


EMPTY_SNAPSHOT: Final = Snapshot(MappingProxyType({}), _EMPTY, _EMPTY, 0)


def unregistered(snapshot: Snapshot, serial: int, device_id: str) -> bool:
    """*serial* is not among *device_id*'s valid serials (``[auth] registered_only``); with no
    list at all, nothing is registered: refused, never opened up."""
    listed = snapshot.certificates
    if listed is None:
        return True
    serials = listed.get(device_id)
    return serials is None or serial not in serials


def refusal(snapshot: Snapshot, serial: int, device_id: str) -> str | None:
    """Why *serial* / *device_id* is refused, in DESIGN section 5's order; None when allowed.

    The certificate first (``revoked``, ``on-hold``), then its device (``device-suspended``,
    ``device-revoked``).
    """
    reason = snapshot.revoked.get(serial)
    if reason is not None:
        return reason
    status = snapshot.devices.get(device_id)
    if status is None:
        return None
    # A status this hub does not know is still not "active": refuse, reversibly.
    return _DEVICE_REASONS.get(status, "device-suspended")


@dataclass(frozen=True, slots=True)
class SourceData:
    """One source's list as last loaded; the watcher unites every source's into a Snapshot."""

    revoked: dict[int, str]  # serial -> "revoked" | "on-hold"
    devices: dict[str, str] = field(default_factory=dict)  # -> "suspended" | "revoked"
    password_hashes: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    next_update: float | None = None  # a CRL's nextUpdate (time.time()); None: never stale
    crl_number: int | None = None
    # device id -> valid (active or superseded) serials; None: this source lists none
    certificates: dict[str, frozenset[int]] | None = None


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """One source as ``/healthz`` and ``/metrics`` show it; times are ``time.time()`` values."""

    name: str  # "registry" | "crl-file" | "crl-url"
    ok: bool  # the last attempt succeeded; False before the first one
    stale: bool  # the CRL in use is past its nextUpdate (it is still used)
    last_success: float | None
    last_error: str | None  # why the last attempt failed; None while ok
    entries: int  # revoked or held serials in the source's last good data
    next_update: float | None  # the CRL's nextUpdate; None for the registry
    warning: str | None = None  # why the source is stale, one line; None while fresh
    # Down, but its last good state is young enough to stand (the feed, below
    # max_age_seconds): reported, and /healthz stays 200.
    grace: bool = False

    @property
    def healthy(self) -> bool:
        """What ``/healthz`` asks of every source: loaded (or in its grace) and fresh."""
        return (self.ok or self.grace) and not self.stale


class SourceState(enum.Enum):
    """A source's state as ``on_source`` hears of it, once per change."""

    DOWN = "down"  # the last attempt failed: the last good data stays in force
    STALE = "stale"  # loaded, but the list in use is past its nextUpdate
    UP = "up"  # loaded and fresh again


SourceCallback = Callable[[str, SourceState, str | None], None]
"""``on_source(name, state, why)``: *why* is the error or the staleness; None for UP."""


def one_line(text: str) -> str:
    """*text* with every run of whitespace (newlines included) made one space."""
    return " ".join(text.split())


def iso_utc(moment: float) -> str:
    """A ``time.time()`` value as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
