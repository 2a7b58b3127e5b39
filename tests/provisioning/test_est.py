"""EST (RFC 7030) against a real ``fleet-provision serve``, driven by curl, openssl and stdlib."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from provisioning import der
from provisioning.authority import Authority
from provisioning.csr import CSRInput
from provisioning.est.messages import b64_body, certs_only, certs_only_der, pem_der
from provisioning.issuer import SignOptions
from provisioning.profile import device_certificate, random_serial
from provisioning.serial import format_serial
from tests.provisioning.conftest import ORG, TRUST_DOMAIN, CliResult, fleet_provision
from tests.provisioning.csrs import PrivateKey, make_csr, make_key
from tests.provisioning.est_support import (
    NEEDS_TOOLS,
    Answer,
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

pytestmark = pytest.mark.skipif(NEEDS_TOOLS, reason="openssl and curl required")

ENROLL = "/.well-known/est/simpleenroll"
REENROLL = "/.well-known/est/simplereenroll"
PKCS10 = {"Content-Type": "application/pkcs10"}
ALLOWED = ["est-curl", "est-station-made", "est-same", *(f"est-{i:03d}" for i in range(40))]


@dataclass(frozen=True)
class Fleet:
    root: Path
    pki: Path
    server: Server
    secret: str
    station: tuple[Path, Path]

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None,
             ctx: ssl.SSLContext | None = None) -> Answer:
        return request(self.server, "POST", path, body, headers, ctx, pki=self.pki)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        return request(self.server, "GET", path, None, headers, pki=self.pki)

    def enroll(self, cn: str, key: PrivateKey | None = None,
               ) -> tuple[x509.Certificate, PrivateKey]:
        key = key or make_key()
        answer = self.post(ENROLL, enroll_body(make_csr(cn=cn, key=key)),
                           {**PKCS10, "Authorization": basic("line7", self.secret)})
        return issued(answer), key

    def identity(self, name: str, cert: x509.Certificate, key: PrivateKey) -> ssl.SSLContext:
        cert_path, key_path = write_identity(self.root, name, cert, key)
        return client_context(self.pki, cert_path, key_path)

    def curl(self, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return run("curl", "-sS", "--cacert", self.pki / "ca-chain.pem", *args)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("est")
    pki = make_pki(root, ALLOWED)
    station_key = make_key()
    with Authority(pki) as authority:
        secret = authority.create_token("line7")
        [made] = authority.issuer().sign(
            [CSRInput("station.csr", make_csr(cn="station-1", key=station_key))],
            SignOptions(group="stations"))
    assert made.pem is not None
    station = write_identity(root, "station-1", x509.load_pem_x509_certificate(
        made.pem.encode()), station_key)
    server = Server(pki)
    try:
        yield Fleet(root, pki, server, secret, station)
    finally:
        assert server.stop() == 0
    # After everything the module did to it, good and bad, the audit chain still holds.
    verified = fleet_provision("audit", "verify", "--pki", pki)
    assert verified.returncode == 0, verified.stderr


def _openssl_req(folder: Path, cn: str, key: Path | None = None) -> Path:
    """A DER CSR by ``openssl req`` turned into ``req.b64`` by ``openssl base64``."""
    der_path, b64 = folder / f"{cn}.der", folder / f"{cn}.b64"
    new_key = ["-key", str(key)] if key else ["-newkey", "ec", "-pkeyopt",
                                              "ec_paramgen_curve:P-256", "-nodes",
                                              "-keyout", str(folder / f"{cn}-req.key")]
    done = run("openssl", "req", "-new", *new_key, "-subj", f"/CN={cn}", "-outform", "DER",
               "-out", der_path)
    assert done.returncode == 0, done.stderr
    assert run("openssl", "base64", "-in", der_path, "-out", b64).returncode == 0
    return b64


def _print_certs(b64: bytes) -> bytes:
    """``openssl base64 -d | openssl pkcs7 -inform DER -print_certs``, as RFC 7030 readers do."""
    decoded = run("openssl", "base64", "-d", stdin=b64)
    assert decoded.returncode == 0
    printed = run("openssl", "pkcs7", "-inform", "DER", "-print_certs", stdin=decoded.stdout)
    assert printed.returncode == 0, printed.stderr
    return printed.stdout


# -- the RFC's own examples, with curl and openssl ------------------------------------------

def test_curl_simpleenroll_with_a_token_as_in_rfc_7030(fleet: Fleet, tmp_path: Path) -> None:
    """curl --user --data-binary @req.b64 gets a certificate openssl verify accepts."""
    b64 = _openssl_req(tmp_path, "est-curl")
    done = fleet.curl("--user", f"line7:{fleet.secret}", "--data-binary", f"@{b64}",
                      "-H", "Content-Type: application/pkcs10", "-D", tmp_path / "headers",
                      "-o", tmp_path / "resp.b64", f"{fleet.server.url}{ENROLL}")
    assert done.returncode == 0, done.stderr
    headers = (tmp_path / "headers").read_text().lower()
    assert headers.startswith("http/1.1 200")
    assert "content-type: application/pkcs7-mime; smime-type=certs-only" in headers
    assert "content-transfer-encoding: base64" in headers
    pem = _print_certs((tmp_path / "resp.b64").read_bytes())
    (tmp_path / "est-curl.pem").write_bytes(pem)
    verified = run("openssl", "verify", "-purpose", "sslclient", "-CAfile",
                   fleet.pki / "ca-chain.pem", tmp_path / "est-curl.pem")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.subject.rfc4514_string() == f"CN=est-curl,O={ORG}"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/device/est-curl"]


def test_curl_cacerts_returns_the_chain(fleet: Fleet) -> None:
    """GET cacerts is the issuing and root CA as base64 certs-only PKCS#7 (RFC 7030 4.1.3)."""
    done = fleet.curl(f"{fleet.server.url}/.well-known/est/cacerts")
    assert done.returncode == 0, done.stderr
    printed = x509.load_pem_x509_certificates(_print_certs(done.stdout))
    assert printed == x509.load_pem_x509_certificates((fleet.pki / "ca-chain.pem").read_bytes())


