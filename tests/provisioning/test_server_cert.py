"""``server-cert``: DESIGN section 4's gateway profile, and names checked before anything is
written (issue 11 defect 9: ``--name ../../evil`` was certified)."""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.provisioning.conftest import TRUST_DOMAIN, CliResult

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="openssl binary required (Debian: openssl)")


def _leaf(out: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((out / "server.pem").read_bytes())[0]


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _event_count(pki: Path) -> int:
    with sqlite3.connect(pki / "registry.db") as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


def test_profile_is_server_and_client_with_the_gateway_spiffe_id(
        pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """EKU serverAuth + clientAuth; SAN DNS, IPs and spiffe://<domain>/gateway/<host>."""
    out = tmp_path / "gw"
    result = cli("server-cert", "--pki", pki_dir, "--name", "gw1.local", "--ip", "127.0.0.1",
                 "--ip", "::1", "--out", out)
    assert result.code == 0, result.err
    cert = _leaf(out)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    san = _san(cert)
    assert san.get_values_for_type(x509.DNSName) == ["gw1.local"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/gateway/gw1.local"]


@needs_openssl
@pytest.mark.parametrize("purpose", ["sslserver", "sslclient"])
def test_openssl_verifies_server_pem_for_both_purposes(
        purpose: str, pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """openssl verify -purpose sslserver and sslclient both accept server.pem's leaf."""
    out = tmp_path / "gw"
    assert cli("server-cert", "--pki", pki_dir, "--name", "gw1.local", "--out", out).code == 0
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(x509.load_pem_x509_certificates((out / "server.pem").read_bytes())[0]
                    .public_bytes(Encoding.PEM).decode())
    done = subprocess.run(
        ["openssl", "verify", "-purpose", purpose, "-CAfile", str(pki_dir / "root-ca.pem"),
         "-untrusted", str(pki_dir / "issuing-ca.pem"), str(leaf)],
        capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{leaf}: OK"


@pytest.mark.parametrize(("name", "problem"), [
    ("../../evil", "'../../evil' contains '/'; a host name has no path or URL characters"),
    ("gw\\evil", "'gw\\\\evil' contains '\\\\'; a host name has no path or URL characters"),
    ("gw.local:8883", "'gw.local:8883' contains ':'; a host name has no path or URL "
                      "characters"),
    ("-gw.local", "'-gw.local' has the label '-gw'; want RFC 1123 labels: letters, digits "
                  "and inner hyphens, 1-63 characters each"),
    ("gw-.local", "'gw-.local' has the label 'gw-'; want RFC 1123 labels: letters, digits "
                  "and inner hyphens, 1-63 characters each"),
    ("gw_1.local", "'gw_1.local' has the label 'gw_1'; want RFC 1123 labels: letters, digits "
                   "and inner hyphens, 1-63 characters each"),
    ("*.local", "'*.local' has the label '*'; want RFC 1123 labels: letters, digits and "
                "inner hyphens, 1-63 characters each"),
    ("gw..local", "'gw..local' has an empty label; want labels between single dots"),
    ("gw.local..", "'gw.local.' has an empty label; want labels between single dots"),
    ("", "the host name is empty"),
    ("a" * 64 + ".local", f"'{'a' * 64}.local' has the label '{'a' * 64}'; want RFC 1123 "
                          "labels: letters, digits and inner hyphens, 1-63 characters each"),
    ("1.2.3", "'1.2.3' ends in the all-numeric label '3'; no top-level domain is"),
    ("10.0.0.5", "'10.0.0.5' is an IP address, not a host name; give it with --ip"),
    ("fe80::1", "'fe80::1' is an IP address, not a host name; give it with --ip"),
])
def test_bad_host_names_are_refused_and_nothing_is_written(
        name: str, problem: str, pki_dir: Path, tmp_path: Path,
        cli: Callable[..., CliResult]) -> None:
    """One line naming --name, exit 2, no folder, no files, no audit event."""
    out = tmp_path / "gw"
    events = _event_count(pki_dir)
    result = cli("server-cert", "--pki", pki_dir, "--name", name, "--out", out)
    assert (result.code, result.out, result.err) == (2, "", f"error: {problem} (--name)\n")
    assert not out.exists()
    assert _event_count(pki_dir) == events


def test_a_253_character_name_is_the_longest(pki_dir: Path, tmp_path: Path,
                                             cli: Callable[..., CliResult]) -> None:
    """253 characters pass (RFC 1035's 255 octets on the wire); 254 are refused."""
    longest = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(longest) == 253
    out = tmp_path / "gw"
    assert cli("server-cert", "--pki", pki_dir, "--name", longest, "--out", out).code == 0
    assert _san(_leaf(out)).get_values_for_type(x509.DNSName) == [longest]
    too_long = "c" + longest
    result = cli("server-cert", "--pki", pki_dir, "--name", too_long, "--out", tmp_path / "x")
    assert result.code == 2
    assert result.err.endswith("is 254 characters long; want at most 253 (--name)\n")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("ip", "problem"), [
    ("1.2.3", "'1.2.3' is not an IP address"),
    ("10.0.0.256", "'10.0.0.256' is not an IP address"),
    ("../evil", "'../evil' is not an IP address"),
    ("fe80::1%eth0", "'fe80::1%eth0' has a zone index; want the address without %zone"),
    ("0.0.0.0",  # noqa: S104 (refused, not bound)
     "'0.0.0.0' is not an address a client connects to; want the hub's unicast address"),
    ("::", "'::' is not an address a client connects to; want the hub's unicast address"),
    ("224.0.0.1", "'224.0.0.1' is not an address a client connects to; want the hub's "
                  "unicast address"),
])
def test_bad_addresses_are_refused_and_nothing_is_written(
        ip: str, problem: str, pki_dir: Path, tmp_path: Path,
        cli: Callable[..., CliResult]) -> None:
    """One line naming --ip, exit 2, nothing written, even after a good --ip."""
    out = tmp_path / "gw"
    events = _event_count(pki_dir)
    result = cli("server-cert", "--pki", pki_dir, "--name", "gw1.local", "--ip", "10.0.0.5",
                 "--ip", ip, "--out", out)
    assert (result.code, result.out, result.err) == (2, "", f"error: {problem} (--ip)\n")
    assert not out.exists()
    assert _event_count(pki_dir) == events


def test_trailing_dot_and_case_are_normalised(pki_dir: Path, tmp_path: Path,
                                             cli: Callable[..., CliResult]) -> None:
    """``GW1.Example.COM.`` is certified, and audited, as ``gw1.example.com``."""
    out = tmp_path / "gw"
    result = cli("server-cert", "--pki", pki_dir, "--name", "GW1.Example.COM.", "--ip",
                 "10.0.0.5", "--ip", "10.0.0.5", "--out", out)
    assert result.code == 0, result.err
    san = _san(_leaf(out))
    assert san.get_values_for_type(x509.DNSName) == ["gw1.example.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/gateway/gw1.example.com"]
    with sqlite3.connect(pki_dir / "registry.db") as conn:
        detail = conn.execute("SELECT detail FROM events WHERE action = 'server.issue'"
                              ).fetchone()[0]
    assert '"name":"gw1.example.com"' in detail
    assert f'"uri":"spiffe://{TRUST_DOMAIN}/gateway/gw1.example.com"' in detail
    assert cli("audit", "verify", "--pki", pki_dir).code == 0


def test_hub_trust_domain_is_read_from_the_gateway_uri(pki_dir: Path, tmp_path: Path,
                                                      cli: Callable[..., CliResult]) -> None:
    """hub.trust finds the fleet's domain in server.pem: the URI has the form it parses."""
    trust = pytest.importorskip("hub.trust")
    out = tmp_path / "gw"
    assert cli("server-cert", "--pki", pki_dir, "--name", "gw1.local", "--out", out).code == 0
    assert trust.certificate_trust_domain(out / "server.pem") == TRUST_DOMAIN


@pytest.mark.parametrize(("fleet", "options", "days"), [
    ("10m", (), 365),                      # a minute-scale fleet: a year, not 10 minutes
    ("730d", (), 730),                     # a longer fleet validity is kept
    ("10m", ("--validity", "2h"), None),   # an explicit --validity wins
])
def test_server_certificates_outlive_a_short_fleet_validity(
        pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult],
        fleet: str, options: tuple[str, ...], days: int | None) -> None:
    """The fleet's validity is the devices' policy; without --validity a gateway's (and the
    enrollment service's) certificate lives at least 365 days."""
    done = cli("policy", "set", "--pki", pki_dir, f"validity={fleet}", "renew_grace=1m")
    assert done.code == 0, done.err
    out = tmp_path / "gw"
    result = cli("server-cert", "--pki", pki_dir, "--name", "gw1.local", "--out", out,
                 *options)
    assert result.code == 0, result.err
    cert = _leaf(out)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    want = dt.timedelta(days=days) if days is not None else dt.timedelta(hours=2)
    assert abs(lifetime - want) < dt.timedelta(minutes=10)
