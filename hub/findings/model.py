"""The seven check names of DESIGN section 11, and one finding as the checks produce it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

CERTIFICATE_SHARED: Final = "certificate-shared"
CLIENT_ID_CONFLICT: Final = "client-id-conflict"
CERTIFICATE_EXPIRING: Final = "certificate-expiring"
CA_EXPIRING: Final = "ca-expiring"
REVOKED_STILL_CONNECTED: Final = "revoked-still-connected"
UNREGISTERED_CERTIFICATE: Final = "unregistered-certificate"
WEAK_KEY: Final = "weak-key"

CHECKS: Final = (CERTIFICATE_SHARED, CLIENT_ID_CONFLICT, CERTIFICATE_EXPIRING, CA_EXPIRING,
                 REVOKED_STILL_CONNECTED, UNREGISTERED_CERTIFICATE, WEAK_KEY)
# Findings that say a certificate is misused or unfit: ``action = "quarantine"`` acts on these.
# The expiry checks never quarantine: the certificate is sound, a renewal is due.
MISUSE: Final = frozenset({CERTIFICATE_SHARED, CLIENT_ID_CONFLICT, REVOKED_STILL_CONNECTED,
                           UNREGISTERED_CERTIFICATE, WEAK_KEY})


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's finding about one subject.

    *subject* is what the finding is about, for reporting it once per period (a serial, or a
    client id for a conflict); *serial* the certificate in the audit row (hex); *quarantine*
    the certificates a quarantine would refuse, as (serial, device id).
    """

    check: str
    subject: str
    device_id: str | None
    serial: str | None
    peer: str | None
    evidence: Mapping[str, object]
    quarantine: tuple[tuple[int, str], ...] = field(default=())
