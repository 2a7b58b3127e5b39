"""``fleet-hub events --follow``: the records as they are committed, for a log shipper.

Polls the store read-only, cheaply: ``PRAGMA data_version`` changes only when another
connection commits, so an idle store costs one pragma per poll; when it changes, one indexed
query fetches the rows past the last id seen (ids only grow: the writer never reuses one, a
prune only removes the oldest). Nothing here writes, so following never slows the hub.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from hub.audit.records import AuditRecord, connect_readonly, record_from_row, select_sql
from hub.errors import AuditError

__all__ = ["follow"]

_PAGE = 1000


def follow(path: Path, *, stop: threading.Event, since: float | None = None,
           device_id: str | None = None, poll: float = 0.2,
           started: Callable[[int], None] | None = None) -> Iterator[list[AuditRecord]]:
    """Yield the new records (oldest first, a list per poll that found some) until *stop* is
    set. Starts after the newest record committed now, or with the records at or after
    *since* (epoch seconds) when given; *started* is told the last id it starts after."""
    path = Path(path)
    conn, present = connect_readonly(path)
    select = select_sql(present)
    device = "" if device_id is None else " AND device_id = ?"
    extra: tuple[object, ...] = () if device_id is None else (device_id,)
    try:
        if since is None:
            last = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])
        else:
            start = conn.execute("SELECT MIN(id) FROM events WHERE time >= ?",
                                 (since,)).fetchone()[0]
            last = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM events")
                       .fetchone()[0]) if start is None else int(start) - 1
        if started is not None:
            started(last)
        version = None
        while not stop.is_set():
            now = conn.execute("PRAGMA data_version").fetchone()[0]
            if now != version:
                version = now
                while True:
                    rows = conn.execute(f"{select} WHERE id > ?{device} ORDER BY id LIMIT ?",
                                        (last, *extra, _PAGE)).fetchall()
                    if not rows:
                        break
                    # With a device the rows skip other devices' ids: still, nothing at or
                    # below the last row returned is left to find.
                    records = [record_from_row(row) for row in rows]
                    last = int(str(rows[-1][0]))
                    yield records
                    if len(rows) < _PAGE:
                        break
            stop.wait(poll)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot read the audit store: {exc} ({path})") from exc
    finally:
        conn.close()
