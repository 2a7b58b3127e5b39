"""The one exception tree of the simulator.

    SimError                 every expected failure; ``str()`` is the user-facing line
    ├── UsageError           bad options, no PKI, an unreachable broker: exit code 2
    ├── EnrollError          the CA or the enrollment service refused the fleet: exit code 1
    ├── RenewalError         one renewal attempt failed (agent/est.py): counted and retried
    └── HandshakeError       one device's TCP connect or TLS handshake failed (transport.py)

Connection refusals are not exceptions to a run: :class:`HandshakeError` is raised by the
transport and turned into data at once (:class:`device_sim.device.Outcome`), compared with
what a scenario expects and reported.
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


class RenewalError(SimError):
    """One renewal attempt failed: the EST service refused it or could not be reached.

    Not fatal to a device or a run: the agent counts it and tries again later
    (:mod:`device_sim.agent.renewer`). ``answered`` is False when no answer came (the CA may
    have issued the certificate all the same): the retry then sends the same key again.
    """

    def __init__(self, message: str, where: str | None = None, *,
                 answered: bool = True) -> None:
        super().__init__(message, where)
        self.answered = answered


class HandshakeError(SimError):
    """TCP or TLS failed; ``phase`` is 'tcp' or 'tls', ``reason`` is short and readable."""

    def __init__(self, phase: str, reason: str) -> None:
        super().__init__(f"{phase}: {reason}")
        self.phase = phase
        self.reason = reason
