"""The certificate profiles of DESIGN section 1: what a device or hub certificate carries.

Built with cryptography's ``CertificateBuilder``; a batch's device certificates come from
:class:`provisioning.template.DeviceTemplate` (loaded from here on first use, as before).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    NameOID,
)

from provisioning.certder import (
    IssuablePublicKey,
    certificate_pem,
    key_identifier,
    public_key_der,
)
from provisioning.config import PKIConfig
from provisioning.identity import gateway_spiffe_id, spiffe_id
from provisioning.pki import IssuingCA

__all__ = ["BACKDATE", "IssuablePublicKey", "backdate", "certificate_pem",
           "device_certificate", "key_identifier", "public_key_der", "random_serial",
           "server_certificate", "validity"]

# Devices with slightly slow clocks must accept a certificate minted moments ago; but by no
# more than a tenth of its life: a 4-minute certificate back-dated 5 minutes would span 9, and
# a device renewing at 2/3 of that span would renew the moment it got it (issue 14).
BACKDATE = dt.timedelta(minutes=5)
BACKDATE_SHARE = 10

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


def backdate(lifetime: dt.timedelta) -> dt.timedelta:
    """How far not-before goes back: :data:`BACKDATE`, at most a tenth of *lifetime*, in
    whole seconds (a certificate's times have no finer unit)."""
    return min(BACKDATE, dt.timedelta(seconds=lifetime.total_seconds() // BACKDATE_SHARE))


def validity(
    ca: IssuingCA, lifetime: dt.timedelta, now: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    """Back-dated start; the end *lifetime* after *now*, never past the issuing CA's end
    (it could not verify then)."""
    not_after = min(now + lifetime, ca.cert.not_valid_after_utc)
    return now - backdate(lifetime), not_after


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


def server_certificate(
    ca: IssuingCA,
    config: PKIConfig,
    host: str,
    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    public_key: ec.EllipticCurvePublicKey,
    lifetime: dt.timedelta,
    now: dt.datetime,
) -> x509.Certificate:
    """A hub's certificate (DESIGN section 4): SAN DNS name, IP addresses and the gateway's
    SPIFFE ID; EKU serverAuth for its listener and clientAuth, since it is also the gateway's
    identity toward the CA's services (the fleet-state feed, section 9).

    The hub refuses it as a device: it names no ``/device/`` SPIFFE ID.
    """
    not_before, not_after = validity(ca, lifetime, now)
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


def __getattr__(name: str) -> object:
    """``profile.DeviceTemplate``, its old home: provisioning.template imports this module."""
    if name == "DeviceTemplate":
        from provisioning.template import DeviceTemplate  # noqa: PLC0415

        return DeviceTemplate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
