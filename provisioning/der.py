"""A tiny DER encoder (X.690), enough for the EST CSR attributes body (RFC 7030 4.5.2).

cryptography has no public ASN.1 encoder and the structure is three OIDs deep, so it is
built here by hand rather than pulling in pyasn1.
"""

from __future__ import annotations

# RFC 5480 / RFC 5758 object identifiers.
ID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
SECP256R1 = "1.2.840.10045.3.1.7"
ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"

_SEQUENCE, _SET, _OID = 0x30, 0x31, 0x06


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _length(len(body)) + body


def oid(dotted: str) -> bytes:
    """OBJECT IDENTIFIER: the first two arcs share an octet, the rest base-128 (X.690 8.19)."""
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"{dotted!r} is not an object identifier")
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body.extend(reversed(chunk))
    return tlv(_OID, bytes(body))


def sequence(*items: bytes) -> bytes:
    return tlv(_SEQUENCE, b"".join(items))


def set_of(*items: bytes) -> bytes:
    """SET OF: DER orders the encoded elements (X.690 11.6)."""
    return tlv(_SET, b"".join(sorted(items)))


def attribute(attr_type: str, *values: bytes) -> bytes:
    """``Attribute ::= SEQUENCE { type OID, values SET SIZE (1..MAX) OF ANY }``."""
    return sequence(oid(attr_type), set_of(*values))


def csr_attributes() -> bytes:
    """What this CA wants in a CSR: an EC P-256 key, signed with ECDSA-SHA256.

    ``CsrAttrs ::= SEQUENCE OF AttrOrOID``; per RFC 8951 section 4 (replacing RFC 7030
    4.5.2) a key type is an attribute whose type is the algorithm and whose value its
    parameters, and a signature scheme a bare OID. Other accepted key types (P-384, Ed25519,
    RSA) stay accepted; this is the preference a client should follow.
    """
    return sequence(attribute(ID_EC_PUBLIC_KEY, oid(SECP256R1)), oid(ECDSA_WITH_SHA256))
