"""What batch issuance works with: the options, each CSR's result, one chunk's clock, and
a CSR that passed the policy on its way to a certificate (:mod:`provisioning.issuer`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from provisioning.config import PKIConfig
from provisioning.pki import IssuingCA
from provisioning.profile import IssuablePublicKey, validity
from provisioning.template import DeviceTemplate
from provisioning.timefmt import iso

Status = Literal["issued", "existing", "rejected"]


@dataclass(frozen=True)
class SignResult:
    """The outcome for one CSR, as ``sign --json`` prints it."""

    source: str
    device_id: str | None
    status: Status
    serial: str | None = None
    reason: str | None = None
    # The certificate (PEM) for "issued" and "existing": what the enrollment service returns.
    pem: str | None = field(default=None, repr=False, compare=False)
    # Something asked for but not done, the CSR still accepted: a --group that an existing
    # device keeps its own group against (issue 11 defect 12: it was ignored silently).
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """DESIGN section 4's keys; ``note`` is added only when there is one."""
        row: dict[str, Any] = {"source": self.source, "device_id": self.device_id,
                               "status": self.status, "serial": self.serial,
                               "reason": self.reason}
        if self.note is not None:
            row["note"] = self.note
        return row


@dataclass(frozen=True)
class SignOptions:
    manifest: frozenset[str] | None = None
    group: str | None = None
    validity: dt.timedelta | None = None  # None: the fleet's (PKIConfig.validity)
    out_dir: Path | None = None
    renew: bool = False


# From this lifetime up, validity counts from the minute: at most 0.07% of it is lost.
MINUTE_GRAIN = dt.timedelta(days=1)


@dataclass(frozen=True)
class Window:
    """One chunk's clock: its certificates share the times, so they are formatted once."""

    stamp: str  # iso(now): issued_at and the audit events' time
    not_before_iso: str
    not_after_iso: str
    template: DeviceTemplate  # device_certificate for this validity, fixed parts made once
    issuer_key_id: str  # the signing CA's key identifier (hex): certificates.issuer_key_id


def chunk_window(ca: IssuingCA, config: PKIConfig, lifetime: dt.timedelta, now: dt.datetime,
            previous: Window | None = None) -> Window:
    """Validity counts from the minute (DESIGN: back-dated "by a few minutes"), so every
    chunk of that minute shares the *previous* window's template, proven once: the enrollment
    service signs many small chunks, and building and proving a template costs about two
    certificates. A certificate of less than a day counts from the second instead: cut to
    the minute, a 1-minute certificate issued at :59 would live one second (issue 14)."""
    start = now.replace(microsecond=0)
    if lifetime >= MINUTE_GRAIN:
        start = start.replace(second=0)
    not_before, not_after = validity(ca, lifetime, start)
    if (previous is not None and previous.template.ca is ca
            and previous.template.not_before == not_before
            and previous.template.not_after == not_after):
        template = previous.template
    else:
        template = DeviceTemplate(ca, config, not_before, not_after)
    return Window(iso(now), iso(not_before), iso(not_after), template, ca.key_id)


@dataclass
class Candidate:
    source: str
    device_id: str
    key_sha256: str
    public_key: IssuablePublicKey
    spki_der: bytes  # the key's DER SubjectPublicKeyInfo: its hash above, and the SKI
    actor: str | None = None
    renews: str | None = None
    der: bytes | None = None  # the certificate, once minted
    result: SignResult | None = None
    pem: str = field(default="")
    serial: str = field(default="")  # format_serial of the certificate
    fingerprint: str = field(default="")  # SHA-256 of der, hex
