"""Fixtures: a real PKI and a real ``fleet-hub serve`` process on a free loopback port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.fleet import Device, Fleet, RunningHub
from tests.integration.mqtt import Client


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return Fleet.create(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def hub(fleet: Fleet) -> Iterator[RunningHub]:
    running = RunningHub.start(fleet.write_config())
    yield running
    assert running.stop() == 0, "".join(running.log)


@pytest.fixture
def connect(fleet: Fleet, hub: RunningHub) -> Iterator[Callable[..., Client]]:
    """Make a paho client for a device (or raw cert/key), closed after the test."""
    clients: list[Client] = []

    def make(device: Device | None = None, client_id: str | None = None, *,
             cert: Path | None = None, key: Path | None = None, port: int | None = None,
             **kwargs: object) -> Client:
        client = Client(port or hub.port, fleet.ca,
                        cert or (device.cert if device else None),
                        key or (device.key if device else None),
                        client_id if client_id is not None else (device.device_id if device
                                                                 else "anonymous"),
                        **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
