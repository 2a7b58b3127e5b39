"""A fleet and the brokers under test, for the hub benchmarks.

:func:`build_fleet` makes a PKI folder with a hub server certificate and enrolls *count* devices
the factory way, each with its own P-256 key, as one batch (all CSRs first, then one
``Authority(pki).issuer().sign(...)`` call); :func:`enroll` adds more, optionally into a group
(``operators`` may subscribe to ``#`` in :func:`hub_config`). :class:`BrokerProcess` starts
``fleet-hub serve`` (waiting for its ready line) or stock ``amqtt -c stock.yaml`` (waiting for
its listener line) as a child process whose PID the benchmarks read /proc for.
:func:`tree_cpu_seconds` is the CPU of a process and its children (the CA service and its
worker); :class:`FeedReader` fetches the fleet-state feed as a gateway does (for its sizes).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _mqtt_load import DeviceCreds, cpu_seconds, rss_kib

from device_sim.lab import (
    AMQTT_READY,
    LOOPBACK,
    HubProcess,
    ReadyProcess,
    amqtt_argv,
    amqtt_yaml,
    hub_toml,
    make_pki,
)
from device_sim.lab import enroll as lab_enroll

TRUST_DOMAIN = "bench.fleet.test"


def build_fleet(root: Path, count: int, prefix: str = "dev") -> tuple[Path, list[DeviceCreds]]:
    """A PKI under *root*/pki and *count* enrolled devices under *root*/devices."""
    pki = make_pki(root, trust_domain=TRUST_DOMAIN, organisation="Bench Org", actor=None)
    out = root / "devices"
    out.mkdir()
    return pki, enroll(pki, out, [f"{prefix}-{i:05d}" for i in range(count)])


def enroll(pki: Path, out: Path, device_ids: Sequence[str],
           group: str | None = None) -> list[DeviceCreds]:
    """Enroll *device_ids* the factory way (own P-256 key, CSR), one batch, into *group*."""
    return [DeviceCreds(d.device_id, str(d.cert), str(d.key))
            for d in lab_enroll(pki, out, device_ids, group=group)]


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
    path = root / "hub.toml"
    path.write_text(hub_toml("pki", LOOPBACK, {
        "listener": {"handshake_timeout": 10},
        "revocation": {"refresh_seconds": refresh_seconds},
        "acl": {"groups": {"operators": {"publish": ["fleet/broadcast/#"]}}},
        "limits": {"publish_rate": 10000000, "publish_bytes_rate": 10000000000,
                   "max_pending_tls": max_pending_tls}}))
    return path


def stock_config(root: Path, pki: Path, port: int) -> Path:
    """Stock amqtt as shipped: its own TLS listener (CERT_OPTIONAL), anonymous auth."""
    path = root / "stock.yaml"
    path.write_text(amqtt_yaml(pki, port, {
        "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}))
    return path


class BrokerProcess(ReadyProcess):
    """A broker child process (device_sim.lab's launcher); SIGINT stops it (both brokers shut
    down cleanly on it), SIGKILL after 15 s; ``lines`` is its stderr."""

    @classmethod
    def hub(cls, config: Path, env: dict[str, str] | None = None) -> BrokerProcess:
        return _HubBroker(config, env=env, stop_signal=signal.SIGINT, stop_timeout=15)

    @classmethod
    def stock(cls, config: Path) -> BrokerProcess:
        return cls("stock-amqtt", amqtt_argv(config), AMQTT_READY,
                   cwd=config.parent, stop_signal=signal.SIGINT, stop_timeout=15)

    @property
    def lines(self) -> list[str]:
        return self.log


class _HubBroker(HubProcess, BrokerProcess):
    """``fleet-hub serve --config FILE`` as one of the brokers, named "hub"."""

    def __init__(self, config: Path, **options: Any) -> None:
        super().__init__(config, **options)
        self.name = "hub"


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


def _children(pid: int) -> list[int]:
    """Every descendant of *pid* (from /proc/PID/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                kids = [int(k) for k in task.read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* and every live descendant (``fleet-provision serve`` keeps the
    CA key in a worker process of its own: both count)."""
    total = 0.0
    for one in [pid, *_children(pid)]:
        try:
            total += cpu_seconds(one)
        except (OSError, ValueError):
            continue
    return total


def tree_rss_kib(pid: int) -> int:
    """VmRSS of *pid* and every live descendant, KiB."""
    total = 0
    for one in [pid, *_children(pid)]:
        try:
            total += rss_kib(one)
        except (OSError, RuntimeError):
            continue
    return total


class FeedReader:
    """``GET /feed`` with a gateway's certificate (mutual TLS), as a hub asks for it.

    :meth:`get` returns the HTTP status, the bytes on the wire that HTTP carries (status line,
    headers and body; TLS framing not counted) and the document's version and base.
    """

    def __init__(self, host: str, port: int, ca: Path, cert: Path, key: Path) -> None:
        self.host, self.port = host, port
        self.context = ssl.create_default_context(cafile=str(ca))
        self.context.load_cert_chain(cert, key)

    def get(self, since: int, wait: float = 0) -> tuple[int, int, int | None, int | None]:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                           timeout=wait + 30)
        try:
            conn.request("GET", f"/feed?since={since}&wait={wait:g}")
            response = conn.getresponse()
            body = response.read()
            head = len(f"HTTP/1.1 {response.status} {response.reason}\r\n") + sum(
                len(k) + len(v) + 4 for k, v in response.getheaders()) + 2
        finally:
            conn.close()
        if response.status != 200:
            return response.status, head + len(body), None, None
        payload = json.loads(body)["payload"]
        document = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return 200, head + len(body), int(document["version"]), int(document["base"])