def test_curl_simplereenroll_with_the_current_certificate(fleet: Fleet, tmp_path: Path) -> None:
    """curl --cert/--key renews with a new key; the old certificate becomes superseded."""
    old, old_key = fleet.enroll("est-000")
    cert_path, key_path = write_identity(tmp_path, "est-000", old, old_key)
    b64 = _openssl_req(tmp_path, "est-000")
    done = fleet.curl("--cert", cert_path, "--key", key_path, "--data-binary", f"@{b64}",
                      "-H", "Content-Type: application/pkcs10", "-w", "%{http_code}",
                      "-o", tmp_path / "resp.b64", f"{fleet.server.url}{REENROLL}")
    assert done.stdout == b"200", done.stderr
    new = x509.load_pem_x509_certificate(_print_certs((tmp_path / "resp.b64").read_bytes()))
    assert new.serial_number != old.serial_number
    assert new.subject == old.subject
    with Authority(fleet.pki) as authority:
        statuses = {c.serial: c.status for c in authority.registry.certificates("est-000")}
    assert statuses == {format_serial(old.serial_number): "superseded",
                        format_serial(new.serial_number): "active"}


def test_csrattrs_asks_for_p256_and_ecdsa_with_sha256(fleet: Fleet) -> None:
    """GET csrattrs: base64 DER CsrAttrs naming id-ecPublicKey/prime256v1, ecdsa-with-SHA256."""
    answer = fleet.get("/.well-known/est/csrattrs")
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/csrattrs"
    parsed = run("openssl", "asn1parse", "-inform", "DER",
                 stdin=base64.b64decode(answer.body))
    assert parsed.returncode == 0
    oids = [line.rsplit(":", 1)[1] for line in parsed.stdout.decode().splitlines()
            if "OBJECT" in line]
    assert oids == ["id-ecPublicKey", "prime256v1", "ecdsa-with-SHA256"]


def test_der_encoder_reproduces_the_rfc_example() -> None:
    """The hand-made DER encoder gives RFC 8951 section 4's CsrAttrs example byte for byte."""
    example = der.sequence(der.oid("1.2.840.113549.1.9.7"),
                           der.attribute("1.2.840.10045.2.1", der.oid("1.3.132.0.34")),
                           der.attribute("1.2.840.113549.1.9.14", der.oid("1.3.6.1.1.1.1.22")),
                           der.oid("1.2.840.10045.4.3.3"))
    assert base64.b64encode(example) == (b"MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGS"
                                         b"Ib3DQEJDjEJBgcrBgEBAQEWBggqhkjOPQQDAw==")


