"""``GET /feed`` on a real ``fleet-provision serve`` (DESIGN section 9): only a gateway
certificate the CA issued may read it; a snapshot lists the fleet, signed ES256 by the issuing
CA; a revocation, a suspension or a group change wakes every waiting long-poll at once with a
delta on the old version; an idle wait ends in a heartbeat; the audit log records what each
gateway was given, never a heartbeat."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import http.client
import json
import sqlite3
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.issuer import SignOptions
from provisioning.profile import server_certificate
from provisioning.registry.feeddoc import decode_jws, parse_document
from provisioning.registry.view import FleetView
from provisioning.serial import format_serial
from provisioning.timefmt import iso, utcnow
from tests.provisioning.csrs import make_csr, make_key
from tests.provisioning.est_support import (
    NEEDS_TOOLS,
    Answer,
    Server,
    client_context,
    make_pki,
    request,
    run,
    write_identity,
)

GATEWAY = "gw-1.example.com"
DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d", "dev-f", "dev-g", "dev-h", "dev-i")


@dataclass
class Feed:
    root: Path
    pki: Path
    server: Server
    serials: dict[str, str]  # device -> hex serial
    gateway: ssl.SSLContext

    def identity(self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                 ) -> ssl.SSLContext:
        return client_context(self.pki, *write_identity(self.root, name, cert, key))

    def fetch(self, query: str = "", ctx: ssl.SSLContext | None = None) -> Answer:
        return request(self.server, "GET", f"/feed{query}", ctx=ctx or self.gateway,
                       pki=self.pki)

    def document(self, query: str = "", ctx: ssl.SSLContext | None = None) -> dict[str, Any]:
        return signed_document(self.fetch(query, ctx), self.pki)

    def version(self) -> int:
        return int(self.document("?since=0")["version"])


def signed_document(answer: Answer, pki: Path) -> dict[str, Any]:
    """The payload of a 200 answer, once its JWS signature verified with the issuing CA's
    public key (r || s re-encoded to DER, as OpenSSL wants it)."""
    assert answer.status == 200, (answer.status, answer.text)
    assert answer.headers["content-type"] == "application/jose+json"
    header, payload, signing_input, signature = decode_jws(answer.body)
    issuing = x509.load_pem_x509_certificate((pki / "issuing-ca.pem").read_bytes())
    assert header == {"alg": "ES256", "typ": "fleet-state+json", "x5c": [
        base64.b64encode(issuing.public_bytes(serialization.Encoding.DER)).decode()]}
    assert len(signature) == 64
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                               int.from_bytes(signature[32:], "big"))
    key = issuing.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))  # raises when forged
    parse_document(payload)  # what the hub does next: every field as the format wants
    return dict(json.loads(payload))


def _issue(authority: Authority, device_id: str, group: str | None = None,
           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = make_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    [made] = authority.issuer().sign([CSRInput(f"{device_id}.csr", make_csr(cn=device_id,
                                                                            key=key))],
                                     SignOptions(group=group))
    assert made.pem is not None, made.reason
    return x509.load_pem_x509_certificate(made.pem.encode()), key


def _gateway_cert(authority: Authority, name: str, *, trust_domain: str | None = None,
                  now: dt.datetime | None = None, recorded: bool = True,
                  ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate signed by the issuing key, not through ``server-cert``: another
    trust domain, back-dated, or never recorded in the registry."""
    key = ec.generate_private_key(ec.SECP256R1())
    config = authority.config
    if trust_domain is not None:
        config = dataclasses.replace(config, trust_domain=trust_domain)
    cert = server_certificate(authority.ca, config, name, [], key.public_key(),
                              dt.timedelta(days=1), now or utcnow())
    if recorded:
        with authority.registry.write("test") as tx:
            tx.audit(iso(utcnow()), "server.issue", None, format_serial(cert.serial_number),
                     {"name": name, "uri": f"spiffe://{config.trust_domain}/gateway/{name}"})
    return cert, key


def _start(root: Path) -> Feed:
    pki = make_pki(root)
    serials: dict[str, str] = {}
    with Authority(pki) as authority:
        for device_id in DEVICES:
            cert, _ = _issue(authority, device_id, "sensors" if device_id == "dev-a" else None)
            serials[device_id] = format_serial(cert.serial_number)
        authority.set_password("dev-b", "s3cret")
        authority.revoke("dev-c", None, "keyCompromise")
        authority.suspend("dev-d")
        gateway = authority.server_cert(GATEWAY, ["127.0.0.1"], root / "gw")
    return Feed(root, pki, Server(pki), serials, client_context(pki, *gateway))


@pytest.fixture(scope="module")
def feed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Feed]:
    running = _start(tmp_path_factory.mktemp("feed"))
    try:
        yield running
    finally:
        assert running.server.stop() == 0


