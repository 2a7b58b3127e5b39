"""The fleet-state feed's document format (provisioning/registry/feeddoc.py) and its history:
what the CA serves turns a hub's state into the CA's, as a snapshot or as deltas, through
JSON and a JWS envelope signed r||s; every malformed field is refused by its key."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.feed import jws
from provisioning.feed.history import History
from provisioning.registry.feeddoc import (
    Changes,
    Device,
    FeedFormatError,
    FeedState,
    apply,
    changes,
    decode_jws,
    document,
    encode_jws,
    merge,
    parse_document,
    state_from_view,
)
from provisioning.registry.view import FleetState, Position, Revocation

ISSUED = "2026-12-03T12:00:00.123Z"
HASH = "scrypt$16384$8$1$00$11"


def _state(version: int, devices: dict[str, Device],
           revoked: dict[int, Revocation] | None = None) -> FeedState:
    return FeedState(version, "fleet.test", MappingProxyType(devices),
                     MappingProxyType(revoked or {}))


def _device(status: str = "active", group: str | None = None, password: str | None = None,
            **certs: str) -> Device:
    return Device(status, group, password,
                  MappingProxyType({int(s, 16): v for s, v in certs.items()}))


A = _state(10, {"d1": _device(group="g", a1="active"), "d2": _device(a2="active"),
                "d3": _device("suspended")},
           {0xB1: Revocation("on_hold", "certificateHold", "2026-01-01T00:00:00Z", "d3")})
B = _state(14, {"d1": _device(group="h", a1="active"),
                "d2": _device("revoked"), "d4": _device(password=HASH, a4="active")},
           {0xA2: Revocation("revoked", "keyCompromise", "2026-01-02T00:00:00Z", "d2")})
C = _state(20, {"d1": _device(group="h", a1="superseded", c1="active"), "d2": _device("revoked"),
                "d4": _device(password=HASH, a4="active")},
           {0xA2: Revocation("revoked", "keyCompromise", "2026-01-02T00:00:00Z", "d2"),
            0xB1: Revocation("on_hold", "certificateHold", "2026-01-03T00:00:00Z", "d3")})


def _wire(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _same(got: FeedState, want: FeedState) -> None:
    assert got.version == want.version
    assert got.trust_domain == want.trust_domain
    assert dict(got.devices) == dict(want.devices)
    assert dict(got.revoked) == dict(want.revoked)


def test_a_snapshot_through_json_is_the_state() -> None:
    """A snapshot (base 0) lists everything; applied to nothing it gives the CA's state."""
    doc = parse_document(_wire(document(B, base=5, moved=None, issued=ISSUED, gateway="gw")))
    assert doc.snapshot
    assert (doc.base, doc.version, doc.gateway, doc.issued) == (0, 14, "gw", ISSUED)
    _same(apply(None, doc), B)
    _same(apply(A, doc), B)  # a snapshot replaces whatever was held


def test_a_delta_through_json_turns_the_old_state_into_the_new() -> None:
    """Changed devices whole, removed devices, new refusals and released serials."""
    raw = document(B, base=A.version, moved=changes(A, B), issued=ISSUED, gateway="gw")
    assert raw["removed"] == ["d3"]
    assert raw["released"] == ["b1"]
    doc = parse_document(_wire(raw))
    assert not doc.snapshot
    assert not doc.heartbeat
    _same(apply(A, doc), B)


def test_merged_deltas_equal_one_delta() -> None:
    """Changes A->B then B->C merged apply to A as C; the later change of a key wins."""
    moved = merge([changes(A, B), changes(B, C)])
    doc = parse_document(_wire(document(C, base=A.version, moved=moved, issued=ISSUED,
                                        gateway="gw")))
    _same(apply(A, doc), C)
    assert moved.revoked[0xB1] == C.revoked[0xB1]  # released in A->B, refused again in B->C


def test_a_heartbeat_lists_nothing() -> None:
    """version == base and no change: a heartbeat, which leaves the state as it was."""
    doc = parse_document(_wire(document(C, base=C.version, moved=Changes(), issued=ISSUED,
                                        gateway="gw")))
    assert doc.heartbeat
    _same(apply(C, doc), C)


def test_a_device_that_becomes_plain_is_dropped() -> None:
    """A delta entry equal to a plain active device removes it from the state held."""
    plain = Changes(devices={"d3": Device()})
    doc = parse_document(_wire(document(_state(11, {}), base=10, moved=plain, issued=ISSUED,
                                        gateway="gw")))
    assert "d3" not in apply(A, doc).devices


