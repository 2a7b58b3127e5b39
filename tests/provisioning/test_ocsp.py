"""OCSP (RFC 6960) and CRL distribution from ``fleet-provision serve``, read by openssl and curl."""

from __future__ import annotations

import datetime as dt
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from provisioning.authority import Authority
from provisioning.crl import publish_crl
from provisioning.csr import CSRInput
from provisioning.issuer import SignOptions
from provisioning.ocsp import Responder
from provisioning.serial import format_serial
from tests.provisioning.csrs import make_csr
from tests.provisioning.est_support import NEEDS_TOOLS, Answer, Server, make_pki, request, run

pytestmark = pytest.mark.skipif(NEEDS_TOOLS, reason="openssl and curl required")

OCSP_REQUEST = {"Content-Type": "application/ocsp-request"}


@dataclass(frozen=True)
class Responders:
    root: Path
    pki: Path
    server: Server
    issuer: x509.Certificate

    def certificate(self, cn: str) -> tuple[x509.Certificate, Path]:
        """A device certificate issued by the batch path, and its PEM file."""
        with Authority(self.pki) as authority:
            [result] = authority.issuer().sign([CSRInput(f"{cn}.csr", make_csr(cn=cn))],
                                               SignOptions())
        assert result.pem is not None
        path = self.root / f"{cn}.pem"
        path.write_text(result.pem)
        return x509.load_pem_x509_certificate(result.pem.encode()), path

    def openssl_ocsp(self, cert: Path, url: str) -> tuple[int, str]:
        """``openssl ocsp -issuer ... -cert ... -url ... -CAfile ca-chain.pem``."""
        done = run("openssl", "ocsp", "-issuer", self.pki / "issuing-ca.pem", "-cert", cert,
                   "-url", url, "-CAfile", self.pki / "ca-chain.pem")
        return done.returncode, (done.stdout + done.stderr).decode()

    def post(self, body: bytes, headers: dict[str, str] | None = None) -> Answer:
        return request(self.server, "POST", "/ocsp", body, headers or OCSP_REQUEST,
                       pki=self.pki)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        return request(self.server, "GET", path, None, headers, pki=self.pki)


@pytest.fixture(scope="module")
def responders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Responders]:
    root = tmp_path_factory.mktemp("ocsp")
    pki = make_pki(root)
    server = Server(pki)
    issuer = x509.load_pem_x509_certificate((pki / "issuing-ca.pem").read_bytes())
    try:
        yield Responders(root, pki, server, issuer)
    finally:
        assert server.stop() == 0


