"""A CA service and gateways fed by it: ``fleet-provision serve`` and N ``fleet-hub serve``.

DESIGN section 9's deployment on one machine: the CA service (EST, /crl, OCSP and the
fleet-state feed at ``/feed``) as a :class:`CAServiceProcess`, and each gateway in its own
folder (``ROOT/gw-N/``: its certificate from ``server-cert --name gw-N``, which is both its
TLS server certificate and its client certificate toward the feed; its hub.toml, audit store
and ``feed_cache``) with no registry and no CRL: everything it knows of the fleet comes
from the feed. :class:`Gateways` starts them all at once (each waits for its first snapshot
before it listens) and stops them together.
"""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from device_sim.lab.hubconfig import LOOPBACK, Layer, hub_toml
from device_sim.lab.process import HubProcess, ReadyProcess
from provisioning.authority import Authority

CA_READY = re.compile(r"fleet-provision serve: listening on "
                      r"https://(?P<host>\[[^\]]+\]|[^\s:/]+):(?P<port>\d+)")
"""What ``fleet-provision serve`` prints once it listens (provisioning/est/serve.py)."""

FEED_HUB: Final[Mapping[str, Any]] = {
    "acl": {"subscribe": ["devices/{device_id}/#", "fleet/broadcast/#"], "groups": None},
    "limits": None,
}
"""The quickstart's policy for a gateway: every device its own topics, no group rules,
the hub's default [limits]."""


class CAServiceProcess(ReadyProcess):
    """``fleet-provision serve --pki DIR --bind HOST:PORT`` (port 0: a free one), ready when
    it says where it listens; SIGTERM is its clean stop (the last audit events written).

    :meth:`again` starts a new one on the same port (a CA that comes back);
    :meth:`pause`/:meth:`resume` freeze it with SIGSTOP/SIGCONT (a CA that hangs: its
    connections stay open, nothing answers).
    """

    def __init__(self, pki: Path, *, bind: str = "127.0.0.1:0", timeout: float = 60.0,
                 env: dict[str, str] | None = None, max_lines: int | None = 20_000) -> None:
        self.pki = pki
        argv = [sys.executable, "-m", "provisioning.cli", "serve", "--pki", str(pki),
                "--bind", bind]
        super().__init__("fleet-provision serve", argv, CA_READY, env=env, timeout=timeout,
                         stop_timeout=30, max_lines=max_lines)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def feed_url(self) -> str:
        """The fleet-state feed (DESIGN section 9): what a gateway's [revocation] feed names."""
        return f"{self.url}/feed"

    def again(self, *, timeout: float = 60.0) -> CAServiceProcess:
        """A new CA service on this one's port (stop this one first)."""
        return CAServiceProcess(self.pki, bind=f"{self.host}:{self.port}", timeout=timeout)

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> CAServiceProcess:
        return self


def gateway_name(index: int) -> str:
    """``gw-1``, ``gw-2``, ...: the gateway's host name, certificate name and folder."""
    return f"gw-{index + 1}"


def write_gateway_config(root: Path, pki: Path, name: str, feed_url: str, *,
                         layers: Sequence[Layer] = (), cert: bool = True) -> Path:
    """``root/NAME/hub.toml`` for a gateway fed by *feed_url*; with *cert*, its certificate
    first (``server-cert --name NAME --ip 127.0.0.1 --out root/NAME``).

    [revocation] has the feed and its cache only (no registry, no CRL); the listener and
    metrics on free loopback ports; *layers* go over the quickstart's policy (FEED_HUB).
    """
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if cert:
        with Authority(pki, actor="fleet-sim") as authority:
            authority.server_cert(name, ["127.0.0.1"], folder)
    path = folder / "hub.toml"
    path.write_text(hub_toml(pki.absolute(), LOOPBACK, FEED_HUB, {
        "listener": {"server_cert": str((folder / "server.pem").absolute()),
                     "server_key": str((folder / "server.key").absolute())},
        "revocation": {"registry": None, "crl": None, "refresh_seconds": None,
                       "feed": feed_url,
                       "feed_cache": str((folder / "fleet-state.json").absolute())},
        "audit": {"path": str((folder / "hub-audit.db").absolute())}}, *layers))
    return path


class Gateways:
    """N gateways fed by one CA service, started in parallel; a context manager.

    ``configs[i]`` is gateway i's hub.toml (``root/gw-{i+1}/``); :attr:`hubs` the running
    processes, in the same order. Any that fails to start stops the others and raises.
    """

    def __init__(self, configs: Sequence[Path], *, timeout: float = 60.0,
                 stop_signal: signal.Signals = signal.SIGTERM,
                 max_lines: int | None = 20_000) -> None:
        self.configs = list(configs)
        self.hubs: list[HubProcess] = []

        def start(config: Path) -> HubProcess:
            return HubProcess(config, timeout=timeout, stop_signal=stop_signal,
                              stop_timeout=30, max_lines=max_lines)

        with ThreadPoolExecutor(max_workers=max(1, len(self.configs))) as pool:
            futures = [pool.submit(start, config) for config in self.configs]
        failures = []
        for future in futures:
            try:
                self.hubs.append(future.result())
            except RuntimeError as exc:
                failures.append(str(exc))
        if failures:
            self.stop()
            raise RuntimeError(failures[0])

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", hub.port) for hub in self.hubs]

    def __iter__(self) -> Iterator[HubProcess]:
        return iter(self.hubs)

    def __len__(self) -> int:
        return len(self.hubs)

    def stop(self) -> list[int]:
        """Stop every gateway (SIGTERM: each flushes its audit store); their exit codes."""
        with ThreadPoolExecutor(max_workers=max(1, len(self.hubs))) as pool:
            return list(pool.map(lambda hub: hub.stop(), self.hubs))

    def __enter__(self) -> Gateways:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
