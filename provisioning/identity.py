"""The device identity convention, shared by the CA, the hub and the simulator.

Pure functions only: the hub imports this module without the rest of the CA.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re

from provisioning.serial import format_serial

DEVICE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_DEVICE_ID_RE = re.compile(rf"^{DEVICE_ID_PATTERN}$")
# A SPIFFE trust domain is a lowercase DNS-like name (SPIFFE ID spec, section 2.1).
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?$")
_SPIFFE_PREFIX = "spiffe://"
_DEVICE_PATH = "/device/"
_GATEWAY_PATH = "/gateway/"
# RFC 1123 section 2.1: a host name is dot-separated labels of letters, digits and hyphens,
# 1-63 characters each, no hyphen first or last (a digit may come first), at most 253 in all
# (255 octets on the wire, RFC 1035 section 2.3.4, less the length octets).
HOST_NAME_MAX = 253
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$", re.IGNORECASE)


def is_valid_device_id(value: str) -> bool:
    """True when *value* may name a device (DESIGN section 1)."""
    return _DEVICE_ID_RE.fullmatch(value) is not None


def device_id_problem(value: str) -> str | None:
    """Why *value* is not a device id, or None when it is one."""
    if is_valid_device_id(value):
        return None
    shown = value if len(value) <= 80 else value[:77] + "..."
    return f"{shown!r} is not a valid device id (want {DEVICE_ID_PATTERN}, 1-64 characters)"


def is_valid_trust_domain(value: str) -> bool:
    """True for a SPIFFE trust domain name such as ``fleet.example.com``."""
    return _TRUST_DOMAIN_RE.fullmatch(value) is not None


def spiffe_id(trust_domain: str, device_id: str) -> str:
    """The SAN URI that names *device_id* in *trust_domain*."""
    return f"{_SPIFFE_PREFIX}{trust_domain}{_DEVICE_PATH}{device_id}"


def gateway_spiffe_id(trust_domain: str, host: str) -> str:
    """The SAN URI that names a gateway (hub): its identity toward the CA's services."""
    return f"{_SPIFFE_PREFIX}{trust_domain}{_GATEWAY_PATH}{host}"


def normalise_host_name(value: str) -> str:
    """The one spelling a host name is certified under: lowercase, without the root's dot.

    DNS names compare case-insensitively and ``gw1.example.com.`` (absolute) names the same
    host as ``gw1.example.com``; a certificate carries the relative form (RFC 5280 4.2.1.6
    wants the preferred name syntax), and the SPIFFE path segment must not vary with either.
    """
    return value.lower().removesuffix(".")


def host_name_problem(value: str) -> str | None:
    """Why *value* is not a host name for a server certificate, or None.

    Refused besides bad RFC 1123 labels: path characters (the name also becomes a SPIFFE
    path segment), IP addresses (they belong in an IP SAN, ``--ip``) and an all-numeric last
    label (RFC 3696 section 2: no top-level domain is, so ``1.2.3`` is a mistyped address).
    """
    shown = value if len(value) <= 80 else value[:77] + "..."
    if not value:
        return "the host name is empty"
    if len(value) > HOST_NAME_MAX:
        return f"{shown!r} is {len(value)} characters long; want at most {HOST_NAME_MAX}"
    if _is_ip_address(value):
        return f"{shown!r} is an IP address, not a host name; give it with --ip"
    for char in ("/", "\\", "%", "?", "#", "@", ":"):
        if char in value:
            return f"{shown!r} contains {char!r}; a host name has no path or URL characters"
    labels = value.split(".")
    for label in labels:
        if not label:
            return f"{shown!r} has an empty label; want labels between single dots"
        if _LABEL_RE.fullmatch(label) is None:
            return (f"{shown!r} has the label {label!r}; want RFC 1123 labels: letters, "
                    "digits and inner hyphens, 1-63 characters each")
    if labels[-1].isdigit():
        return f"{shown!r} ends in the all-numeric label {labels[-1]!r}; no top-level domain is"
    return None


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def parse_spiffe_id(uri: str) -> tuple[str, str] | None:
    """Split a device SPIFFE ID into (trust domain, device id); None when it is not one."""
    if not uri.startswith(_SPIFFE_PREFIX):
        return None
    rest = uri[len(_SPIFFE_PREFIX) :]
    domain, sep, device_id = rest.partition(_DEVICE_PATH)
    if not sep or not is_valid_trust_domain(domain) or not is_valid_device_id(device_id):
        return None
    return domain, device_id


# The hub's name for format_serial (hub/identity.py imports it from here).
serial_hex = format_serial


# -- the optional MQTT password (second factor) -------------------------------------------------
# Stored as "scrypt$N$r$p$salt_hex$hash_hex"; the hub verifies with the same pure function, so
# a gateway needs neither the CA nor a shared library beyond hashlib.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(secret: str, salt: bytes | None = None) -> str:
    """A salted scrypt hash of *secret* for the registry; the secret itself is never stored."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R,
                            p=_SCRYPT_P, dklen=32)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(secret: str, stored: str) -> bool:
    """Constant-time check of *secret* against a :func:`hash_password` string."""
    try:
        scheme, n, r, p, salt_hex, digest_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(secret.encode("utf-8"), salt=bytes.fromhex(salt_hex),
                                n=int(n), r=int(r), p=int(p), dklen=len(digest_hex) // 2)
    except ValueError:
        return False
    return hmac.compare_digest(digest, bytes.fromhex(digest_hex))
