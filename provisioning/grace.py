"""The superseded grace (DESIGN section 10): a renewed certificate's predecessor stays valid
for the fleet's ``renew_grace``, then is revoked with reason ``superseded``.

A renewal marks the certificate it replaces ``superseded`` and records when
(``certificates.superseded_at``, :mod:`provisioning.chunk`); the device has the grace to move
its sessions to the new certificate. Nothing expires by itself at the end of the grace: the
old certificate keeps its not-after, so the end is a revocation, made by :func:`revoke_due`
in one transaction with one audit event per certificate (``certificate.revoke``, actor
``policy``, reason superseded: RFC 5280 §5.3.1 CRLReason 4), and the CRL re-signed when it
revoked anything; OCSP and the fleet-state feed read the same rows. The enrollment service
runs it every :func:`sweep_interval` (:mod:`provisioning.est.engine`); ``fleet-provision
crl`` runs it before it signs (:meth:`provisioning.authority.Authority.publish_crl`), and
every other command that writes the registry at its start (``provisioning/cli/_common.py``:
one indexed read when nothing is due; a command that needs no CA key sweeps only when the
issuing key opens without a passphrase, since the CRL is re-signed with the sweep).

Times are whole seconds (``superseded_at`` is ISO 8601 text), so a certificate is due only
when a whole grace has passed since the second after its renewal: never early, at most a
second plus the sweep interval late.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from provisioning.duration import format_duration
from provisioning.registry.schema import SUPERSEDED_REASON
from provisioning.registry.store import Registry
from provisioning.registry.transactions import Transaction
from provisioning.timefmt import iso

POLICY_ACTOR = "policy"  # the audit actor of what the fleet's policy does by itself
SWEEP_MAX_SECONDS = 30.0
SWEEP_MIN_SECONDS = 1.0


@dataclass(frozen=True)
class Superseded:
    """A certificate the sweep revoked: its grace counted from ``superseded_at``."""

    device_id: str
    serial: str
    superseded_at: str


def sweep_interval(grace: dt.timedelta) -> float:
    """How often the service sweeps: a quarter of the grace, 1 s to 30 s, so a certificate
    is revoked at most a quarter grace late (30 s for the default hour)."""
    return max(SWEEP_MIN_SECONDS, min(SWEEP_MAX_SECONDS, grace.total_seconds() / 4))


def _cutoff(grace: dt.timedelta, now: dt.datetime) -> str:
    # Strictly before: superseded_at is truncated to the second, so "<=" could end a grace
    # up to a second early.
    return iso(now - grace)


def any_due(registry: Registry, grace: dt.timedelta, now: dt.datetime) -> bool:
    """A read without the write lock: is any superseded certificate's grace over?"""
    return registry.superseded_due(_cutoff(grace, now), limit=1) != []


def revoke_due(tx: Transaction, grace: dt.timedelta, now: dt.datetime) -> list[Superseded]:
    """Revoke, in *tx*, every superseded certificate whose grace ended by *now*; each one
    audited. The caller re-signs the CRL in the same transaction when this returns any."""
    stamp = iso(now)
    swept = [Superseded(device_id, serial, at)
             for serial, device_id, at in tx.superseded_due(_cutoff(grace, now))]
    shown = format_duration(grace)
    for cert in swept:
        tx.revoke(cert.serial, stamp, SUPERSEDED_REASON)
        tx.audit(stamp, "certificate.revoke", cert.device_id, cert.serial,
                 {"reason": SUPERSEDED_REASON, "superseded_at": cert.superseded_at,
                  "renew_grace": shown}, actor=POLICY_ACTOR)
    return swept