# -- enrollment semantics ------------------------------------------------------------------

def test_resubmitting_the_same_csr_returns_the_same_certificate(fleet: Fleet) -> None:
    """Idempotent like sign: the same CSR twice gives the one certificate already issued."""
    key = make_key()
    csr = enroll_body(make_csr(cn="est-001", key=key))
    auth = {**PKCS10, "Authorization": basic("line7", fleet.secret)}
    first, second = issued(fleet.post(ENROLL, csr, auth)), issued(fleet.post(ENROLL, csr, auth))
    assert first == second
    another_key = fleet.post(ENROLL, enroll_body(make_csr(cn="est-001")), auth)
    assert another_key.status == 400
    assert another_key.text.startswith("has-certificate: device 'est-001' already has")


def test_a_station_certificate_authorises_simpleenroll(fleet: Fleet) -> None:
    """A device of a group in pki.toml station_groups may enroll others without a token."""
    ctx = client_context(fleet.pki, *fleet.station)
    answer = fleet.post(ENROLL, enroll_body(make_csr(cn="est-station-made")), PKCS10, ctx)
    assert issued(answer).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value \
        == "est-station-made"


def test_a_device_certificate_is_not_a_station(fleet: Fleet) -> None:
    """An ordinary device certificate on simpleenroll is 403 and says why."""
    cert, key = fleet.enroll("est-002")
    answer = fleet.post(ENROLL, enroll_body(make_csr(cn="est-003")), PKCS10,
                        fleet.identity("est-002", cert, key))
    assert answer.status == 403
    assert "is not a factory station" in answer.text


def test_reenroll_with_the_same_key_is_refused(fleet: Fleet) -> None:
    """DESIGN 10: a renewal needs a key the device has never used; the current certificate's
    key is refused with 400 renew-key-reused, nothing issued, the refusal audited."""
    old, key = fleet.enroll("est-same")
    ctx = fleet.identity("est-same", old, key)
    answer = fleet.post(REENROLL, enroll_body(make_csr(cn="est-same", key=key)), PKCS10, ctx)
    assert answer.status == 400
    assert answer.text.startswith("renew-key-reused: this key is the key of the device's "
                                  f"certificate {format_serial(old.serial_number)} (active)")
    with Authority(fleet.pki) as authority:
        assert [c.status for c in authority.registry.certificates("est-same")] == ["active"]
        refused = authority.registry.conn.execute(
            "SELECT actor, serial, detail FROM events WHERE action = "
            "'certificate.renew.refuse' AND device_id = 'est-same'").fetchall()
    assert len(refused) == 1
    assert refused[0][:2] == ("est:cert:est-same", format_serial(old.serial_number))
    assert json.loads(refused[0][2])["reason"].startswith("renew-key-reused")


def test_reenroll_retry_gets_the_renewal_and_old_keys_stay_refused(fleet: Fleet) -> None:
    """The answer lost, the same request again (the superseded certificate, the new key)
    returns the certificate already issued; renewing again from the superseded certificate
    with a fresh key is 403 renew-not-active; the new certificate with the first key is
    400 renew-key-reused."""
    first, first_key = fleet.enroll("est-030")
    old_ctx = fleet.identity("est-030", first, first_key)
    new_key = make_key()
    body = enroll_body(make_csr(cn="est-030", key=new_key))
    renewed = issued(fleet.post(REENROLL, body, PKCS10, old_ctx))
    assert issued(fleet.post(REENROLL, body, PKCS10, old_ctx)) == renewed  # the retry
    again = fleet.post(REENROLL, enroll_body(make_csr(cn="est-030", key=make_key())), PKCS10,
                       old_ctx)
    assert again.status == 403
    assert again.text.startswith(f"renew-not-active: certificate "
                                 f"{format_serial(first.serial_number)} is superseded")
    new_ctx = fleet.identity("est-030", renewed, new_key)
    reused = fleet.post(REENROLL, enroll_body(make_csr(cn="est-030", key=first_key)), PKCS10,
                        new_ctx)
    assert reused.status == 400
    assert reused.text.startswith("renew-key-reused: this key is the key of the device's "
                                  f"certificate {format_serial(first.serial_number)} "
                                  "(superseded)")


