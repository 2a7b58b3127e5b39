"""``fleet-hub audit``: the findings of the hub's checks, grouped by check and device.

The checks (hub/findings/, DESIGN section 11) write ``finding`` records (reason = the check's
name, evidence = what it saw); this reads them back the way an operator asks: which check,
which device, how often, since when, and the latest evidence (contract C2 of session 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hub.audit.records import AuditRecord, format_time, read_records

__all__ = ["FindingGroup", "group_findings", "read_findings"]


@dataclass(frozen=True, slots=True)
class FindingGroup:
    """Every finding of one check about one device (device None: not about a device, such as
    ``ca-expiring``)."""

    check: str
    device_id: str | None
    serial: str | None  # of the latest finding
    count: int
    first: float
    last: float
    evidence: object  # of the latest finding

    def as_json(self) -> dict[str, object]:
        """``{"check", "device_id", "serial", "count", "first", "last", "evidence"}``."""
        return {"check": self.check, "device_id": self.device_id, "serial": self.serial,
                "count": self.count, "first": format_time(self.first),
                "last": format_time(self.last), "evidence": self.evidence}


def group_findings(records: list[AuditRecord]) -> list[FindingGroup]:
    """Group ``finding`` records (oldest first) by (check, device); sorted by check, then
    device (None first)."""
    groups: dict[tuple[str, str | None], FindingGroup] = {}
    for record in records:
        if record.event != "finding":
            continue
        key = (record.reason or "", record.device_id)
        evidence = None if record.evidence is None else dict(record.evidence)
        seen = groups.get(key)
        if seen is None:
            groups[key] = FindingGroup(key[0], record.device_id, record.serial, 1, record.time,
                                       record.time, evidence)
        else:
            groups[key] = FindingGroup(key[0], record.device_id, record.serial, seen.count + 1,
                                       min(seen.first, record.time),
                                       max(seen.last, record.time), evidence)
    order = sorted(groups, key=lambda k: (k[0], k[1] is not None, k[1] or ""))
    return [groups[key] for key in order]


def read_findings(path: Path, *, since: float | None = None) -> list[FindingGroup]:
    """The grouped findings in the store at *path* (read-only), at or after *since*."""
    return group_findings(read_records(path, since=since, event="finding"))
