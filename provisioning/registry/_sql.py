"""Small helpers the registry's queries share (private to the package)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

# Ids per "IN (...)" query: far below SQLite's default limit of 32766 variables.
IN_BATCH = 500


def in_batches(ids: Sequence[str]) -> Iterator[tuple[tuple[str, ...], str]]:
    """*ids* in slices of :data:`IN_BATCH`, each with its ``?,?,...`` placeholders."""
    for start in range(0, len(ids), IN_BATCH):
        part = tuple(ids[start:start + IN_BATCH])
        yield part, ",".join("?" * len(part))
