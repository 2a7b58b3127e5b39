"""Durations (issue 14): one parser for --validity, --within and pki.toml; pki.toml's policy."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from provisioning.config import PKIConfig, load_config
from provisioning.duration import check_grace, check_validity, format_duration, parse_duration
from provisioning.errors import PKIError, UsageError
from tests.provisioning.conftest import ORG, TRUST_DOMAIN

D = dt.timedelta


@pytest.mark.parametrize(("text", "value"), [
    ("90d", D(days=90)), ("12h", D(hours=12)), ("10m", D(minutes=10)), ("30s", D(seconds=30)),
    ("0s", D(0)), ("36500d", D(days=36500)), (" 1h ", D(hours=1)), ("007m", D(minutes=7)),
])
def test_parse_reads_integer_and_unit(text: str, value: dt.timedelta) -> None:
    """<int><unit> with unit s, m, h, d; surrounding blanks are ignored."""
    assert parse_duration(text, "--validity") == value


@pytest.mark.parametrize("text", ["", "10", "d", "1.5h", "-5m", "1h30m", "10M", "2w", "1y",
                                  "ten minutes", "10 m", "1234567890d"])
def test_parse_refuses_anything_else_naming_the_option(text: str) -> None:
    """A bad duration is a usage error that names where it came from and what is wanted."""
    with pytest.raises(UsageError) as info:
        parse_duration(text, "--within")
    assert info.value.where == "--within"
    assert str(info.value) == (f"{text!r} is not a duration; want <integer><unit>, unit s, m, "
                               "h or d (e.g. 90d, 12h, 10m, 30s) (--within)")


@pytest.mark.parametrize(("value", "text"), [
    (D(days=365), "365d"), (D(hours=1), "1h"), (D(minutes=90), "90m"), (D(hours=36), "36h"),
    (D(seconds=61), "61s"), (D(0), "0s"), (D(days=2), "2d"),
])
def test_format_writes_the_largest_exact_unit(value: dt.timedelta, text: str) -> None:
    """format is the inverse of parse, in the largest unit that divides exactly."""
    assert format_duration(value) == text
    assert parse_duration(text, "x") == value


def test_format_refuses_what_parse_cannot_read() -> None:
    """Fractions of a second and negative durations have no written form."""
    for value in (D(milliseconds=1500), D(seconds=-1)):
        with pytest.raises(ValueError, match="whole, non-negative"):
            format_duration(value)


def test_validity_bounds_are_one_minute_to_100_years() -> None:
    """validity 1m..36500d; outside, the error names the option and the range."""
    assert check_validity(D(minutes=1), "--validity") == D(minutes=1)
    assert check_validity(D(days=36500), "--validity") == D(days=36500)
    for bad in (D(seconds=59), D(days=36501), D(0)):
        with pytest.raises(UsageError, match=r"out of range \(want 1m to 36500d\)") as info:
            check_validity(bad, "--validity")
        assert info.value.where == "--validity"


def test_grace_bounds_are_zero_to_the_validity() -> None:
    """renew_grace 0s..validity: a replaced certificate never outlives a new one's life."""
    assert check_grace(D(0), D(minutes=10), "renew_grace") == D(0)
    assert check_grace(D(minutes=10), D(minutes=10), "renew_grace") == D(minutes=10)
    with pytest.raises(UsageError, match=r"11m is out of range \(want 0s to the validity, "
                       r"10m\) \(renew_grace\)"):
        check_grace(D(minutes=11), D(minutes=10), "renew_grace")


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "pki.toml"
    path.write_text(f'trust_domain = "{TRUST_DOMAIN}"\norganisation = "{ORG}"\n{body}')
    return path


def test_config_defaults_are_365d_and_1h(tmp_path: Path) -> None:
    """A pki.toml without policy keys gets DESIGN section 10's defaults."""
    config = load_config(_write(tmp_path, ""))
    assert (config.validity, config.renew_grace) == (D(days=365), D(hours=1))


def test_config_round_trips_validity_and_grace(tmp_path: Path) -> None:
    """New files write validity and renew_grace as durations, and read them back."""
    config = PKIConfig(TRUST_DOMAIN, ORG, validity=D(hours=12), renew_grace=D(minutes=5))
    text = config.to_toml()
    assert 'validity = "12h"\n' in text
    assert 'renew_grace = "5m"\n' in text
    assert "default_days" not in text
    path = tmp_path / "pki.toml"
    path.write_text(text)
    assert load_config(path) == config


def test_old_default_days_loads_as_validity(tmp_path: Path) -> None:
    """A pki.toml written before issue 14 (default_days = N) still loads, as validity Nd."""
    config = load_config(_write(tmp_path, "default_days = 30\n"))
    assert config.validity == D(days=30)
    assert config.renew_grace == D(hours=1)
    assert config.default_days == 30


def test_short_validity_without_grace_gets_a_grace_it_fits(tmp_path: Path) -> None:
    """validity 10m and no renew_grace: the default 1h is cut to the validity, not refused."""
    config = load_config(_write(tmp_path, 'validity = "10m"\n'))
    assert (config.validity, config.renew_grace) == (D(minutes=10), D(minutes=10))


@pytest.mark.parametrize(("body", "message"), [
    ('validity = "10"\n', "validity: '10' is not a duration"),
    ('validity = "30s"\n', "validity: 30s is out of range (want 1m to 36500d)"),
    ("validity = 30\n", "validity: want str, got int"),
    ('renew_grace = "forever"\n', "renew_grace: 'forever' is not a duration"),
    ('validity = "1h"\nrenew_grace = "2h"\n',
     "renew_grace: 2h is out of range (want 0s to the validity, 1h)"),
    ('validity = "1d"\ndefault_days = 1\n',
     "default_days: give validity or the older default_days, not both"),
    ("default_days = 0\n", "default_days: 0 is out of range (want 1-36500)"),
])
def test_bad_policy_in_pki_toml_names_the_key_and_file(tmp_path: Path, body: str,
                                                       message: str) -> None:
    """Every bad policy value fails the load with the key, the problem and the file."""
    path = _write(tmp_path, body)
    with pytest.raises(PKIError) as info:
        load_config(path)
    assert str(info.value).startswith(message)
    assert info.value.where == str(path)


def test_config_refuses_a_grace_longer_than_the_validity() -> None:
    """Built in code, the same bounds hold, named by key."""
    with pytest.raises(PKIError, match=r"^renew_grace: 1h is out of range"):
        PKIConfig(TRUST_DOMAIN, ORG, validity=D(minutes=10))
    with pytest.raises(PKIError, match=r"^validity: 0s is out of range"):
        PKIConfig(TRUST_DOMAIN, ORG, validity=D(0), renew_grace=D(0))
