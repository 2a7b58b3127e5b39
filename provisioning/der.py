"""A tiny DER encoder and reader (X.690): the EST CSR attributes body (RFC 7030 4.5.2), the
per-device parts of a certificate (:class:`provisioning.template.DeviceTemplate`) and the few
fields of a CSR the policy reads without building Python objects for the whole request.

cryptography has no public ASN.1 encoder and these structures are small, so they are built
here by hand rather than pulling in pyasn1. The reader only walks DER that cryptography has
already parsed or written (a loaded CSR, a certificate it built): it checks lengths, not
every rule of X.690, and callers fall back to cryptography whenever the layout is not the
one they expect.
"""

from __future__ import annotations

import binascii

# RFC 5480 / RFC 5758 object identifiers.
ID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
SECP256R1 = "1.2.840.10045.3.1.7"
ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"

INTEGER, BIT_STRING, OCTET_STRING, OBJECT_IDENTIFIER = 0x02, 0x03, 0x04, 0x06
UTF8_STRING, PRINTABLE_STRING, IA5_STRING = 0x0C, 0x13, 0x16
SEQUENCE, SET = 0x30, 0x31
_SEQUENCE, _SET, _OID = SEQUENCE, SET, OBJECT_IDENTIFIER


def length(n: int) -> bytes:
    """A definite length: short form below 128, else 0x80 | count and big-endian octets."""
    if n < 0x80:
        return bytes((n,))
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


_length = length


def tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:  # the common case, spelled out: this runs several times per certificate
        return bytes((tag, n)) + body
    return bytes((tag,)) + length(n) + body


def integer(value: int) -> bytes:
    """INTEGER: two's complement in the fewest octets (X.690 8.3), so a positive value
    whose top bit is set gets a leading 0x00."""
    magnitude = value if value >= 0 else ~value
    return tlv(INTEGER, value.to_bytes(magnitude.bit_length() // 8 + 1, "big", signed=True))


def octet_string(body: bytes) -> bytes:
    return tlv(OCTET_STRING, body)


def bit_string(body: bytes, unused_bits: int = 0) -> bytes:
    """BIT STRING of whole octets (keys, signatures): the unused-bits octet, then *body*."""
    return tlv(BIT_STRING, bytes((unused_bits,)) + body)


def utf8_string(text: str) -> bytes:
    return tlv(UTF8_STRING, text.encode("utf-8"))


def ia5_string(text: str) -> bytes:
    return tlv(IA5_STRING, text.encode("ascii"))


def explicit(number: int, body: bytes) -> bytes:
    """``[number] EXPLICIT``: a constructed context-specific tag around a whole element."""
    return tlv(0xA0 | number, body)


def implicit(number: int, body: bytes) -> bytes:
    """``[number] IMPLICIT`` of a primitive type: the context tag replaces the type's."""
    return tlv(0x80 | number, body)


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


# -- reading ------------------------------------------------------------------------------


def header(data: bytes, pos: int, tag: int | None = None) -> tuple[int, int, int] | None:
    """(tag, content start, content end) of the element at *pos*; None when there is none,
    its tag is not *tag* (when given), it uses a high tag number or an indefinite length,
    or it runs past the end of *data*."""
    if pos + 2 > len(data):
        return None
    got = data[pos]
    if (tag is not None and got != tag) or got & 0x1F == 0x1F:
        return None
    n = data[pos + 1]
    pos += 2
    if n & 0x80:
        count = n & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            return None
        n = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    end = pos + n
    return (got, pos, end) if end <= len(data) else None


def children(data: bytes, start: int = 0, end: int | None = None
             ) -> list[tuple[int, int, int, int]] | None:
    """The elements that exactly fill ``data[start:end]``, each as (tag, element start,
    content start, end); None when they do not fill it exactly."""
    end = len(data) if end is None else end
    found: list[tuple[int, int, int, int]] = []
    pos = start
    while pos < end:
        element = header(data, pos)
        if element is None or element[2] > end:
            return None
        found.append((element[0], pos, element[1], element[2]))
        pos = element[2]
    return found


def base64_lines(data: bytes) -> bytes:
    """*data* in base64 lines of 64 characters, each ending in "\n" (48 octets a line): the
    body of a PEM block (RFC 7468) and of an EST reply (RFC 2045); empty data gives b""."""
    b2a = binascii.b2a_base64
    return b"".join([b2a(data[i:i + 48]) for i in range(0, len(data), 48)])
