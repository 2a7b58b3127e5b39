"""``pki.toml``: the settings of one fleet's PKI, read into a frozen dataclass.

The fleet's policy lives here too (DESIGN section 10): ``validity`` (how long a device
certificate lives, ``365d`` by default) and ``renew_grace`` (how long a certificate replaced by
a renewal stays valid, ``1h``), both durations as :mod:`provisioning.duration` reads them.
Files written before issue 14 say ``default_days = N``; they load as ``validity = "Nd"``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioning.duration import check_grace, check_validity, format_duration, parse_duration
from provisioning.errors import PKIError, UsageError
from provisioning.identity import is_valid_trust_domain

DEFAULT_DAYS = 365
DEFAULT_VALIDITY = dt.timedelta(days=DEFAULT_DAYS)
DEFAULT_GRACE = dt.timedelta(hours=1)
DEFAULT_CRL_HOURS = 24
_KNOWN = {
    "trust_domain",
    "organisation",
    "validity",
    "renew_grace",
    "default_days",  # before issue 14; read as validity
    "crl_url",
    "ocsp_url",
    "crl_lifetime_hours",
    "station_groups",
    "manifest",
}


@dataclass(frozen=True)
class PKIConfig:
    """What every certificate and CRL of the fleet is built from."""

    trust_domain: str
    organisation: str
    # How long a device certificate lives (not-after - issue time); 1m to 36500d.
    validity: dt.timedelta = DEFAULT_VALIDITY
    # How long a certificate replaced by a renewal stays valid before it is revoked with reason
    # superseded; 0s to the validity.
    renew_grace: dt.timedelta = DEFAULT_GRACE
    crl_url: str | None = None
    ocsp_url: str | None = None
    crl_lifetime_hours: int = DEFAULT_CRL_HOURS
    # Device groups whose certificates may act as factory stations on the enrollment service.
    station_groups: tuple[str, ...] = field(default_factory=tuple)
    # The production manifest EST enrollments are held to, relative to the PKI folder.
    manifest: str | None = None

    def __post_init__(self) -> None:
        if not is_valid_trust_domain(self.trust_domain):
            raise PKIError(
                f"trust_domain: {self.trust_domain!r} is not a valid trust domain "
                "(want a lowercase DNS-style name such as fleet.example.com)"
            )
        if not self.organisation.strip():
            raise PKIError("organisation: must not be empty")
        for key in ("validity", "renew_grace"):
            if not isinstance(getattr(self, key), dt.timedelta):
                raise PKIError(f"{key}: want a duration, got {type(getattr(self, key)).__name__}")
        try:
            check_validity(self.validity, "validity")
            check_grace(self.renew_grace, self.validity, "renew_grace")
        except UsageError as exc:
            raise PKIError(f"{exc.where}: {exc.message}") from None
        if not 1 <= self.crl_lifetime_hours <= 24 * 366:
            raise PKIError(
                f"crl_lifetime_hours: {self.crl_lifetime_hours} is out of range (want 1-8784)"
            )
        for key in ("crl_url", "ocsp_url"):
            url = getattr(self, key)
            if url is not None and not url.startswith(("http://", "https://")):
                raise PKIError(f"{key}: {url!r} is not an http(s) URL")
        for group in self.station_groups:
            if not isinstance(group, str) or not group:
                raise PKIError(f"station_groups: {group!r} is not a group name")
        if self.manifest is not None and not self.manifest.strip():
            raise PKIError("manifest: must not be empty (leave the key out for no manifest)")

    @property
    def default_days(self) -> int:
        """The validity in whole days, rounded up: for callers not yet converted to
        :attr:`validity` (a ``10m`` fleet reads 1 here; use :attr:`validity`)."""
        return max(1, math.ceil(self.validity / dt.timedelta(days=1)))

    def manifest_path(self, root: Path) -> Path | None:
        """The manifest file for EST enrollments, relative paths taken from the PKI folder."""
        return root / self.manifest if self.manifest is not None else None

    def to_toml(self) -> str:
        """Serialise; TOML basic strings accept JSON string escapes, so json.dumps quotes."""
        lines = [
            "# Fleet PKI settings; read by every fleet-provision command.",
            f"trust_domain = {json.dumps(self.trust_domain)}",
            f"organisation = {json.dumps(self.organisation)}",
            "# Device certificate lifetime and how long a renewed one stays valid (DESIGN 10).",
            f"validity = {json.dumps(format_duration(self.validity))}",
            f"renew_grace = {json.dumps(format_duration(self.renew_grace))}",
            f"crl_lifetime_hours = {self.crl_lifetime_hours}",
        ]
        for key in ("crl_url", "ocsp_url"):
            value = getattr(self, key)
            if value is None:
                lines.append(f'# {key} = "http://ca.example.com:8443/{key.split("_")[0]}"')
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        groups = ", ".join(json.dumps(g) for g in self.station_groups)
        lines.append("# Device groups whose certificates may enroll others over EST (stations).")
        lines.append(f"station_groups = [{groups}]")
        if self.manifest is None:
            lines.append('# manifest = "manifest.txt"   # EST enrollments: allowed device ids')
        else:
            lines.append(f"manifest = {json.dumps(self.manifest)}")
        return "\n".join(lines) + "\n"


def load_config(path: Path) -> PKIConfig:
    """Read and validate ``pki.toml``; errors name the key and the file."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PKIError("no PKI here: pki.toml is missing", str(path)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PKIError(f"pki.toml is not valid TOML: {exc}", str(path)) from exc
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise PKIError(f"unknown key {unknown[0]!r} in pki.toml", str(path))
    try:
        validity = _validity(raw)
        grace = _duration(raw, "renew_grace")
        return PKIConfig(
            trust_domain=_get(raw, "trust_domain", str),
            organisation=_get(raw, "organisation", str),
            validity=validity,
            renew_grace=grace if grace is not None else default_grace(validity),
            crl_url=_get(raw, "crl_url", str, None),
            ocsp_url=_get(raw, "ocsp_url", str, None),
            crl_lifetime_hours=_get(raw, "crl_lifetime_hours", int, DEFAULT_CRL_HOURS),
            station_groups=tuple(_get(raw, "station_groups", list, [])),
            manifest=_get(raw, "manifest", str, None),
        )
    except PKIError as exc:
        raise PKIError(exc.message, str(path)) from None


