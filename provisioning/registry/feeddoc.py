"""The fleet-state feed's documents: one format for the CA that serves them and the hub that
applies them (DESIGN section 9). Stdlib-only, like :mod:`provisioning.registry.view`, so a
gateway may import it; the signature's cryptography lives on each side (the CA signs in its
worker process, the hub verifies against ``client_ca``).

On the wire a document is a flattened JWS JSON serialization (RFC 7515 section 7.2.2)::

    {"protected": b64url(header), "payload": b64url(document), "signature": b64url(r || s)}

with the header ``{"alg": "ES256", "typ": "fleet-state+json", "x5c": [signer DER, base64]}``
(``ES384`` for a P-384 key; RFC 7518 section 3.4: the signature is ``r || s``, not DER). The
signed input is ``protected + "." + payload`` as ASCII. Any JOSE library can check it.

The document (the payload, UTF-8 JSON)::

    {"format": "fleet-state/1", "trust_domain": "fleet.acme.com",
     "version": 1234,                       # the CA's state (its registry's audit event id)
     "base": 1200,                          # 0: a full snapshot; else the version it builds on
     "issued": "2026-12-03T12:00:00.123Z",  # when signed: moves on every answer (freshness)
     "gateway": "gw-7",                     # the gateway it was served to
     "devices": {"<device id>": {"status": "active" | "suspended" | "revoked",
                                 "group": "<group>" | null, "password_hash": "scrypt$..." | null,
                                 "certificates": {"<hex serial>": "active" | "superseded"}}},
     "revoked": {"<hex serial>": {"status": "revoked" | "on_hold", "reason": "<RFC 5280 name>"
                                  | null, "revoked_at": "<ISO 8601>" | null,
                                  "device_id": "<device id>"}},
     "removed": ["<device id>"],            # delta only: devices no longer listed
     "released": ["<hex serial>"],          # delta only: serials no longer refused (hold lifted)
     "issuers": ["<base64 DER>", ...]}      # every live issuing CA, the current (signing) one
                                            # first; in every document, snapshot, delta or
                                            # heartbeat (issue 14's issuing-CA rotation)

A snapshot lists every device that has a valid certificate, a status other than active, a
group or a password hash; a device not listed is active with none of these. A delta lists each
changed device whole (its entry replaces the old one), each new or changed refusal, and what
left. ``version == base`` with nothing listed is a heartbeat: nothing changed, and ``issued``
says the CA still vouches for the state. Serials are hex, as :func:`provisioning.serial` writes
them; in memory they are integers, as a certificate carries them.

``issuers`` is standard base64 (RFC 4648 section 4, as ``x5c``) of each live issuing CA
certificate's DER: during an ``issuing-ca rotate`` overlap the new one and the old one, after
``retire`` the new one alone. It is whole in every document (never a delta), and optional
when parsing: a document from an older CA has none, which means "unknown", not "none"
(:attr:`Document.issuers` is None then, and :func:`apply` keeps what the state had).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from provisioning.errors import ProvisioningError
from provisioning.registry.view import FleetState, Revocation
from provisioning.serial import format_serial, parse_serial

__all__ = [
    "CONTENT_TYPE",
    "FORMAT",
    "JWS_TYPE",
    "Changes",
    "Device",
    "Document",
    "FeedFormatError",
    "FeedState",
    "apply",
    "b64url",
    "b64url_decode",
    "changes",
    "decode_jws",
    "document",
    "encode_jws",
    "merge",
    "parse_document",
    "state_from_view",
]

FORMAT: Final = "fleet-state/1"
JWS_TYPE: Final = "fleet-state+json"
CONTENT_TYPE: Final = "application/jose+json"
DEVICE_STATUSES: Final = frozenset({"active", "suspended", "revoked"})
CERT_STATUSES: Final = frozenset({"active", "superseded"})
REFUSED_STATUSES: Final = frozenset({"revoked", "on_hold"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*\Z")
_ISSUED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z\Z")


class FeedFormatError(ProvisioningError):
    """A feed document or envelope that is not what this module writes."""


class Device(NamedTuple):
    """One device as a gateway decides with it."""

    status: str = "active"
    group: str | None = None
    password_hash: str | None = None
    certificates: Mapping[int, str] = MappingProxyType({})  # valid serial -> active|superseded


_PLAIN: Final = Device()


@dataclass(frozen=True, slots=True)
class FeedState:
    """The fleet at one version, as the feed serves it and a hub holds it."""

    version: int
    trust_domain: str
    devices: Mapping[str, Device]  # only devices that differ from Device()
    revoked: Mapping[int, Revocation]
    issuers: tuple[bytes, ...] = ()  # live issuing CAs' DER, current first; (): unknown


@dataclass(frozen=True, slots=True)
class Changes:
    """What moved between two states: ``None`` means gone (device plain again, serial freed)."""

    devices: dict[str, Device | None] = field(default_factory=dict)
    revoked: dict[int, Revocation | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.devices or self.revoked)


@dataclass(frozen=True, slots=True)
class Document:
    """A parsed, checked document (its signature is checked before, on the envelope)."""

    version: int
    base: int  # 0: snapshot
    issued: str
    gateway: str
    trust_domain: str
    changes: Changes  # a snapshot's: everything it lists, as additions
    issuers: tuple[bytes, ...] | None = None  # DER, current first; None: the CA sent none

    @property
    def snapshot(self) -> bool:
        return self.base == 0

    @property
    def heartbeat(self) -> bool:
        return self.base == self.version and not self.changes


# -- the CA side: from the registry's view to documents ------------------------------------


def state_from_view(view_state: FleetState, version: int, trust_domain: str,
                    issuers: tuple[bytes, ...] = ()) -> FeedState:
    """The feed's state from one :meth:`FleetView.read` made with ``certificates=True``."""
    certificates = view_state.certificates or MappingProxyType({})
    ids = (set(view_state.device_status) | set(view_state.groups)
           | set(view_state.password_hashes) | set(certificates))
    devices = {
        device_id: Device(view_state.device_status.get(device_id, "active"),
                          view_state.groups.get(device_id),
                          view_state.password_hashes.get(device_id),
                          certificates.get(device_id, MappingProxyType({})))
        for device_id in ids
    }
    return FeedState(version, trust_domain, MappingProxyType(devices), view_state.revoked,
                     issuers)


