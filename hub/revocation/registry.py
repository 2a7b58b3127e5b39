"""The ``registry`` source: the CA's registry on the same host, through its read-only view.

:class:`provisioning.registry.view.FleetView` (stdlib-only, ``mode=ro``, the one reader of the
registry's tables the hub may import) answers with one ``PRAGMA data_version`` when no other
connection committed since the last look, and reads only when the audit head moved (a CA
action), so an unchanged registry costs one ``stat`` and one PRAGMA per look. The PRAGMA only
sees commits made through SQLite: when the file itself changes under the connection (another
inode, size or mtime: a restore, a checkpoint, or garbage written over it) the header is checked
and the registry reopened and read in full, so a broken file is reported down instead of
answered from the old connection's cache.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Final

from hub.errors import SourceError
from hub.revocation.model import SourceData
from hub.revocation.sources import Outcome, PolledSource, Still
from provisioning.registry.view import FleetState, FleetView, FleetViewError, Position

__all__ = ["RegistrySource"]

# The view's statuses (FleetState.revoked[...].status) as the hub's refusal reasons.
_CERT_REASONS: Final = {"revoked": "revoked", "on_hold": "on-hold"}
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"  # the first 16 bytes of every database file
_SQLITE_HEADER_BYTES: Final = 100


def _check_header(path: Path) -> None:
    """Refuse a file that is no SQLite database before SQLite reads it (or a WAL masks it)."""
    try:
        with path.open("rb") as file:
            header = file.read(_SQLITE_HEADER_BYTES)
    except FileNotFoundError:
        raise SourceError("no such file") from None
    except OSError as exc:
        raise SourceError(f"cannot read the registry: {exc.strerror}") from exc
    if len(header) < _SQLITE_HEADER_BYTES:
        raise SourceError(f"the registry is truncated: {len(header)} bytes, shorter than an "
                          "SQLite header")
    if not header.startswith(_SQLITE_MAGIC):
        raise SourceError("the registry is not an SQLite database any more (its header is "
                          "gone: overwritten?)")


def _problem(exc: FleetViewError) -> str:
    """The view's failure in the words the hub has always logged and audited."""
    cause = exc.__cause__
    if isinstance(cause, ValueError):  # a serial that is not hex
        return f"the registry holds a malformed serial: {cause}"
    return f"cannot read the registry: {cause if cause is not None else exc.message}"


def _data(state: FleetState) -> SourceData:
    revoked = {serial: _CERT_REASONS.get(entry.status, "revoked")
               for serial, entry in state.revoked.items()}
    devices = {device_id: "revoked" if status == "revoked" else "suspended"
               for device_id, status in state.device_status.items()}
    certificates = None if state.certificates is None else {
        device_id: frozenset(serials) for device_id, serials in state.certificates.items()}
    return SourceData(revoked, devices, dict(state.password_hashes), dict(state.groups),
                      certificates=certificates)


class RegistrySource(PolledSource):
    """The same-host registry; its view is used by one worker thread at a time.

    With *certificates* (``[auth] registered_only``) its data also lists each device's valid
    serials: one more query, only when a CA action moved the audit head.
    """

    name = "registry"
    local = True

    def __init__(self, path: Path, *, certificates: bool = False) -> None:
        super().__init__(str(path))
        self._path = path
        self._certificates = certificates
        self._view: FleetView | None = None
        self._file_id: tuple[int, int, int, int] | None = None  # dev, inode, size, mtime
        self._seen: Position | None = None  # how far the data loaded goes
        # The watcher's asyncio lock already serialises polls; this one also covers a poll
        # whose awaiting coroutine was cancelled while its thread still runs.
        self._thread_lock = threading.Lock()

    async def _attempt(self, budget: float | None) -> Outcome:
        return await asyncio.to_thread(self._read)

    async def close(self) -> None:
        await asyncio.to_thread(self._disconnect)

    def _disconnect(self) -> None:
        with self._thread_lock:
            self._drop_view()

    def _drop_view(self) -> None:
        if self._view is not None:
            self._view.close()
        self._view, self._file_id, self._seen = None, None, None

    def _read(self) -> Outcome:
        with self._thread_lock:
            try:
                return self._read_locked()
            except SourceError:
                self._drop_view()
                raise
            except FleetViewError as exc:
                self._drop_view()
                raise SourceError(_problem(exc)) from exc

    def _read_locked(self) -> Outcome:
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            raise SourceError("no such file") from None
        except OSError as exc:
            raise SourceError(f"cannot stat the registry: {exc.strerror}") from exc
        file_id = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if self._view is None or file_id != self._file_id:
            # First look, or the file changed under the connection. A restore (another
            # inode) leaves the old connection reading the old file; garbage written over
            # the same inode leaves it answering from its cache and data_version unmoved.
            # So: check the header, reopen, and read everything afresh.
            self._drop_view()
            _check_header(self._path)
            self._view, self._file_id = FleetView(self._path), file_id
        self._seen, state = self._view.read(self._seen, certificates=self._certificates)
        return Still.UNCHANGED if state is None else _data(state)