def test_a_snapshot_at_since_0_lists_the_fleet_signed_by_the_issuing_ca(feed: Feed) -> None:
    """Devices with status, group, password hash and valid serials; revoked and held serials
    with their reasons; base 0; the gateway named by the client certificate."""
    doc = feed.document()  # since defaults to 0
    assert (doc["format"], doc["trust_domain"], doc["base"], doc["gateway"]) == (
        "fleet-state/1", "fleet.test", 0, GATEWAY)
    assert doc["version"] >= 1
    assert "removed" not in doc
    devices, revoked, serials = doc["devices"], doc["revoked"], feed.serials
    assert devices["dev-a"] == {"status": "active", "group": "sensors", "password_hash": None,
                                "certificates": {serials["dev-a"]: "active"}}
    assert devices["dev-b"]["password_hash"].startswith("scrypt$")
    assert devices["dev-c"] == {"status": "revoked", "group": None, "password_hash": None,
                                "certificates": {}}
    assert devices["dev-d"]["status"] == "suspended"
    assert revoked[serials["dev-c"]] == {"status": "revoked", "reason": "keyCompromise",
                                         "revoked_at": revoked[serials["dev-c"]]["revoked_at"],
                                         "device_id": "dev-c"}
    assert revoked[serials["dev-d"]]["status"] == "on_hold"
    assert revoked[serials["dev-d"]]["reason"] == "certificateHold"


@pytest.mark.skipif(NEEDS_TOOLS, reason="openssl required")
def test_the_signature_verifies_with_openssl(feed: Feed, tmp_path: Path) -> None:
    """The recipe of docs/enrollment.md: r || s to DER with asn1parse, then dgst -verify with
    the issuing CA's public key over ``protected.payload``."""
    envelope = json.loads(feed.fetch("?since=0").body)
    (tmp_path / "input").write_text(f"{envelope['protected']}.{envelope['payload']}")
    raw = base64.urlsafe_b64decode(envelope["signature"] + "==")
    (tmp_path / "sig.cnf").write_text(
        f"asn1=SEQUENCE:sig\n[sig]\nr=INTEGER:0x{raw[:32].hex()}\n"
        f"s=INTEGER:0x{raw[32:].hex()}\n")
    assert run("openssl", "asn1parse", "-genconf", "sig.cnf", "-out", "sig.der", "-noout",
               cwd=tmp_path).returncode == 0
    assert run("openssl", "x509", "-in", feed.pki / "issuing-ca.pem", "-pubkey", "-noout",
               "-out", "ca.pub", cwd=tmp_path).returncode == 0
    verified = run("openssl", "dgst", "-sha256", "-verify", "ca.pub", "-signature", "sig.der",
                   "input", cwd=tmp_path)
    assert verified.stdout.strip() == b"Verified OK", verified.stderr
    (tmp_path / "input").write_text(f"{envelope['protected']}.{envelope['payload']}x")
    forged = run("openssl", "dgst", "-sha256", "-verify", "ca.pub", "-signature", "sig.der",
                 "input", cwd=tmp_path)
    assert forged.returncode != 0


def test_a_revocation_wakes_a_dozen_waiting_long_polls_with_one_delta(feed: Feed) -> None:
    """Twelve gateways' long-polls on the current version (wait=1000, clamped to 60) all
    answer with the delta from that version once a device is revoked: not at the end of the
    wait (the requests time out long before 60 s)."""
    before = feed.version()
    with ThreadPoolExecutor(12) as pool:
        polls = [pool.submit(feed.fetch, f"?since={before}&wait=1000") for _ in range(12)]
        with Authority(feed.pki) as authority:
            authority.revoke("dev-f", None, "keyCompromise")
        answers = [poll.result(timeout=30) for poll in polls]
    for answer in answers:
        doc = signed_document(answer, feed.pki)
        assert doc["base"] == before
        assert doc["version"] > before
        assert doc["devices"] == {"dev-f": {"status": "revoked", "group": None,
                                            "password_hash": None, "certificates": {}}}
        assert doc["revoked"][feed.serials["dev-f"]]["reason"] == "keyCompromise"
        assert (doc["removed"], doc["released"]) == ([], [])


