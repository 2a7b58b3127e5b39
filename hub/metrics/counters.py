"""The broker's counters: plain integers bumped on the event loop, read at scrape time.

They are not prometheus-client ``Counter`` objects on purpose: the broker bumps them for every
PUBLISH read and delivered, and a ``Counter.inc()`` takes a lock and costs 0.40 µs (1.39 µs
through ``labels()``) where an int increment costs 0.06 µs; at the 80,000 messages/s of
docs/gateway.md's scale run that is about 5% of the loop. :class:`~hub.metrics.exposition.
HubCollector` reads :meth:`Metrics.statistics` when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from hub.metrics.exposition import SourceHealthLike, render_text

__all__ = ["ACL_ACTIONS", "KICK_REASONS", "LIMITS", "Metrics", "Statistics"]

ACL_ACTIONS: Final = ("publish", "subscribe")
KICK_REASONS: Final = ("revoked", "on-hold", "device-suspended", "device-revoked", "expired",
                       "unregistered", "quarantined")
# [limits] hits, by the audit reason they share (hub/limits.py, docs/gateway.md).
LIMITS: Final = ("packet-too-large", "rate-limited", "topic-too-long", "too-many-subscriptions",
                 "retained-quota")


@dataclass(frozen=True, slots=True)
class Statistics:
    """The counters at one moment (an immutable copy: a scrape never sees one half-updated)."""

    connections: int
    accepted: int
    refused: Mapping[str, int]  # reason -> connections refused
    acl_denied: Mapping[str, int]  # "publish" | "subscribe" -> refusals
    kicks: Mapping[str, int]  # reason -> live sessions closed
    limit_hits: Mapping[str, int]  # [limits] reason -> hits
    received: int
    delivered: int


class Metrics:
    """The hub's counters; every method is an O(1) increment, called from the event loop.

    Known label values (ACL actions, kick reasons, and any *refuse_reasons* given) are exported
    at 0 from the start, so ``rate()`` sees the first event.
    """

    def __init__(self, *, refuse_reasons: Iterable[str] = ()) -> None:
        self._connections = 0
        self._accepted = 0
        self._refused: dict[str, int] = dict.fromkeys(refuse_reasons, 0)
        self._acl_denied: dict[str, int] = dict.fromkeys(ACL_ACTIONS, 0)
        self._kicks: dict[str, int] = dict.fromkeys(KICK_REASONS, 0)
        self._received = 0
        self._delivered = 0
        self._limit_hits: dict[str, int] = dict.fromkeys(LIMITS, 0)

    def connection_opened(self) -> None:
        """A client connection was accepted by the listener."""
        self._connections += 1

    def connection_closed(self) -> None:
        """A client connection ended, for whatever reason."""
        self._connections -= 1

    def accepted(self) -> None:
        """A CONNECT passed every check."""
        self._accepted += 1

    def refused(self, reason: str) -> None:
        """A CONNECT (or handshake) was refused with the reason code *reason*."""
        self._refused[reason] = self._refused.get(reason, 0) + 1

    def acl_denied(self, action: str) -> None:
        """A publish or a subscription was refused by the ACL."""
        self._acl_denied[action] = self._acl_denied.get(action, 0) + 1

    def kicked(self, reason: str) -> None:
        """A live session was closed by the hub (revocation, hold, suspension, expiry)."""
        self._kicks[reason] = self._kicks.get(reason, 0) + 1

    def limit_hit(self, limit: str) -> None:
        """A [limits] value refused something (every message or filter, not once per
        connection like the audit)."""
        self._limit_hits[limit] = self._limit_hits.get(limit, 0) + 1

    def messages_in(self, n: int = 1) -> None:
        """*n* PUBLISH messages received from clients."""
        self._received += n

    def messages_out(self, n: int = 1) -> None:
        """*n* messages delivered to subscribers."""
        self._delivered += n

    def statistics(self) -> Statistics:
        """The counters now, as an immutable snapshot."""
        return Statistics(
            connections=self._connections, accepted=self._accepted,
            refused=MappingProxyType(dict(self._refused)),
            acl_denied=MappingProxyType(dict(self._acl_denied)),
            kicks=MappingProxyType(dict(self._kicks)),
            limit_hits=MappingProxyType(dict(self._limit_hits)),
            received=self._received, delivered=self._delivered,
        )

    def render(
        self,
        revocation: Sequence[SourceHealthLike],
        extra_gauges: Mapping[str, float] | None = None,
        *,
        now: float | None = None,
        revocation_version: int | None = None,
    ) -> str:
        """The exposition text of these counters and of the figures given; *now*
        (``time.time()``) is for the revocation ages."""
        return render_text(self.statistics, lambda: revocation,
                           (lambda: extra_gauges) if extra_gauges is not None else None,
                           now=now, revocation_version=revocation_version)
