"""The one exception tree of the simulator.

    SimError                 every expected failure; ``str()`` is the user-facing line
    ├── UsageError           bad options, no PKI, an unreachable broker: exit code 2
    └── EnrollError          the CA or the enrollment service refused the fleet: exit code 1

Connection refusals are not exceptions: they are data (:class:`device_sim.device.Outcome`),
compared with what a scenario expects and reported.
"""

from __future__ import annotations


class SimError(Exception):
    """Root of every expected failure; carries *where* it happened for the one-line message."""

    exit_code = 1

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.message} ({self.where})" if self.where else self.message


class UsageError(SimError):
    """The run cannot start as invoked (exit 2)."""

    exit_code = 2


class EnrollError(SimError):
    """Devices could not get certificates (exit 1)."""
