"""``fleet-provision expiring``: what expires within a window (issue 14, DESIGN section 4).

Device certificates still in service (active, or superseded and within their renewal grace:
the registry's :meth:`~provisioning.registry.Registry.expiring`) and the CA certificates of the
trust bundle, ``ca-chain.pem`` (the root and every issuing CA a device may still chain to),
whose not-after falls within the window; those already past it are listed too and flagged,
since a device on an expired certificate is one that failed to renew. A finding is not an
error: the exit code is 0 whatever is listed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from cryptography.x509.oid import NameOID

from provisioning.authority import Authority
from provisioning.cli._common import DEFAULT_PKI, PkiOpt, emit_json, err, print_columns
from provisioning.duration import MAX_VALIDITY, format_duration, parse_duration
from provisioning.errors import PKIError, UsageError
from provisioning.serial import format_serial
from provisioning.timefmt import iso, parse_iso, utcnow

CA_STATUS = "ca"


@dataclass(frozen=True)
class Expiring:
    """One row of the listing: a device certificate, or a CA certificate (``kind="ca"``)."""

    kind: str  # "device" or "ca"
    device_id: str | None  # None for a CA
    name: str  # the device id, or the CA's common name
    serial: str
    not_after: dt.datetime
    status: str  # the registry's (active, superseded), "ca" for a CA

    def to_json(self, now: dt.datetime) -> dict[str, Any]:
        row: dict[str, Any] = {"device_id": self.device_id, "serial": self.serial,
                               "not_after": iso(self.not_after), "status": self.status,
                               "kind": self.kind, "expired": self.not_after <= now}
        if self.kind == CA_STATUS:
            row["name"] = self.name
        return row


def _ca_rows(chain: Path, cutoff: dt.datetime) -> list[Expiring]:
    try:
        certs = x509.load_pem_x509_certificates(chain.read_bytes())
    except (OSError, ValueError) as exc:
        raise PKIError(f"cannot read the CA certificates: {exc}", str(chain)) from None
    rows: dict[int, Expiring] = {}
    for cert in certs:
        if cert.not_valid_after_utc > cutoff:
            continue
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(names[0].value) if names else cert.subject.rfc4514_string()
        rows[cert.serial_number] = Expiring(CA_STATUS, None, name,
                                            format_serial(cert.serial_number),
                                            cert.not_valid_after_utc, CA_STATUS)
    return list(rows.values())


def _left(delta: dt.timedelta) -> str:
    """``29d 23h``, ``3h 12m``, ``45s``; ``expired 2h 3m ago`` for a past not-after."""
    seconds = int(abs(delta.total_seconds()))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(parts) == 2:
            break
    text = " ".join(parts)
    return f"expired {text} ago" if delta <= dt.timedelta(0) else text


def expiring(
    pki: PkiOpt = DEFAULT_PKI,
    within: Annotated[str, typer.Option("--within", metavar="DURATION",
                                        help="The window from now: 30d, 12h, 10m.")] = "30d",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """List device and CA certificates that expire within the window, or already have.

    Device certificates in service (active, superseded) and the CA certificates of
    ca-chain.pem; revoked and held ones are left out. Exit 0 whatever is found.

    Example: fleet-provision expiring --pki fleet-pki --within 7d --json
    """
    window = parse_duration(within, "--within")
    if window > MAX_VALIDITY:
        raise UsageError(f"{format_duration(window)} is out of range (want 0s to "
                         f"{format_duration(MAX_VALIDITY)})", "--within")
    now = utcnow().replace(microsecond=0)
    cutoff = now + window
    with Authority(pki) as authority:
        devices = [Expiring("device", row.device_id, row.device_id, row.serial,
                            parse_iso(row.not_after), row.status)
                   for row in authority.registry.expiring(iso(cutoff))]
        cas = _ca_rows(authority.paths.chain, cutoff)
    rows = sorted(devices + cas, key=lambda r: (r.not_after, r.kind, r.name, r.serial))
    if as_json:
        emit_json([row.to_json(now) for row in rows])
    else:
        print_columns(("device", "serial", "not after", "status", "left"),
                      [(row.name, row.serial, iso(row.not_after), row.status,
                        _left(row.not_after - now)) for row in rows])
    expired = sum(1 for row in rows if row.not_after <= now)
    err.print(f"{len(rows)} certificate(s) expire within {format_duration(window)} "
              f"(by {iso(cutoff)}), {expired} already expired: {len(devices)} of devices, "
              f"{len(cas)} of CAs", markup=False)
