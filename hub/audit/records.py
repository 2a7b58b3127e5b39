"""The read side of the audit store: records as ``fleet-hub events`` and ``audit`` print them.

Readers open the file read-only (``mode=ro``), so they are safe while the hub writes and can
never create or change a store; they read stores of every schema version (a version 1 file an
older hub left has no evidence or hash columns: those read as NULL).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from hub.audit.schema import columns
from hub.errors import AuditError, InvalidValueError

__all__ = [
    "EVENTS",
    "AuditRecord",
    "connect_readonly",
    "decode_evidence",
    "encode_evidence",
    "format_time",
    "parse_since",
    "read_events",
    "read_records",
    "record_from_row",
    "select_sql",
]

# accept / reject (with reason) / acl-deny / kick (revocation, expiry) / disconnect;
# violation: an MQTT protocol violation closed the connection ("protocol-violation: what");
# limit: a [limits] value was hit (packet-too-large, rate-limited, topic-too-long,
# too-many-subscriptions, retained-quota, pending-tls); source: a revocation source went
# down, stale, or came back ("registry down: why"); finding: an audit check saw something
# (reason = the check's name, evidence = what it saw, DESIGN section 11).
EVENTS = ("accept", "reject", "acl-deny", "kick", "disconnect", "violation", "limit", "source",
          "finding")


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One row of the store; ``time`` is seconds since the epoch (``time.time()``).

    ``evidence`` is the decoded JSON object a ``finding`` carries, None for other events.
    ``id`` and ``hash`` (the row's place and seal in the chain; None for a record an older hub
    wrote and not yet sealed) do not take part in equality: two records are equal when they
    say the same thing.
    """

    time: float
    event: str
    device_id: str | None
    serial: str | None
    peer: str | None
    reason: str | None
    evidence: Mapping[str, object] | None = None
    id: int | None = field(default=None, compare=False)
    hash: str | None = field(default=None, compare=False)

    def as_json(self) -> dict[str, object]:
        """The ``fleet-hub events --json`` form: ``time`` as ISO 8601 UTC with milliseconds."""
        return {
            "time": format_time(self.time),
            "event": self.event,
            "device_id": self.device_id,
            "serial": self.serial,
            "peer": self.peer,
            "reason": self.reason,
            "evidence": None if self.evidence is None else dict(self.evidence),
        }

    def as_line(self) -> dict[str, object]:
        """The ``fleet-hub events --follow --json`` form: as_json with ``id`` and ``hash``
        first and last, so a shipped copy can anchor the chain (``events verify --anchor``)."""
        return {"id": self.id, **self.as_json(), "hash": self.hash}


def encode_evidence(evidence: Mapping[str, object]) -> str:
    """Compact JSON text with sorted keys; ValueError/TypeError for what cannot be one."""
    if not isinstance(evidence, Mapping):
        raise TypeError(f"audit evidence must be a mapping, got {type(evidence).__name__}")
    try:
        return json.dumps(dict(evidence), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit evidence is not JSON-serialisable: {exc}") from None


def decode_evidence(text: str | None) -> Mapping[str, object] | None:
    """The stored JSON object; text that is not one (edited by hand) comes back as ``raw``."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {"raw": str(text)}
    return value if isinstance(value, dict) else {"raw": text}


def format_time(seconds: float) -> str:
    """``2026-11-27T10:00:00.123Z``: ISO 8601, UTC, milliseconds."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def connect_readonly(path: Path) -> tuple[sqlite3.Connection, list[str]]:
    """A read-only connection to an audit store and its events columns; AuditError naming
    the file when it is missing, not SQLite, or has no events table."""
    path = Path(path)
    if not path.exists():
        raise AuditError(f"no audit store: the file does not exist ({path})")
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open the audit store: {exc} ({path})") from exc
    try:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
        ).fetchone()
        present = columns(conn) if found is not None else []
    except sqlite3.Error as exc:
        conn.close()
        raise AuditError(f"cannot read the audit store: {exc} ({path})") from exc
    if found is None:
        conn.close()
        raise AuditError(f"not an audit store: it has no events table ({path})")
    return conn, present


def select_sql(present: list[str]) -> str:
    """``SELECT <every record column> FROM events``; NULL for a column an old store lacks."""
    wanted = ("id", "time", "event", "device_id", "serial", "peer", "reason", "evidence",
              "hash")
    listed = ", ".join(c if c in present else "NULL" for c in wanted)
    return f"SELECT {listed} FROM events"  # noqa: S608 - fixed column names, no user text


def record_from_row(row: tuple[object, ...]) -> AuditRecord:
    """An AuditRecord from a :func:`select_sql` row."""
    (record_id, at, event, device_id, serial, peer, reason, evidence, digest) = row
    return AuditRecord(
        time=at, event=event, device_id=device_id,  # type: ignore[arg-type]
        serial=serial, peer=peer, reason=reason,  # type: ignore[arg-type]
        evidence=decode_evidence(evidence),  # type: ignore[arg-type]
        id=record_id, hash=digest,  # type: ignore[arg-type]
    )


def read_records(
    path: Path,
    *,
    device_id: str | None = None,
    since: float | None = None,
    limit: int | None = None,
    event: str | None = None,
) -> list[AuditRecord]:
    """Records oldest first; the file is opened read-only, safe while the hub writes.

    *since* keeps events at or after that epoch time; *limit* keeps the most recent *limit*
    events (still oldest first, like ``tail``); *event* keeps one kind (``finding``).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be 0 or more, got {limit}")
    path = Path(path)
    where: list[str] = []
    params: list[object] = []
    if device_id is not None:
        where.append("device_id = ?")
        params.append(device_id)
    if since is not None:
        where.append("time >= ?")
        params.append(since)
    if event is not None:
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}: want one of {', '.join(EVENTS)}")
        # A literal (one of EVENTS, not user text), so that SQLite can use the partial index
        # of findings, which a bound parameter would rule out.
        where.append(f"event = '{event}'")
    conn, present = connect_readonly(path)
    sql = select_sql(present)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY time DESC, id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    try:
        rows = conn.execute(sql, params).fetchall()
    except sqlite3.Error as exc:
        raise AuditError(f"cannot read the audit store: {exc} ({path})") from exc
    finally:
        conn.close()
    rows.reverse()
    return [record_from_row(row) for row in rows]


def read_events(
    path: Path,
    *,
    device_id: str | None = None,
    since: float | None = None,
    limit: int | None = None,
) -> list[dict[str, object]]:
    """:func:`read_records` as ``fleet-hub events --json`` prints them (AuditRecord.as_json)."""
    records = read_records(path, device_id=device_id, since=since, limit=limit)
    return [record.as_json() for record in records]


_DURATION_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?[smhdw])+")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, *, now: float | None = None) -> float:
    """An epoch time from ISO 8601 or from a duration ago (``30s``, ``10m``, ``2h``, ``1d``).

    ISO 8601 takes a date (midnight UTC), a date and time with ``Z`` or an offset, or a naive
    date and time read as UTC (the store prints UTC). Durations may combine: ``1h30m``. Raises
    InvalidValueError (a ValueError) saying what was expected.
    """
    value = text.strip()
    if _DURATION_RE.fullmatch(value):
        ago = sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART_RE.findall(value))
        return (time.time() if now is None else now) - ago
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidValueError(
            f"{text!r} is not a time: want ISO 8601 (2026-11-27T10:00:00Z, 2026-11-27) "
            "or a duration ago (30s, 10m, 2h, 1d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
