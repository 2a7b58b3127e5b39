"""The checks a periodic pass over the live sessions makes: nothing of it on the CONNECT path.

- ``certificate-expiring``: a connected device whose certificate ends within ``warn_days``;
- ``ca-expiring``: a CA certificate of ``client_ca`` that ends within ``warn_days`` (looked at
  when the hub starts, when a new bundle is put in force, and hourly);
- ``revoked-still-connected``: a session the current fleet state refuses (revoked, on hold,
  device suspended or revoked, unregistered with ``registered_only``, quarantined) that is
  still open ``KICK_DEADLINE`` seconds after a pass first saw it. The gatekeeper closes such
  sessions the moment the state changes, so this should never be found; the pass proves it,
  over the broker's sessions (not the gatekeeper's table, which forgets a session as it kicks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final, Protocol

from cryptography import x509

from hub.audit import format_time
from hub.findings.model import (
    CA_EXPIRING,
    CERTIFICATE_EXPIRING,
    REVOKED_STILL_CONNECTED,
    Finding,
)
from hub.identity import DeviceIdentity
from provisioning.serial import format_serial

KICK_DEADLINE: Final = 5.0  # seconds a refused session may stay open before it is a finding
DAY: Final = 86_400.0


class Live(Protocol):
    """A live connection as the sweep reads it (``hub.broker.connection.Connection``)."""

    @property
    def identity(self) -> DeviceIdentity: ...

    @property
    def peer(self) -> str: ...


def expiring(sessions: Iterable[Live], now: float,
             warn_days: int) -> Iterator[tuple[int, Finding]]:
    """(serial, finding) for each session whose certificate ends within *warn_days* days of
    *now*."""
    horizon = now + warn_days * DAY
    for session in sessions:
        identity = session.identity
        if identity.not_after <= horizon:
            serial = identity.serial_hex
            yield identity.serial, Finding(
                CERTIFICATE_EXPIRING, serial, identity.device_id, serial, session.peer,
                {"not_after": format_time(identity.not_after),
                 "days_left": round((identity.not_after - now) / DAY, 3),
                 "warn_days": warn_days})


def ca_expiring(certificates: Iterable[x509.Certificate], now: float, warn_days: int,
                where: str) -> Iterator[Finding]:
    """A finding for each CA certificate of *where* (client_ca) ending within *warn_days*."""
    horizon = now + warn_days * DAY
    for cert in certificates:
        not_after = cert.not_valid_after_utc.timestamp()
        if not_after <= horizon:
            serial = format_serial(cert.serial_number)
            yield Finding(CA_EXPIRING, f"ca:{serial}", None, serial, None,
                          {"subject": cert.subject.rfc4514_string(),
                           "not_after": format_time(not_after),
                           "days_left": round((not_after - now) / DAY, 3),
                           "warn_days": warn_days, "client_ca": where})


class StillConnected:
    """Remembers when a pass first saw each refused-but-open session."""

    def __init__(self, deadline: float = KICK_DEADLINE) -> None:
        self.deadline = deadline
        # id(session) -> (first seen, the session: held so its id is not reused meanwhile)
        self._seen: dict[int, tuple[float, Live]] = {}

    def check(self, sessions: Iterable[Live], lost: Callable[[DeviceIdentity], str | None],
              now: float) -> list[Finding]:
        """Findings for sessions refused for longer than the deadline; forgets the others."""
        seen: dict[int, tuple[float, Live]] = {}
        found: list[Finding] = []
        for session in sessions:
            reason = lost(session.identity)
            if reason is None:
                continue
            first = self._seen.get(id(session), (now, session))[0]
            seen[id(session)] = (first, session)
            if now - first >= self.deadline:
                identity = session.identity
                serial = identity.serial_hex
                found.append(Finding(
                    REVOKED_STILL_CONNECTED, serial, identity.device_id, serial, session.peer,
                    {"status": reason, "seen_at": format_time(first),
                     "open_seconds": round(now - first, 3), "deadline_seconds": self.deadline},
                    ((identity.serial, identity.device_id),)))
        self._seen = seen
        return found