def changes(old: FeedState, new: FeedState) -> Changes:
    """What turns *old* into *new*."""
    moved = Changes()
    for device_id, device in new.devices.items():
        if old.devices.get(device_id) != device:
            moved.devices[device_id] = device
    for device_id in old.devices.keys() - new.devices.keys():
        moved.devices[device_id] = None
    for serial, entry in new.revoked.items():
        if old.revoked.get(serial) != entry:
            moved.revoked[serial] = entry
    for serial in old.revoked.keys() - new.revoked.keys():
        moved.revoked[serial] = None
    return moved


def merge(steps: Iterable[Changes]) -> Changes:
    """Consecutive changes as one (the later wins per device and serial)."""
    merged = Changes()
    for step in steps:
        merged.devices.update(step.devices)
        merged.revoked.update(step.revoked)
    return merged


def document(state: FeedState, *, base: int, moved: Changes | None, issued: str,
             gateway: str) -> dict[str, Any]:
    """The document for *gateway*: a snapshot of *state* when *moved* is None (base 0), else
    the delta *moved* from *base* to ``state.version``."""
    if moved is None:
        base = 0
        moved = Changes(dict(state.devices), dict(state.revoked))
    doc: dict[str, Any] = {
        "format": FORMAT, "trust_domain": state.trust_domain, "version": state.version,
        "base": base, "issued": issued, "gateway": gateway,
        "devices": {device_id: _device_json(device)
                    for device_id, device in sorted(moved.devices.items()) if device is not None},
        "revoked": {format_serial(serial): entry._asdict()
                    for serial, entry in sorted(moved.revoked.items()) if entry is not None},
    }
    if base:
        doc["removed"] = sorted(d for d, device in moved.devices.items() if device is None)
        doc["released"] = [format_serial(s) for s, e in sorted(moved.revoked.items())
                           if e is None]
    if state.issuers:
        doc["issuers"] = [base64.b64encode(der).decode("ascii") for der in state.issuers]
    return doc


