"""certificate-shared and client-id-conflict: what repeated take-overs say.

A take-over is a CONNECT for a client id whose previous connection is still open: the broker
closes the old one [MQTT-3.1.4-2]. Once is normal (a device whose old TCP connection went
half-open reconnects and takes its own place); a device that reconnects after a clean close
takes nothing over. Twice within ``shared_window_seconds`` is not:

- the same certificate on both sides each time: two boxes with one certificate throwing each
  other off (``certificate-shared``; A takes over B, B takes over A, or a third peer);
- different certificates of one client id each time: two certificates of one device in use at
  once, e.g. the old and the renewed one in two boxes (``client-id-conflict``). A device that
  renews and reconnects once takes over at most once.

The history is a short deque per serial and per client id, pruned by age: O(1) work per
take-over, none per ordinary CONNECT.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TypeVar

from hub.audit import format_time
from hub.findings.model import CERTIFICATE_SHARED, CLIENT_ID_CONFLICT, Finding
from provisioning.identity import serial_hex

REPEAT = 2  # take-overs within the window that make a finding
KEEP = 16  # take-overs kept per subject for the evidence
_K = TypeVar("_K", int, str)


@dataclass(frozen=True, slots=True)
class Takeover:
    """One CONNECT (*new_serial* from *new_peer*) that took *client_id* over from a live
    connection (*old_serial* from *old_peer*, silent for *old_idle* seconds) at *time*."""

    time: float
    client_id: str
    old_serial: int
    old_peer: str
    new_serial: int
    new_peer: str
    old_idle: float | None = None  # seconds the displaced connection had been silent


class TakeoverDetector:
    """Remembers the take-overs of the last *window* seconds; says when they make a finding."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._by_serial: dict[int, deque[Takeover]] = {}
        self._by_client: dict[str, deque[Takeover]] = {}

    def observe(self, event: Takeover) -> Finding | None:
        """Record *event*; the finding it completes, if any."""
        if event.old_serial == event.new_serial:
            history = self._remember(self._by_serial, event.new_serial, event)
            return _shared(history, self.window) if len(history) >= REPEAT else None
        history = self._remember(self._by_client, event.client_id, event)
        return _conflict(history, self.window) if len(history) >= REPEAT else None

    def _remember(self, table: dict[_K, deque[Takeover]], key: _K,
                     event: Takeover) -> deque[Takeover]:
        history = table.get(key)
        if history is None:
            history = table[key] = deque(maxlen=KEEP)
        history.append(event)
        _drop_before(history, event.time - self.window)
        return history

    def prune(self, now: float) -> None:
        """Forget subjects with no take-over in the window (called by the periodic sweep)."""
        _prune(self._by_serial, now - self.window)
        _prune(self._by_client, now - self.window)

    def __len__(self) -> int:
        return len(self._by_serial) + len(self._by_client)


def _prune(table: dict[_K, deque[Takeover]], cutoff: float) -> None:
    for key in [k for k, h in table.items() if not h or h[-1].time < cutoff]:
        del table[key]


def _drop_before(history: deque[Takeover], cutoff: float) -> None:
    while history and history[0].time < cutoff:
        history.popleft()


def _idle(event: Takeover) -> float | None:
    return None if event.old_idle is None else round(event.old_idle, 3)


def _peers(history: deque[Takeover]) -> list[str]:
    peers: dict[str, None] = {}
    for event in history:
        peers.setdefault(event.old_peer)
        peers.setdefault(event.new_peer)
    return list(peers)


def _shared(history: deque[Takeover], window: float) -> Finding:
    last = history[-1]
    serial = serial_hex(last.new_serial)
    return Finding(
        CERTIFICATE_SHARED, serial, last.client_id, serial, last.new_peer,
        {"peers": _peers(history), "window_seconds": window,
         "takeovers": [{"time": format_time(e.time), "from_peer": e.old_peer,
                        "to_peer": e.new_peer, "from_idle_seconds": _idle(e)}
                       for e in history]},
        ((last.new_serial, last.client_id),))


def _conflict(history: deque[Takeover], window: float) -> Finding:
    last = history[-1]
    serials: dict[int, None] = {}
    for event in history:
        serials.setdefault(event.old_serial)
        serials.setdefault(event.new_serial)
    return Finding(
        CLIENT_ID_CONFLICT, last.client_id, last.client_id, serial_hex(last.new_serial),
        last.new_peer,
        {"client_id": last.client_id, "serials": [serial_hex(s) for s in serials],
         "peers": _peers(history), "window_seconds": window,
         "takeovers": [{"time": format_time(e.time), "from_serial": serial_hex(e.old_serial),
                        "from_peer": e.old_peer, "to_serial": serial_hex(e.new_serial),
                        "to_peer": e.new_peer, "from_idle_seconds": _idle(e)}
                       for e in history]},
        tuple((s, last.client_id) for s in serials))
