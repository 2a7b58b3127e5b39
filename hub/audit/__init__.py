"""The hub's audit store: every decision the gateway takes, in a tamper-evident SQLite chain.

Split by job: :mod:`~hub.audit.store` (the writer the event loop feeds, off the loop),
:mod:`~hub.audit.records` (reading, as ``fleet-hub events`` prints), :mod:`~hub.audit.chain`
(the seal of one record), :mod:`~hub.audit.schema` (tables and migrations); the commands'
parts, imported only by the CLI: :mod:`~hub.audit.verify`, :mod:`~hub.audit.checkpoint` and
:mod:`~hub.audit.prune` (``events verify`` / ``prune``), :mod:`~hub.audit.follow`
(``events --follow``), :mod:`~hub.audit.findings` (``fleet-hub audit``). What the rest of the
hub uses is re-exported here: ``from hub.audit import AuditStore``. Operators' guide:
docs/audit-log.md.
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
