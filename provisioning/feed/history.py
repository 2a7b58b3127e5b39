"""The feed's recent past: the change set of each of the last versions, so a gateway that
asks ``since=V`` gets one delta from V to now instead of a full snapshot.

Versions only grow. Only versions this process passed are known: after a restart, or once a
version fell off the end (``KEEP_VERSIONS`` change sets), :meth:`History.since` says None and
the gateway gets a snapshot (DESIGN section 9).
"""

from __future__ import annotations

import bisect
from typing import Final

from provisioning.registry.feeddoc import Changes, merge

__all__ = ["KEEP_VERSIONS", "History"]

KEEP_VERSIONS: Final = 1000  # change sets kept; a gateway further behind gets a snapshot


class History:
    """The versions passed since *version*, each with what changed to reach it."""

    def __init__(self, version: int, *, keep: int = KEEP_VERSIONS) -> None:
        self._versions = [version]  # strictly increasing
        self._steps: list[Changes] = []  # _steps[i] turns _versions[i] into _versions[i + 1]
        self._keep = keep

    @property
    def latest(self) -> int:
        return self._versions[-1]

    @property
    def oldest(self) -> int:
        """The oldest version a delta can start from."""
        return self._versions[0]

    def record(self, version: int, moved: Changes) -> None:
        """*moved* turned :attr:`latest` into *version*."""
        if version <= self.latest:
            raise ValueError(f"version {version} is not after {self.latest}")
        self._versions.append(version)
        self._steps.append(moved)
        if len(self._steps) > self._keep:
            del self._versions[0], self._steps[0]

    def since(self, version: int) -> Changes | None:
        """Everything that changed after *version*, merged; None when *version* is not one
        this history holds (too old, from before a restart, or never served)."""
        at = bisect.bisect_left(self._versions, version)
        if at == len(self._versions) or self._versions[at] != version:
            return None
        return merge(self._steps[at:])
