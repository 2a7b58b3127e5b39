"""Waiting on the hub's /healthz instead of sleeping: its status and revocation version."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tests.integration.fleet import RunningHub

Health = dict[str, Any]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, every: float = 0.05) -> bool:
    """Poll *condition* (a metric, /proc, the audit store) until it holds: True, or False
    after *timeout* s. No fixed sleep decides anything."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def healthz(hub: RunningHub) -> tuple[int, Health]:
    """The HTTP status and JSON body of ``GET /healthz`` (200 ok, 503 degraded)."""
    assert hub.metrics_port is not None, "the hub serves no metrics"
    url = f"http://127.0.0.1:{hub.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), dict(json.loads(response.read()))
    except urllib.error.HTTPError as failure:
        with failure:
            return int(failure.code), dict(json.loads(failure.read()))


def wait_healthz(hub: RunningHub, until: Callable[[int, Health], bool],
                 timeout: float = 10.0) -> tuple[int, Health]:
    """Poll /healthz until *until(status, body)* holds; AssertionError with the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = healthz(hub)
        if until(status, body):
            return status, body
        assert time.monotonic() < deadline, f"/healthz never got there: {status} {body}"
        time.sleep(0.05)


def metric(hub: RunningHub, name: str) -> float:
    """One unlabelled figure of the hub's ``GET /metrics``."""
    assert hub.metrics_port is not None, "the hub serves no metrics"
    url = f"http://127.0.0.1:{hub.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} missing from /metrics"
    return float(match[1])


def wait_metric(hub: RunningHub, name: str, until: Callable[[float], bool],
                timeout: float = 10.0) -> float:
    """Poll a figure of /metrics until *until(value)* holds; AssertionError with the last."""
    deadline = time.monotonic() + timeout
    while not until(value := metric(hub, name)):
        assert time.monotonic() < deadline, f"{name} never got there: {value}"
        time.sleep(0.05)
    return value


def revocation_version(hub: RunningHub) -> int:
    return int(healthz(hub)[1]["revocation_version"])


@contextmanager
def revocation_change(hub: RunningHub, timeout: float = 10.0) -> Iterator[None]:
    """Around one CA action that changes what the hub enforces (revoke, suspend, resume, a
    group, a password): on leaving, wait until the hub's revocation snapshot has taken it
    (its version grows by one on every change) instead of sleeping. *hub*: anything with
    the ``metrics_port`` of a hub runtime (``fleet-hub serve``, or our plugins in amqtt)."""
    before = revocation_version(hub)
    yield
    wait_version_above(hub, before, timeout)


def wait_version_above(hub: RunningHub, version: int, timeout: float = 10.0) -> int:
    """Wait until the hub has taken a revocation change made after it showed *version*."""
    _, body = wait_healthz(hub, lambda _s, b: int(b["revocation_version"]) > version, timeout)
    return int(body["revocation_version"])
