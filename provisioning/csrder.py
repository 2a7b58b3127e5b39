"""A CSR's subject CNs and EC key read from its DER where it has the usual plain form, for
:class:`provisioning.policy.CSRContext`; cryptography's reading otherwise (moved out of
policy.py as they were, issue 12).
"""

from __future__ import annotations

import warnings

from cryptography import x509
from cryptography.x509.oid import NameOID

from provisioning import der

_CN = der.oid("2.5.4.3")
# The string types whose value cryptography reads as UTF-8 text (BMPString, UniversalString,
# BIT STRING and the rest are left to it).
_PLAIN_STRINGS = frozenset((der.UTF8_STRING, der.PRINTABLE_STRING, der.IA5_STRING))


def plain_common_names(data: bytes, subject: tuple[int, int, int, int]) -> list[str] | None:
    """The CN values of the subject Name at *subject* in *data*, or None unless every RDN
    holds exactly one attribute whose value is a UTF-8, printable or IA5 string of valid
    UTF-8: for such a subject cryptography gives the same list (and raises nothing); any
    other is left to it."""
    rdns = der.children(data, subject[2], subject[3])
    if rdns is None:
        return None
    names: list[str] = []
    for tag, _, start, end in rdns:
        # RDN SET OF exactly one AttributeTypeAndValue SEQUENCE { type OID, value ANY }
        atv = der.header(data, start, der.SEQUENCE) if tag == der.SET else None
        if atv is None or atv[2] != end:
            return None
        kind = der.header(data, atv[1], der.OBJECT_IDENTIFIER)
        value = der.header(data, kind[2]) if kind is not None else None
        if value is None or value[2] != end or value[0] not in _PLAIN_STRINGS:
            return None
        try:
            text = data[value[1]:value[2]].decode("utf-8")
        except UnicodeDecodeError:
            return None
        if data.startswith(_CN, atv[1]):
            names.append(text)
    return names


def _uncompressed_ec_spki(curve: str, coordinate_octets: int) -> tuple[int, bytes]:
    """(length, fixed prefix) of the SubjectPublicKeyInfo of a named-curve EC key whose
    point is uncompressed: 0x04, then X and Y."""
    point = bytes(1 + 2 * coordinate_octets)
    whole = der.sequence(der.sequence(der.oid(der.ID_EC_PUBLIC_KEY), der.oid(curve)),
                         der.bit_string(b"\x04" + point[1:]))
    return len(whole), whole[:len(whole) - len(point) + 1]


UNCOMPRESSED_EC_SPKI = dict((_uncompressed_ec_spki(der.SECP256R1, 32),
                             _uncompressed_ec_spki("1.3.132.0.34", 48)))  # P-384


def subject_common_names(csr: x509.CertificateSigningRequest) -> list[str]:
    """Every CN value of the subject, as cryptography reads it."""
    # cryptography warns on an over-long CN; policy.cn_is_device_id reports it as a
    # rejection.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        attrs = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return [a.value if isinstance(a.value, str) else a.value.decode("utf-8", "replace")
            for a in attrs]
