"""Issued certificates on disk: ``OUT/<device-id>.pem`` files no reader sees half written.

The issuer writes a chunk's files right after its commit (:class:`FileWriter`) and, after a
crash, finishes the promised ones, first clearing temporaries of killed writers
(:func:`remove_dead_temporaries`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from provisioning.errors import OutputError


class FileWriter:
    """Complete ``<folder>/<name>`` files that no reader ever sees half written.

    Each file is written without a name (``O_TMPFILE``) and then linked under its name in one
    step: one directory entry per file instead of a temporary one plus a rename. Where a file
    by that name exists already, the finished file is linked as ``.<name>.<pid>.tmp`` and
    renamed over it. Where the kernel or file system cannot do that, the file is written as
    :func:`provisioning.fsutil.atomic_write` does (temporary file, rename), without fsync.
    Either way relative to an open folder descriptor, so the kernel does not walk the whole
    path for every step. *unnamed* False takes the temporary file and rename way from the
    start (the tests of that way).
    """

    _FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    _UNNAMED = getattr(os, "O_TMPFILE", 0)
    _MODE = 0o644

    def __init__(self, chain_pem: bytes, *, unnamed: bool = True) -> None:
        self.chain_pem = chain_pem
        self.suffix = f".{os.getpid()}.tmp"
        self.folders: dict[str, int] = {}
        self.unnamed = unnamed and bool(self._UNNAMED)

    def write(self, path: str, pem: str) -> None:
        folder, name = os.path.split(path)
        folder = folder or "."
        tmp = f".{name}{self.suffix}"
        data = pem.encode("ascii") + self.chain_pem  # the certificate, then its chain
        try:
            dir_fd = self.folders.get(folder)
            if dir_fd is None:
                try:
                    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as exc:
                    exc.filename = str(Path(folder) / tmp)
                    raise
                self.folders[folder] = dir_fd
            if not (self.unnamed and self._write_unnamed(dir_fd, name, tmp, data)):
                self._write_named(dir_fd, name, tmp, data)
        except OSError as exc:
            where = str(Path(folder) / exc.filename) if exc.filename is not None else "--out"
            raise OutputError(f"cannot write certificate file: {exc.strerror}",
                              where) from exc

    def _write_unnamed(self, dir_fd: int, name: str, tmp: str, data: bytes) -> bool:
        """False when this way is not available here; the caller then writes a named file."""
        try:
            fd = os.open(".", self._UNNAMED | os.O_WRONLY | os.O_CLOEXEC, self._MODE,
                         dir_fd=dir_fd)
        except OSError:  # no O_TMPFILE on this file system
            self.unnamed = False
            return False
        try:
            os.fchmod(fd, self._MODE)
            _write_all(fd, data)
            # linkat(2) of an O_TMPFILE file, as open(2) shows it without CAP_DAC_READ_SEARCH
            handle = f"/proc/self/fd/{fd}"
            try:
                os.link(handle, name, dst_dir_fd=dir_fd)
            except FileExistsError:
                pass
            except OSError:  # no /proc, or links refused: write named files from now on
                self.unnamed = False
                return False
            else:
                return True
            try:
                os.link(handle, tmp, dst_dir_fd=dir_fd)
            except OSError:  # a stale temporary by that name: the named way truncates it
                return False
        finally:
            os.close(fd)
        try:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        return True

    def _write_named(self, dir_fd: int, name: str, tmp: str, data: bytes) -> None:
        fd = os.open(tmp, self._FLAGS, self._MODE, dir_fd=dir_fd)
        try:
            try:
                os.fchmod(fd, self._MODE)
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise

    def close(self) -> None:
        for fd in self.folders.values():
            os.close(fd)
        self.folders.clear()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def remove_dead_temporaries(folder: Path) -> None:
    """Temporary files of killed writers (``.NAME.PID.tmp``); a live writer's are left alone."""
    for stray in folder.glob(".*.tmp"):
        pid = stray.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            stray.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