def test_reenroll_for_another_device_is_refused(fleet: Fleet) -> None:
    """The CSR must carry the device id of the client certificate."""
    cert, key = fleet.enroll("est-004")
    answer = fleet.post(REENROLL, enroll_body(make_csr(cn="est-005")), PKCS10,
                        fleet.identity("est-004", cert, key))
    assert answer.status == 400
    assert answer.text.startswith("device-mismatch: the CSR names 'est-005'")


def test_reenroll_needs_a_client_certificate(fleet: Fleet) -> None:
    """No certificate (a token does not count) is 403."""
    answer = fleet.post(REENROLL, enroll_body(make_csr(cn="est-006")),
                        {**PKCS10, "Authorization": basic("line7", fleet.secret)})
    assert answer.status == 403
    assert "mutual TLS" in answer.text


def test_reenroll_refuses_revoked_held_and_expired_certificates(fleet: Fleet) -> None:
    """Revoked, on hold or expired client certificates get 403 with the reason."""
    revoked, revoked_key = fleet.enroll("est-007")
    held, held_key = fleet.enroll("est-008")
    with Authority(fleet.pki) as authority:
        authority.revoke("est-007", None, "keyCompromise")
        authority.suspend("est-008")
        expired_key = make_key()
        now = dt.datetime.now(dt.UTC)
        expired = device_certificate(authority.ca, authority.config, "est-009",
                                     expired_key.public_key(), random_serial(),  # type: ignore[arg-type]
                                     now - dt.timedelta(days=30), now - dt.timedelta(days=1))
    for name, cert, key, why in (("est-007", revoked, revoked_key, "is revoked"),
                                 ("est-008", held, held_key, "is on hold"),
                                 ("est-009", expired, expired_key, "expired at")):
        answer = fleet.post(REENROLL, enroll_body(make_csr(cn=name, key=make_key())), PKCS10,
                            fleet.identity(name, cert, key))
        assert answer.status == 403, (name, answer.text)
        assert why in answer.text


# -- bad input, each with its status --------------------------------------------------------

@pytest.mark.parametrize(("case", "status", "text"), [
    ("malformed base64", 400, "malformed base64"),
    ("not a CSR", 400, "not a CSR: binary data that is not DER PKCS#10"),
    ("empty body", 400, "empty body"),
    ("wrong content type", 415, "want Content-Type application/pkcs10, got 'text/plain'"),
    ("body over 64 KiB", 413, "request body over 65536 bytes"),
    ("CA:TRUE requested", 400, "ca-requested: CSR asks for BasicConstraints CA:TRUE"),
    ("not in the manifest", 400, "not-in-manifest: device 'intruder' is not in the manifest"),
    ("bad signature", 400, "bad-signature: CSR signature does not verify"),
])
def test_bad_input_gets_its_status_and_reason(fleet: Fleet, case: str, status: int,
                                              text: str) -> None:
    """Each refusal is the right status with a short text/plain reason."""
    good = enroll_body(make_csr(cn="est-010"))
    bodies = {
        "malformed base64": b"%%% not base64 %%%",
        "not a CSR": base64.b64encode(b"\x30\x03\x02\x01\x00 garbage"),
        "empty body": b"",
        "wrong content type": good,
        "body over 64 KiB": base64.encodebytes(b"\x30" * 60_000),
        "CA:TRUE requested": enroll_body(make_csr(cn="est-011", ca=True)),
        "not in the manifest": enroll_body(make_csr(cn="intruder")),
        "bad signature": enroll_body(_tampered("est-012", "est-013")),
    }
    content_type = "text/plain" if case == "wrong content type" else "application/pkcs10"
    answer = fleet.post(ENROLL, bodies[case], {"Content-Type": content_type,
                                               "Authorization": basic("line7", fleet.secret)})
    assert (answer.status, answer.text.splitlines()[0][:len(text)]) == (status, text)
    assert answer.headers["content-type"].startswith("text/plain")


