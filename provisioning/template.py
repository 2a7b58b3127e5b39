"""DeviceTemplate: the device certificates of a batch encoded from one proven template, the
issuer's fast path to :func:`provisioning.profile.device_certificate` (its DER pieces are
:mod:`provisioning.certder`'s). Moved out of profile.py as it was (issue 12); ``from
provisioning.profile import DeviceTemplate`` still works."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import SignatureAlgorithmOID

from provisioning.certder import IssuablePublicKey, key_identifier, public_key_der

# Under the names DeviceTemplate has always used
from provisioning.certder import Layout as _Layout
from provisioning.certder import cut as _cut
from provisioning.certder import encodable as _encodable
from provisioning.config import PKIConfig
from provisioning.pki import IssuingCA
from provisioning.profile import device_certificate

__all__ = ["Build", "Cut", "DeviceTemplate"]

# DeviceTemplate's seams: how a certificate is built (device_certificate) and how the fixed
# parts are cut from its DER (certder.cut); tests pass their own to count or to damage.
Build = Callable[[IssuingCA, PKIConfig, str, IssuablePublicKey, int, dt.datetime, dt.datetime],
                 x509.Certificate]
Cut = Callable[[bytes, PKIConfig], _Layout | None]


class DeviceTemplate:
    """:func:`device_certificate` for many devices of one CA, configuration and validity.

    Why: cryptography's ``CertificateBuilder.sign`` spends about twice the ECDSA signature
    itself on building Python objects and encoding them, for a certificate of which all but
    five small fields are the same for every device of a batch. So the first certificate is
    built by ``device_certificate`` itself and cut into its fixed byte parts (version,
    signature algorithm, issuer, validity, the organisation in the subject, and the
    extensions that are not the device's own, in their order); every later certificate's
    TBSCertificate is those bytes plus the device's own parts encoded here with
    :mod:`provisioning.der` (serial, CN, SubjectPublicKeyInfo, SAN URI, SKI), signed with
    the issuing key (ECDSA with SHA-256, as ``device_certificate`` signs) and wrapped into
    the Certificate SEQUENCE.

    The template proves itself on that first device: it is used only if the TBS it encodes
    for it has the very bytes ``device_certificate`` built, and the Certificate it wraps
    around them and that signature the very bytes of that certificate; otherwise (another
    layout, an issuing key that is not EC, another signature algorithm) every certificate
    is built by ``device_certificate``. A device id that is not one
    (:func:`provisioning.identity.is_valid_device_id`, which the policy enforces) or a key
    type not issued here also goes to ``device_certificate``, so its checks and errors stay
    what they are. tests/provisioning/test_profile.py checks byte equality over many
    serials, ids, key types and configurations, and that the template is used.

    *build* and *cut* are seams for those tests: what builds a certificate
    (:func:`device_certificate`) and what cuts the fixed parts out of the first one's DER
    (:func:`provisioning.certder.cut`, None when it cannot).
    """

    def __init__(
        self,
        ca: IssuingCA,
        config: PKIConfig,
        not_before: dt.datetime,
        not_after: dt.datetime,
        *,
        build: Build = device_certificate,
        cut: Cut = _cut,
    ) -> None:
        self.ca = ca
        self.config = config
        self.not_before, self.not_after = not_before, not_after
        self._device_certificate, self._cut = build, cut
        self._layout: _Layout | None = None
        self._learned = False

    def certificate(
        self,
        device_id: str,
        public_key: IssuablePublicKey,
        serial: int,
        spki_der: bytes | None = None,
    ) -> x509.Certificate:
        """*spki_der*, the key's DER SubjectPublicKeyInfo when the caller has it, saves
        serializing the key again (it must be that key's: it goes into the certificate)."""
        made = self._encode(device_id, public_key, serial, spki_der)
        if made is not None:
            return x509.load_der_x509_certificate(made)  # parsed lazily by cryptography
        return self._build(device_id, public_key, serial)

    def certificate_der(
        self,
        device_id: str,
        public_key: IssuablePublicKey,
        serial: int,
        spki_der: bytes | None = None,
    ) -> bytes:
        """:meth:`certificate` as DER: what the issuer stores, hashes and writes."""
        made = self._encode(device_id, public_key, serial, spki_der)
        if made is not None:
            return made
        return self._build(device_id, public_key, serial).public_bytes(
            serialization.Encoding.DER)

    def _build(self, device_id: str, public_key: IssuablePublicKey,
               serial: int) -> x509.Certificate:
        cert = self._device_certificate(self.ca, self.config, device_id, public_key, serial,
                                        self.not_before, self.not_after)
        if not self._learned and _encodable(device_id, public_key):
            self._learned = True
            self._layout = self._prove(cert, device_id, public_key, serial)
        return cert

    def _prove(self, cert: x509.Certificate, device_id: str, public_key: IssuablePublicKey,
               serial: int) -> _Layout | None:
        """The layout of *cert*, if encoding this device again gives *cert* byte for byte."""
        if (not isinstance(self.ca.key, ec.EllipticCurvePrivateKey)
                or cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256):
            return None
        whole = cert.public_bytes(serialization.Encoding.DER)
        layout = self._cut(whole, self.config)
        if layout is None:
            return None
        spki = public_key_der(public_key)
        tbs = layout.tbs(device_id, serial, spki, key_identifier(public_key, spki).digest)
        if tbs != cert.tbs_certificate_bytes or layout.wrap(tbs, cert.signature) != whole:
            return None
        return layout

    def _encode(self, device_id: str, public_key: IssuablePublicKey, serial: int,
                spki_der: bytes | None) -> bytes | None:
        layout = self._layout
        if layout is None or not _encodable(device_id, public_key):
            return None
        # CertificateBuilder.serial_number's checks (RFC 5280 4.1.2.2: at most 20 octets)
        if serial <= 0 or serial.bit_length() >= 160:
            raise ValueError("serial must be positive and less than 160 bits")
        spki = spki_der if spki_der is not None else public_key_der(public_key)
        tbs = layout.tbs(device_id, serial, spki, key_identifier(public_key, spki).digest)
        # The same signature as sign(tbs, ECDSA(SHA256())), hashed here: a little cheaper
        return layout.wrap(tbs, self.ca.key.sign(hashlib.sha256(tbs).digest(),
                                                 _ECDSA_SHA256_PREHASHED))


_ECDSA_SHA256_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))
