"""The live issuing CAs as the feed announces them (``issuers``, issue 14): every certificate
of ``ca-chain.pem`` but the root, in the file's order (current first).

``issuing-ca rotate`` and ``retire`` rewrite ``ca-chain.pem`` inside the registry transaction
that commits their audit event, so the follower asks for this when the audit head moved
(:mod:`provisioning.feed.follower`); it costs one ``stat`` unless the file changed.
Stdlib-only: the PEM blocks are decoded, not parsed.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from provisioning.fsutil import file_stamp

__all__ = ["ChainIssuers", "pem_certificates"]

_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def pem_certificates(data: bytes) -> list[bytes]:
    """The DER of every PEM certificate in *data*, in order."""
    return [ssl.PEM_cert_to_DER_cert(block.decode("ascii")) for block in _BLOCK.findall(data)]


class ChainIssuers:
    """``ca-chain.pem`` minus ``root-ca.pem``, re-read only when the chain file changed."""

    def __init__(self, chain: Path, root: Path) -> None:
        self.chain = chain
        self.root = root
        self._stamp: tuple[int, int, int] | None = None
        self._issuers: tuple[bytes, ...] = ()

    def __call__(self) -> tuple[bytes, ...]:
        stamp = file_stamp(self.chain)
        if stamp is None or stamp == self._stamp:
            return self._issuers
        roots = set(pem_certificates(self.root.read_bytes()))
        self._issuers = tuple(der for der in pem_certificates(self.chain.read_bytes())
                              if der not in roots)
        self._stamp = stamp
        return self._issuers
