"""The registry's read for ``fleet-provision expiring`` (issue 14): the device certificates
still in service (active, or superseded within their renewal grace) whose not-after falls
before a cutoff, the soonest first, those already past it included.

Held and revoked certificates are left out: nothing relies on them any more. Times are the
registry's ISO 8601 text, which sorts as the instants do.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from provisioning.registry.schema import CERT_ACTIVE, CERT_SUPERSEDED


@dataclass(frozen=True)
class ExpiringRow:
    """One certificate that expires before the cutoff (or has already)."""

    device_id: str
    serial: str
    not_after: str
    status: str


# Constants only in the f-string: the cutoff is a parameter.
_EXPIRING = ("SELECT device_id, serial, not_after, status FROM certificates "  # noqa: S608
             f"WHERE status IN ('{CERT_ACTIVE}', '{CERT_SUPERSEDED}') AND not_after <= ? "
             "ORDER BY not_after, device_id, serial")


def expiring_before(conn: sqlite3.Connection, cutoff: str) -> list[ExpiringRow]:
    """Active and superseded certificates whose not-after is at or before *cutoff*."""
    return [ExpiringRow(*row) for row in conn.execute(_EXPIRING, (cutoff,))]
