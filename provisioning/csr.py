"""Reading CSR files as a factory line produces them: PEM or DER, one CSR a file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

MAX_CSR_BYTES = 64 * 1024
CSR_SUFFIXES = (".csr", ".req", ".p10")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_CSR_LABELS = {b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"}


@dataclass(frozen=True)
class CSRInput:
    """One CSR to sign and the name it is reported under.

    ``actor`` names who asked, for the audit log, when a batch serves several callers (the
    enrollment service); ``renews`` is the serial of the certificate an EST re-enrollment
    renews: the CSR must name the same device, and the same key is then renewed, not
    answered with the existing certificate.
    """

    source: str
    data: bytes
    actor: str | None = None
    renews: str | None = None


class CSRFormatError(ValueError):
    """The input is not exactly one PKCS#10 request; the message is the rejection reason."""


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse one CSR, refusing everything that is not exactly one PKCS#10 request."""
    if len(data) > MAX_CSR_BYTES:
        raise CSRFormatError(f"file too large: {len(data)} bytes, want at most {MAX_CSR_BYTES}")
    if not data.strip():
        raise CSRFormatError("empty file: want one PEM or DER certificate request")
    labels = _PEM_BLOCK.findall(data)
    if labels:
        csr_count = sum(1 for label in labels if label in _CSR_LABELS)
        if csr_count == 0:
            found = labels[0].decode("ascii", "replace")
            raise CSRFormatError(f"not a CSR: found a PEM {found} block, want CERTIFICATE REQUEST")
        if csr_count > 1:
            raise CSRFormatError(f"{csr_count} CSRs in one file, want exactly 1")
        if len(labels) > 1:
            raise CSRFormatError(f"{len(labels)} PEM blocks in one file, want only the CSR")
        try:
            return x509.load_pem_x509_csr(data)
        except ValueError as exc:
            raise CSRFormatError(f"malformed PEM CSR: {_short(exc)}") from exc
    if data.lstrip()[:1] != b"\x30":  # a DER SEQUENCE; anything else is text or noise
        kind = "text" if _looks_textual(data) else "binary data"
        raise CSRFormatError(f"not a CSR: {kind}, want a PEM or DER certificate request")
    try:
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise CSRFormatError(
            f"not a CSR: binary data that is not DER PKCS#10 ({_short(exc)})") from exc


def read_inputs(paths: list[Path]) -> tuple[list[CSRInput], list[tuple[str, str]]]:
    """Expand files and folders into inputs; unreadable paths come back as (source, reason).

    A folder contributes its ``*.csr``, ``*.req`` and ``*.p10`` files, sorted, so an output
    folder of ``.pem`` certificates next to the CSRs is never read back as input.
    """
    inputs: list[CSRInput] = []
    problems: list[tuple[str, str]] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in CSR_SUFFIXES
                           and p.is_file() and not p.name.startswith("."))
            if not files:
                problems.append((str(path), "folder holds no *.csr, *.req or *.p10 file"))
            for file in files:
                _read_one(file, inputs, problems)
        else:
            _read_one(path, inputs, problems)
    return inputs, problems


def _read_one(path: Path, inputs: list[CSRInput], problems: list[tuple[str, str]]) -> None:
    try:
        size = path.stat().st_size
        if size > MAX_CSR_BYTES:
            problems.append(
                (str(path), f"file too large: {size} bytes, want at most {MAX_CSR_BYTES}")
            )
            return
        inputs.append(CSRInput(str(path), path.read_bytes()))
    except FileNotFoundError:
        problems.append((str(path), "no such file"))
    except OSError as exc:
        problems.append((str(path), f"cannot read: {exc.strerror}"))


def _looks_textual(data: bytes) -> bool:
    sample = data[:512]
    return all(32 <= b < 127 or b in b"\r\n\t" for b in sample)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
