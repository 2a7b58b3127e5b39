"""Building and publishing the CRL: one at a time, numbered monotonically (RFC 5280 §5.2.3).

``crl.pem`` holds one PEM CRL per live issuing CA, the current one first: while an
``issuing-ca rotate`` overlap lasts, the retiring CA keeps signing the CRL of its own
certificates (each CRL lists only its issuer's serials, ``certificates.issuer_key_id``).
All of them are signed in one publication, share its CRL number, and replace the file
together (contract C1 of session 6).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from provisioning.config import PKIConfig
from provisioning.fsutil import atomic_write
from provisioning.pki import IssuingCA
from provisioning.registry.schema import CERT_ON_HOLD, HOLD_REASON
from provisioning.registry.transactions import Transaction
from provisioning.serial import parse_serial

# RFC 5280 §5.3.1 names, as an operator types them.
REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
# certificateHold belongs to suspend/resume; removeFromCRL only exists in delta CRLs.
REVOKE_REASONS = tuple(name for name in REASONS if name != "certificateHold")


def reason_name(text: str) -> str | None:
    """Canonical RFC 5280 name for *text*, forgiving case, '-' and '_' (key-compromise)."""
    folded = text.replace("-", "").replace("_", "").lower()
    for name in REVOKE_REASONS:
        if name.lower() == folded:
            return name
    return None


def _current_file_number(path: Path) -> int:
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except (FileNotFoundError, ValueError, x509.ExtensionNotFound):
        return 0


def publish_crl(
    tx: Transaction, ca: IssuingCA, config: PKIConfig, crl_path: Path, now: dt.datetime,
    extra_out: Path | None = None, *, others: Sequence[IssuingCA] = (),
) -> x509.CertificateRevocationList:
    """Build the CRL of *ca* (and of each retiring CA in *others*) from the registry as *tx*
    sees it and replace ``crl.pem`` atomically; returns *ca*'s.

    Called inside the write transaction that changed the revocation state, so two
    processes can never publish out of order. The number is one past both the registry's
    and the file's, which keeps it monotonic even if a crash fell between file and commit.
    """
    number = max(tx.crl_number(), _current_file_number(crl_path)) + 1
    crl = _signed(tx, ca, config, now, number, unstamped=True)
    pem = crl.public_bytes(serialization.Encoding.PEM) + b"".join(
        _signed(tx, other, config, now, number, unstamped=False)
        .public_bytes(serialization.Encoding.PEM) for other in others)
    atomic_write(crl_path, pem)
    if extra_out is not None:
        atomic_write(extra_out, pem)
    tx.set_crl_number(number)
    return crl


def _signed(tx: Transaction, ca: IssuingCA, config: PKIConfig, now: dt.datetime, number: int,
            *, unstamped: bool) -> x509.CertificateRevocationList:
    """*ca*'s CRL: its own revoked and held certificates (*unstamped*: with the rows from
    before the registry recorded issuers, which are the current CA's)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(hours=config.crl_lifetime_hours))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca.ski),
            critical=False,
        )
    )
    for serial, status, revoked_at, reason in tx.crl_entries(
            now.strftime("%Y-%m-%dT%H:%M:%SZ"), ca.key_id, unstamped=unstamped):
        flag = REASONS[HOLD_REASON] if status == CERT_ON_HOLD else REASONS.get(
            reason or "unspecified", x509.ReasonFlags.unspecified)
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(parse_serial(serial))
            .revocation_date(dt.datetime.strptime(revoked_at, "%Y-%m-%dT%H:%M:%SZ")
                             .replace(tzinfo=dt.UTC))
        )
        # RFC 5280 §5.3.1: omit reasonCode rather than use "unspecified".
        if flag is not x509.ReasonFlags.unspecified:
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca.key, hashes.SHA256())
