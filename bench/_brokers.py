"""A fleet and the brokers under test, for the hub benchmarks.

:func:`build_fleet` makes a PKI folder with a hub server certificate and enrolls *count* devices
the factory way, each with its own P-256 key, as one batch (all CSRs first, then one
``Authority(pki).issuer().sign(...)`` call); :func:`enroll` adds more, optionally into a group
(``operators`` may subscribe to ``#`` in :func:`hub_config`). :class:`BrokerProcess` starts
``fleet-hub serve`` (waiting for its ready line) or stock ``amqtt -c stock.yaml`` (waiting for
its listener line) as a child process whose PID the benchmarks read /proc for.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from _mqtt_load import DeviceCreds
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sim.lab import stop_process
from provisioning.authority import Authority, initialize
from provisioning.config import PKIConfig
from provisioning.csr import CSRInput
from provisioning.issuer import SignOptions

TRUST_DOMAIN = "bench.fleet.test"
HUB_READY = re.compile(r"fleet-hub ready: listening on [^:]+:(\d+)")
STOCK_READY = re.compile(r"Listener 'default' bind to [^:]+:(\d+)")


def build_fleet(root: Path, count: int, prefix: str = "dev") -> tuple[Path, list[DeviceCreds]]:
    """A PKI under *root*/pki and *count* enrolled devices under *root*/devices."""
    pki = root / "pki"
    initialize(pki, PKIConfig(trust_domain=TRUST_DOMAIN, organisation="Bench Org"), None)
    with Authority(pki) as authority:
        authority.server_cert("localhost", ["127.0.0.1"], pki)
    out = root / "devices"
    out.mkdir()
    return pki, enroll(pki, out, [f"{prefix}-{i:05d}" for i in range(count)])


def enroll(pki: Path, out: Path, device_ids: Sequence[str],
           group: str | None = None) -> list[DeviceCreds]:
    """Enroll *device_ids* the factory way (own P-256 key, CSR), one batch, into *group*."""
    inputs: list[CSRInput] = []
    devices: list[DeviceCreds] = []
    for device_id in device_ids:
        key = ec.generate_private_key(ec.SECP256R1())
        key_path = out / f"{device_id}.key"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
               .sign(key, hashes.SHA256()))
        inputs.append(CSRInput(device_id, csr.public_bytes(serialization.Encoding.PEM)))
        devices.append(DeviceCreds(device_id, str(out / f"{device_id}.pem"), str(key_path)))
    with Authority(pki) as authority:
        results = authority.issuer().sign(inputs, SignOptions(out_dir=out, group=group))
    bad = [r for r in results if r.status != "issued"]
    if bad:
        raise RuntimeError(f"{len(bad)} devices not issued, e.g. {bad[0]}")
    return devices


def hub_config(root: Path, *, refresh_seconds: float = 1.0,
               max_pending_tls: int = 65535) -> Path:
    """hub.toml with every check on: registry + CRL revocation, ACL, audit, metrics, limits.

    ``[limits]`` raises publish_rate and publish_bytes_rate far above what the throughput
    step's publishers send (thousands of messages/s each, against 100/s by default): the
    limiter still runs for every message, it just never drops one, so the figure measures the
    hub with its per-device buckets, not the limit. Likewise max_pending_tls: the load
    connects every device from 127.0.0.1 (a storm has 1,000 in flight from that one address),
    so the per-address count runs on every connect but never refuses one.
    """
    text = f"""
[listener]
bind = "127.0.0.1:0"
server_cert = "pki/server.pem"
server_key = "pki/server.key"
client_ca = "pki/ca-chain.pem"
handshake_timeout = 10

[revocation]
registry = "pki/registry.db"
crl = "pki/crl.pem"
refresh_seconds = {refresh_seconds}

[auth]
client_id = "must-match"
password = false

[acl]
publish = ["devices/{{device_id}}/#"]
subscribe = ["devices/{{device_id}}/#", "fleet/broadcast/#"]

[acl.groups.operators]
subscribe = ["#"]
publish = ["fleet/broadcast/#"]

[audit]
path = "hub-audit.db"

[metrics]
bind = "127.0.0.1:0"

[limits]
publish_rate = 10000000
publish_bytes_rate = 10000000000
max_pending_tls = {max_pending_tls}
"""
    path = root / "hub.toml"
    path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stock_config(root: Path, pki: Path, port: int) -> Path:
    """Stock amqtt as shipped: its own TLS listener (CERT_OPTIONAL), anonymous auth."""
    text = f"""listeners:
  default:
    type: tcp
    bind: 127.0.0.1:{port}
    ssl: true
    certfile: {pki / "server.pem"}
    keyfile: {pki / "server.key"}
    cafile: {pki / "ca-chain.pem"}
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
"""
    path = root / "stock.yaml"
    path.write_text(text)
    return path


class BrokerProcess:
    """A broker child process; ``port`` is known once its ready line was seen on stderr."""

    def __init__(self, name: str, argv: list[str], ready: re.Pattern[str], cwd: Path,
                 *, timeout: float = 60.0, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.lines: list[str] = []
        env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        found: list[int] = []
        seen = threading.Event()

        def pump() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                if len(self.lines) < 20_000:
                    self.lines.append(line)
                match = ready.search(line)
                if match and not found:
                    found.append(int(match[1]))
                    seen.set()
            seen.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not seen.wait(timeout) or not found:
            self.stop()
            raise RuntimeError(f"{name} did not become ready:\n" + "".join(self.lines[-30:]))
        self.port = found[0]

    @classmethod
    def hub(cls, config: Path, env: dict[str, str] | None = None) -> BrokerProcess:
        return cls("hub", [sys.executable, "-m", "hub.cli", "serve", "--config", str(config)],
                   HUB_READY, config.parent, env=env)

    @classmethod
    def stock(cls, config: Path) -> BrokerProcess:
        amqtt = Path(sys.executable).parent / "amqtt"
        return cls("stock-amqtt", [str(amqtt), "-c", str(config)], STOCK_READY, config.parent)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> int:
        """SIGINT (both brokers shut down cleanly on it), then SIGKILL after 15 s."""
        return stop_process(self.process, self._pump, signal.SIGINT, 15)


class Profiler:
    """``py-spy record`` of a process (collapsed stacks, native frames too) until :meth:`stop`.

    py-spy is looked up as $PY_SPY, then on PATH; it is not a project dependency (install it
    anywhere, e.g. ``pip install --target /tmp/pyspy py-spy``).
    """

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        exe = os.environ.get("PY_SPY") or shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("py-spy not found: set PY_SPY or put it on PATH")
        self.out = out
        self.process = subprocess.Popen(
            [exe, "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", str(rate),
             "--native", "--threads"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # let it attach

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
