"""What one device may cost the gateway ([limits], DESIGN section 5): pure bookkeeping.

:class:`PublishBudget` is a device's two token buckets (messages and PUBLISH bytes per second,
each holding ``BURST_SECONDS`` of its rate). The handler refills it once per read buffer with
the loop's clock and spends it per message: a few float operations, no clock call, per PUBLISH.
:class:`PublishBudgets` keeps one budget per device across reconnects, so hanging up and coming
back does not refill it. :class:`RetainedQuota` charges every retained message to the device
that published it, so one device cannot fill the gateway's memory with retained messages.

Nothing here audits, closes or routes: the handler and the broker do, with these answers.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "BURST_SECONDS",
    "PublishBudget",
    "PublishBudgets",
    "RetainedQuota",
    "RetainedUsage",
]

BURST_SECONDS = 2.0  # a bucket holds two seconds of its rate: one second's burst on top
_PRUNE_FLOOR = 1024  # budgets kept before the first sweep for full (i.e. unused) ones


class PublishBudget:
    """One device's publish allowance: *rate* messages and *byte_rate* bytes per second.

    A message is allowed when a whole message token and its bytes are in the buckets; a
    message larger than the whole byte bucket passes only on a full bucket (which it then
    overdraws), so a small ``publish_bytes_rate`` slows large messages instead of banning them.
    """

    __slots__ = ("_burst", "_byte_burst", "_byte_rate", "_rate", "byte_tokens", "stamp",
                 "tokens")

    def __init__(self, rate: float, byte_rate: float, now: float) -> None:
        self._rate = float(rate)
        self._byte_rate = float(byte_rate)
        self._burst = self._rate * BURST_SECONDS
        self._byte_burst = self._byte_rate * BURST_SECONDS
        self.tokens = self._burst
        self.byte_tokens = self._byte_burst
        self.stamp = now

    def refill(self, now: float) -> None:
        """Add what *now* (loop time, seconds) earned since the last refill, up to the burst."""
        elapsed = now - self.stamp
        if elapsed <= 0.0:
            return
        self.stamp = now
        tokens = self.tokens + elapsed * self._rate
        self.tokens = tokens if tokens < self._burst else self._burst
        byte_tokens = self.byte_tokens + elapsed * self._byte_rate
        self.byte_tokens = byte_tokens if byte_tokens < self._byte_burst else self._byte_burst

    def take(self, size: int) -> bool:
        """Spend one message and *size* bytes; False, spending nothing, when either is short."""
        if self.tokens >= 1.0 and (self.byte_tokens >= size
                                   or self.byte_tokens >= self._byte_burst):
            self.tokens -= 1.0
            self.byte_tokens -= size
            return True
        return False

    def full_at(self, now: float) -> bool:
        """Whether both buckets would be full at *now*: then it equals a brand-new budget."""
        elapsed = max(0.0, now - self.stamp)
        return (self.tokens + elapsed * self._rate >= self._burst
                and self.byte_tokens + elapsed * self._byte_rate >= self._byte_burst)


class PublishBudgets:
    """A :class:`PublishBudget` per device id, kept while it could differ from a new one.

    Budgets of devices that left are swept when the table has doubled since the last sweep;
    only full ones go (a full budget is what a newcomer gets anyway), so memory follows the
    number of devices that published recently, not of every device ever seen.
    """

    def __init__(self, rate: float, byte_rate: float) -> None:
        self.rate = rate
        self.byte_rate = byte_rate
        self._budgets: dict[str, PublishBudget] = {}
        self._sweep_at = _PRUNE_FLOOR

    def __len__(self) -> int:
        return len(self._budgets)

    def get(self, device_id: str, now: float) -> PublishBudget:
        """The device's budget, refilled to *now*; a full new one for a device not seen lately."""
        budget = self._budgets.get(device_id)
        if budget is not None:
            budget.refill(now)
            return budget
        if len(self._budgets) >= self._sweep_at:
            self.sweep(now)
        budget = self._budgets[device_id] = PublishBudget(self.rate, self.byte_rate, now)
        return budget

    def sweep(self, now: float) -> int:
        """Forget every budget that is full by *now*; how many were forgotten."""
        full = [key for key, budget in self._budgets.items() if budget.full_at(now)]
        for key in full:
            del self._budgets[key]
        self._sweep_at = max(_PRUNE_FLOOR, 2 * len(self._budgets))
        return len(full)


class RetainedUsage(NamedTuple):
    """What one device's retained messages hold: how many, and their topic + payload bytes."""

    messages: int
    size: int


_NONE = RetainedUsage(0, 0)


class RetainedQuota:
    """Retained messages charged to the device that published them.

    Size is the topic's UTF-8 bytes plus the payload's: what the gateway keeps in memory. A
    message retained by the broker itself (owner None) is tracked but charged to nobody. A
    message that replaces a retained one on the same topic first frees the old one's charge,
    whoever owned it [MQTT-3.3.1-5]; deleting (an empty retained payload) frees it too
    [MQTT-3.3.1-10/11].
    """

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._topics: dict[str, tuple[str | None, int]] = {}  # topic -> (owner, size)
        self._usage: dict[str, RetainedUsage] = {}

    def usage(self, owner: str) -> RetainedUsage:
        return self._usage.get(owner, _NONE)

    def fits(self, owner: str | None, topic: str, size: int) -> bool:
        """Whether *owner* may retain *size* bytes on *topic* (after freeing that topic)."""
        if owner is None:
            return True
        count, total = self._usage.get(owner, _NONE)
        old = self._topics.get(topic)
        if old is not None and old[0] == owner:
            count, total = count - 1, total - old[1]
        return count + 1 <= self.max_messages and total + size <= self.max_bytes

    def store(self, owner: str | None, topic: str, size: int) -> bool:
        """Charge *owner* for retaining *size* bytes on *topic*; False (no change) if over."""
        if not self.fits(owner, topic, size):
            return False
        self.remove(topic)
        self._topics[topic] = (owner, size)
        if owner is not None:
            count, total = self._usage.get(owner, _NONE)
            self._usage[owner] = RetainedUsage(count + 1, total + size)
        return True

    def remove(self, topic: str) -> None:
        """The retained message on *topic* is gone: free its owner's charge."""
        owner, size = self._topics.pop(topic, (None, 0))
        if owner is None:
            return
        count, total = self._usage[owner]
        if count <= 1:
            del self._usage[owner]
        else:
            self._usage[owner] = RetainedUsage(count - 1, total - size)

    def clear(self) -> None:
        self._topics.clear()
        self._usage.clear()
