"""A provisioning walk-through: a factory line in a temporary folder, run with the real CLI.

Each step prints the command an operator would type, then its output.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEVICES = ("sensor-0001", "sensor-0002", "sensor-0003")


def _run(cmd: list[str], cwd: Path, *, check: bool = True) -> int:
    shown = " ".join(shlex.quote(c) for c in cmd)
    print(f"\n$ {shown}", flush=True)
    done = subprocess.run(cmd, cwd=cwd, check=False)
    if check and done.returncode != 0:
        print(f"walkthrough: step failed with exit code {done.returncode}", file=sys.stderr)
        sys.exit(1)
    return done.returncode


def _fleet() -> str:
    found = shutil.which("fleet-provision", path=str(Path(sys.executable).parent))
    return found or "fleet-provision"


def _make_csr(work: Path, device_id: str) -> None:
    """As the device does it: its own key, never leaving it; openssl when present."""
    key, csr = work / "device-keys" / f"{device_id}.key", work / "csrs" / f"{device_id}.csr"
    if shutil.which("openssl"):
        _run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
              "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key.relative_to(work)),
              "-subj", f"/CN={device_id}", "-out", str(csr.relative_to(work))], work)
        return
    private = ec.generate_private_key(ec.SECP256R1())
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
               .sign(private, hashes.SHA256()))
    csr.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    print(f"(openssl not found: made {csr.name} with cryptography)")


def main() -> None:
    fleet = _fleet()
    with tempfile.TemporaryDirectory(prefix="fleet-walkthrough-") as tmp:
        work = Path(tmp)
        (work / "csrs").mkdir()
        (work / "device-keys").mkdir()
        print(f"# A factory line in {work}")
        _run([fleet, "init", "--pki", "fleet-pki", "--org", "Acme Devices",
              "--trust-domain", "fleet.acme.example"], work)
        print("\n# Each device makes its own key and CSR")
        for device_id in DEVICES:
            _make_csr(work, device_id)
        (work / "manifest.txt").write_text("\n".join(DEVICES) + "\n")
        print("\n# The CA checks every CSR against policy and the production manifest")
        _run([fleet, "sign", "--pki", "fleet-pki", "--manifest", "manifest.txt",
              "--group", "sensors", "--out", "certs", "csrs"], work)
        if shutil.which("openssl"):
            _run(["openssl", "verify", "-CAfile", "fleet-pki/ca-chain.pem",
                  "certs/sensor-0001.pem"], work)
        print("\n# A device is stolen: revoke it; crl.pem is rewritten at once")
        _run([fleet, "revoke", "--pki", "fleet-pki", "sensor-0002", "--reason",
              "keyCompromise"], work)
        _run([fleet, "devices", "--pki", "fleet-pki"], work)
        if shutil.which("openssl"):
            _run(["openssl", "crl", "-in", "fleet-pki/crl.pem", "-CAfile",
                  "fleet-pki/ca-chain.pem", "-noout", "-text"], work)
        _run([fleet, "audit", "verify", "--pki", "fleet-pki"], work)
        print("\nwalkthrough done: every step above is a real fleet-provision command.")


if __name__ == "__main__":
    main()
