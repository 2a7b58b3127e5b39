"""An issuing-CA rotation under a running ``fleet-provision serve`` (issue 14, contract C1): the
service takes it without a restart, and every outside view agrees: EST enrollments and
renewals come from the new CA at once, ``openssl ocsp`` answers for both issuers' certificates,
``/crl`` serves the current CRL as DER and every live one as PEM on request, ``/cacerts`` and
the signed ``/feed`` (its ``issuers``) follow, and after ``retire`` only the new one is left."""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from provisioning.authority import Authority
from provisioning.serial import format_serial
from tests.provisioning.conftest import fleet_provision
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

pytestmark = pytest.mark.skipif(NEEDS_TOOLS, reason="openssl and curl required")

PKCS10 = {"Content-Type": "application/pkcs10"}
PEM_FILE = "application/x-pem-file"
_T = TypeVar("_T")


def _until(probe: Callable[[], _T], done: Callable[[_T], bool], deadline_s: float = 10.0) -> _T:
    """Ask *probe* until *done* says yes or the deadline passes; the last answer."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = probe()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _der64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def _ocsp(issuer: Path, cert: Path, server: Server, pki: Path, *extra: str) -> str:
    done = run("openssl", "ocsp", "-issuer", issuer, "-cert", cert, "-url",
               server.http_url + "/ocsp", "-CAfile", pki / "ca-chain.pem", *extra)
    return (done.stdout + done.stderr).decode()


def _cli(*args: str | Path) -> None:
    done = fleet_provision(*args)
    assert done.returncode == 0, done.stderr


def test_a_running_service_takes_a_rotation_and_a_retirement_without_restart(
        tmp_path: Path) -> None:
    """Before: a device enrolls under the old CA. rotate (another process): the next
    enrollment and the old device's renewal are the new CA's; OCSP answers both issuers'
    certificates (each response verifying against ca-chain.pem); /crl DER is the new CA's
    CRL, PEM both; /cacerts and /feed's issuers list new then old, the JWS signed by the new
    CA. retire once the old certificate is revoked: /feed and /cacerts drop it, OCSP for it
    says unknown."""
    pki = make_pki(tmp_path)
    with Authority(pki) as authority:
        secret = authority.create_token("line7")
        gateway = authority.server_cert("gw-1.example.com", ["127.0.0.1"], tmp_path / "gw")
    old_ca = x509.load_pem_x509_certificate((pki / "issuing-ca.pem").read_bytes())
    server = Server(pki)
    try:
        token = {**PKCS10, "Authorization": basic("line7", secret)}
        first_key = make_key()
        first = issued(request(server, "POST", "/.well-known/est/simpleenroll",
                               enroll_body(make_csr(cn="dev-a", key=first_key)), token,
                               pki=pki))
        assert first.issuer == old_ca.subject
        first_pem, first_key_path = write_identity(tmp_path, "dev-a", first, first_key)

        _cli("issuing-ca", "rotate", "--pki", pki)
        new_ca = x509.load_pem_x509_certificate((pki / "issuing-ca.pem").read_bytes())
        retiring = next((pki / "retiring").glob("*.pem"))

        fresh_key = make_key()
        fresh = issued(request(server, "POST", "/.well-known/est/simpleenroll",
                               enroll_body(make_csr(cn="dev-b", key=fresh_key)), token,
                               pki=pki))
        assert fresh.issuer == new_ca.subject
        fresh.verify_directly_issued_by(new_ca)
        fresh_pem, fresh_key_path = write_identity(tmp_path, "dev-b", fresh, fresh_key)
        renewed = issued(request(server, "POST", "/.well-known/est/simplereenroll",
                                 enroll_body(make_csr(cn="dev-a", key=make_key())), PKCS10,
                                 client_context(pki, first_pem, first_key_path), pki=pki))
        assert renewed.issuer == new_ca.subject

        old_answer = _ocsp(retiring, first_pem, server, pki)
        assert f"{first_pem}: good" in old_answer
        assert "Response verify OK" in old_answer
        new_answer = _ocsp(pki / "issuing-ca.pem", fresh_pem, server, pki)
        assert f"{fresh_pem}: good" in new_answer
        assert "Response verify OK" in new_answer

        der = request(server, "GET", "/crl", pki=pki)
        assert der.headers["content-type"] == "application/pkix-crl"
        assert x509.load_der_x509_crl(der.body).issuer == new_ca.subject
        pem = request(server, "GET", "/crl", headers={"Accept": PEM_FILE}, pki=pki)
        assert pem.headers["content-type"] == PEM_FILE
        assert pem.body == (pki / "crl.pem").read_bytes()
        assert pem.body.count(b"-----BEGIN X509 CRL-----") == 2
        assert pem.headers["etag"] != der.headers["etag"]

        def cacerts() -> list[x509.Certificate]:
            answer = request(server, "GET", "/.well-known/est/cacerts", pki=pki)
            return pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer.body))

        assert old_ca in _until(cacerts, lambda certs: new_ca in certs)
        assert new_ca in cacerts()
        # The listener now trusts the new CA: its device renews presenting its leaf alone
        # (a client trusting the root only has no intermediate to add to what it sends).
        leaf_only = ssl.create_default_context(cafile=str(pki / "root-ca.pem"))
        leaf_only.load_cert_chain(fresh_pem, fresh_key_path)
        again = issued(request(server, "POST", "/.well-known/est/simplereenroll",
                               enroll_body(make_csr(cn="dev-b", key=make_key())), PKCS10,
                               leaf_only, pki=pki))
        assert again.issuer == new_ca.subject

        def feed() -> dict[str, object]:
            return signed_document(request(server, "GET", "/feed?since=0",
                                           ctx=client_context(pki, *gateway), pki=pki), pki)

        doc = _until(feed, lambda d: len(d.get("issuers", [])) == 2)  # type: ignore[arg-type]
        assert doc["issuers"] == [_der64(new_ca), _der64(old_ca)]

        _cli("revoke", "--pki", pki, "dev-a", "--serial", format_serial(first.serial_number),
             "--reason", "superseded")
        _cli("issuing-ca", "retire", "--pki", pki)
        doc = _until(feed, lambda d: len(d.get("issuers", [])) == 1)  # type: ignore[arg-type]
        assert doc["issuers"] == [_der64(new_ca)]
        assert old_ca not in _until(cacerts, lambda certs: old_ca not in certs)
        retired = pki / "retired" / retiring.name
        gone = _ocsp(retired, first_pem, server, pki, "-noverify")
        assert f"{first_pem}: unknown" in gone
        again = request(server, "GET", "/crl", headers={"Accept": PEM_FILE}, pki=pki)
        assert again.body.count(b"-----BEGIN X509 CRL-----") == 1
    finally:
        assert server.stop() == 0
    assert "issuing CA changed" in "".join(server.lines)


def test_a_chain_change_the_worker_cannot_load_keeps_the_old_ca_and_is_logged_once(
        tmp_path: Path) -> None:
    """ca-chain.pem rewritten while issuing-ca.key no longer pairs with issuing-ca.pem (a
    hand edit, a cut rotation): the service keeps signing with the CA it holds, says why
    once in its log, and does not try again until the file changes again."""
    pki = make_pki(tmp_path)
    with Authority(pki) as authority:
        secret = authority.create_token("line7")
    old_ca = x509.load_pem_x509_certificate((pki / "issuing-ca.pem").read_bytes())
    server = Server(pki)
    try:
        token = {**PKCS10, "Authorization": basic("line7", secret)}
        stray = ec.generate_private_key(ec.SECP256R1())
        (pki / "issuing-ca.key").write_bytes(stray.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        chain = pki / "ca-chain.pem"
        chain.write_bytes(chain.read_bytes())  # another inode, the same certificates
        for name in ("dev-1", "dev-2"):
            made = issued(request(server, "POST", "/.well-known/est/simpleenroll",
                                  enroll_body(make_csr(cn=name)), token, pki=pki))
            made.verify_directly_issued_by(old_ca)
    finally:
        assert server.stop() == 0
    log = "".join(server.lines)
    assert log.count("cannot load the issuing CAs after ca-chain.pem changed") == 1
    assert "not the pair of its certificate" in log
