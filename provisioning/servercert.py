"""Server certificates (a hub's, the enrollment service's): the names they may carry, and
their issue. The server's key is made here; a device's never is.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.config import PKIConfig
from provisioning.errors import UsageError
from provisioning.fsutil import atomic_write
from provisioning.identity import gateway_spiffe_id, host_name_problem, normalise_host_name
from provisioning.pki import IssuingCA
from provisioning.profile import server_certificate
from provisioning.registry.store import Registry
from provisioning.serial import format_serial
from provisioning.timefmt import iso, utcnow

SERVER_MIN_VALIDITY = dt.timedelta(days=365)


def issue_server_cert(registry: Registry, ca: IssuingCA, config: PKIConfig, actor: str,
                      host: str, addresses: list[IPAddress], out_dir: Path,
                      validity: dt.timedelta | int | None, basename: str) -> tuple[Path, Path]:
    """:meth:`provisioning.authority.Authority.server_cert` once *host* and *addresses*
    passed :func:`server_names`: the key, the certificate, both files and the audit event.

    *validity* None is the fleet's, but at least :data:`SERVER_MIN_VALIDITY`: the fleet's
    validity is a device policy, and a fleet on certificates of minutes must not have its
    enrollment service's or gateways' TLS certificates expire minutes after they are made
    (nothing renews those by itself). An int is days (``Authority.server_cert``'s ``days``).
    """
    if isinstance(validity, int):
        validity = dt.timedelta(days=validity)
    if validity is None:
        validity = max(config.validity, SERVER_MIN_VALIDITY)
    now = utcnow()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = server_certificate(ca, config, host, addresses, key.public_key(),
                              validity, now)
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{basename}.pem", out_dir / f"{basename}.key"
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with registry.write(actor) as tx:
        atomic_write(key_path, key_pem, 0o600)
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM) + ca.chain_pem)
        tx.audit(iso(now), "server.issue", None, format_serial(cert.serial_number),
                 {"name": host, "ips": [str(a) for a in addresses],
                  "uri": gateway_spiffe_id(config.trust_domain, host),
                  "not_after": iso(cert.not_valid_after_utc),
                  "out": str(out_dir.absolute())})
    return cert_path, key_path


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def server_names(name: str, ips: Sequence[str]) -> tuple[str, list[IPAddress]]:
    """The host name (normalised) and addresses a server certificate may carry.

    Raises UsageError naming ``--name`` or ``--ip``: a host name that is not one would go
    into the SAN and the gateway's SPIFFE ID as typed (``../../evil`` did, issue 11).
    """
    host = normalise_host_name(name)
    problem = host_name_problem(host)
    if problem is not None:
        raise UsageError(problem, "--name")
    addresses: list[IPAddress] = []
    for text in ips:
        address = _server_address(text)
        if address not in addresses:
            addresses.append(address)
    return host, addresses


def _server_address(text: str) -> IPAddress:
    shown = text if len(text) <= 80 else text[:77] + "..."
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"{shown!r} is not an IP address", "--ip") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        # The zone (%eth0) is local to one host; an IP SAN has no place for it (RFC 5280).
        raise UsageError(f"{shown!r} has a zone index; want the address without %zone",
                         "--ip")
    if address.is_unspecified or address.is_multicast:
        raise UsageError(f"{shown!r} is not an address a client connects to; want the "
                         "hub's unicast address", "--ip")
    return address
