"""``feed_cache``: the last good fleet state on the hub's disk, to start from when the CA is down.

The file is a snapshot document (:func:`provisioning.registry.feeddoc.document` with no
changes: base 0), the same format the feed serves inside its signed envelope, read back with
:func:`~provisioning.registry.feeddoc.parse_document`. It holds the ``issued`` time of the last
document the hub accepted, so the state's age (and ``max_age_seconds``) survives a restart.
It carries no signature: the documents were checked when they arrived, and the file is the
hub's own, like its audit store. A file that does not parse, is not a snapshot, or is for
another trust domain or gateway is logged and ignored, never half-used.

Writes are atomic (a temporary file in the same folder, fsync, rename, fsync of the folder):
a crash leaves the old state or the new one. Both directions are blocking work (a whole
fleet's JSON): call them from a worker thread.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

from provisioning.registry.feeddoc import (
    FeedFormatError,
    FeedState,
    apply,
    document,
    parse_document,
)

__all__ = ["Cached", "FeedCache"]

logger = logging.getLogger("hub.revocation")


class Cached(NamedTuple):
    """The state a cache file holds and when the CA issued the document it came with."""

    state: FeedState
    issued: str


class FeedCache:
    """One cache file for one gateway of one trust domain."""

    def __init__(self, path: Path, trust_domain: str, gateway: str) -> None:
        self.path = path
        self.trust_domain = trust_domain
        self.gateway = gateway

    def load(self) -> Cached | None:
        """The cached state; None (logged when the file is there) when there is none to use."""
        try:
            payload = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("feed cache %s cannot be read (%s): ignored", self.path,
                           exc.strerror)
            return None
        try:
            doc = parse_document(payload)
        except FeedFormatError as exc:
            logger.warning("feed cache %s is damaged (%s): ignored", self.path, exc)
            return None
        problem = None
        if not doc.snapshot:
            problem = f"it is a delta (base {doc.base}), not a snapshot"
        elif doc.version < 1:
            problem = "it has no version"
        elif doc.trust_domain != self.trust_domain:
            problem = f"it is for trust domain {doc.trust_domain!r}, not {self.trust_domain!r}"
        elif doc.gateway != self.gateway:
            problem = f"it is for gateway {doc.gateway!r}, not {self.gateway!r}"
        if problem is not None:
            logger.warning("feed cache %s cannot be used: %s; ignored", self.path, problem)
            return None
        return Cached(apply(None, doc), doc.issued)

    def save(self, state: FeedState, issued: str) -> None:
        """Write *state* atomically; OSError when the folder cannot take it."""
        payload = json.dumps(document(state, base=0, moved=None, issued=issued,
                                      gateway=self.gateway),
                             separators=(",", ":")).encode()
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                         dir=folder)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())
            Path(temporary).replace(self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power loss
        finally:
            os.close(directory)