def _device_json(device: Device) -> dict[str, Any]:
    return {"status": device.status, "group": device.group,
            "password_hash": device.password_hash,
            "certificates": {format_serial(s): status
                             for s, status in device.certificates.items()}}


# -- the hub side: from documents to the state ---------------------------------------------


def parse_document(payload: bytes) -> Document:
    """Check every field's type and value; raise FeedFormatError naming the first bad one."""
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FeedFormatError(f"the document is not JSON: {exc}", "payload") from None
    doc = _object(raw, "payload")
    if doc.get("format") != FORMAT:
        raise FeedFormatError(f"want format {FORMAT!r}, got {doc.get('format')!r}", "format")
    version, base = _count(doc, "version"), _count(doc, "base")
    if base > version:
        raise FeedFormatError(f"base {base} is after version {version}", "base")
    issued = _text(doc, "issued")
    if not _ISSUED.match(issued):
        raise FeedFormatError(f"want an ISO 8601 UTC time, got {issued!r}", "issued")
    moved = Changes()
    for device_id, entry in _object(doc.get("devices", {}), "devices").items():
        moved.devices[device_id] = _device(entry, f"devices.{device_id}")
    for serial_text, entry in _object(doc.get("revoked", {}), "revoked").items():
        moved.revoked[_serial(serial_text, "revoked")] = _revocation(entry,
                                                                     f"revoked.{serial_text}")
    if base:
        for device_id in _strings(doc.get("removed", []), "removed"):
            moved.devices[device_id] = None
        for serial_text in _strings(doc.get("released", []), "released"):
            moved.revoked[_serial(serial_text, "released")] = None
    return Document(version, base, issued, _text(doc, "gateway"), _text(doc, "trust_domain"),
                    moved, _issuers(doc.get("issuers")))


def apply(state: FeedState | None, doc: Document) -> FeedState:
    """The state after *doc*: a snapshot replaces everything, a delta applies on ``doc.base``
    (the caller checks that *state* is at that version)."""
    issuers = doc.issuers if doc.issuers is not None else (
        state.issuers if state is not None else ())
    if doc.snapshot or state is None:
        devices: dict[str, Device] = {}
        revoked: dict[int, Revocation] = {}
    else:
        devices, revoked = dict(state.devices), dict(state.revoked)
    for device_id, device in doc.changes.devices.items():
        if device is None or device == _PLAIN:
            devices.pop(device_id, None)
        else:
            devices[device_id] = device
    for serial, entry in doc.changes.revoked.items():
        if entry is None:
            revoked.pop(serial, None)
        else:
            revoked[serial] = entry
    return FeedState(doc.version, doc.trust_domain, MappingProxyType(devices),
                     MappingProxyType(revoked), issuers)