def _tampered(cn: str, new: str) -> bytes:
    from tests.provisioning.csrs import tamper

    return tamper(make_csr(cn=cn), cn.encode(), new.encode())


@pytest.mark.parametrize(("authorization", "why"), [
    (None, "no credentials"),
    ("Basic " + base64.b64encode(b"line7:wrong-secret").decode(), "wrong secret"),
    ("Basic " + base64.b64encode(b"nobody:whatever").decode(), "unknown token"),
    ("Basic ###", "malformed header"),
    ("Bearer abc", "another scheme"),
])
def test_unauthenticated_is_401_with_a_basic_challenge(fleet: Fleet, authorization: str | None,
                                                       why: str) -> None:
    """401 with WWW-Authenticate: Basic (RFC 7030 3.2.3), whatever was wrong."""
    headers = dict(PKCS10)
    if authorization is not None:
        headers["Authorization"] = authorization
    answer = fleet.post(ENROLL, enroll_body(make_csr(cn="est-014")), headers)
    assert answer.status == 401, why
    assert answer.headers["www-authenticate"].startswith('Basic realm="fleet-est"')


def test_token_revoke_makes_its_secret_useless(fleet: Fleet) -> None:
    """A token works, is revoked from the CLI, and the running service refuses it at once."""
    created = fleet_provision("token", "create", "--pki", fleet.pki, "short-lived", "--json")
    secret = json.loads(created.stdout)["secret"]
    auth = {**PKCS10, "Authorization": basic("short-lived", secret)}
    issued(fleet.post(ENROLL, enroll_body(make_csr(cn="est-015")), auth))
    assert fleet_provision("token", "revoke", "--pki", fleet.pki, "short-lived").returncode == 0
    answer = fleet.post(ENROLL, enroll_body(make_csr(cn="est-016")), auth)
    assert answer.status == 401


def test_unknown_paths_and_methods(fleet: Fleet) -> None:
    """404 for what does not exist, 405 with Allow for the wrong method."""
    assert fleet.get("/.well-known/est/fullcmc").status == 404
    wrong = fleet.get(ENROLL)
    assert wrong.status == 405
    assert wrong.headers["allow"] == "POST"


def test_the_service_keeps_serving_under_bad_input(fleet: Fleet,
                                                   tmp_path: Path) -> None:
    """Garbage bytes, an unfinished request, a rogue client CA: others are still served."""
    import trustme

    idle = socket.create_connection(("127.0.0.1", fleet.server.port))  # says nothing
    try:
        with socket.create_connection(("127.0.0.1", fleet.server.port)) as junk:
            junk.sendall(b"\x00\xff" * 4096)  # not TLS at all
        ctx = client_context(fleet.pki)
        with socket.create_connection(("127.0.0.1", fleet.server.port)) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert tls.recv(100).startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
        rogue = trustme.CA().issue_cert("est-017")
        rogue_cert, rogue_key = tmp_path / "rogue.pem", tmp_path / "rogue.key"
        rogue.cert_chain_pems[0].write_to_path(str(rogue_cert))
        rogue.private_key_pem.write_to_path(str(rogue_key))
        refused = fleet.curl("--cert", rogue_cert, "--key", rogue_key, "-o", "/dev/null",
                             f"{fleet.server.url}/.well-known/est/cacerts")
        assert refused.returncode != 0  # the handshake fails: unknown issuer
        cert, _ = fleet.enroll("est-018")
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "est-018"
    finally:
        idle.close()


# -- the service's own set-up -----------------------------------------------------------------

