"""A server as a child process, ready when its ready line shows: ``fleet-hub serve`` and others.

One launcher for the quickstart, the tests and the benchmarks: the hub is a separate process
(``python -m hub.cli serve --config FILE``), talked to over the network only. Its stderr is
read by a thread (kept in :attr:`ReadyProcess.log`); the ready line gives the ports it bound.
Stock amqtt (``amqtt -c FILE``, :data:`AMQTT_READY`) is started the same way.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

HUB_READY = re.compile(r"fleet-hub ready: listening on (?P<host>\S+):(?P<port>\d+)"
                       r"(?:, metrics on \S+:(?P<metrics>\d+))?")
"""What ``fleet-hub serve`` prints once it listens (hub/cli.py)."""
AMQTT_READY = re.compile(r"Listener 'default' bind to [^:]+:(?P<port>\d+)")
"""What stock ``amqtt -c FILE`` logs once its listener named ``default`` is bound."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server that cannot bind port 0 and say so)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[str], pump: threading.Thread,
                 sig: signal.Signals, timeout: float) -> int:
    """Stop a child: *sig*, SIGKILL after *timeout* s; then its stderr reader. Its exit code."""
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


class ReadyProcess:
    """*argv* as a child process until :meth:`stop`; ready when a stderr line matches *ready*.

    The match's groups ``host``, ``port`` and ``metrics`` (each optional) say where it
    listens. The first *max_lines* lines of stderr are kept (None: all). Not ready within
    *timeout* seconds, or gone: stopped, and RuntimeError with what it printed.
    """

    def __init__(self, name: str, argv: list[str], ready: re.Pattern[str], *,
                 cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 60.0, stop_signal: signal.Signals = signal.SIGTERM,
                 stop_timeout: float = 60.0, max_lines: int | None = 20_000) -> None:
        self.name = name
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self.log: list[str] = []
        self.host = ""
        self.port = 0
        self.metrics_port: int | None = None
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, cwd=cwd, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
        ready_seen = threading.Event()
        matched = threading.Event()

        def pump() -> None:
            assert self.process.stderr is not None  # noqa: S101
            for line in self.process.stderr:
                if max_lines is None or len(self.log) < max_lines:
                    self.log.append(line)
                match = None if matched.is_set() else ready.search(line)
                if match is not None:
                    found = match.groupdict()
                    self.host = found.get("host") or ""
                    self.port = int(found.get("port") or 0)
                    self.metrics_port = int(found["metrics"]) if found.get("metrics") else None
                    matched.set()
                    ready_seen.set()
            ready_seen.set()

        self._pump = threading.Thread(target=pump, daemon=True, name=f"{name}-stderr")
        self._pump.start()
        if not ready_seen.wait(timeout) or not matched.is_set() \
                or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"{name} did not become ready:\n" + "".join(self.log[-50:]))

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the process so far, from /proc/PID/stat (Linux)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return float("nan")
        values = stat.rsplit(")", 1)[1].split()
        return (int(values[11]) + int(values[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float | None = None) -> int:
        """The stop signal, SIGKILL after *timeout* (default: stop_timeout) seconds."""
        return stop_process(self.process, self._pump, self.stop_signal,
                            self.stop_timeout if timeout is None else timeout)

    def __enter__(self) -> ReadyProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def hub_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "hub.cli", "serve", "--config", str(config)]


def amqtt_argv(config: Path) -> list[str]:
    """Stock ``amqtt -c FILE``: the console script beside this interpreter."""
    return [str(Path(sys.executable).parent / "amqtt"), "-c", str(config)]


class HubProcess(ReadyProcess):
    """``fleet-hub serve --config FILE`` in the config's folder; SIGTERM stops it (the hub
    flushes its audit store first)."""

    def __init__(self, config: Path, *, timeout: float = 60.0,
                 env: dict[str, str] | None = None,
                 stop_signal: signal.Signals = signal.SIGTERM, stop_timeout: float = 60.0,
                 max_lines: int | None = 20_000) -> None:
        self.config = config
        super().__init__("fleet-hub", hub_argv(config), HUB_READY, cwd=config.parent, env=env,
                         timeout=timeout, stop_signal=stop_signal, stop_timeout=stop_timeout,
                         max_lines=max_lines)

    def __enter__(self) -> HubProcess:
        return self
