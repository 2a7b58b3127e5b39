"""A device certificate's DER without cryptography's builder, for :class:`provisioning.template.
DeviceTemplate`: the fixed parts cut from a first certificate (:class:`Layout`, :func:`cut`)
and the per-device parts encoded into them; PEM armour, SubjectPublicKeyInfo and the key
identifier read from it. Moved out of profile.py as it was (issue 12); profile re-exports it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from provisioning import der
from provisioning.config import PKIConfig
from provisioning.identity import is_valid_device_id, spiffe_id

IssuablePublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
_ISSUABLE = (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, rsa.RSAPublicKey)
_CN = der.oid("2.5.4.3")
_SAN = der.oid("2.5.29.17")
_SKI = der.oid("2.5.29.14")
_URI = 0x86  # GeneralName uniformResourceIdentifier: [6] IMPLICIT IA5String


def encodable(device_id: str, public_key: object) -> bool:
    """What the template encodes itself: a valid device id is ASCII, 1-64 characters (the
    CN length CertificateBuilder enforces), and is a valid URI path segment as it is."""
    return (type(device_id) is str and is_valid_device_id(device_id)
            and isinstance(public_key, _ISSUABLE))


@dataclass(frozen=True)
class Layout:
    """The fixed byte parts of one template's certificates, cut from its first one."""

    version: bytes  # [0] EXPLICIT INTEGER
    middle: bytes  # signature AlgorithmIdentifier, issuer Name, validity
    subject_head: bytes  # the subject's RDNs before the CN's: the organisation
    uri_prefix: bytes  # spiffe://<trust domain>/device/
    extensions_head: bytes  # the extensions between the SAN and the SKI
    extensions_tail: bytes  # the extensions after the SKI
    signature_algorithm: bytes  # the Certificate's signatureAlgorithm

    def tbs(self, device_id: str, serial: int, spki: bytes, key_id: bytes) -> bytes:
        """TBSCertificate: the per-device parts as ``device_certificate`` encodes them."""
        tlv = der.tlv
        cn = device_id.encode("ascii")  # encodable: a device id is ASCII
        # Name: ..., RDN SET { AttributeTypeAndValue { id-at-commonName, UTF8String } }
        subject = tlv(0x30, self.subject_head + tlv(0x31, tlv(0x30, _CN + tlv(0x0C, cn))))
        # Extension { extnID, extnValue OCTET STRING }, not critical: no BOOLEAN (DER)
        san = tlv(0x30, _SAN + tlv(0x04, tlv(0x30, tlv(_URI, self.uri_prefix + cn))))
        ski = tlv(0x30, _SKI + tlv(0x04, tlv(0x04, key_id)))
        extensions = der.explicit(3, tlv(0x30, san + self.extensions_head + ski
                                         + self.extensions_tail))
        return tlv(0x30, self.version + der.integer(serial) + self.middle + subject + spki
                   + extensions)

    def wrap(self, tbs: bytes, signature: bytes) -> bytes:
        """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }."""
        return der.tlv(0x30, tbs + self.signature_algorithm + der.bit_string(signature))


def cut(whole: bytes, config: PKIConfig) -> Layout | None:
    """*whole* (a certificate's DER) cut into a :class:`Layout`, or None when it is not
    laid out as expected: a CN RDN last in the subject, the SAN first among the extensions
    and one SKI after it. The proof in :meth:`provisioning.template.DeviceTemplate._prove`
    checks the rest."""
    top = der.header(whole, 0, der.SEQUENCE)
    if top is None or top[2] != len(whole):
        return None
    parts = der.children(whole, top[1], top[2])
    if parts is None or len(parts) != 3 or parts[0][0] != der.SEQUENCE:
        return None
    fields = der.children(whole, parts[0][2], parts[0][3])
    if fields is None or [f[0] for f in fields] != [0xA0, der.INTEGER, *[der.SEQUENCE] * 5,
                                                    0xA3]:
        return None
    version, _, _, _, validity_, subject, _, extensions = fields
    rdns = der.children(whole, subject[2], subject[3])
    if not rdns or not whole.startswith(_CN, rdns[-1][2] + 2):  # SET { SEQUENCE { CN
        return None
    wrapper = der.header(whole, extensions[2], der.SEQUENCE)
    if wrapper is None or wrapper[2] != extensions[3]:
        return None
    items = der.children(whole, wrapper[1], wrapper[2])
    if not items:
        return None
    # Extension ::= SEQUENCE { extnID OBJECT IDENTIFIER, ... }: which one each is
    kinds = [_SAN if whole.startswith(_SAN, item[2]) else
             _SKI if whole.startswith(_SKI, item[2]) else b"" for item in items]
    if kinds[0] != _SAN or kinds.count(_SAN) != 1 or kinds.count(_SKI) != 1:
        return None
    ski = kinds.index(_SKI)
    return Layout(
        version=whole[version[1]:version[3]],
        middle=whole[fields[2][1]:validity_[3]],
        subject_head=whole[rdns[0][1]:rdns[-1][1]],
        uri_prefix=spiffe_id(config.trust_domain, "").encode("ascii"),
        extensions_head=whole[items[1][1]:items[ski][1]],
        extensions_tail=whole[items[ski][3]:wrapper[2]],
        signature_algorithm=whole[parts[1][1]:parts[1][3]],
    )


def certificate_pem(certificate_der: bytes) -> str:
    """``Certificate.public_bytes(Encoding.PEM)`` of this DER, without parsing it: base64
    in lines of 64 characters (48 octets each) between the RFC 7468 labels."""
    body = der.base64_lines(certificate_der).decode("ascii")
    return f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"


def public_key_der(public_key: IssuablePublicKey) -> bytes:
    """The key's DER SubjectPublicKeyInfo, as a certificate carries it."""
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


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


def _spki_key_bits(data: bytes) -> bytes | None:
    """SEQUENCE { AlgorithmIdentifier SEQUENCE, subjectPublicKey BIT STRING }: the key bits,
    or None when *data* is not laid out so (then the caller asks cryptography)."""
    outer = der.header(data, 0, der.SEQUENCE)
    if outer is None or outer[2] != len(data):
        return None
    algorithm = der.header(data, outer[1], der.SEQUENCE)
    if algorithm is None:
        return None
    bits = der.header(data, algorithm[2], der.BIT_STRING)
    if bits is None or bits[2] != len(data) or bits[2] - bits[1] < 1 or data[bits[1]] != 0:
        return None
    return data[bits[1] + 1:]