def test_state_from_view_lists_each_device_that_differs_from_plain() -> None:
    """Statuses, groups, password hashes and valid serials of the view make one Device each."""
    view = FleetState(Position(1, "7:ab"), MappingProxyType({}),
                      MappingProxyType({"s": "suspended"}), MappingProxyType({"p": HASH}),
                      MappingProxyType({"g": "grp"}),
                      MappingProxyType({"c": MappingProxyType({0xC: "active"})}))
    state = state_from_view(view, 7, "fleet.test")
    assert dict(state.devices) == {"s": Device("suspended"), "p": Device(password_hash=HASH),
                                   "g": Device(group="grp"),
                                   "c": Device(certificates=MappingProxyType({0xC: "active"}))}


def _valid() -> dict[str, Any]:
    return document(B, base=A.version, moved=changes(A, B), issued=ISSUED, gateway="gw")


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        for key in parents:
            doc = doc[key]
        doc[last] = value
    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        for key in parents:
            doc = doc[key]
        del doc[last]
    return change


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("format", _set("format", "fleet-state/2"), "format"),
    ("version negative", _set("version", -1), "version"),
    ("version text", _set("version", "14"), "version"),
    ("version bool", _set("version", True), "version"),
    ("base after version", _set("base", 15), "base"),
    ("base missing", _drop("base"), "base"),
    ("issued not ISO", _set("issued", "yesterday"), "issued"),
    ("issued not UTC", _set("issued", "2026-12-03T12:00:00+01:00"), "issued"),
    ("gateway missing", _drop("gateway"), "gateway"),
    ("trust_domain empty", _set("trust_domain", ""), "trust_domain"),
    ("devices a list", _set("devices", []), "devices"),
    ("device not an object", _set("devices/d4", "active"), "devices.d4"),
    ("device status", _set("devices/d4/status", "gone"), "devices.d4.status"),
    ("device group", _set("devices/d4/group", 7), "devices.d4.group"),
    ("device password", _set("devices/d4/password_hash", ["x"]), "devices.d4.password_hash"),
    ("certificate serial", _set("devices/d4/certificates", {"xyz": "active"}),
     "devices.d4.certificates"),
    ("certificate status", _set("devices/d4/certificates/a4", "revoked"),
     "devices.d4.certificates.a4"),
    ("revoked a list", _set("revoked", []), "revoked"),
    ("revoked serial", _set("revoked", {"not hex": {"status": "revoked", "reason": None,
                                                    "revoked_at": None, "device_id": "d2"}}),
     "revoked"),
    ("revoked status", _set("revoked/a2/status", "active"), "revoked.a2.status"),
    ("revoked reason", _set("revoked/a2/reason", 1), "revoked.a2.reason"),
    ("revoked device", _drop("revoked/a2/device_id"), "revoked.a2.device_id"),
    ("removed not strings", _set("removed", [1]), "removed"),
    ("released serial", _set("released", ["zz"]), "released"),
]