def test_suspend_resume_and_group_set_each_wake_a_long_poll(feed: Feed) -> None:
    """Each CA action answers the waiting poll with the delta on the version it waited on;
    a poll from the first version gets the changes of all of them merged."""
    first = feed.version()
    version = first

    def after(action: str, device_id: str) -> dict[str, Any]:
        nonlocal version
        with ThreadPoolExecutor(1) as pool:
            poll = pool.submit(feed.fetch, f"?since={version}&wait=30")
            with Authority(feed.pki) as authority:
                if action == "suspend":
                    authority.suspend(device_id)
                elif action == "resume":
                    authority.resume(device_id)
                else:
                    authority.set_group([device_id], "lab")
            doc = signed_document(poll.result(timeout=25), feed.pki)
        assert doc["base"] == version
        assert doc["version"] > version
        version = doc["version"]
        return doc

    held = after("suspend", "dev-g")
    assert held["devices"]["dev-g"]["status"] == "suspended"
    assert held["revoked"][feed.serials["dev-g"]]["status"] == "on_hold"
    resumed = after("resume", "dev-g")
    assert resumed["devices"]["dev-g"]["status"] == "active"
    assert resumed["released"] == [feed.serials["dev-g"]]
    moved = after("group", "dev-h")
    assert moved["devices"] == {"dev-h": {"status": "active", "group": "lab",
                                          "password_hash": None,
                                          "certificates": {feed.serials["dev-h"]: "active"}}}
    merged = feed.document(f"?since={first}")
    assert (merged["base"], merged["version"]) == (first, version)
    assert set(merged["devices"]) == {"dev-g", "dev-h"}
    assert merged["revoked"] == {}  # held, then released: nothing left to refuse


def test_an_idle_wait_ends_in_a_heartbeat(feed: Feed) -> None:
    """since == current: after ``wait`` seconds a heartbeat (version == base, nothing listed,
    a fresh ``issued``, strictly later for each answer); wait below 0 is clamped to 0 and
    answers at once."""
    first = feed.document("?since=0")
    version = first["version"]
    started = time.monotonic()
    beat = feed.document(f"?since={version}&wait=0.3")
    assert time.monotonic() - started >= 0.3
    assert (beat["version"], beat["base"]) == (version, version)
    assert (beat["devices"], beat["revoked"], beat["removed"], beat["released"]) == (
        {}, {}, [], [])
    assert beat["issued"] > first["issued"]
    now = feed.document(f"?since={version}&wait=-5")
    assert (now["version"], now["base"]) == (version, version)
    # Answers to one gateway within one millisecond still get strictly later times: a hub
    # refuses a document whose ``issued`` is not after the last one's (a replay).
    with ThreadPoolExecutor(8) as pool:
        beats = list(pool.map(lambda _: feed.document(f"?since={version}"), range(16)))
    times = sorted(b["issued"] for b in beats)
    assert len(set(times)) == len(times)
    assert times[0] > now["issued"]


@pytest.mark.parametrize("since", ["1", "999999999999"])
def test_a_version_the_ca_does_not_hold_gets_a_snapshot(feed: Feed, since: str) -> None:
    """Too old (a version this service never passed) or unknown (after the current one, as
    from a CA restored from backup): a full snapshot, base 0."""
    doc = feed.document(f"?since={since}")
    assert doc["base"] == 0
    assert "dev-a" in doc["devices"]


@pytest.mark.parametrize("query", ["?since=-1", "?since=abc", "?since=1.5", "?since=",
                                   "?wait=abc", "?wait=nan", "?wait=" + "9" * 30])
def test_a_bad_query_is_400(feed: Feed, query: str) -> None:
    """``since`` must be a whole number >= 0 and ``wait`` a number of seconds."""
    answer = feed.fetch(query)
    assert answer.status == 400, answer.text
    assert answer.text.startswith(("since:", "wait:"))


def test_a_large_wait_is_clamped_not_refused(feed: Feed) -> None:
    """wait=inf is 60 s; since=0 answers at once whatever the wait."""
    assert signed_document(feed.fetch("?since=0&wait=inf"), feed.pki)["base"] == 0


def test_only_a_gateway_certificate_the_ca_issued_reads_the_feed(feed: Feed) -> None:
    """403 with the reason for: no client certificate, a device certificate, an expired
    gateway certificate, one of another trust domain, one the issuing key signed but the CA
    never recorded; a gateway certificate issued while the service runs is taken at once."""
    with Authority(feed.pki) as authority:
        device = feed.identity("device", *_issue(authority, "dev-x"))
        expired = feed.identity("expired", *_gateway_cert(
            authority, "gw-old", now=utcnow() - dt.timedelta(days=30)))
        foreign = feed.identity("other-domain", *_gateway_cert(
            authority, "gw-1", trust_domain="other.test"))
        rogue = feed.identity("rogue", *_gateway_cert(authority, "gw-rogue", recorded=False))
        fresh = client_context(feed.pki, *authority.server_cert("gw-new", [],
                                                                feed.root / "new"))
    refusals = {
        "none": (client_context(feed.pki), "got no client certificate"),
        "device": (device, "is not a gateway certificate: want one SAN URI "
                           "spiffe://fleet.test/gateway/<name>, got spiffe://fleet.test/"
                           "device/dev-x"),
        "expired": (expired, "expired at"),
        "foreign": (foreign, "spiffe://other.test/gateway/gw-1"),
        "rogue": (rogue, "is no gateway certificate this CA issued"),
    }
    for name, (ctx, reason) in refusals.items():
        answer = feed.fetch("?since=0", ctx)
        assert answer.status == 403, (name, answer.status, answer.text)
        assert reason in answer.text, (name, answer.text)
        assert answer.text.count("\n") == 1
    theirs = signed_document(feed.fetch("?since=0", fresh), feed.pki)
    ours = feed.document("?since=0")
    assert (theirs["gateway"], ours["gateway"]) == ("gw-new", GATEWAY)
    assert theirs["version"] == ours["version"]  # one snapshot of this version, two names
    assert (theirs["devices"], theirs["revoked"]) == (ours["devices"], ours["revoked"])


