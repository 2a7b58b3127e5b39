"""Signing throughput: the real batch path against cryptography's own floor, on one core.

The batch path is ``Authority(pki).issuer().sign(...)``: parsing, policy, registry
transactions (one per chunk of ``CHUNK`` CSRs), hash-chained audit events and
``OUT/<device-id>.pem`` files. The floor is what no CA can avoid for the same CSRs: load the
PEM CSR, verify its signature, build the device certificate with cryptography's
CertificateBuilder (``provisioning.profile.device_certificate``, from scratch for every CSR),
sign, PEM. The batch makes the same certificates (the same TBS bytes) through
``provisioning.profile.DeviceTemplate``: the first certificate of each minute's validity
is built by device_certificate, and the template encodes every later one's DER itself from that
certificate's fixed byte parts and the device's own fields, then signs it, once it has
proven on the first that it encodes exactly what device_certificate built. The floor keeps
the per-certificate build it has always timed, so the batch can be faster than the floor.
The CSRs (and their keys) are generated up front and are not timed.

    .venv/bin/python bench/sign_throughput.py [--count 10000] [--profile FILE]

Prints certificates/s for both, their ratio (target: batch >= 60% of the floor) and, last,
one JSON line of the figures.

The output files make the batch sensitive to the file system: on ext4 without a journal, for
about 30-60 s after many files were deleted (the previous run's clean-up, a test suite), each
new inode is found by skipping the recently deleted ones (``recently_deleted()`` in the
kernel), which can make a file cost ten times its usual ~30-100 us. New files go to the
block group of their folder, and a new folder to its parent's, so a run right after another
(whose clean-up freed 10,000 inodes there) paid that scan for every file: 0.57-0.61 against
0.87 on a quiet disk. The bench therefore marks its temporary folder as a top of a directory
hierarchy (ext4's ``TOPDIR`` flag, ``chattr +T``; where the file system has no such flag
nothing changes), and names its output folder at random: folders made inside it are then
placed as top-level folders are, searching from a block group drawn from a hash of their
name, so the output lands away from the previous run's freed inodes. Back to back, three
runs then gave 0.89, 0.73 and 0.95. ``--dir /dev/shm`` leaves the disk out altogether.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import fcntl
import gc
import json
import os
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from device_sim.factory import csr_pem, new_key
from provisioning.authority import Authority, initialize
from provisioning.config import PKIConfig
from provisioning.csr import CSRInput
from provisioning.issuer import CHUNK, SignOptions
from provisioning.profile import device_certificate, random_serial, validity

TARGET_RATIO = 0.6


def make_csrs(count: int) -> list[bytes]:
    """P-256 CSRs with distinct CNs, the way a device makes them (key never leaves it)."""
    return [csr_pem(f"bench-{i:06d}", new_key()) for i in range(1, count + 1)]


_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS = 0x80086601, 0x40086602  # linux/fs.h, 64-bit
_TOPDIR_FL = 0x00020000  # "top of directory hierarchies": spread the folders made inside


def spread_folders(folder: Path) -> bool:
    """Set ext4's TOPDIR flag on *folder*; False where the file system does not have it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
        value = int.from_bytes(flags[:4], "little") | _TOPDIR_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, value.to_bytes(4, "little") + bytes(4))
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def time_floor(authority: Authority, csrs: list[bytes]) -> float:
    """Seconds for load + verify + build + sign + PEM of every CSR, nothing else."""
    ca, config = authority.ca, authority.config
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = validity(ca, config.validity, now)
    pems: list[bytes] = []
    start = time.perf_counter()
    for data in csrs:
        csr = x509.load_pem_x509_csr(data)
        if not csr.is_signature_valid:
            raise SystemExit("floor: a generated CSR does not verify")
        cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        cert = device_certificate(ca, config, str(cn), csr.public_key(),  # type: ignore[arg-type]
                                  random_serial(), not_before, not_after)
        pems.append(cert.public_bytes(serialization.Encoding.PEM))
    elapsed = time.perf_counter() - start
    assert len(pems) == len(csrs)
    return elapsed


def time_batch(authority: Authority, csrs: list[bytes], out_dir: Path,
               profile: Path | None) -> float:
    """Seconds for the real batch path; every CSR must come back ``issued``."""
    inputs = [CSRInput(f"bench-{i:06d}.csr", data) for i, data in enumerate(csrs, start=1)]
    issuer = authority.issuer()
    out_dir.mkdir()  # the CLI makes it; the library expects it to exist
    options = SignOptions(out_dir=out_dir)
    profiler = cProfile.Profile() if profile is not None else None
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    results = issuer.sign(inputs, options)
    if profiler is not None:
        profiler.disable()
    elapsed = time.perf_counter() - start
    if profiler is not None and profile is not None:
        profiler.dump_stats(profile)
    issued = sum(1 for r in results if r.status == "issued")
    if issued != len(csrs):
        bad = next(r for r in results if r.status != "issued")
        raise SystemExit(f"batch: {issued}/{len(csrs)} issued; first other: {bad}")
    written = sum(1 for _ in out_dir.glob("*.pem"))
    if written != len(csrs):
        raise SystemExit(f"batch: {written} files written, want {len(csrs)}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="CSRs to sign (10000)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="write a cProfile of the batch path to this file")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the temporary PKI and output folder go (default: the "
                        "system temp dir); e.g. /dev/shm to leave the disk out")
    parser.add_argument("--all-cores", action="store_true",
                        help="do not pin the process to one core")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    print(f"generating {args.count} P-256 CSRs (not timed) ...", flush=True)
    csrs = make_csrs(args.count)
    with tempfile.TemporaryDirectory(prefix="sign-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        spread = spread_folders(root)
        pki = root / "pki"
        initialize(pki, PKIConfig(trust_domain="bench.example.com",
                                  organisation="Bench Org"), None)
        with Authority(pki, actor="bench") as authority:
            _ = authority.ca  # load the issuing key outside both timings
            # The floor is timed before and after the batch and averaged, so load from
            # other processes on a shared machine weighs on both figures alike.
            gc.collect()
            floor_before = time_floor(authority, csrs)
            gc.collect()
            # A name of its own: ext4 starts its search for a top-level folder's block group
            # at a hash of the name, so a fixed name would land where the last run's was.
            out = root / f"out-{os.urandom(4).hex()}"
            batch_s = time_batch(authority, csrs, out, args.profile)
            gc.collect()
            floor_after = time_floor(authority, csrs)
    floor_s = (floor_before + floor_after) / 2

    floor_rate = args.count / floor_s
    batch_rate = args.count / batch_s
    ratio = batch_rate / floor_rate
    met = ratio >= TARGET_RATIO
    print(f"floor (load + verify + build + sign + PEM): {floor_rate:8.0f} certificates/s "
          f"({floor_s:.2f} s; {floor_before:.2f} s before the batch, {floor_after:.2f} s "
          "after)")
    print(f"batch (validation, registry, files, audit): {batch_rate:8.0f} certificates/s "
          f"({batch_s:.2f} s, chunks of {CHUNK}; folders spread by TOPDIR: "
          f"{'yes' if spread else 'no'})")
    print(f"ratio batch/floor: {ratio:.2f} (target >= {TARGET_RATIO}: "
          f"{'met' if met else 'NOT met'})")
    print(json.dumps({"count": args.count, "batch_per_s": round(batch_rate, 1),
                      "floor_per_s": round(floor_rate, 1), "ratio": round(ratio, 3),
                      "target_ratio": TARGET_RATIO, "met": met, "topdir_spread": spread}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