def _request_der(cert: x509.Certificate, issuer: x509.Certificate,
                 nonce: bytes | None = None, algorithm: hashes.HashAlgorithm | None = None,
                 ) -> bytes:
    # SHA-1 CertIDs are what openssl and most clients send (RFC 5019 2.1.1), not a signature.
    builder = ocsp.OCSPRequestBuilder().add_certificate(
        cert, issuer, algorithm or hashes.SHA1())  # noqa: S303
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _signed_by_issuer(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> None:
    public = issuer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(response.signature, response.tbs_response_bytes,
                  ec.ECDSA(response.signature_hash_algorithm))  # type: ignore[arg-type]


# -- openssl ocsp, the outside client -----------------------------------------------------------

@pytest.mark.parametrize("scheme", ["https", "http"])
def test_openssl_ocsp_reports_good_and_revoked(responders: Responders, scheme: str) -> None:
    """openssl ocsp verifies the CA-signed answer: good, then revoked with reason and time."""
    cert, path = responders.certificate(f"ocsp-{scheme}")
    url = (responders.server.url if scheme == "https" else responders.server.http_url) + "/ocsp"
    code, out = responders.openssl_ocsp(path, url)
    assert code == 0, out
    assert "Response verify OK" in out
    assert f"{path}: good" in out
    with Authority(responders.pki) as authority:
        authority.revoke(f"ocsp-{scheme}", None, "keyCompromise")
        [row] = authority.registry.certificates(f"ocsp-{scheme}")
    code, out = responders.openssl_ocsp(path, url)
    assert code == 0, out
    assert "Response verify OK" in out
    assert f"{path}: revoked" in out
    assert "Reason: keyCompromise" in out
    revoked_at = dt.datetime.strptime(str(row.revoked_at), "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.UTC)
    assert f"Revocation Time: {revoked_at:%b %e %H:%M:%S %Y} GMT" in out
    assert format_serial(cert.serial_number) == row.serial


def test_on_hold_is_revoked_with_certificate_hold_until_resumed(responders: Responders) -> None:
    """suspend answers revoked/certificateHold (RFC 6960 2.2); resume answers good again."""
    _, path = responders.certificate("ocsp-held")
    url = responders.server.url + "/ocsp"
    with Authority(responders.pki) as authority:
        authority.suspend("ocsp-held")
    code, out = responders.openssl_ocsp(path, url)
    assert code == 0, out
    assert f"{path}: revoked" in out
    assert "Reason: certificateHold" in out
    with Authority(responders.pki) as authority:
        authority.resume("ocsp-held")
    _, out = responders.openssl_ocsp(path, url)
    assert f"{path}: good" in out


# -- the protocol details ---------------------------------------------------------------------

def test_the_nonce_is_echoed_and_the_issuer_signs_by_key_hash(responders: Responders) -> None:
    """RFC 6960 4.4.1 nonce echoed; responderID byKey; the issuing CA's signature verifies."""
    cert, _ = responders.certificate("ocsp-nonce")
    nonce = os.urandom(16)
    answer = responders.post(_request_der(cert, responders.issuer, nonce))
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/ocsp-response"
    assert answer.headers["cache-control"] == "no-store"
    response = ocsp.load_der_ocsp_response(answer.body)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert response.serial_number == cert.serial_number
    assert response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    key_hash = x509.SubjectKeyIdentifier.from_public_key(responders.issuer.public_key()).digest
    assert response.responder_key_hash == key_hash
    assert response.certificates == []
    _signed_by_issuer(response, responders.issuer)
    assert response.next_update_utc is not None
    assert response.this_update_utc < response.next_update_utc


def test_get_with_the_url_encoded_base64_request(responders: Responders, tmp_path: Path) -> None:
    """RFC 6960 A.1 GET form, built by openssl ocsp -reqout and fetched with curl."""
    _, path = responders.certificate("ocsp-get")
    req = tmp_path / "req.der"
    made = run("openssl", "ocsp", "-issuer", responders.pki / "issuing-ca.pem", "-cert", path,
               "-no_nonce", "-reqout", req)
    assert made.returncode == 0, made.stderr
    import base64

    encoded = urllib.parse.quote(base64.b64encode(req.read_bytes()).decode(), safe="")
    resp = tmp_path / "resp.der"
    done = run("curl", "-sS", "--cacert", responders.pki / "ca-chain.pem", "-D",
               tmp_path / "headers", "-o", resp, f"{responders.server.url}/ocsp/{encoded}")
    assert done.returncode == 0, done.stderr
    assert "cache-control: public, max-age=60" in (tmp_path / "headers").read_text().lower()
    checked = run("openssl", "ocsp", "-respin", resp, "-issuer",
                  responders.pki / "issuing-ca.pem", "-cert", path, "-CAfile",
                  responders.pki / "ca-chain.pem")
    assert checked.returncode == 0, checked.stderr
    assert b": good" in checked.stdout
    unencoded = responders.get("/ocsp/" + base64.b64encode(req.read_bytes()).decode())
    assert ocsp.load_der_ocsp_response(unencoded.body).certificate_status \
        is ocsp.OCSPCertStatus.GOOD


def test_unknown_serial_and_foreign_issuer_are_unknown(responders: Responders) -> None:
    """A serial this CA never issued, or another CA's certificate: status unknown (RFC 6960 2.2)."""
    import trustme

    foreign_ca = trustme.CA()
    foreign = x509.load_pem_x509_certificate(foreign_ca.issue_cert("x.test").cert_chain_pems[0]
                                             .bytes())
    foreign_issuer = x509.load_pem_x509_certificate(foreign_ca.cert_pem.bytes())
    cert, _ = responders.certificate("ocsp-template")
    never_issued = x509.CertificateBuilder(
        issuer_name=cert.issuer, subject_name=cert.subject, public_key=cert.public_key(),
        serial_number=x509.random_serial_number(), not_valid_before=cert.not_valid_before_utc,
        not_valid_after=cert.not_valid_after_utc,
    ).sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    for subject, issuer in ((never_issued, responders.issuer), (foreign, foreign_issuer)):
        response = ocsp.load_der_ocsp_response(
            responders.post(_request_der(subject, issuer)).body)
        assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
        assert response.certificate_status is ocsp.OCSPCertStatus.UNKNOWN
        _signed_by_issuer(response, responders.issuer)


@pytest.mark.parametrize("how", ["POST garbage", "GET garbage", "GET bad base64",
                                 "two certificates"])
def test_malformed_requests_get_malformed_request(responders: Responders, how: str,
                                                  tmp_path: Path) -> None:
    """Anything that is not one DER OCSPRequest: HTTP 200 with status malformedRequest."""
    if how == "POST garbage":
        answer = responders.post(b"\x30\x03garbage")
    elif how == "GET garbage":
        answer = responders.get("/ocsp/" + urllib.parse.quote("AAAA"))
    elif how == "GET bad base64":
        answer = responders.get("/ocsp/%%%%")
    else:
        _, a = responders.certificate("ocsp-two-a")
        _, b = responders.certificate("ocsp-two-b")
        made = run("openssl", "ocsp", "-issuer", responders.pki / "issuing-ca.pem", "-cert", a,
                   "-cert", b, "-reqout", tmp_path / "two.der")
        assert made.returncode == 0, made.stderr
        answer = responders.post((tmp_path / "two.der").read_bytes())
    assert answer.status == 200
    response = ocsp.load_der_ocsp_response(answer.body)
    assert response.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_ocsp_post_needs_its_content_type_and_a_small_body(responders: Responders) -> None:
    """415 for another content type, 413 over 64 KiB; the next request is still answered."""
    cert, _ = responders.certificate("ocsp-ct")
    body = _request_der(cert, responders.issuer)
    assert responders.post(body, {"Content-Type": "application/octet-stream"}).status == 415
    assert responders.post(b"\x30" * 70_000).status == 413
    assert responders.post(body).status == 200


def test_responder_answers_sha256_cert_ids_and_omits_unspecified_reasons(
        tmp_path: Path) -> None:
    """The responder itself: SHA-256 CertIDs match; a revocation without reason has none."""
    pki = make_pki(tmp_path)
    with Authority(pki) as authority:
        [result] = authority.issuer().sign([CSRInput("r.csr", make_csr(cn="plain"))],
                                           SignOptions())
        assert result.pem is not None
        cert = x509.load_pem_x509_certificate(result.pem.encode())
        authority.revoke("plain", None, "unspecified")
        responder = Responder(authority.ca, lambda serial: (
            ("revoked", authority.registry.certificate(serial).revoked_at, "unspecified", None)  # type: ignore[union-attr]
            if authority.registry.certificate(serial) else None))
        now = dt.datetime.now(dt.UTC)
        answer = responder.respond(_request_der(cert, authority.ca.cert,
                                                algorithm=hashes.SHA256()), now)
    response = ocsp.load_der_ocsp_response(answer.der)
    assert (answer.result, answer.serial) == ("revoked", format_serial(cert.serial_number))
    assert response.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert response.revocation_reason is None
    assert isinstance(response.hash_algorithm, hashes.SHA256)


# -- the CRL endpoint ---------------------------------------------------------------------------

def test_crl_is_served_as_der_with_caching_headers(responders: Responders) -> None:
    """GET /crl is crl.pem in DER with ETag, Last-Modified, Cache-Control; 304 if unchanged."""
    answer = responders.get("/crl")
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(answer.body)
    on_disk = x509.load_pem_x509_crl((responders.pki / "crl.pem").read_bytes())
    assert crl.public_bytes(serialization.Encoding.DER) == \
        on_disk.public_bytes(serialization.Encoding.DER)
    assert crl.is_signature_valid(responders.issuer.public_key())  # type: ignore[arg-type]
    assert answer.headers["cache-control"].startswith("public, max-age=")
    assert 0 < int(answer.headers["cache-control"].rsplit("=", 1)[1]) <= 60
    assert answer.headers["last-modified"].endswith(" GMT")
    etag = answer.headers["etag"]
    again = responders.get("/crl", {"If-None-Match": etag})
    assert (again.status, again.body, again.headers["etag"]) == (304, b"", etag)
    since = responders.get("/crl", {"If-Modified-Since": answer.headers["last-modified"]})
    assert since.status == 304


def test_crl_changes_after_a_revocation_and_plain_http_serves_it(
        responders: Responders) -> None:
    """A revocation rewrites crl.pem: /crl has a new ETag and lists it; http gives the same."""
    before = responders.get("/crl").headers["etag"]
    cert, _ = responders.certificate("crl-dev")
    with Authority(responders.pki) as authority:
        authority.revoke("crl-dev", None, "cessationOfOperation")
    changed = responders.get("/crl", {"If-None-Match": before})
    assert changed.status == 200
    assert changed.headers["etag"] != before
    entry = x509.load_der_x509_crl(changed.body).get_revoked_certificate_by_serial_number(
        cert.serial_number)
    assert entry is not None
    plain = run("curl", "-sS", f"{responders.server.http_url}/crl")
    assert plain.stdout == changed.body
    est_over_http = run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                        f"{responders.server.http_url}/.well-known/est/cacerts")
    assert est_over_http.stdout == b"404"  # enrollment is never offered without TLS


def test_a_crl_past_half_its_lifetime_is_re_signed_by_the_service(tmp_path: Path) -> None:
    """The service keeps /crl fresh: a CRL past half its lifetime is re-signed and audited."""
    pki = make_pki(tmp_path)
    with Authority(pki) as authority, authority.registry.write("test") as tx:
        stale = publish_crl(tx, authority.ca, authority.config, authority.paths.crl,
                            dt.datetime.now(dt.UTC) - dt.timedelta(hours=20))
    old_number = stale.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    server = Server(pki)
    try:
        request(server, "GET", "/crl", pki=pki)  # the first batch; then the check runs
        fresh = x509.load_der_x509_crl(request(server, "GET", "/crl", pki=pki).body)
    finally:
        server.stop()
    assert fresh.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number \
        == old_number + 1
    assert dt.datetime.now(dt.UTC) - fresh.last_update_utc < dt.timedelta(minutes=5)
    with Authority(pki) as authority:
        [(actor,)] = authority.registry.conn.execute(
            "SELECT actor FROM events WHERE action = 'crl.publish'").fetchall()
    assert actor == "est:service"
