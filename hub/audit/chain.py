"""The seal of one audit record: why editing, removing or moving a row shows.

Each record's ``hash`` is SHA-256 over a canonical JSON array of its id, every column and the
``prev_hash`` it continues from (the hash of the record before it, :data:`GENESIS` for the
first record, or a checkpoint's head once older records are pruned). Changing any field, the
id included, changes the hash; rewriting the hash too breaks the next record's ``prev_hash``.
The same construction as the CA's registry events (provisioning/registry/audit.py), over the
hub's columns; both sides of the chain (the writer thread and ``fleet-hub events verify``) call
:func:`seal`, so there is one encoding.
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring  # the C string encoder json.dumps uses

__all__ = ["GENESIS", "seal"]

GENESIS = "0" * 64


def seal(
    record_id: int,
    time: float,
    event: str,
    device_id: str | None,
    serial: str | None,
    peer: str | None,
    reason: str | None,
    evidence: str | None,
    prev_hash: str,
) -> str:
    """The record's hash (64 hex digits); raises UnicodeError for text UTF-8 cannot encode.

    The body is ``json.dumps([id, time, event, device_id, serial, peer, reason, evidence,
    prev_hash], separators=(",", ":"), ensure_ascii=False)``. For the types the writer stores
    (an int, a float, strings and None) it is spelled out with the same C encoders, byte for
    byte the same text and several times faster; any other type (a value edited into the file
    by hand: an integer time, a blob) takes json.dumps and so seals to something else.
    """
    if (type(record_id) is int and type(time) is float and type(event) is str
            and type(prev_hash) is str
            and (device_id is None or type(device_id) is str)
            and (serial is None or type(serial) is str)
            and (peer is None or type(peer) is str)
            and (reason is None or type(reason) is str)
            and (evidence is None or type(evidence) is str)):
        body = (f"[{record_id},{float.__repr__(time)},{encode_basestring(event)},"
                f"{'null' if device_id is None else encode_basestring(device_id)},"
                f"{'null' if serial is None else encode_basestring(serial)},"
                f"{'null' if peer is None else encode_basestring(peer)},"
                f"{'null' if reason is None else encode_basestring(reason)},"
                f"{'null' if evidence is None else encode_basestring(evidence)},"
                f"{encode_basestring(prev_hash)}]")
    else:
        body = json.dumps(
            [record_id, time, event, device_id, serial, peer, reason, evidence, prev_hash],
            separators=(",", ":"), ensure_ascii=False, default=repr,
        )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()