@pytest.mark.parametrize(("change", "where"), [(c, w) for _, c, w in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_parse_document_names_the_malformed_field(change: Callable[[dict[str, Any]], None],
                                                  where: str) -> None:
    """Each malformed field is refused with its key path."""
    doc = copy.deepcopy(_valid())
    change(doc)
    with pytest.raises(FeedFormatError) as caught:
        parse_document(_wire(doc))
    assert caught.value.where == where


@pytest.mark.parametrize("payload", [b"{not json", b"\xff\xfe", b"[]", b'"text"'])
def test_a_payload_that_is_no_json_object_is_refused(payload: bytes) -> None:
    """Not JSON, not UTF-8, or not an object: refused as ``payload``."""
    with pytest.raises(FeedFormatError) as caught:
        parse_document(payload)
    assert caught.value.where == "payload"


def test_a_jws_round_trip_verifies_and_tampering_does_not() -> None:
    """encode_jws -> raw r||s signature -> decode_jws gives back header, payload and input;
    the signature verifies with the signer's key, and not once the payload changed."""
    key = ec.generate_private_key(ec.SECP256R1())
    header = {"alg": "ES256", "typ": "fleet-state+json", "x5c": ["AA=="]}
    payload = _wire(_valid())
    signing_input, _ = encode_jws(header, payload)
    signature = jws.raw_signature(key, signing_input)
    assert len(signature) == 64
    _, body = encode_jws(header, payload, signature)
    got_header, got_payload, got_input, got_signature = decode_jws(body)
    assert (got_header, got_payload, got_input, got_signature) == (
        header, payload, signing_input, signature)
    assert jws.verify(key.public_key(), got_input, got_signature)
    assert jws.envelope(signing_input, signature) == body  # the service's shortcut
    envelope = json.loads(body)
    envelope["payload"] = envelope["payload"][:-4] + "AAAA"
    _, _, forged_input, forged_signature = decode_jws(json.dumps(envelope).encode())
    assert not jws.verify(key.public_key(), forged_input, forged_signature)
    other = ec.generate_private_key(ec.SECP256R1())
    assert not jws.verify(other.public_key(), got_input, got_signature)


def test_a_p384_signer_signs_es384() -> None:
    """A P-384 key gives 48+48 octets, verified with SHA-384."""
    key = ec.generate_private_key(ec.SECP384R1())
    signature = jws.raw_signature(key, b"a.b")
    assert len(signature) == 96
    assert jws.verify(key.public_key(), b"a.b", signature)


@pytest.mark.parametrize(("body", "where"), [
    (b'{"protected":"eyJh', "envelope"),
    (b"[1]", "envelope"),
    (b'{"payload":"e30","signature":""}', "envelope.protected"),
    (b'{"protected":"e30","payload":"e30","signature":"@@"}', "envelope.signature"),
    (b'{"protected":"bm90IGpzb24","payload":"e30","signature":"AA"}', "envelope.protected"),
])
def test_decode_jws_refuses_a_broken_envelope(body: bytes, where: str) -> None:
    """Truncated, not an object, a member missing, bad base64url, a header not JSON."""
    with pytest.raises(FeedFormatError) as caught:
        decode_jws(body)
    assert caught.value.where == where


def test_history_merges_the_steps_since_a_version_it_holds() -> None:
    """since(V) merges every step after V; a version never passed or dropped gives None."""
    history = History(10, keep=2)
    history.record(14, changes(A, B))
    history.record(20, changes(B, C))
    assert history.since(20) == Changes()
    assert history.since(10) == merge([changes(A, B), changes(B, C)])
    assert history.since(12) is None
    assert history.since(99) is None
    history.record(21, Changes(devices={"d9": Device("suspended")}))
    assert history.oldest == 14
    assert history.since(10) is None
    assert history.since(14) is not None
    with pytest.raises(ValueError, match="not after"):
        history.record(21, Changes())


OLD_CA, NEW_CA = b"\x30\x03\x02\x01\x01", b"\x30\x03\x02\x01\x02"  # stand-ins: DER SEQUENCEs


def _with_issuers(state: FeedState, *issuers: bytes) -> FeedState:
    return FeedState(state.version, state.trust_domain, state.devices, state.revoked, issuers)


@pytest.mark.parametrize("base", [0, 10, 14])  # snapshot, delta, heartbeat
def test_every_document_carries_the_issuers_current_first(base: int) -> None:
    """issuers (contract C1): standard base64 DER, in the state's order, in a snapshot, a
    delta and a heartbeat alike; parsed back as bytes and kept by apply."""
    state = _with_issuers(B, NEW_CA, OLD_CA)
    moved = None if base == 0 else (Changes() if base == 14 else changes(A, B))
    raw = document(state, base=base, moved=moved, issued=ISSUED, gateway="gw")
    assert raw["issuers"] == ["MAMCAQI=", "MAMCAQE="]
    doc = parse_document(_wire(raw))
    assert doc.issuers == (NEW_CA, OLD_CA)
    assert apply(_with_issuers(A, OLD_CA), doc).issuers == (NEW_CA, OLD_CA)


def test_a_document_without_issuers_means_unknown_and_keeps_what_was_held() -> None:
    """An older CA's document has no issuers: parsed as None (unknown, not none), and the
    state keeps the issuers it had; a state that never had any says ()."""
    doc = parse_document(_wire(document(B, base=0, moved=None, issued=ISSUED, gateway="gw")))
    assert "issuers" not in json.loads(_wire(document(B, base=0, moved=None, issued=ISSUED,
                                                      gateway="gw")))
    assert doc.issuers is None
    assert apply(_with_issuers(A, OLD_CA), doc).issuers == (OLD_CA,)
    assert apply(None, doc).issuers == ()


@pytest.mark.parametrize("value", [[], "MAMCAQE=", [1], [""], ["not base64!"], ["AAAA"]])
def test_malformed_issuers_are_refused_by_name(value: object) -> None:
    """Not a non-empty list of base64 DER certificates: FeedFormatError naming issuers."""
    raw = document(B, base=0, moved=None, issued=ISSUED, gateway="gw")
    raw["issuers"] = value
    with pytest.raises(FeedFormatError) as caught:
        parse_document(_wire(raw))
    assert caught.value.where is not None
    assert caught.value.where.startswith("issuers")
