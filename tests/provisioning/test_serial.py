"""Serials as text: one formatter, one parser (provisioning.serial)."""

from __future__ import annotations

import pytest

from provisioning.serial import format_serial, parse_serial


@pytest.mark.parametrize(("number", "text"), [
    (0x1, "01"), (0xABC, "0abc"), (0x1ABC, "1abc"), (0, "00"),
    (2**159 + 5, format(2**159 + 5, "x")),
])
def test_format_serial_is_lowercase_hex_in_whole_octets(number: int, text: str) -> None:
    """DESIGN section 4: lowercase hex without separators, as openssl x509 -serial prints it."""
    assert format_serial(number) == text
    assert len(format_serial(number)) % 2 == 0


@pytest.mark.parametrize("text", ["3F:9A:01", "3f9a01", "0x3F9A01", " 3f9a01\n", "03f9a01"])
def test_parse_serial_accepts_what_operators_paste(text: str) -> None:
    """Any case, ':' separators, 0x, blanks around it."""
    assert parse_serial(text) == 0x3F9A01


@pytest.mark.parametrize("text", ["", "  ", "0x", "xyz", "3f 9a"])
def test_parse_serial_refuses_what_is_not_hex(text: str) -> None:
    """Empty or non-hex text is a ValueError (the CLI turns it into a usage error)."""
    with pytest.raises(ValueError, match=r"serial|invalid literal"):
        parse_serial(text)


def test_parse_and_format_are_inverse() -> None:
    """A stored serial parses back to the certificate's number and formats to itself."""
    for number in (1, 255, 256, 2**63, 2**159 - 1):
        assert parse_serial(format_serial(number)) == number
        assert format_serial(parse_serial(format_serial(number))) == format_serial(number)


def test_old_names_still_work() -> None:
    """hub/identity.py and device_sim import serial_hex from identity / issuer."""
    from provisioning.identity import serial_hex
    from provisioning.issuer import serial_hex as issuer_serial_hex

    assert serial_hex is format_serial
    assert issuer_serial_hex is format_serial
