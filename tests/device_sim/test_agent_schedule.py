"""The device agent's schedule: when each certificate is renewed and how retries wait."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from device_sim.agent import Schedule, Validity

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
FOUR_MINUTES = Validity(START, START + dt.timedelta(minutes=4), "0a1b")


def _fractions(schedule: Schedule, count: int = 2000) -> list[float]:
    return [schedule.fraction(f"sim-{i:05d}", FOUR_MINUTES) for i in range(count)]


def test_renewal_falls_within_renew_at_plus_or_minus_half_the_jitter() -> None:
    """Every device renews between renew_at - jitter/2 and renew_at + jitter/2 of the
    certificate's life, and renew_time is that point between not-before and not-after."""
    schedule = Schedule(renew_at=0.67, jitter=0.1)
    fractions = _fractions(schedule)
    assert all(0.62 <= f <= 0.72 for f in fractions)
    when = schedule.renew_time("sim-00001", FOUR_MINUTES)
    assert when == START + dt.timedelta(minutes=4) * schedule.fraction("sim-00001",
                                                                       FOUR_MINUTES)


def test_jitter_spreads_a_fleet_issued_together() -> None:
    """2,000 devices with certificates issued the same second renew spread over the whole
    jitter window: no tenth of it holds more than twice its share, both edges are used."""
    fractions = _fractions(Schedule(renew_at=0.67, jitter=0.1))
    buckets = [0] * 10
    for f in fractions:
        buckets[min(9, int((f - 0.62) / 0.01))] += 1
    assert max(buckets) < 2 * len(fractions) / 10
    assert min(buckets) > len(fractions) / 20
    assert len({round(f, 6) for f in fractions}) > 1900


def test_same_seed_same_times_other_seed_other_times() -> None:
    """The jitter is fixed by (seed, device, serial): repeatable, yet each certificate of a
    device gets its own draw, so rounds do not line up."""
    assert _fractions(Schedule(seed="7")) == _fractions(Schedule(seed="7"))
    assert _fractions(Schedule(seed="7")) != _fractions(Schedule(seed="8"))
    schedule = Schedule(seed="7")
    other_cert = Validity(FOUR_MINUTES.not_before, FOUR_MINUTES.not_after, "0c2d")
    assert schedule.fraction("sim-1", FOUR_MINUTES) != schedule.fraction("sim-1", other_cert)


def test_no_jitter_renews_exactly_at_renew_at() -> None:
    """jitter 0: every device at renew_at exactly."""
    assert set(_fractions(Schedule(renew_at=0.5, jitter=0.0), 50)) == {0.5}


@pytest.mark.parametrize(("renew_at", "jitter"), [(0.01, 0.0), (0.99, 0.0), (0.67, 0.8),
                                                   (0.1, 0.2), (0.5, -0.1)])
def test_out_of_bounds_policy_is_refused(renew_at: float, jitter: float) -> None:
    """renew_at within 0.05..0.95 and a jitter that keeps every renewal there."""
    with pytest.raises(ValueError, match=r"renew_at|jitter"):
        Schedule(renew_at=renew_at, jitter=jitter)


def test_retries_back_off_up_to_a_tenth_of_the_lifetime() -> None:
    """Retry delays double from retry_base, scaled into [0.5, 1], capped at lifetime/10;
    no attempt after not_after - lifetime/50."""
    schedule = Schedule(retry_base=dt.timedelta(seconds=1))
    rng = random.Random(1)
    delays = [schedule.retry_delay(n, FOUR_MINUTES, rng).total_seconds() for n in range(12)]
    for n, delay in enumerate(delays):
        step = min(24.0, 2.0 ** n)
        assert step / 2 <= delay <= step
    assert max(delays) <= 24.0
    assert schedule.give_up_at(FOUR_MINUTES) == FOUR_MINUTES.not_after - dt.timedelta(
        seconds=4.8)
