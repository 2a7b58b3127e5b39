"""Findings onto the record: one audit ``finding`` row and one count per check and subject per
period, so a flapping clone or a certificate expiring next week does not flood the log.

The period is ``shared_window_seconds`` for what happens in bursts (certificate-shared,
client-id-conflict, revoked-still-connected: a new burst after a quiet window is a new
finding) and a day for standing conditions (expiring certificates and CAs, unregistered
certificates, weak keys: once a day for as long as they are seen).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final, Protocol

from hub.findings.model import (
    CERTIFICATE_SHARED,
    CHECKS,
    CLIENT_ID_CONFLICT,
    REVOKED_STILL_CONNECTED,
    Finding,
)

log = logging.getLogger("hub.findings")

DAY: Final = 86_400.0
BURSTS: Final = frozenset({CERTIFICATE_SHARED, CLIENT_ID_CONFLICT, REVOKED_STILL_CONNECTED})


class FindingSink(Protocol):
    """``hub.audit.AuditStore`` as the findings write to it (contract C2)."""

    def record(self, event: str, *, device_id: str | None = None, serial: str | None = None,
               peer: str | None = None, reason: str | None = None,
               evidence: Mapping[str, object] | None = None) -> None: ...


class Reporter:
    """Audits and counts findings; :meth:`report` says whether this one was new."""

    def __init__(self, audit: FindingSink, window: float) -> None:
        self._audit = audit
        self._window = window
        self._last: dict[tuple[str, str], float] = {}
        self._counts: dict[str, int] = dict.fromkeys(CHECKS, 0)

    def period(self, check: str) -> float:
        return self._window if check in BURSTS else DAY

    def report(self, finding: Finding, now: float) -> bool:
        """Record *finding* unless its check and subject were reported within the period."""
        key = (finding.check, finding.subject)
        last = self._last.get(key)
        if last is not None and now - last < self.period(finding.check):
            return False
        self._last[key] = now
        self._counts[finding.check] = self._counts.get(finding.check, 0) + 1
        self._audit.record("finding", device_id=finding.device_id, serial=finding.serial,
                           peer=finding.peer, reason=finding.check, evidence=finding.evidence)
        log.warning("finding %s: device %s serial %s peer %s: %s", finding.check,
                    finding.device_id or "-", finding.serial or "-", finding.peer or "-",
                    dict(finding.evidence))
        return True

    def prune(self, now: float) -> None:
        """Forget subjects whose period is over (the periodic sweep calls this)."""
        for key in [k for k, t in self._last.items() if now - t >= self.period(k[0])]:
            del self._last[key]

    def counts(self) -> dict[str, int]:
        """Findings recorded since start, by check (every check, 0 included)."""
        return dict(self._counts)
