"""When a device renews its certificate, and how long it waits after a failed attempt.

Pure arithmetic on the certificate's own validity, so a firmware port needs only a clock and
a random source:

- **When**: at ``renew_at`` of the certificate's lifetime (not-before to not-after; 0.67 by
  default: the last third is the margin for a CA that is down or a device that is offline),
  moved by up to ``jitter / 2`` of the lifetime either way. A fleet issued within the same
  minute would otherwise come back to the CA within the same second, at every round.
- **Jitter from a seed**: the offset is drawn from ``random.Random("seed:device:serial")``, so
  it differs per device and per certificate (rounds do not line up either), and a test or a
  re-run with the same seed gets the same times. A device with no seed to keep uses any
  random source; only the bounds matter.
- **Retry**: a failed attempt waits ``min(cap, base * 2**attempt)`` scaled by a random factor
  in [0.5, 1] (the "equal jitter" of exponential backoff, so failed devices do not retry in
  step), with ``cap`` a tenth of the lifetime; no attempt is made after ``not_after - margin``,
  because a certificate that has ended cannot authenticate a renewal (the CA refuses it).
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

MIN_FRACTION = 0.05  # never renew in the first 5% or the last 5% of a certificate's life
MAX_FRACTION = 0.95


@dataclass(frozen=True)
class Validity:
    """A certificate's not-before and not-after (UTC), and its serial (for the jitter)."""

    not_before: dt.datetime
    not_after: dt.datetime
    serial: str

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    def at(self, fraction: float) -> dt.datetime:
        """The instant *fraction* of the way from not-before to not-after."""
        return self.not_before + self.lifetime * fraction


@dataclass(frozen=True)
class Schedule:
    """The renewal policy of a device: ``renew_at`` and ``jitter`` are fractions of the
    certificate's lifetime; ``seed`` makes the jitter repeatable."""

    renew_at: float = 0.67
    jitter: float = 0.1
    seed: str = "0"
    retry_base: dt.timedelta = dt.timedelta(seconds=1)

    def __post_init__(self) -> None:
        if not MIN_FRACTION <= self.renew_at <= MAX_FRACTION:
            raise ValueError(f"renew_at {self.renew_at:g} is out of range; want "
                             f"{MIN_FRACTION:g} to {MAX_FRACTION:g}")
        if not 0 <= self.jitter <= 2 * min(self.renew_at - MIN_FRACTION,
                                           MAX_FRACTION - self.renew_at) + 1e-9:
            raise ValueError(f"jitter {self.jitter:g} would move renewals outside "
                             f"{MIN_FRACTION:g}..{MAX_FRACTION:g} of the lifetime")

    def fraction(self, device_id: str, cert: Validity) -> float:
        """Where in *cert*'s life *device_id* renews: renew_at +- jitter/2, fixed by the seed."""
        draw = random.Random(f"{self.seed}:{device_id}:{cert.serial}").random()  # noqa: S311
        return self.renew_at + (draw - 0.5) * self.jitter

    def renew_time(self, device_id: str, cert: Validity) -> dt.datetime:
        """When *device_id* should renew *cert*."""
        return cert.at(self.fraction(device_id, cert))

    def retry_delay(self, attempt: int, cert: Validity, rng: random.Random) -> dt.timedelta:
        """How long to wait after failed attempt number *attempt* (0 for the first failure)."""
        cap = cert.lifetime / 10
        step: dt.timedelta = min(cap, self.retry_base * (2 ** min(attempt, 30)))
        return step * rng.uniform(0.5, 1.0)

    def give_up_at(self, cert: Validity) -> dt.datetime:
        """No renewal attempt starts after this: 1/50 of the lifetime before not-after (a
        request takes a round trip, and an expired certificate is refused)."""
        return cert.not_after - cert.lifetime / 50
