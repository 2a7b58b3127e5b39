"""The superseded grace end to end on a real ``fleet-provision serve`` (DESIGN section 10):
a device renews over EST simplereenroll with its current certificate; the old one is
superseded and still good; once pki.toml's renew_grace (seconds here) has passed, the
service's own sweep revokes it with reason superseded, and every outside view says so:
``openssl crl -text`` of ``/crl``, ``openssl ocsp``, the signed ``/feed`` document."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest

from provisioning.authority import Authority
from provisioning.registry.store import CertificateRow
from provisioning.serial import format_serial
from tests.provisioning.csrs import make_csr, make_key
from tests.provisioning.est_support import (
    NEEDS_TOOLS,
    Server,
    basic,
    client_context,
    enroll_body,
    issued,
    make_pki,
    request,
    run,
    write_identity,
)
from tests.provisioning.test_feed_service import signed_document
from tests.provisioning.test_grace import openssl_crl_reasons

pytestmark = pytest.mark.skipif(NEEDS_TOOLS, reason="openssl and curl required")

GRACE = dt.timedelta(seconds=3)
PKCS10 = {"Content-Type": "application/pkcs10"}


def _row(pki: Path, serial: str) -> CertificateRow:
    with Authority(pki) as authority:
        row = authority.registry.certificate(serial)
    assert row is not None
    return row


def _wait_revoked(pki: Path, serial: str, deadline_s: float) -> CertificateRow:
    """Poll the registry row until it is revoked; fail at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        row = _row(pki, serial)
        if row.status == "revoked" or time.monotonic() > deadline:
            return row
        time.sleep(0.1)


def _ocsp(pki: Path, cert: Path, url: str) -> str:
    done = run("openssl", "ocsp", "-issuer", pki / "issuing-ca.pem", "-cert", cert,
               "-url", url, "-CAfile", pki / "ca-chain.pem")
    assert done.returncode == 0, done.stderr
    return (done.stdout + done.stderr).decode()


def test_the_service_revokes_the_superseded_certificate_after_the_grace(
        tmp_path: Path) -> None:
    """Renewed over mutual TLS; superseded and OCSP-good at once; revoked with reason
    superseded by the service within the grace plus its sweep interval (1 s) and a second;
    /crl, OCSP and /feed agree; the audit log names the policy as the actor."""
    pki = make_pki(tmp_path, renew_grace=GRACE)
    assert 'renew_grace = "3s"' in (pki / "pki.toml").read_text()
    with Authority(pki) as authority:
        secret = authority.create_token("line7")
        gateway = authority.server_cert("gw-1.example.com", ["127.0.0.1"], tmp_path / "gw")
    server = Server(pki)
    try:
        first_key = make_key()
        first = issued(request(server, "POST", "/.well-known/est/simpleenroll",
                               enroll_body(make_csr(cn="rot-1", key=first_key)),
                               {**PKCS10, "Authorization": basic("line7", secret)}, pki=pki))
        first_pem, first_key_path = write_identity(tmp_path, "rot-1", first, first_key)
        renewed = issued(request(server, "POST", "/.well-known/est/simplereenroll",
                                 enroll_body(make_csr(cn="rot-1", key=make_key())), PKCS10,
                                 client_context(pki, first_pem, first_key_path), pki=pki))
        renewed_at = time.monotonic()
        old, new = format_serial(first.serial_number), format_serial(renewed.serial_number)
        assert _row(pki, old).status == "superseded"
        assert f"{first_pem}: good" in _ocsp(pki, first_pem, server.url + "/ocsp")

        row = _wait_revoked(pki, old, GRACE.total_seconds() + 15)
        assert (row.status, row.reason) == ("revoked", "superseded")
        waited = time.monotonic() - renewed_at
        assert GRACE.total_seconds() - 0.5 <= waited <= GRACE.total_seconds() + 10
        assert _row(pki, new).status == "active"
        with Authority(pki) as authority:
            [event] = authority.registry.conn.execute(
                "SELECT actor, detail FROM events WHERE action = 'certificate.revoke' "
                "AND serial = ?", (old,)).fetchall()
        assert event[0] == "policy"
        assert json.loads(event[1])["reason"] == "superseded"

        crl = request(server, "GET", "/crl", pki=pki)
        assert crl.status == 200
        text = run("openssl", "crl", "-inform", "DER", "-noout", "-text", stdin=crl.body)
        assert text.returncode == 0, text.stderr
        assert openssl_crl_reasons(text.stdout.decode()) == {old: "Superseded"}

        answer = _ocsp(pki, first_pem, server.url + "/ocsp")
        assert f"{first_pem}: revoked" in answer
        assert "Reason: superseded" in answer

        doc = signed_document(request(server, "GET", "/feed?since=0",
                                      ctx=client_context(pki, *gateway), pki=pki), pki)
        assert doc["revoked"][old]["status"] == "revoked"
        assert doc["revoked"][old]["reason"] == "superseded"
        assert doc["devices"]["rot-1"]["certificates"] == {new: "active"}
    finally:
        assert server.stop() == 0
