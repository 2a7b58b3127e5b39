"""[limits] bookkeeping: publish token buckets and retained-message quotas, on a fake clock."""

from __future__ import annotations

import pytest

from hub.limits import PublishBudget, PublishBudgets, RetainedQuota, RetainedUsage
from hub.metrics import LIMITS, Metrics


class TestPublishBudget:
    def test_a_new_budget_allows_a_burst_of_twice_the_rate(self) -> None:
        """100 msg/s: 200 messages at once pass, the 201st does not."""
        budget = PublishBudget(100, 1_000_000, now=0.0)
        assert all(budget.take(10) for _ in range(200))
        assert not budget.take(10)

    def test_refill_earns_the_rate_per_second_up_to_the_burst(self) -> None:
        budget = PublishBudget(100, 1_000_000, now=0.0)
        while budget.take(1):
            pass
        budget.refill(0.5)
        assert sum(budget.take(1) for _ in range(100)) == 50
        budget.refill(100.0)  # a long pause earns no more than the burst
        assert sum(budget.take(1) for _ in range(1000)) == 200

    def test_a_clock_that_goes_back_earns_nothing(self) -> None:
        budget = PublishBudget(1, 1000, now=10.0)
        assert budget.take(1)
        assert budget.take(1)
        budget.refill(5.0)
        assert not budget.take(1)

    def test_bytes_limit_messages_too(self) -> None:
        """512 B/s, burst 1024 B: four 256-byte messages, then nothing until refilled."""
        budget = PublishBudget(1000, 512, now=0.0)
        assert [budget.take(256) for _ in range(5)] == [True, True, True, True, False]
        budget.refill(0.5)
        assert budget.take(256)
        assert not budget.take(256)

    def test_a_refused_message_spends_nothing(self) -> None:
        budget = PublishBudget(1000, 100, now=0.0)
        assert budget.take(150)
        assert not budget.take(100)  # 50 bytes left
        assert budget.take(50)

    def test_a_message_larger_than_the_byte_bucket_passes_only_on_a_full_bucket(self) -> None:
        """Not banned for ever: it waits until the bucket is full, then overdraws it."""
        budget = PublishBudget(1000, 100, now=0.0)  # the byte bucket holds 200
        assert budget.take(500)
        assert not budget.take(500)
        budget.refill(1.0)  # -300 + 100: still short
        assert not budget.take(1)
        budget.refill(5.0)
        assert budget.take(500)

    def test_full_at_tells_a_budget_that_equals_a_new_one(self) -> None:
        budget = PublishBudget(10, 1000, now=0.0)
        assert budget.full_at(0.0)
        budget.take(100)
        assert not budget.full_at(0.0)
        assert not budget.full_at(0.05)
        assert budget.full_at(0.1)


class TestPublishBudgets:
    def test_a_device_keeps_its_budget_across_reconnects(self) -> None:
        """Hanging up and coming back does not refill it."""
        budgets = PublishBudgets(1, 1000)
        first = budgets.get("d1", 0.0)
        assert first.take(1)
        assert first.take(1)
        again = budgets.get("d1", 0.1)
        assert again is first
        assert not again.take(1)
        assert budgets.get("d2", 0.1).take(1)  # another device is not affected

    def test_get_refills_to_now(self) -> None:
        budgets = PublishBudgets(1, 1000)
        budget = budgets.get("d1", 0.0)
        budget.take(1)
        budget.take(1)
        assert budgets.get("d1", 1.0).take(1)

    def test_full_budgets_are_swept_when_the_table_doubles(self) -> None:
        budgets = PublishBudgets(1, 1000)
        for n in range(1024):
            budgets.get(f"idle-{n}", 0.0)
        busy = budgets.get("busy", 0.0)  # 1024 kept: this one triggers a sweep first
        busy.take(1)
        assert len(budgets) == 1
        for n in range(1023):
            budgets.get(f"more-{n}", 0.1)
        budgets.get("last", 0.1)  # the next sweep keeps the busy one, whose bucket is short
        assert len(budgets) == 2
        assert budgets.get("busy", 0.1) is busy


