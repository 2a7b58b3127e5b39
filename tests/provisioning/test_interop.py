"""Interop with OpenSSL, the tool every factory line and gateway already has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.provisioning.conftest import CliResult

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="openssl binary required (Debian: openssl)")


def _openssl(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          check=False, cwd=cwd)


def _req(tmp: Path, cn: str, newkey: list[str]) -> Path:
    csr = tmp / f"{cn}.csr"
    done = _openssl("req", "-new", *newkey, "-nodes", "-keyout", tmp / f"{cn}.key",
                    "-subj", f"/C=DE/O=Factory/CN={cn}", "-out", csr)
    assert done.returncode == 0, done.stderr
    return csr


def test_openssl_csrs_are_issued_and_verify(pki_dir: Path, tmp_path: Path,
                                            cli: Callable[..., CliResult]) -> None:
    """openssl req EC and RSA CSRs are accepted; openssl verify accepts the certificates."""
    ec = _req(tmp_path, "ec-dev", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])
    ec384 = _req(tmp_path, "ec384-dev", ["-newkey", "ec", "-pkeyopt",
                                         "ec_paramgen_curve:P-384"])
    rsa = _req(tmp_path, "rsa-dev", ["-newkey", "rsa:2048"])
    ed = _req(tmp_path, "ed-dev", ["-newkey", "ed25519"])
    result = cli("sign", "--pki", pki_dir, "--out", tmp_path / "out", "--json",
                 ec, ec384, rsa, ed)
    assert result.code == 0, result.out
    assert [r["status"] for r in json.loads(result.out)] == ["issued"] * 4
    for cn in ("ec-dev", "ec384-dev", "rsa-dev", "ed-dev"):
        done = _openssl("verify", "-purpose", "sslclient", "-CAfile", pki_dir / "ca-chain.pem",
                        tmp_path / "out" / f"{cn}.pem")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith(": OK")
        text = _openssl("x509", "-in", tmp_path / "out" / f"{cn}.pem", "-noout", "-text").stdout
        assert f"URI:spiffe://fleet.test/device/{cn}" in text
        assert "Subject: O=Test Org, CN=" + cn in text.replace(" = ", "=")
        assert "DE" not in text.split("Subject:")[1].split("\n")[0]


def test_openssl_verifies_the_crl_and_lists_revoked_serials(
        pki_dir: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """openssl crl -verify accepts crl.pem and shows every revoked serial with its reason."""
    for cn in ("a", "b", "c"):
        _req(tmp_path, cn, ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])
    rows = json.loads(cli("sign", "--pki", pki_dir, "--out", tmp_path / "o", "--json",
                          tmp_path).out)
    serial = {r["device_id"]: r["serial"] for r in rows}
    cli("revoke", "--pki", pki_dir, "a", "--reason", "keyCompromise")
    cli("revoke", "--pki", pki_dir, "b", "--reason", "cessationOfOperation")
    cli("suspend", "--pki", pki_dir, "c")
    done = _openssl("crl", "-in", pki_dir / "crl.pem", "-CAfile", pki_dir / "issuing-ca.pem",
                    "-noout", "-text")
    assert done.returncode == 0, done.stderr
    assert "verify OK" in done.stderr + done.stdout
    listed = dict(re.findall(r"Serial Number: ([0-9A-F]+)\s+Revocation Date:[^\n]*\n\s+CRL "
                             r"entry extensions:\s+X509v3 CRL Reason Code:\s+([^\n]+)",
                             done.stdout))
    assert listed == {serial["a"].upper(): "Key Compromise",
                      serial["b"].upper(): "Cessation Of Operation",
                      serial["c"].upper(): "Certificate Hold"}
    # A revoked certificate fails openssl's own CRL check; a good one passes.
    chain_crl = tmp_path / "chain+crl.pem"
    chain_crl.write_bytes((pki_dir / "ca-chain.pem").read_bytes()
                          + (pki_dir / "crl.pem").read_bytes())
    revoked = _openssl("verify", "-crl_check", "-CAfile", chain_crl, tmp_path / "o" / "a.pem")
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stdout + revoked.stderr
