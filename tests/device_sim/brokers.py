"""Brokers for the simulator's tests: Debian's Mosquitto with the fleet's policy."""

from __future__ import annotations

import getpass
import re
import shutil
import socket
from pathlib import Path

from device_sim.lab import ReadyProcess

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()),
    None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """``mosquitto -c FILE``: mutual TLS, identity from the certificate, a per-device ACL.

    The closest Mosquitto gets to the hub's policy: ``require_certificate``,
    ``use_identity_as_username`` (username = certificate CN = device id), the fleet CRL
    (read once, at start) and ``pattern readwrite devices/%u/#``.
    """

    def __init__(self, root: Path, pki: Path) -> None:
        assert MOSQUITTO is not None
        self.port = free_port()
        acl = root / "mosquitto.acl"
        acl.write_text("pattern readwrite devices/%u/#\n")
        config = root / "mosquitto.conf"
        config.write_text(
            f"user {getpass.getuser()}\n"
            "per_listener_settings false\n"
            "allow_anonymous false\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {pki / 'ca-chain.pem'}\n"
            f"certfile {pki / 'server.pem'}\n"
            f"keyfile {pki / 'server.key'}\n"
            f"crlfile {pki / 'crl.pem'}\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
            f"acl_file {acl}\n")
        self.server = ReadyProcess("mosquitto", [MOSQUITTO, "-c", str(config)],
                                   re.compile(" running"), timeout=20, stop_timeout=10)
        self.log = self.server.log

    def stop(self) -> None:
        self.server.stop()
