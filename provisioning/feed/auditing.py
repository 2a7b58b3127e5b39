"""Which feed requests are worth an audit record (the middleware audits every other request).

Gateways long-poll: each one asks again as soon as it has an answer, and an idle fleet
answers a heartbeat every ``wait`` seconds. The registry's hash chain records what a gateway
was given, not that it asked: a ``feed.fetch`` event when what that gateway holds changes
(a document whose version differs from the last one recorded for it: the first answer after
the service started, a snapshot of a new version, a delta), never a heartbeat nor the same
version again. Refusals (403, 400, 503) are recorded at most once per peer address and reason
every ``REFUSAL_SECONDS``, so a misconfigured gateway retrying in a loop leaves one record a
minute, not thousands.
"""

from __future__ import annotations

from typing import Final

__all__ = ["REFUSAL_SECONDS", "FeedAudit"]

REFUSAL_SECONDS: Final = 60.0
_PRUNE_AT: Final = 4096  # remembered refusals before the expired ones are dropped


class FeedAudit:
    """Per gateway, the version last recorded; per (peer, reason), when it was recorded."""

    def __init__(self, *, refusal_seconds: float = REFUSAL_SECONDS) -> None:
        self._held: dict[str, int] = {}
        self._refused: dict[tuple[str, str], float] = {}
        self._refusal_seconds = refusal_seconds

    def served(self, gateway: str, version: int) -> bool:
        """*gateway* was given *version*: True when that is news worth a record."""
        if self._held.get(gateway) == version:
            return False
        self._held[gateway] = version
        return True

    def refused(self, peer: str, reason: str, now: float) -> bool:
        """*peer* was refused for *reason* at *now* (monotonic seconds): True when it was not
        recorded within the last ``refusal_seconds``."""
        key = (peer, reason)
        last = self._refused.get(key)
        if last is not None and now - last < self._refusal_seconds:
            return False
        if len(self._refused) >= _PRUNE_AT:
            self._refused = {k: t for k, t in self._refused.items()
                             if now - t < self._refusal_seconds}
        self._refused[key] = now
        return True
