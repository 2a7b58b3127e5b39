"""The registry's schema: its tables and columns, the statuses, the meta keys, the version.

The one owner of these names (DESIGN section 3). The CA writes the tables only through the
named transactions of :mod:`provisioning.registry` and the hub reads them only through
:mod:`provisioning.registry.view`; both take the statuses and keys from here. Stdlib-only,
so the read-only view imports it without the CA. The tables are created by
:mod:`provisioning.registry.migrations`; ``PRAGMA user_version`` is the schema version.

``devices``
    ``device_id`` (primary key), ``status`` (:data:`DEVICE_STATUSES`), ``"group"`` (an ACL's
    ``{group}``; quoted, it is an SQL keyword), ``created_at``, ``updated_at``, ``metadata``
    (JSON), ``password_hash`` (the hub's optional second factor, ``scrypt$...``).
``certificates``
    ``serial`` (primary key, :func:`provisioning.serial.format_serial` text), ``device_id``
    (references ``devices``), ``fingerprint`` (SHA-256 of the DER, hex, unique),
    ``public_key_sha256`` (of the DER SubjectPublicKeyInfo), ``not_before``, ``not_after``,
    ``status`` (:data:`CERT_STATUSES`), ``revoked_at``, ``reason`` (RFC 5280 name),
    ``hold_prior_status`` (the status a hold returns to), ``issued_at``, ``pem``,
    ``superseded_at`` (v3: when a renewal superseded it; its ``renew_grace`` counts from
    then, :mod:`provisioning.grace`), ``issuer_key_id`` (v4: the key identifier, lowercase
    hex of the SKI, of the issuing CA that signed it, so ``issuing-ca retire``, the CRL of
    each live issuer and OCSP tell the issuers' certificates apart without parsing a PEM;
    NULL for a row written before v4, when the PKI had one issuing CA: ``issuing-ca rotate``
    stamps those with it, :mod:`provisioning.rotation`).
``events``
    The audit chain (:mod:`provisioning.registry.audit`): ``id``, ``time``, ``actor``,
    ``action``, ``device_id``, ``serial``, ``detail`` (JSON), ``prev_hash``, ``hash``.
``meta``
    ``key`` (primary key), ``value``: :data:`HEAD_KEY`, :data:`CRL_NUMBER_KEY`.
``pending_outputs``
    ``path`` (primary key), ``serial``: files a committed ``sign`` promised and writes
    right after its commit; a crash in between is finished by the next ``sign``.
``tokens`` (v2)
    ``name`` (primary key), ``hash`` (``scrypt$...``; never the secret), ``created_at``,
    ``revoked_at``.

Times are ISO 8601 UTC text (``2030-01-01T00:00:00Z``), so they compare as text.
"""

from __future__ import annotations

from typing import Final

SCHEMA_VERSION: Final = 4

# devices.status
DEVICE_ACTIVE: Final = "active"
DEVICE_SUSPENDED: Final = "suspended"
DEVICE_REVOKED: Final = "revoked"
DEVICE_STATUSES: Final = (DEVICE_ACTIVE, DEVICE_SUSPENDED, DEVICE_REVOKED)

# certificates.status
CERT_ACTIVE: Final = "active"
CERT_SUPERSEDED: Final = "superseded"  # renewed; valid for renew_grace, then revoked
CERT_ON_HOLD: Final = "on_hold"  # suspended (certificateHold); resume restores the status before
CERT_REVOKED: Final = "revoked"
CERT_STATUSES: Final = (CERT_ACTIVE, CERT_SUPERSEDED, CERT_ON_HOLD, CERT_REVOKED)
# Listed on the CRL and refused by a hub; their key is never certified again.
REFUSED_CERT_STATUSES: Final = (CERT_REVOKED, CERT_ON_HOLD)
# A device's current certificates: a CSR for another key needs --renew while one exists.
CURRENT_CERT_STATUSES: Final = (CERT_ACTIVE, CERT_ON_HOLD)
# certificates.reason of a certificate on hold (RFC 5280 §5.3.1).
HOLD_REASON: Final = "certificateHold"
# certificates.reason of a superseded certificate revoked once its renew_grace has passed.
SUPERSEDED_REASON: Final = "superseded"

# meta keys
HEAD_KEY: Final = "audit_head"  # "<last event id>:<its hash>": moved by every CA action
CRL_NUMBER_KEY: Final = "crl_number"  # the last CRL number published (RFC 5280 §5.2.3)

# The first audit event, written once by ``init``: its detail names the trust domain.
PKI_INIT_ACTION: Final = "pki.init"