def test_every_request_is_audited_and_the_chain_verifies(tmp_path: Path) -> None:
    """After good and bad requests and a clean stop, audit verify passes and names who did what."""
    pki = make_pki(tmp_path, ALLOWED)
    with Authority(pki) as authority:
        secret = authority.create_token("line9")
    server = Server(pki)
    try:
        def post(body: bytes, headers: dict[str, str]) -> Answer:
            return request(server, "POST", ENROLL, body, headers, pki=pki)

        good = post(enroll_body(make_csr(cn="est-020")),
                    {**PKCS10, "Authorization": basic("line9", secret)})
        cert = issued(good)
        assert post(b"!!", {**PKCS10, "Authorization": basic("line9", secret)}).status == 400
        assert post(b"", PKCS10).status == 401
        assert request(server, "GET", "/crl", pki=pki).status == 200
    finally:
        assert server.stop() == 0
    verified = fleet_provision("audit", "verify", "--pki", pki)
    assert verified.returncode == 0, verified.stderr
    with Authority(pki) as authority:
        rows = authority.registry.conn.execute(
            "SELECT actor, action, device_id, serial, detail FROM events ORDER BY id").fetchall()
    requests = [(a, act, json.loads(d)["status"], json.loads(d).get("result"))
                for a, act, _, _, d in rows if act.startswith(("est.", "crl."))]
    assert requests == [("est:token:line9", "est.enroll", 200, "issued"),
                        ("est:token:line9", "est.enroll", 400, "refused"),
                        ("est:anonymous", "est.enroll", 401, "unauthorized"),
                        ("est:anonymous", "crl.fetch", 200, "ok")]
    issue = next(r for r in rows if r[1] == "certificate.issue")
    assert issue[:4] == ("est:token:line9", "certificate.issue", "est-020",
                         format_serial(cert.serial_number))


