"""The audit writer with and without the hash chain: does sealing slow the batches down?

The hub records an ``accept`` per CONNECT (and a reject, kick, ACL denial... per decision), so
the writer thread must keep far ahead of the connect rate (bench/hub_connect.py: a few thousand
per second on this machine). Three figures, each the best of ``--rounds`` runs of ``--count``
records in a fresh WAL file:

- plain: what the writer did before the chain, replayed: batches of 512 rows,
  ``executemany`` of the six (now seven) columns inside one ``BEGIN IMMEDIATE`` each;
- chained: the real :class:`hub.audit.AuditStore`: the records are queued with ``record()``
  before ``open()``, then open() and close() time the writer thread draining them (ids, one
  SHA-256 per record, the head read and moved per batch, the same batch size);
- seal only: :func:`hub.audit.chain.seal` over the same rows, no SQLite;
- verify: ``fleet-hub events verify``'s walk (:func:`hub.audit.verify.verify_store`) over the
  chained file; ``events prune`` holds the write lock for about this long per record.

Also ``record()``'s own cost per call (the event loop's side), which the chain does not touch.

    .venv/bin/python bench/audit_chain.py [--count 100000] [--rounds 3] [--dir DIR]

Prints records/s for each and the chained/plain ratio, then one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path

from hub.audit import AuditStore
from hub.audit.chain import GENESIS, seal
from hub.audit.checkpoint import CheckpointTrust
from hub.audit.verify import verify_store

BATCH = 512
_PLAIN_SCHEMA = """CREATE TABLE events (id INTEGER PRIMARY KEY, time REAL NOT NULL,
    event TEXT NOT NULL, device_id TEXT, serial TEXT, peer TEXT, reason TEXT, evidence TEXT)"""
_PLAIN_INSERT = ("INSERT INTO events (time, event, device_id, serial, peer, reason, evidence) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)")

Row = tuple[float, str, str | None, str | None, str | None, str | None, str | None]


def rows(count: int) -> list[Row]:
    """Accept records as the gatekeeper writes them: device id, serial, peer."""
    now = time.time()
    return [(now + i * 1e-4, "accept", f"sensor-{i % 5000:05d}", f"{(i * 7919) << 64:040x}",
             f"10.{i % 250}.{(i // 250) % 250}.{i % 200 + 1}:{40000 + i % 20000}", None, None)
            for i in range(count)]


def plain(path: Path, batch: list[Row]) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(_PLAIN_SCHEMA)
    conn.execute("CREATE INDEX events_device_time ON events (device_id, time)")
    conn.execute("CREATE INDEX events_time ON events (time)")
    started = time.perf_counter()
    for at in range(0, len(batch), BATCH):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_PLAIN_INSERT, batch[at:at + BATCH])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


def chained(path: Path, batch: list[Row]) -> tuple[float, float]:
    """(writer seconds, record() seconds in all)."""
    store = AuditStore(path, batch_size=BATCH, max_queue=len(batch) + 1)
    started = time.perf_counter()
    for _at, event, device_id, serial, peer, reason, _ in batch:
        store.record(event, device_id=device_id, serial=serial, peer=peer, reason=reason)
    recorded = time.perf_counter() - started
    started = time.perf_counter()
    store.open()
    store.close(timeout=600)
    elapsed = time.perf_counter() - started
    stats = store.statistics()
    if stats.written != len(batch):
        raise SystemExit(f"the store wrote {stats.written} of {len(batch)} records")
    return elapsed, recorded


def verify(path: Path, count: int) -> float:
    started = time.perf_counter()
    report = verify_store(path, CheckpointTrust(frozenset(), ()))
    elapsed = time.perf_counter() - started
    if not report.ok or report.records != count:
        raise SystemExit(f"verify: {report.problem}, {report.records} records")
    return elapsed


def seal_only(batch: list[Row]) -> float:
    prev = GENESIS
    started = time.perf_counter()
    for number, row in enumerate(batch, start=1):
        prev = seal(number, *row, prev)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    batch = rows(args.count)
    best = {"plain": float("inf"), "chained": float("inf"), "seal": float("inf"),
            "record": float("inf"), "verify": float("inf")}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for round_ in range(args.rounds):
            best["plain"] = min(best["plain"], plain(Path(folder) / f"plain-{round_}.db", batch))
            path = Path(folder) / f"chained-{round_}.db"
            writer, recorded = chained(path, batch)
            best["verify"] = min(best["verify"], verify(path, args.count))
            best["chained"] = min(best["chained"], writer)
            best["record"] = min(best["record"], recorded)
            best["seal"] = min(best["seal"], seal_only(batch))
    rate = {name: args.count / seconds for name, seconds in best.items()}
    ratio = rate["chained"] / rate["plain"]
    print(f"plain   (pre-chain batches): {rate['plain']:10.0f} records/s")
    print(f"chained (AuditStore writer): {rate['chained']:10.0f} records/s "
          f"({ratio:.2f} of plain)")
    print(f"seal only (SHA-256 + JSON):  {rate['seal']:10.0f} records/s")
    print(f"verify (events verify walk): {rate['verify']:10.0f} records/s")
    print(f"record() on the loop:        {1e9 * best['record'] / args.count:10.0f} ns/call")
    print(json.dumps({"count": args.count, "rounds": args.rounds,
                      "plain_per_s": round(rate["plain"]),
                      "chained_per_s": round(rate["chained"]),
                      "seal_per_s": round(rate["seal"]),
                      "verify_per_s": round(rate["verify"]), "ratio": round(ratio, 3),
                      "record_ns": round(1e9 * best["record"] / args.count)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
