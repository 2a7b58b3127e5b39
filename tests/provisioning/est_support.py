"""A real ``fleet-provision serve`` on loopback for the EST/OCSP tests, and the outside clients.

The server is the console script's code path in a subprocess, started on port 0; the tests
wait for its ready line on stderr (never a sleep) and stop it with SIGTERM, which is the
clean shutdown that writes the last audit events.
"""

from __future__ import annotations

import base64
import http.client
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from provisioning.authority import initialize
from provisioning.config import PKIConfig
from tests.provisioning.conftest import ORG, TRUST_DOMAIN
from tests.provisioning.csrs import PrivateKey

READY = re.compile(r"listening on (https://\S+)(?: (http://\S+))?")
NEEDS_TOOLS = shutil.which("openssl") is None or shutil.which("curl") is None


def make_pki(root: Path, allowed: list[str] | None = None, **config: object) -> Path:
    """A PKI whose pki.toml names a station group and, with *allowed*, a manifest."""
    pki = root / "pki"
    initialize(pki, PKIConfig(trust_domain=TRUST_DOMAIN, organisation=ORG,
                              station_groups=("stations",),
                              manifest="manifest.txt" if allowed is not None else None,
                              **config), None)  # type: ignore[arg-type]
    if allowed is not None:
        (pki / "manifest.txt").write_text("\n".join(allowed) + "\n")
    return pki


class Server:
    """``fleet-provision serve --bind 127.0.0.1:0 --http-bind 127.0.0.1:0``."""

    def __init__(self, pki: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "provisioning.cli", "serve", "--pki", str(pki),
             "--bind", "127.0.0.1:0", "--http-bind", "127.0.0.1:0", *extra],
            stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            found = READY.search(line)
            if found:
                self.url, self.http_url = found.group(1), found.group(2)
                break
        else:
            raise AssertionError(f"serve did not start (exit {self.proc.wait()}): "
                                 f"{''.join(self.lines)}")
        self.port = int(self.url.rsplit(":", 1)[1])
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        self.lines.extend(self.proc.stderr)

    def stop(self) -> int:
        """SIGTERM, the clean shutdown; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self._drain.join(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def client_context(pki: Path, cert: Path | None = None, key: Path | None = None,
                   ) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca-chain.pem"))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def request(server: Server, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, ctx: ssl.SSLContext | None = None,
            *, pki: Path) -> Answer:
    """One HTTPS request with the standard library: what a minimal EST client does."""
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=30,
                                       context=ctx or client_context(pki))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                      response.read())
    finally:
        conn.close()


def basic(name: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()


def enroll_body(csr_pem: bytes) -> bytes:
    """What ``openssl base64`` makes of a DER CSR: base64 in 64-character lines."""
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    return base64.encodebytes(der)


def issued(answer: Answer) -> x509.Certificate:
    """The one certificate of a base64 certs-only EST response."""
    assert answer.status == 200, (answer.status, answer.text)
    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer.body))
    assert len(certs) == 1
    return certs[0]


def write_identity(folder: Path, name: str, cert: x509.Certificate,
                   key: PrivateKey) -> tuple[Path, Path]:
    """PEM files for ``curl --cert/--key`` and ``ssl.load_cert_chain``."""
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def run(*args: str | Path, stdin: bytes | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(a) for a in args], input=stdin, capture_output=True,
                          check=False, cwd=cwd)