# What ``fleet-provision policy set`` may change (DESIGN section 4), and what each one is.
# The trust domain and organisation are in every certificate, station_groups and manifest
# decide who may enroll: those are changed by editing pki.toml, not as policy.
POLICY_KEYS: dict[str, str] = {
    "validity": "device certificate lifetime (1m to 36500d)",
    "renew_grace": "a renewed certificate stays valid this long, then is revoked (superseded)",
    "crl_lifetime_hours": "CRL nextUpdate, in hours (1 to 8784)",
}


def policy_values(config: PKIConfig) -> dict[str, str | int]:
    """The policy keys' values as pki.toml spells them: durations as ``90d``, hours as int."""
    return {"validity": format_duration(config.validity),
            "renew_grace": format_duration(config.renew_grace),
            "crl_lifetime_hours": config.crl_lifetime_hours}


def with_policy(config: PKIConfig, settings: Mapping[str, str]) -> PKIConfig:
    """*config* with the policy *settings* (key -> text as typed) applied, checked as a whole.

    Raises UsageError naming the key: an unknown or unchangeable key, a value that does not
    parse, or one out of its range (renew_grace longer than the new validity included).
    """
    changes: dict[str, Any] = {}
    for key, text in settings.items():
        if key not in POLICY_KEYS:
            raise UsageError(f"{key!r} is not a policy key; want one of "
                             f"{', '.join(POLICY_KEYS)}", key)
        if key == "crl_lifetime_hours":
            if re.fullmatch(r"[0-9]{1,6}", text.strip()) is None:
                raise UsageError(f"{text!r} is not a whole number of hours", key)
            changes[key] = int(text)
        else:
            changes[key] = parse_duration(text, key)
    try:
        return dataclasses.replace(config, **changes)
    except PKIError as exc:
        key, _, message = exc.message.partition(": ")
        raise UsageError(message, key) from None


def default_grace(validity: dt.timedelta) -> dt.timedelta:
    """renew_grace when none is given: 1h, or the whole validity when that is shorter."""
    return min(DEFAULT_GRACE, validity)


def _validity(raw: dict[str, Any]) -> dt.timedelta:
    if "validity" in raw and "default_days" in raw:
        raise PKIError("default_days: give validity or the older default_days, not both")
    if "default_days" in raw:
        days = _get(raw, "default_days", int)
        if not 1 <= days <= 36500:
            raise PKIError(f"default_days: {days} is out of range (want 1-36500)")
        return dt.timedelta(days=days)
    value = _duration(raw, "validity")
    return value if value is not None else DEFAULT_VALIDITY


def _duration(raw: dict[str, Any], key: str) -> dt.timedelta | None:
    text = _get(raw, key, str, None)
    if text is None:
        return None
    try:
        return parse_duration(text, key)
    except UsageError as exc:
        raise PKIError(f"{key}: {exc.message}") from None


_MISSING = object()


def _get(raw: dict[str, Any], key: str, kind: type, default: Any = _MISSING) -> Any:
    if key not in raw:
        if default is _MISSING:
            raise PKIError(f"{key}: missing")
        return default
    value = raw[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PKIError(f"{key}: want {kind.__name__}, got {type(value).__name__}")
    return value