def test_the_view_lists_the_gateways_the_ca_issued(authority: Authority,
                                                   tmp_path: Path) -> None:
    """FleetView.gateways: serial -> SPIFFE URI of each server.issue event after an event id,
    and the last id, so the next read takes only what came since."""
    cert_path, _ = authority.server_cert("gw-9.example.com", ["10.0.0.9"], tmp_path)
    serial = x509.load_pem_x509_certificates(cert_path.read_bytes())[0].serial_number
    _issue(authority, "dev-z")
    with FleetView(authority.paths.registry) as view:
        last, issued = view.gateways()
        assert issued == {serial: "spiffe://fleet.test/gateway/gw-9.example.com"}
        assert view.gateways(last) == (last, {})
        authority.server_cert("gw-10", [], tmp_path / "10")
        later, more = view.gateways(last)
    assert later > last
    assert list(more.values()) == ["spiffe://fleet.test/gateway/gw-10"]


def test_a_certificate_of_a_foreign_ca_fails_the_handshake(feed: Feed) -> None:
    """The chain is verified by TLS: a stranger never reaches the handler."""
    ca = trustme.CA()
    leaf = ca.issue_cert(GATEWAY)
    ctx = client_context(feed.pki)
    leaf.configure_cert(ctx)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        feed.fetch("?since=0", ctx)


def test_the_plain_http_listener_has_no_feed(feed: Feed) -> None:
    """/feed needs mutual TLS: the --http-bind listener (CRL and OCSP) does not serve it."""
    host, port = feed.server.http_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/feed?since=0")
        assert conn.getresponse().status == 404
    finally:
        conn.close()


def test_the_audit_log_records_state_changes_per_gateway_not_heartbeats(
        tmp_path: Path) -> None:
    """feed.fetch once per version a gateway is given (snapshot, then each delta), none for
    heartbeats or the same version again; a refusal once per peer and reason."""
    running = _start(tmp_path)
    try:
        first = running.document("?since=0")
        version = first["version"]
        for _ in range(3):
            running.document(f"?since={version}&wait=0")  # heartbeats
        running.document("?since=0")  # the same version again
        with Authority(running.pki) as authority:
            authority.revoke("dev-f", None, "keyCompromise")
            second = client_context(running.pki, *authority.server_cert(
                "gw-2", [], tmp_path / "gw2"))
        delta = running.document(f"?since={version}&wait=30")
        assert delta["base"] == version
        running.document(f"?since={delta['version']}&wait=0")  # heartbeat
        running.document("?since=0", second)
        for _ in range(3):
            assert running.fetch("?since=0", client_context(running.pki)).status == 403
    finally:
        assert running.server.stop() == 0
    conn = sqlite3.connect(running.pki / "registry.db")
    try:
        rows = conn.execute("SELECT actor, serial, detail FROM events WHERE action = "
                            "'feed.fetch' ORDER BY id").fetchall()
        paths = [json.loads(d)["path"] for (d,) in conn.execute(
            "SELECT detail FROM events WHERE action = 'http.request'")]
    finally:
        conn.close()
    assert "/feed" not in paths
    fetched = [(actor, {k: json.loads(d)[k] for k in ("gateway", "since", "version", "kind",
                                                      "status")})
               for actor, _, d in rows if json.loads(d).get("result") == "ok"]
    assert fetched == [
        (f"gateway:{GATEWAY}", {"gateway": GATEWAY, "since": 0, "version": version,
                                "kind": "snapshot", "status": 200}),
        (f"gateway:{GATEWAY}", {"gateway": GATEWAY, "since": version,
                                "version": delta["version"], "kind": "delta", "status": 200}),
        ("gateway:gw-2", {"gateway": "gw-2", "since": 0, "version": delta["version"],
                          "kind": "snapshot", "status": 200}),
    ]
    refused = [json.loads(d) for _, _, d in rows if json.loads(d).get("result") != "ok"]
    assert len(refused) == 1
    assert refused[0]["status"] == 403
    assert refused[0]["result"] == "forbidden"
    assert "no client certificate" in refused[0]["reason"]
