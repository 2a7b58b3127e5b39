"""Durations as operators write them: ``<int><unit>``, unit ``s``, ``m``, ``h`` or ``d``.

The one parser for every ``--validity``, ``--within`` and ``pki.toml`` duration (issue 14):
``90d``, ``12h``, ``10m``, ``30s``. No fractions, no compound forms (``1h30m`` is ``90m``),
no months or years (their length varies; ``365d`` says what it means). :func:`format_duration`
writes the largest unit that divides exactly, so ``parse(format(x)) == x``.

Errors are :class:`provisioning.errors.UsageError` naming the option or key they came from
(``--validity``, ``renew_grace``), one line, "got X; want Y".
"""

from __future__ import annotations

import datetime as dt
import re

from provisioning.errors import UsageError

__all__ = ["GRACE_MAX", "MAX_VALIDITY", "MIN_VALIDITY", "check_grace", "check_validity",
           "format_duration", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_FORM = re.compile(r"([0-9]{1,9})([smhd])")

# DESIGN section 10 and the issue 14 brief: a certificate lives 1 minute to 100 years.
MIN_VALIDITY = dt.timedelta(minutes=1)
MAX_VALIDITY = dt.timedelta(days=36500)
GRACE_MAX = MAX_VALIDITY  # renew_grace is further bounded by the fleet's validity


def parse_duration(text: str, where: str) -> dt.timedelta:
    """``90d`` -> 90 days; *where* (an option or a pki.toml key) is named in the error."""
    match = _FORM.fullmatch(text.strip())
    if match is None:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise UsageError(f"{shown!r} is not a duration; want <integer><unit>, unit s, m, h "
                         "or d (e.g. 90d, 12h, 10m, 30s)", where)
    return dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def format_duration(value: dt.timedelta) -> str:
    """The shortest exact form: 365d, 1h, 90m, 0s; sub-second parts are not representable."""
    seconds = value.total_seconds()
    if seconds < 0 or seconds != int(seconds):
        raise ValueError(f"{value!r} is not a whole, non-negative number of seconds")
    whole = int(seconds)
    for unit in ("d", "h", "m"):
        if whole and whole % _UNITS[unit] == 0:
            return f"{whole // _UNITS[unit]}{unit}"
    return f"{whole}s"


def check_validity(value: dt.timedelta, where: str) -> dt.timedelta:
    """A certificate validity within 1m..36500d, else a UsageError naming *where*."""
    if not MIN_VALIDITY <= value <= MAX_VALIDITY:
        raise UsageError(f"{_shown(value)} is out of range (want "
                         f"{format_duration(MIN_VALIDITY)} to "
                         f"{format_duration(MAX_VALIDITY)})", where)
    return value


def check_grace(value: dt.timedelta, validity: dt.timedelta, where: str) -> dt.timedelta:
    """A renewal grace within 0s..*validity*: a superseded certificate may not be kept
    valid longer than a certificate lives."""
    if not dt.timedelta(0) <= value <= validity:
        raise UsageError(f"{_shown(value)} is out of range (want 0s to the validity, "
                         f"{format_duration(validity)})", where)
    return value


def _shown(value: dt.timedelta) -> str:
    try:
        return format_duration(value)
    except ValueError:
        return str(value)
