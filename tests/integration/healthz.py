"""Waiting on the hub's /healthz instead of sleeping: its status and revocation version."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.integration.fleet import RunningHub

Health = dict[str, Any]


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


def revocation_version(hub: RunningHub) -> int:
    return int(healthz(hub)[1]["revocation_version"])


def wait_version_above(hub: RunningHub, version: int, timeout: float = 10.0) -> int:
    """Wait until the hub has taken a revocation change made after it showed *version*."""
    _, body = wait_healthz(hub, lambda _s, b: int(b["revocation_version"]) > version, timeout)
    return int(body["revocation_version"])
