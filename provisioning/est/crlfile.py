"""Engine side: ``crl.pem`` as the service's ``/crl`` serves it, re-read only when the file
changed (any writer replaces it: ``fleet-provision crl``, revoke, the engine's own
re-signing, ``issuing-ca rotate``/``retire``): the first CRL (the current issuing CA's) as
DER, and the whole file, one PEM CRL per live issuing CA."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provisioning.est.messages import CRLSnapshot


class CRLFile:
    """The CRL at *path*, kept as a :class:`CRLSnapshot` until the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._crl: CRLSnapshot | None = None
        self._crl_key: tuple[int, int, int] | None = None

    def snapshot(self) -> CRLSnapshot:
        """crl.pem as DER, re-read only when the file changed (any writer replaces it)."""
        path = self.path
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._crl is None or key != self._crl_key:
            pem = path.read_bytes()
            crl = x509.load_pem_x509_crl(pem)  # the first: the current issuing CA's
            der = crl.public_bytes(serialization.Encoding.DER)
            self._crl = CRLSnapshot(der, _etag(der), crl.last_update_utc,
                                    crl.next_update_utc, pem, _etag(pem))
            self._crl_key = key
        return self._crl


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
