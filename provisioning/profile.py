"""The certificate profiles of DESIGN section 1: what a device or hub certificate carries."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    NameOID,
    SignatureAlgorithmOID,
)

from provisioning.certder import (
    IssuablePublicKey,
    certificate_pem,
    key_identifier,
    public_key_der,
)

# Under the names DeviceTemplate has always used
from provisioning.certder import Layout as _Layout
from provisioning.certder import cut as _cut
from provisioning.certder import encodable as _encodable
from provisioning.config import PKIConfig
from provisioning.identity import gateway_spiffe_id, spiffe_id
from provisioning.pki import IssuingCA

__all__ = ["BACKDATE", "DeviceTemplate", "IssuablePublicKey", "certificate_pem",
           "device_certificate", "key_identifier", "public_key_der", "random_serial",
           "server_certificate", "validity"]

# Devices with slightly slow clocks must accept a certificate minted moments ago.
BACKDATE = dt.timedelta(minutes=5)

_DEVICE_KU = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def random_serial() -> int:
    """159 random bits, positive (RFC 5280 §4.1.2.2 caps serials at 20 octets)."""
    return x509.random_serial_number()


def validity(
    ca: IssuingCA, days: int, now: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    """Back-dated start; the end never outlives the issuing CA (it could not verify then)."""
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    return now - BACKDATE, not_after


def _common(
    builder: x509.CertificateBuilder,
    ca: IssuingCA,
    public_key: IssuablePublicKey,
    config: PKIConfig,
) -> x509.CertificateBuilder:
    builder = (
        builder.issuer_name(ca.cert.subject)
        .public_key(public_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca.ski),
            critical=False,
        )
    )
    if config.crl_url:
        builder = builder.add_extension(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        full_name=[x509.UniformResourceIdentifier(config.crl_url)],
                        relative_name=None,
                        reasons=None,
                        crl_issuer=None,
                    )
                ]
            ),
            critical=False,
        )
    if config.ocsp_url:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.OCSP,
                        x509.UniformResourceIdentifier(config.ocsp_url),
                    )
                ]
            ),
            critical=False,
        )
    return builder


def device_certificate(
    ca: IssuingCA,
    config: PKIConfig,
    device_id: str,
    public_key: IssuablePublicKey,
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """Build and sign a device certificate; nothing from the CSR but its key and CN is used."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, config.organisation),
                    x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                ]
            )
        )
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id(config.trust_domain, device_id))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_DEVICE_KU, critical=True)
    )
    builder = _common(builder, ca, public_key, config)
    return builder.sign(ca.key, hashes.SHA256())


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


def server_certificate(
    ca: IssuingCA,
    config: PKIConfig,
    host: str,
    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    public_key: ec.EllipticCurvePublicKey,
    days: int,
    now: dt.datetime,
) -> x509.Certificate:
    """A hub's certificate (DESIGN section 4): SAN DNS name, IP addresses and the gateway's
    SPIFFE ID; EKU serverAuth for its listener and clientAuth, since it is also the gateway's
    identity toward the CA's services (the fleet-state feed, section 9).

    The hub refuses it as a device: it names no ``/device/`` SPIFFE ID.
    """
    not_before, not_after = validity(ca, days, now)
    names: list[x509.GeneralName] = [x509.DNSName(host)]
    names.extend(x509.IPAddress(ip) for ip in ips)
    names.append(x509.UniformResourceIdentifier(gateway_spiffe_id(config.trust_domain, host)))
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, config.organisation),
                    x509.NameAttribute(NameOID.COMMON_NAME, host[:64]),
                ]
            )
        )
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(_DEVICE_KU, critical=True)
    )
    builder = _common(builder, ca, public_key, config)
    return builder.sign(ca.key, hashes.SHA256())
