"""The quarantined certificates of one gateway: a small JSON file that outlives the process.

``[checks] action = "quarantine"`` puts a certificate here when a misuse check finds it; the
gatekeeper refuses it (reason ``quarantined``) until an operator clears it with
``fleet-hub quarantine clear SERIAL`` (or deletes the file). The hub and the CLI both change
the file by read-modify-write under an exclusive ``flock`` on a ``.lock`` file beside it, and
replace it atomically (temporary file, fsync, rename), so neither loses the other's change and
a reader never sees half a file. Everything here blocks: the hub calls it in worker threads.

File: ``{"version": 1, "quarantined": [{"serial", "device_id", "check", "since"}, ...]}``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from hub.errors import QuarantineError
from provisioning.serial import format_serial, parse_serial

VERSION = 1

Signature = tuple[int, int, int] | None  # (inode, mtime ns, size) of the file; None: absent


@dataclass(frozen=True, slots=True)
class Entry:
    """One quarantined certificate: its serial (hex), device, the check that put it here and
    when (ISO 8601 UTC)."""

    serial: str
    device_id: str
    check: str
    since: str


def signature(path: Path) -> Signature:
    """What changes when the file is replaced or rewritten (a stat, for the hub's poll)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise QuarantineError(f"cannot stat the quarantine file {path}: {exc.strerror}") from exc
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def read(path: Path) -> dict[int, Entry]:
    """The quarantined certificates by serial; none when the file does not exist."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise QuarantineError(f"cannot read the quarantine file {path}: {exc}") from exc
    try:
        return _entries(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise QuarantineError(f"the quarantine file {path} is not one fleet-hub wrote: "
                              f"{exc}") from exc


def _entries(doc: object) -> dict[int, Entry]:
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"want a version {VERSION} document")
    entries: dict[int, Entry] = {}
    for item in doc["quarantined"]:
        found = Entry(str(item["serial"]), str(item["device_id"]), str(item["check"]),
                      str(item["since"]))
        entries[parse_serial(found.serial)] = found
    return entries


def add(path: Path, entries: Iterable[tuple[int, Entry]]) -> dict[int, Entry]:
    """Quarantine each (serial, entry) not yet there (an earlier entry keeps its date); the
    file's entries after the change."""
    with _locked(path):
        current = read(path)
        changed = False
        for serial, entry in entries:
            if serial not in current:
                current[serial] = entry
                changed = True
        if changed:
            _write(path, current)
        return current


def clear(path: Path, serials: Iterable[int]) -> list[Entry]:
    """Release each of *serials*; the entries released (none for a serial not there)."""
    with _locked(path):
        current = read(path)
        released = [current.pop(s) for s in serials if s in current]
        if released:
            _write(path, current)
        return released


def entry(serial: int, device_id: str, check: str, since: str) -> tuple[int, Entry]:
    return serial, Entry(format_serial(serial), device_id, check, since)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise QuarantineError(f"cannot lock the quarantine file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write(path: Path, entries: Mapping[int, Entry]) -> None:
    doc = {"version": VERSION,
           "quarantined": [asdict(entries[s]) for s in sorted(entries)]}
    data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            Path(tmp).replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise
    except OSError as exc:
        raise QuarantineError(f"cannot write the quarantine file {path}: {exc.strerror}") from exc
