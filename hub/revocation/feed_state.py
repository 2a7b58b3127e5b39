"""The feed's state as the hub holds and shows it: values and one conversion, no I/O.

:func:`source_data` turns a :class:`~provisioning.registry.feeddoc.FeedState` into the
:class:`~hub.revocation.model.SourceData` every source gives the watcher (the registry's
words: ``on-hold``, ``suspended``); :class:`FeedStatus` is what ``/healthz`` and ``/metrics``
show of the feed beyond a source's health (version, age, refusals).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from hub.revocation.model import SourceData
from provisioning.registry.feeddoc import FeedState

__all__ = ["FeedStatus", "source_data"]

_CERT_REASONS: Final = {"revoked": "revoked", "on_hold": "on-hold"}


def source_data(state: FeedState, *, certificates: bool) -> SourceData:
    """The hub's view of a feed state, as the registry source gives it (worker thread)."""
    revoked = {serial: _CERT_REASONS.get(entry.status, "revoked")
               for serial, entry in state.revoked.items()}
    devices: dict[str, str] = {}
    hashes: dict[str, str] = {}
    groups: dict[str, str] = {}
    listed: dict[str, frozenset[int]] | None = {} if certificates else None
    for device_id, device in state.devices.items():
        if device.status != "active":
            devices[device_id] = "revoked" if device.status == "revoked" else "suspended"
        if device.password_hash is not None:
            hashes[device_id] = device.password_hash
        if device.group is not None:
            groups[device_id] = device.group
        if listed is not None and device.certificates:
            listed[device_id] = frozenset(device.certificates)
    return SourceData(revoked, devices, hashes, groups, certificates=listed)


@dataclass(frozen=True, slots=True)
class FeedStatus:
    """The feed as ``/healthz`` and ``/metrics`` show it."""

    url: str
    gateway: str
    version: int  # of the state in force; 0: none
    issued: str | None  # of the last document accepted
    state_age_seconds: float | None
    max_age_seconds: float
    stale: bool
    refused: Mapping[str, int]  # reason -> documents refused

    def as_json(self) -> dict[str, object]:
        return {"url": self.url, "gateway": self.gateway, "version": self.version,
                "issued": self.issued, "state_age_seconds": self.state_age_seconds,
                "max_age_seconds": self.max_age_seconds, "stale": self.stale,
                "refused": dict(self.refused)}
