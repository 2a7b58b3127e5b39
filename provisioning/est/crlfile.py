"""Engine side: ``crl.pem`` as the DER the service's ``/crl`` serves, re-read only when the
file changed (any writer replaces it: ``fleet-provision crl``, revoke, the engine's own
re-signing)."""

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
            crl = x509.load_pem_x509_crl(path.read_bytes())
            der = crl.public_bytes(serialization.Encoding.DER)
            etag = '"' + hashlib.sha256(der).hexdigest()[:32] + '"'
            self._crl = CRLSnapshot(der, etag, crl.last_update_utc, crl.next_update_utc)
            self._crl_key = key
        return self._crl