def _issuers(value: object) -> tuple[bytes, ...] | None:
    """``issuers``: absent is None (unknown); else one or more base64 DER certificates."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v for v in value):
        raise FeedFormatError("want a list of one or more base64 certificates", "issuers")
    found: list[bytes] = []
    for i, text in enumerate(value):
        try:
            der = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise FeedFormatError("not standard base64", f"issuers[{i}]") from None
        if not der.startswith(b"\x30"):  # a DER SEQUENCE, as every certificate
            raise FeedFormatError("not a DER certificate", f"issuers[{i}]")
        found.append(der)
    return tuple(found)


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FeedFormatError(f"want an object, got {type(value).__name__}", where)
    return value


def _count(doc: Mapping[str, Any], key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FeedFormatError(f"want a whole number >= 0, got {value!r}", key)
    return value


def _text(doc: Mapping[str, Any], key: str, where: str | None = None) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise FeedFormatError(f"want a string, got {value!r}", where or key)
    return value


def _optional_text(doc: Mapping[str, Any], key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise FeedFormatError(f"want a string or null, got {value!r}", f"{where}.{key}")
    return value


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FeedFormatError("want a list of strings", where)
    return value


def _serial(text: str, where: str) -> int:
    try:
        return parse_serial(text)
    except ValueError:
        raise FeedFormatError(f"not a hex serial: {text!r}", where) from None


def _one_of(value: object, allowed: frozenset[str], where: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise FeedFormatError(f"want one of {sorted(allowed)}, got {value!r}", where)
    return value


def _device(value: object, where: str) -> Device:
    entry = _object(value, where)
    status = _one_of(entry.get("status"), DEVICE_STATUSES, f"{where}.status")
    certificates: dict[int, str] = {}
    for serial_text, cert_status in _object(entry.get("certificates", {}),
                                            f"{where}.certificates").items():
        certificates[_serial(serial_text, f"{where}.certificates")] = _one_of(
            cert_status, CERT_STATUSES, f"{where}.certificates.{serial_text}")
    return Device(status, _optional_text(entry, "group", where),
                  _optional_text(entry, "password_hash", where), MappingProxyType(certificates))


def _revocation(value: object, where: str) -> Revocation:
    entry = _object(value, where)
    status = _one_of(entry.get("status"), REFUSED_STATUSES, f"{where}.status")
    return Revocation(status, _optional_text(entry, "reason", where),
                      _optional_text(entry, "revoked_at", where),
                      _text(entry, "device_id", f"{where}.device_id"))


# -- the envelope (RFC 7515 flattened JSON serialization) ----------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, where: str) -> bytes:
    # urlsafe_b64decode drops characters outside the alphabet instead of refusing them.
    if not _B64URL.match(text) or len(text) % 4 == 1:
        raise FeedFormatError("not base64url (RFC 7515 section 2: no padding)", where)
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise FeedFormatError("not base64url", where) from None


def encode_jws(header: Mapping[str, Any], payload: bytes,
               signature: bytes | None = None) -> tuple[bytes, bytes]:
    """``(signing input, envelope)``; sign the input, then encode again with the signature::

        signing_input, _ = encode_jws(header, payload)
        _, body = encode_jws(header, payload, sign(signing_input))
    """
    protected = b64url(json.dumps(dict(header), separators=(",", ":")).encode())
    encoded = b64url(payload)
    signing_input = f"{protected}.{encoded}".encode("ascii")
    envelope = {"protected": protected, "payload": encoded,
                "signature": b64url(signature or b"")}
    return signing_input, json.dumps(envelope, separators=(",", ":")).encode()


def decode_jws(body: bytes) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """``(header, payload, signing input, signature)`` of an envelope; nothing verified."""
    try:
        envelope = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise FeedFormatError("the answer is not a JWS JSON object (truncated?)",
                              "envelope") from None
    envelope = _object(envelope, "envelope")
    protected = _text(envelope, "protected", "envelope.protected")
    payload = _text(envelope, "payload", "envelope.payload")
    signature = b64url_decode(_text(envelope, "signature", "envelope.signature"),
                              "envelope.signature")
    try:
        header = json.loads(b64url_decode(protected, "envelope.protected"))
    except (UnicodeDecodeError, ValueError):
        raise FeedFormatError("the protected header is not JSON", "envelope.protected") from None
    return (_object(header, "envelope.protected"), b64url_decode(payload, "envelope.payload"),
            f"{protected}.{payload}".encode("ascii"), signature)
