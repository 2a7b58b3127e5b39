"""HTTP side: what ``fleet-provision serve`` sets up around the service, and its foreground run.

The bind addresses, the TLS context (a client certificate requested, optional, its validity
left to the CA worker so a device hears why it is refused), the service's own certificate
``est-server.pem`` kept fitting the bind host, and the run until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from provisioning.authority import Authority
from provisioning.errors import UsageError
from provisioning.est.messages import LOG_FORMAT
from provisioning.est.service import EnrollmentService
from provisioning.identity import host_name_problem, normalise_host_name
from provisioning.timefmt import utcnow

log = logging.getLogger("provisioning.est")

SERVER_CERT_MIN_DAYS = 30  # est-server.pem is re-issued when it has less left than this
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (not exported by the ssl module): the service checks
# the client certificate's validity itself, so an expired device hears a 403 with the
# reason instead of a bare TLS alert. The chain is still verified in full.
_NO_CHECK_TIME = 0x200000


def parse_bind(text: str, option: str = "--bind") -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; port 0 picks a free port."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"{text!r} is not HOST:PORT", option)
    return host, int(port_text)


def tls_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """TLS 1.2+, a client certificate requested, optional, verified against *client_ca*."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS certificate and key: {exc}", str(cert)) from exc
    ctx.load_verify_locations(cafile=client_ca)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= _NO_CHECK_TIME
    return ctx


def server_names(host: str) -> tuple[str, list[str]]:
    """(DNS name, IP addresses) for the default certificate of a bind host."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return normalise_host_name(host), []
    if address.is_unspecified:
        # The machine's name when it is a valid host name (container names may not be).
        name = normalise_host_name(socket.gethostname())
        return name if host_name_problem(name) is None else "localhost", ["127.0.0.1", "::1"]
    return "localhost", [str(address)]


def ensure_server_cert(authority: Authority, host: str) -> tuple[Path, Path]:
    """``est-server.pem``/``.key`` in the PKI folder: reused while they fit, else re-issued."""
    root = authority.paths.root
    cert_path, key_path = root / "est-server.pem", root / "est-server.key"
    name, ips = server_names(host)
    if not _still_fits(cert_path, key_path, authority, name, ips):
        authority.server_cert(name, ips, root, basename="est-server")
    return cert_path, key_path


def _still_fits(cert_path: Path, key_path: Path, authority: Authority, name: str,
                ips: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        cert.verify_directly_issued_by(authority.ca.cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, IndexError):
        return False
    if not key_path.is_file():
        return False
    if cert.not_valid_after_utc - utcnow() < dt.timedelta(days=SERVER_CERT_MIN_DAYS):
        return False
    have_ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return name in san.get_values_for_type(x509.DNSName) and set(ips) <= have_ips


def quiet_tls_errors(loop: asyncio.AbstractEventLoop) -> None:
    """A failed handshake (no chain, a rogue CA) is the client's problem: log it quietly."""
    def handler(the_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError):
            log.debug("TLS/connection error: %s", exc)
            return
        the_loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def serve_until(service: EnrollmentService, host: str, port: int,
                      http: tuple[str, int] | None, stop: asyncio.Event,
                      ready: Callable[[list[str]], None]) -> None:
    """Run until *stop* is set, then shut down cleanly."""
    quiet_tls_errors(asyncio.get_running_loop())
    urls = await service.start(host, port, http)
    try:
        ready(urls)
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await service.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - Windows
        return None
    return uvloop.new_event_loop


def run(service: EnrollmentService, host: str, port: int,
        http: tuple[str, int] | None) -> None:
    """The CLI's foreground service: runs until SIGINT or SIGTERM, then shuts down cleanly.

    The ready signal is one line on stderr, ``... listening on URL [URL]``: tests and
    supervisors wait for it instead of sleeping.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=LOG_FORMAT)

    def announce(urls: list[str]) -> None:
        sys.stderr.write(f"fleet-provision serve: listening on {' '.join(urls)}\n")
        sys.stderr.flush()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_until(service, host, port, http, stop, announce)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())
