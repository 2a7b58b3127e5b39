"""Certificate serial numbers as text: the one place they are parsed and formatted.

Everywhere a serial leaves a certificate (the registry's ``certificates.serial``, audit
events, ``sign --json``, ``devices``, OCSP and CRL lookups, the hub's logs) it is the text of
:func:`format_serial`: lowercase hex in whole octets, no separators (DESIGN section 4), the
form ``openssl x509 -serial`` prints, lowercased, so serials compare as text anywhere.
:func:`parse_serial` turns such text, or what an operator pastes, back into the integer a
certificate or CRL entry carries.

Pure and stdlib-only: the hub and the registry's read-only view import it without the CA.
"""

from __future__ import annotations

__all__ = ["format_serial", "parse_serial"]


def format_serial(serial: int) -> str:
    """Lowercase hex in whole octets, without separators: ``0x1abc`` -> ``"1abc"``."""
    text = format(serial, "x")
    return text if len(text) % 2 == 0 else "0" + text


def parse_serial(text: str) -> int:
    """The integer of a hex serial, accepting what operators paste: any case, ``:``
    separators (``openssl x509 -text``), a ``0x`` prefix, surrounding blanks.

    Raises ValueError when *text* is empty or not hexadecimal. For text that
    :func:`format_serial` made, this is ``int(text, 16)``.
    """
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned:
        raise ValueError(f"{text!r} is not a hexadecimal serial: it is empty")
    return int(cleaned, 16)
