"""The hub's audit store: every decision the gateway takes, in a tamper-evident SQLite chain.

Split by job: :mod:`~hub.audit.store` (the writer the event loop feeds, off the loop),
:mod:`~hub.audit.records` (reading, as ``fleet-hub events`` prints), :mod:`~hub.audit.chain`
(the seal of one record), :mod:`~hub.audit.schema` (tables and migrations). Everything the rest
of the hub and the CLI use is re-exported here: ``from hub.audit import AuditStore``.
"""

from __future__ import annotations

from hub.audit.records import (
    EVENTS,
    AuditRecord,
    format_time,
    parse_since,
    read_events,
    read_records,
)
from hub.audit.store import AuditStats, AuditStore
from hub.errors import AuditError

__all__ = [
    "EVENTS",
    "AuditError",
    "AuditRecord",
    "AuditStats",
    "AuditStore",
    "format_time",
    "parse_since",
    "read_events",
    "read_records",
]
