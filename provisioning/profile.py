"""The certificate profiles of DESIGN section 1: what a device or hub certificate carries."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    ExtensionOID,
    NameOID,
)

from provisioning.config import PKIConfig
from provisioning.identity import spiffe_id
from provisioning.pki import IssuingCA

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
IssuablePublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


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


class DeviceTemplate:
    """:func:`device_certificate` for many devices of one CA, configuration and validity.

    The first certificate is built by ``device_certificate`` itself; the extensions it
    carries that are not the device's own (all but the SAN and the SKI) are kept, in their
    order, and every later certificate is built in one step from them plus the device's
    subject, key, serial, SAN and SKI. The template proves itself on that first device: it
    is used only if what it builds has the very TBS bytes ``device_certificate`` built (one
    extra signature per template); otherwise every certificate is built by
    ``device_certificate``. tests/provisioning/test_profile.py checks that it is used.
    """

    def __init__(
        self,
        ca: IssuingCA,
        config: PKIConfig,
        not_before: dt.datetime,
        not_after: dt.datetime,
    ) -> None:
        self.ca = ca
        self.config = config
        self.not_before, self.not_after = not_before, not_after
        # What CertificateBuilder.not_valid_before/after store: naive UTC.
        self._naive = (_naive_utc(not_before), _naive_utc(not_after))
        self._layout: tuple[list[_AnyExtension], list[_AnyExtension]] | None = None
        self._learned = False
        self._issuer = ca.cert.subject  # parsed anew on every access
        self._organisation = x509.NameAttribute(NameOID.ORGANIZATION_NAME, config.organisation)

    def certificate(
        self,
        device_id: str,
        public_key: IssuablePublicKey,
        serial: int,
        spki_der: bytes | None = None,
    ) -> x509.Certificate:
        """*spki_der*, the key's DER SubjectPublicKeyInfo when the caller has it, saves
        serializing the key again for the SKI."""
        if self._layout is None:
            cert = device_certificate(self.ca, self.config, device_id, public_key, serial,
                                      self.not_before, self.not_after)
            if not self._learned:
                self._learned = True
                layout = _fixed_extensions(cert)
                if layout is not None and self._build(
                        layout, device_id, public_key, serial, spki_der
                ).tbs_certificate_bytes == cert.tbs_certificate_bytes:
                    self._layout = layout
            return cert
        return self._build(self._layout, device_id, public_key, serial, spki_der)

    def _build(
        self,
        layout: tuple[list[_AnyExtension], list[_AnyExtension]],
        device_id: str,
        public_key: IssuablePublicKey,
        serial: int,
        spki_der: bytes | None,
    ) -> x509.Certificate:
        if serial <= 0 or serial.bit_length() >= 160:  # CertificateBuilder.serial_number's
            raise ValueError("serial must be positive and less than 160 bits")
        head, tail = layout
        builder = x509.CertificateBuilder(
            issuer_name=self._issuer,
            subject_name=x509.Name(
                [self._organisation, x509.NameAttribute(NameOID.COMMON_NAME, device_id)]
            ),
            public_key=public_key,
            serial_number=serial,
            not_valid_before=self._naive[0],
            not_valid_after=self._naive[1],
            extensions=[
                x509.Extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, False,
                               x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                                   spiffe_id(self.config.trust_domain, device_id))])),
                *head,
                x509.Extension(ExtensionOID.SUBJECT_KEY_IDENTIFIER, False,
                               key_identifier(public_key, spki_der)),
                *tail,
            ],
        )
        return builder.sign(self.ca.key, hashes.SHA256())


_AnyExtension = x509.Extension[x509.ExtensionType]


def key_identifier(
    public_key: IssuablePublicKey, spki_der: bytes | None = None
) -> x509.SubjectKeyIdentifier:
    """``SubjectKeyIdentifier.from_public_key``: SHA-1 of the subjectPublicKey bits (RFC 5280
    4.2.1.2, method 1), read from *spki_der* (the key's SubjectPublicKeyInfo) when given."""
    if spki_der is not None:
        bits = _spki_key_bits(spki_der)
        if bits is not None:
            return x509.SubjectKeyIdentifier(hashlib.sha1(bits).digest())  # noqa: S324
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _spki_key_bits(der: bytes) -> bytes | None:
    """SEQUENCE { AlgorithmIdentifier SEQUENCE, subjectPublicKey BIT STRING }: the key bits,
    or None when *der* is not laid out so (then the caller asks cryptography)."""
    outer = _der_header(der, 0, 0x30)
    if outer is None or outer[0] + outer[1] != len(der):
        return None
    algorithm = _der_header(der, outer[0], 0x30)
    if algorithm is None:
        return None
    bits = _der_header(der, algorithm[0] + algorithm[1], 0x03)
    if bits is None or bits[0] + bits[1] != len(der) or bits[1] < 1 or der[bits[0]] != 0:
        return None
    return der[bits[0] + 1:]


def _der_header(der: bytes, pos: int, tag: int) -> tuple[int, int] | None:
    """(content start, content length) of the element at *pos* if it has *tag*."""
    if pos + 2 > len(der) or der[pos] != tag:
        return None
    length = der[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(der):
            return None
        length = int.from_bytes(der[pos:pos + count], "big")
        pos += count
    return (pos, length) if pos + length <= len(der) else None


def _fixed_extensions(
    cert: x509.Certificate,
) -> tuple[list[_AnyExtension], list[_AnyExtension]] | None:
    """The extensions before and after the SKI, or None when the SAN is not first, the SKI
    not after it, or either is critical: then the template does not know this layout."""
    extensions = list(cert.extensions)
    oids = [e.oid for e in extensions]
    if (oids.count(ExtensionOID.SUBJECT_ALTERNATIVE_NAME) != 1
            or oids.count(ExtensionOID.SUBJECT_KEY_IDENTIFIER) != 1
            or oids[0] != ExtensionOID.SUBJECT_ALTERNATIVE_NAME):
        return None
    ski = oids.index(ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    if extensions[0].critical or extensions[ski].critical:
        return None
    return extensions[1:ski], extensions[ski + 1:]


def _naive_utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


def server_certificate(
    ca: IssuingCA,
    config: PKIConfig,
    host: str,
    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    public_key: ec.EllipticCurvePublicKey,
    days: int,
    now: dt.datetime,
) -> x509.Certificate:
    """A TLS server certificate for a hub: serverAuth, SAN DNS name and IP addresses."""
    not_before, not_after = validity(ca, days, now)
    names: list[x509.GeneralName] = [x509.DNSName(host)]
    names.extend(x509.IPAddress(ip) for ip in ips)
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
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_DEVICE_KU, critical=True)
    )
    builder = _common(builder, ca, public_key, config)
    return builder.sign(ca.key, hashes.SHA256())
