"""The one exception tree of the provisioning package.

    ProvisioningError            every expected failure; ``str()`` is the user-facing line
    ├── UsageError               bad options or environment: exit code 2
    │   ├── PKIError             PKI folder missing, incomplete or already present
    │   └── PassphraseError      a CA key is encrypted and the passphrase is missing or wrong
    ├── NotFoundError            a device, certificate or token the command names does not exist
    ├── ConflictError            a name the command would create is already taken
    ├── InUseError               an issuing CA still needed (retire), or still retiring (rotate)
    ├── OutputError              a certificate file cannot be written (disk full, permissions)
    ├── RegistryError            the registry cannot be read or written
    ├── WorkerGone               the enrollment service's CA worker process is gone: 503
    └── WorkerError              a job failed inside the CA worker process (a bug): 500

CSR refusals are not exceptions: they are data (:class:`provisioning.policy.Rejection`),
reported per CSR while the rest of the batch goes on.
"""

from __future__ import annotations


class ProvisioningError(Exception):
    """Root of every expected failure; carries *where* it happened for the one-line message."""

    exit_code = 1

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.message} ({self.where})" if self.where else self.message


class UsageError(ProvisioningError):
    """The command cannot run as invoked (exit 2)."""

    exit_code = 2


class PKIError(UsageError):
    """The PKI folder is missing, incomplete, or exists where a new one was asked for."""


class PassphraseError(UsageError):
    """A CA key is encrypted and the passphrase is missing or wrong."""


class NotFoundError(ProvisioningError):
    """A device or certificate named on the command line does not exist (exit 1)."""


class ConflictError(ProvisioningError):
    """A name the command would create (an enrollment token) already exists (exit 1)."""


class InUseError(ProvisioningError):
    """An issuing CA is still needed: ``issuing-ca retire`` while certificates it signed are
    in service, or ``rotate`` while the previous one has not been retired (exit 1)."""


class OutputError(ProvisioningError):
    """An output file could not be written; the registry still holds the promise."""


class RegistryError(ProvisioningError):
    """The registry database failed in a way the user must see."""


class WorkerGone(ProvisioningError):  # noqa: N818  (a state, not a failed call)
    """The enrollment service's CA worker process is gone: requests get 503 until ``serve``
    is restarted (:mod:`provisioning.est.channel`)."""


class WorkerError(ProvisioningError):
    """A job failed inside the CA worker process (a bug there): that request gets 500."""
