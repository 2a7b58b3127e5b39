"""Several brokers in one run: ``--broker`` parsed, devices spread over them, figures per broker.

A fleet of gateways (DESIGN section 9: one CA, many ``fleet-hub`` processes fed by it) is
played as one fleet whose devices are dealt out round-robin by their index in the fleet:
device *i* connects to broker ``i % n``, in every run and every process, so a device always
meets the same gateway and a revoked device is expected to be cut off by its own. The
attack scenarios run at every broker (each gateway must refuse on its own), named
``scenario@HOST:PORT`` when there are several; with one broker nothing changes. A
revocation's picks are apportioned over the brokers (:func:`apportion`), so that each
gateway cuts off its share.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence

from device_sim.errors import UsageError

Endpoint = tuple[str, int]


def label(endpoint: Endpoint) -> str:
    """``HOST:PORT`` (``[V6]:PORT``), as the report names a broker."""
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_broker(text: str) -> Endpoint:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{text!r} is not HOST:PORT", "--broker")
    return host, int(port)


def parse_brokers(values: Iterable[str]) -> list[Endpoint]:
    """Every ``--broker`` value, each one broker or a comma-separated list, in order.

    A broker named twice is a usage error: its devices and figures would be counted as two.
    """
    out: list[Endpoint] = []
    for value in values:
        for text in value.split(","):
            if not text.strip():
                raise UsageError(f"{value!r} has an empty broker in its list", "--broker")
            endpoint = parse_broker(text.strip())
            if endpoint in out:
                raise UsageError(f"{label(endpoint)} is given twice", "--broker")
            out.append(endpoint)
    if not out:
        raise UsageError("give at least one broker", "--broker")
    return out


def assign(ordinal: int, endpoints: Sequence[Endpoint]) -> Endpoint:
    """The broker of fleet device *ordinal*: round-robin by its index in the fleet."""
    return endpoints[ordinal % len(endpoints)]


def check_broker(host: str, port: int, timeout: float = 5.0) -> None:
    """Fail fast, with the reason, when nothing listens at a --broker."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise UsageError(f"cannot reach the broker at {host}:{port}: "
                         f"{exc.strerror or exc}", "--broker") from None


def scenario_name(name: str, broker: str, several: bool) -> str:
    """A scenario's name in the report: ``name@HOST:PORT`` when a run has several brokers."""
    return f"{name}@{broker}" if several else name


def apportion(total: int, sizes: list[int]) -> list[int]:
    """*total* (at most sum(sizes)) split in proportion to *sizes*, largest remainders first."""
    whole = sum(sizes)
    total = min(total, whole)
    if total <= 0:
        return [0] * len(sizes)
    exact = [total * n / whole for n in sizes]
    shares = [int(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in order[:total - sum(shares)]:
        shares[i] += 1
    return shares