class TestRetainedQuota:
    def test_messages_are_counted_per_device(self) -> None:
        quota = RetainedQuota(max_messages=2, max_bytes=1000)
        assert quota.store("d1", "a", 10)
        assert quota.store("d1", "b", 10)
        assert not quota.store("d1", "c", 10)
        assert quota.store("d2", "c", 10)  # another device has its own quota
        assert quota.usage("d1") == RetainedUsage(2, 20)

    def test_bytes_are_counted_per_device(self) -> None:
        quota = RetainedQuota(max_messages=100, max_bytes=100)
        assert quota.store("d1", "a", 60)
        assert not quota.store("d1", "b", 41)
        assert quota.store("d1", "b", 40)
        assert quota.usage("d1") == RetainedUsage(2, 100)

    def test_a_refused_message_changes_nothing(self) -> None:
        quota = RetainedQuota(max_messages=100, max_bytes=100)
        assert quota.store("d1", "a", 60)
        assert not quota.store("d1", "a", 101)
        assert quota.usage("d1") == RetainedUsage(1, 60)

    def test_replacing_a_topic_charges_only_the_difference(self) -> None:
        """[MQTT-3.3.1-5]: a new retained message replaces the old one on its topic."""
        quota = RetainedQuota(max_messages=1, max_bytes=100)
        assert quota.store("d1", "a", 90)
        assert quota.store("d1", "a", 100)
        assert quota.usage("d1") == RetainedUsage(1, 100)

    def test_deleting_frees_the_quota(self) -> None:
        """[MQTT-3.3.1-10/11]: an empty retained payload deletes; the device may retain again."""
        quota = RetainedQuota(max_messages=1, max_bytes=100)
        assert quota.store("d1", "a", 50)
        assert not quota.store("d1", "b", 50)
        quota.remove("a")
        assert quota.usage("d1") == RetainedUsage(0, 0)
        assert quota.store("d1", "b", 50)
        quota.remove("never-retained")  # nothing to free
        assert quota.usage("d1") == RetainedUsage(1, 50)

    def test_overwriting_another_devices_message_moves_the_charge(self) -> None:
        quota = RetainedQuota(max_messages=1, max_bytes=100)
        assert quota.store("op", "fleet/state", 40)
        assert quota.store("d1", "fleet/state", 30)
        assert quota.usage("op") == RetainedUsage(0, 0)
        assert quota.usage("d1") == RetainedUsage(1, 30)

    def test_the_brokers_own_messages_are_charged_to_nobody(self) -> None:
        quota = RetainedQuota(max_messages=1, max_bytes=10)
        assert quota.store(None, "sys/a", 1000)
        assert quota.store("d1", "sys/a", 10)  # replacing it charges the device only
        assert quota.usage("d1") == RetainedUsage(1, 10)
        quota.remove("sys/a")
        assert quota.usage("d1") == RetainedUsage(0, 0)


@pytest.mark.parametrize("count", [1, 3])
def test_many_retained_messages_of_one_device_stay_bounded(count: int) -> None:
    """50,000 retained 1 KB messages from one device: only the first max_messages stored."""
    quota = RetainedQuota(max_messages=100 * count, max_bytes=1 << 30)
    stored = sum(quota.store("flood", f"devices/flood/{n}", 1024) for n in range(50_000))
    assert stored == 100 * count


def test_limit_hits_are_exported_from_zero_by_limit() -> None:
    """fleet_hub_limit_hits_total{limit}: every known limit at 0 first, so rate() sees a hit."""
    metrics = Metrics()
    metrics.limit_hit("rate-limited")
    metrics.limit_hit("rate-limited")
    text = metrics.render([])
    assert 'fleet_hub_limit_hits_total{limit="rate-limited"} 2' in text
    for limit in LIMITS:
        assert f'fleet_hub_limit_hits_total{{limit="{limit}"}}' in text
