"""A fleet lab in a folder: a PKI, a server certificate, a hub.toml and ``fleet-hub serve``.

Used by ``fleet-sim quickstart``, the tests and the benchmark. The hub is a separate process
(``python -m hub.cli serve``): the simulator talks to it over the network only.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from provisioning.authority import Authority, initialize
from provisioning.config import PKIConfig

READY = re.compile(r"fleet-hub ready: listening on (\S+):(\d+)")
TRUST_DOMAIN = "quickstart.fleet.test"


def make_pki(root: Path, *, organisation: str = "Quickstart Fleet") -> Path:
    """A new PKI in ``root/pki`` with a hub certificate for localhost / 127.0.0.1."""
    pki = root / "pki"
    initialize(pki, PKIConfig(trust_domain=TRUST_DOMAIN, organisation=organisation), None)
    with Authority(pki, actor="fleet-sim") as authority:
        authority.server_cert("localhost", ["127.0.0.1"], pki)
    return pki


def write_hub_config(root: Path, pki: Path, *, refresh: float = 0.5,
                     subscribe: tuple[str, ...] = ("devices/{device_id}/#",
                                                   "fleet/broadcast/#"),
                     name: str = "hub.toml") -> Path:
    """hub.toml for a loopback hub on a free port, watching the PKI's registry and CRL."""
    allowed = ", ".join(f'"{f}"' for f in subscribe)
    text = f"""\
[listener]
bind = "127.0.0.1:0"
server_cert = "{pki / 'server.pem'}"
server_key = "{pki / 'server.key'}"
client_ca = "{pki / 'ca-chain.pem'}"

[revocation]
registry = "{pki / 'registry.db'}"
crl = "{pki / 'crl.pem'}"
refresh_seconds = {refresh}

[auth]
client_id = "must-match"

[acl]
publish = ["devices/{{device_id}}/#"]
subscribe = [{allowed}]

[audit]
path = "{root / 'hub-audit.db'}"

[metrics]
bind = "127.0.0.1:0"
"""
    path = root / name
    path.write_text(text)
    return path


def stop_process(process: subprocess.Popen[str], pump: threading.Thread,
                 sig: signal.Signals, timeout: float) -> int:
    """Stop a broker child: *sig*, SIGKILL after *timeout* s; then its stderr reader."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    pump.join(5)
    if process.stderr is not None:
        process.stderr.close()
    return process.returncode


class HubProcess:
    """``fleet-hub serve --config FILE`` until :meth:`stop`; ready when its ready line shows."""

    def __init__(self, config: Path, *, timeout: float = 60.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, cwd=config.parent, env=env)
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.host = ""
        self.port = 0
        ready = threading.Event()

        def pump() -> None:
            assert self.process.stderr is not None  # noqa: S101
            for line in self.process.stderr:
                self.log.append(line)
                match = READY.search(line)
                if match and not ready.is_set():
                    self.host, self.port = match[1], int(match[2])
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True, name="hub-stderr")
        self._pump.start()
        if not ready.wait(timeout) or not self.port:
            self.stop()
            raise RuntimeError("the hub did not become ready:\n" + "".join(self.log))

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the hub process so far, from /proc/PID/stat (Linux)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return float("nan")
        values = stat.rsplit(")", 1)[1].split()
        return (int(values[11]) + int(values[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the hub flushes its audit store), SIGKILL after *timeout* seconds."""
        return stop_process(self.process, self._pump, signal.SIGTERM, timeout)

    def __enter__(self) -> HubProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