def _ca_worker(pid: int) -> int:
    """The pid of serve's CA worker process (started with sys.executable)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    workers = [c for c in children
               if b"provisioning.est.engine" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(workers) == 1, children
    return workers[0]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_dead_ca_worker_means_503_not_a_hang(tmp_path: Path) -> None:
    """SIGKILL the worker process: requests get 503 at once, serve still stops cleanly."""
    pki = make_pki(tmp_path, ALLOWED)
    with Authority(pki) as authority:
        secret = authority.create_token("line3")
    server = Server(pki)
    auth = {**PKCS10, "Authorization": basic("line3", secret)}
    try:
        issued(request(server, "POST", ENROLL, enroll_body(make_csr(cn="est-030")), auth,
                       pki=pki))
        os.kill(_ca_worker(server.proc.pid), signal.SIGKILL)
        start = time.monotonic()
        for _ in range(2):  # the one that may race the worker's death, and a later one
            answer = request(server, "POST", ENROLL, enroll_body(make_csr(cn="est-031")), auth,
                             pki=pki)
            assert answer.status == 503, answer.text
            assert "the CA worker is gone" in answer.text
        assert request(server, "GET", "/crl", pki=pki).status == 503
        assert time.monotonic() - start < 10
        assert request(server, "GET", "/.well-known/est/cacerts", pki=pki).status == 200
    finally:
        assert server.stop() == 0
    assert any("the CA worker is gone" in line for line in server.lines), server.lines
    verified = fleet_provision("audit", "verify", "--pki", pki)
    assert verified.returncode == 0, verified.stderr
    with Authority(pki) as authority:
        statuses = [json.loads(d)["status"] for a, d in authority.registry.conn.execute(
            "SELECT action, detail FROM events WHERE action LIKE 'est.%' OR action LIKE 'crl.%'"
            " ORDER BY id")]
    # The requests answered while the worker was gone are audited by serve on its way out.
    assert statuses[-4:] == [503, 503, 503, 200]


def test_init_urls_go_into_certificates_enrolled_over_est(tmp_path: Path) -> None:
    """init --crl-url/--ocsp-url are written to pki.toml and into every issued certificate."""
    pki = tmp_path / "pki"
    done = fleet_provision("init", "--pki", pki, "--org", ORG, "--trust-domain", TRUST_DOMAIN,
                           "--crl-url", "http://ca.test:8080/crl",
                           "--ocsp-url", "http://ca.test:8080/ocsp")
    assert done.returncode == 0, done.stderr
    toml = (pki / "pki.toml").read_text()
    assert 'crl_url = "http://ca.test:8080/crl"' in toml
    assert 'ocsp_url = "http://ca.test:8080/ocsp"' in toml
    with Authority(pki) as authority:
        secret = authority.create_token("t")
    server = Server(pki)
    try:
        cert = issued(request(server, "POST", ENROLL, enroll_body(make_csr(cn="url-dev")),
                              {**PKCS10, "Authorization": basic("t", secret)}, pki=pki))
    finally:
        server.stop()
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for p in cdp for n in p.full_name or []] == ["http://ca.test:8080/crl"]
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [d.access_location.value for d in aia] == ["http://ca.test:8080/ocsp"]


def test_a_given_tls_certificate_is_used_and_the_default_one_reused(
        fleet: Fleet, tmp_path: Path) -> None:
    """--tls-cert/--tls-key serve a server-cert certificate; est-server.pem survives restarts."""
    made = fleet_provision("server-cert", "--pki", fleet.pki, "--name", "est.test",
                           "--ip", "127.0.0.1", "--out", tmp_path)
    assert made.returncode == 0, made.stderr
    default_before = (fleet.pki / "est-server.pem").read_bytes()
    server = Server(fleet.pki, "--tls-cert", str(tmp_path / "server.pem"),
                    "--tls-key", str(tmp_path / "server.key"))
    try:
        done = run("curl", "-sS", "--cacert", fleet.pki / "ca-chain.pem", "--resolve",
                   f"est.test:{server.port}:127.0.0.1", "-o", "/dev/null", "-w", "%{http_code}",
                   f"https://est.test:{server.port}/.well-known/est/cacerts")
        assert done.stdout == b"200", done.stderr
    finally:
        server.stop()
    restarted = Server(fleet.pki)
    restarted.stop()
    assert (fleet.pki / "est-server.pem").read_bytes() == default_before
    cert = x509.load_pem_x509_certificates(default_before)[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


@pytest.mark.parametrize(("args", "message"), [
    (["--bind", "nonsense"], "error: 'nonsense' is not HOST:PORT (--bind)"),
    (["--bind", "127.0.0.1:99999"], "error: '127.0.0.1:99999' is not HOST:PORT (--bind)"),
    (["--tls-cert", "x.pem"], "error: give --tls-cert and --tls-key together (--tls-cert)"),
])
def test_serve_usage_errors_are_one_line(fleet: Fleet, args: list[str], message: str,
                                         cli: Callable[..., CliResult]) -> None:
    """Bad serve options exit 2 with one line, before anything listens."""
    done = cli("serve", "--pki", fleet.pki, *args)
    assert (done.code, done.err) == (2, message + "\n")


def test_serve_without_a_pki_is_one_line(tmp_path: Path) -> None:
    """No PKI folder: exit 2, one line, nothing created."""
    done = fleet_provision("serve", "--pki", tmp_path / "none", "--bind", "127.0.0.1:0")
    assert done.returncode == 2
    assert done.stderr == f"error: no PKI here: the folder does not exist ({tmp_path}/none)\n"


def test_certs_only_response_is_what_cryptography_reads(fleet: Fleet) -> None:
    """The body is base64 in lines of at most 64 characters, for RFC 2045 readers."""
    answer = fleet.get("/.well-known/est/cacerts")
    lines = answer.body.decode().splitlines()
    assert all(len(line) <= 64 for line in lines)
    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer.body))
    assert [c.public_bytes(serialization.Encoding.PEM) for c in certs] == [
        c.public_bytes(serialization.Encoding.PEM)
        for c in x509.load_pem_x509_certificates((fleet.pki / "ca-chain.pem").read_bytes())]


def test_one_certificate_reply_is_cryptographys_bytes(fleet: Fleet) -> None:
    """The enrollment reply is built from the certificate's DER without parsing it: the
    same bytes as pkcs7.serialize_certificates, in the same 64-character lines."""
    for path in ("ca-chain.pem", "issuing-ca.pem", "root-ca.pem"):
        pem = (fleet.pki / path).read_text()
        cert = x509.load_pem_x509_certificate(pem.encode())
        assert pem_der(pem) == cert.public_bytes(serialization.Encoding.DER)
        assert certs_only_der(pem_der(pem)) == pkcs7.serialize_certificates(
            [cert], serialization.Encoding.DER)
        assert b64_body(certs_only_der(pem_der(pem))) == certs_only([cert])
    assert b64_body(b"") == b"\n"
    assert b64_body(bytes(48)) == base64.b64encode(bytes(48)) + b"\n"
    assert b64_body(bytes(49)).count(b"\n") == 2
