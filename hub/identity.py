"""Who a verified client certificate names: the device id of DESIGN section 1, and its serial."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from provisioning.identity import parse_spiffe_id, serial_hex


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """The device a connection proved to be, from its TLS certificate alone."""

    device_id: str
    serial: int
    not_after: float  # unix time: when the session must be closed
    fingerprint: str
    # The <domain> of its spiffe://<domain>/device/<id>; last and defaulted, so the
    # positional four-field form (an unidentified serial) still builds one.
    trust_domain: str = ""

    @property
    def serial_hex(self) -> str:
        return serial_hex(self.serial)


@dataclass(frozen=True, slots=True)
class IdentityProblem:
    """Why a certificate that passed TLS still names no device (reason ``bad-identity``)."""

    detail: str
    serial: int | None = None


def identity_from_der(der: bytes | None) -> DeviceIdentity | IdentityProblem:
    """SAN URI ``spiffe://<domain>/device/<id>`` and CN must both name the same device.

    The domain is returned, not judged: whether it is the fleet's is the gatekeeper's check
    (``wrong-trust-domain``), so the refusal names the device it was.
    """
    if not der:
        return IdentityProblem("no client certificate on this connection")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        return IdentityProblem(f"certificate cannot be parsed: {exc}")
    serial = cert.serial_number
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        return IdentityProblem("certificate has no subjectAltName", serial)
    except ValueError as exc:
        return IdentityProblem(f"certificate extensions are malformed: {exc}", serial)
    devices = [parsed for parsed in map(parse_spiffe_id, uris) if parsed is not None]
    if len(devices) != 1:
        return IdentityProblem(f"want exactly one device SPIFFE URI in the SAN, got "
                               f"{len(devices)} among {len(uris)} URI(s)", serial)
    trust_domain, device_id = devices[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [device_id]:
        return IdentityProblem(f"CN {cns!r} does not match SAN device {device_id!r}", serial)
    return DeviceIdentity(device_id, serial, cert.not_valid_after_utc.timestamp(),
                          cert.fingerprint(hashes.SHA256()).hex(), trust_domain)
