"""The client_ca bundle re-read on change (issue 14): what a bundle must be, when a change is
put in force (every user prepared, then all at once), when it is refused (once per file
version, audited, the bundle in force kept), and what the revocation side does with it: CRLs
and feed documents of a new intermediate are accepted only once the bundle carries it.

Real PKI folders and certificates; the files are rewritten as an operator would (atomically).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from hub.cabundle import Bundle, BundleWatcher, parse_bundle
from hub.errors import BundleError
from hub.revocation import RevocationWatcher, load_ca_bundle
from hub.revocation.crl import CrlVerifier
from hub.revocation.crl_sources import CrlFileSource
from hub.revocation.feed_issuers import compose, under_root, verify_issuers
from hub.revocation.feed_verify import FeedVerifier
from hub.revocation.sources import RevocationSource
from provisioning.config import load_config
from provisioning.pki import IssuingCA
from provisioning.profile import device_certificate, random_serial
from tests.hub.cabundle_support import second_intermediate
from tests.hub.feed_support import GATEWAY, Issued, Signer, snapshot, state
from tests.hub.revocation_support import Fleet, make_crl, make_fleet, pem
from tests.integration.fleet import TRUST_DOMAIN


class Audit:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str | None]] = []

    def record(self, event: str, *, device_id: str | None = None, serial: str | None = None,
               peer: str | None = None, reason: str | None = None) -> None:
        del device_id, serial, peer
        self.rows.append((event, reason))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return make_fleet(tmp_path_factory.mktemp("cabundle"), "dev-1")


@pytest.fixture(scope="module")
def second(fleet: Fleet) -> IssuingCA:
    return second_intermediate(fleet.root)


def _pem(ca: IssuingCA) -> bytes:
    return ca.cert.public_bytes(Encoding.PEM)


def _replace(path: Path, data: bytes) -> None:
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(data)
    staged.replace(path)


def _leaf(fleet: Fleet) -> bytes:
    """A device certificate from the fleet's issuing CA."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = device_certificate(fleet.issuing_ca(), load_config(fleet.root / "pki.toml"), "dev-1",
                              key.public_key(), random_serial(), now, now + dt.timedelta(days=1))
    return cert.public_bytes(Encoding.PEM)


@pytest.mark.parametrize(("data", "why"), [
    (b"", "the file is empty"),
    (b"  \n\n", "the file is empty"),
    (b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
     "no PEM certificate could be read"),
    (b"ca-chain.pem was here", "no PEM certificate could be read"),
])
def test_a_bundle_without_a_readable_certificate_is_refused(data: bytes, why: str) -> None:
    """Empty, blank, damaged PEM, not PEM: each refused with its reason."""
    with pytest.raises(BundleError, match=why):
        parse_bundle(data)


def test_a_bundle_with_a_certificate_that_is_not_a_ca_is_refused(fleet: Fleet) -> None:
    """A device certificate next to the CAs would be a trust anchor: refused, named."""
    with pytest.raises(BundleError, match="'CN=dev-1,O=Test Org' is not a CA certificate"):
        parse_bundle(fleet.chain.read_bytes() + _leaf(fleet))


def test_the_fleets_chain_and_a_second_intermediate_are_a_bundle(fleet: Fleet,
                                                                 second: IssuingCA) -> None:
    assert len(parse_bundle(fleet.chain.read_bytes())) == 2
    assert len(parse_bundle(fleet.chain.read_bytes() + _pem(second))) == 3


def _watcher(tmp_path: Path, fleet: Fleet, audit: Audit) -> tuple[Path, BundleWatcher]:
    path = tmp_path / "ca-chain.pem"
    path.write_bytes(fleet.chain.read_bytes())
    return path, BundleWatcher(path, load_ca_bundle, audit=audit)


def test_a_changed_bundle_goes_in_force_for_every_user_at_once(
        tmp_path: Path, fleet: Fleet, second: IssuingCA) -> None:
    """Each user prepares in a worker thread, then every commit runs on the loop; the
    generation grows by one; an unchanged look and a rewrite with the same certificates
    change nothing."""
    audit = Audit()
    path, watcher = _watcher(tmp_path, fleet, audit)
    seen: list[tuple[str, int, bool]] = []

    def user(name: str) -> Callable[[Bundle], Callable[[], None]]:
        def prepare(bundle: Bundle) -> Callable[[], None]:
            seen.append((f"{name} prepare", bundle.generation,
                         threading.current_thread() is threading.main_thread()))
            return lambda: seen.append((f"{name} commit", bundle.generation,
                                        threading.current_thread() is threading.main_thread()))
        return prepare

    watcher.subscribe(user("a"))
    watcher.subscribe(user("b"))

    async def scenario() -> None:
        assert await watcher.check() is False  # nothing changed since it was read
        _replace(path, fleet.chain.read_bytes())  # new inode, same certificates
        assert await watcher.check() is False
        _replace(path, fleet.chain.read_bytes() + _pem(second))
        assert await watcher.check() is True
        assert await watcher.check() is False

    asyncio.run(scenario())
    assert seen == [("a prepare", 2, False), ("b prepare", 2, False),
                    ("a commit", 2, True), ("b commit", 2, True)]
    assert watcher.bundle.generation == 2
    assert len(watcher.bundle.certificates) == 3
    status = watcher.status()
    assert (status.generation, status.certificates, status.refused, status.last_error) == (
        2, 3, 0, None)
    assert audit.rows == [("source", "client_ca reloaded: generation 2, 3 certificates")]


def test_a_bad_bundle_is_refused_once_per_file_version_and_the_old_one_stays(
        tmp_path: Path, fleet: Fleet, second: IssuingCA) -> None:
    """Garbage, then a missing file, then a bundle a user cannot prepare (the listener's key
    unreadable): each refused once
    (looking again at the same file says nothing new), audited, counted; no commit runs;
    generation 1 stays until a good bundle comes."""
    audit = Audit()
    path, watcher = _watcher(tmp_path, fleet, audit)
    commits: list[int] = []
    fail = [False]

    def prepare(bundle: Bundle) -> Callable[[], None]:
        if fail[0]:
            raise PermissionError(errno.EACCES, "Permission denied", "server.key")
        return lambda: commits.append(bundle.generation)

    watcher.subscribe(prepare)

    async def scenario() -> None:
        _replace(path, b"garbage")
        assert await watcher.check() is False
        assert await watcher.check() is False
        path.unlink()
        assert await watcher.check() is False
        assert await watcher.check() is False
        fail[0] = True
        _replace(path, fleet.chain.read_bytes() + _pem(second))
        assert await watcher.check() is False
        fail[0] = False
        assert await watcher.check() is False  # the same file: already refused
        path.touch()  # the operator installs it again
        os.utime(path, ns=(1, 1))
        assert await watcher.check() is True

    asyncio.run(scenario())
    refusals = [reason for _, reason in audit.rows if reason and "refused" in reason]
    assert len(refusals) == 3, audit.rows
    assert refusals[0].startswith("client_ca refused: no PEM certificate could be read")
    assert refusals[1].startswith("client_ca refused: cannot read it: No such file")
    assert refusals[2] == "client_ca refused: [Errno 13] Permission denied: 'server.key'"
    assert commits == [2]
    assert watcher.status().refused == 3
    assert watcher.status().last_error is None


def test_a_crl_of_a_new_intermediate_is_used_once_the_bundle_carries_it(
        tmp_path: Path, fleet: Fleet, second: IssuingCA) -> None:
    """The watcher hands a reloaded bundle to the CRL source: the new CA's CRL, refused as
    foreign before, is verified and enforced after, without a restart."""
    crl = tmp_path / "crl-2.pem"
    crl.write_bytes(pem(make_crl(second.key, second.cert.subject, 1, [(0x1234, None)])))
    initial = load_ca_bundle(fleet.chain)
    source = CrlFileSource(crl, CrlVerifier(initial))
    sources: list[RevocationSource] = [source]
    watcher = RevocationWatcher.over(sources)

    async def scenario() -> None:
        assert await source.poll(None) is False
        assert source.last_error is not None
        assert "is not a CA of the client_ca bundle" in source.last_error
        bundle = Bundle.of([*initial, second.cert], 2)
        watcher.replace_ca_certs(bundle.certificates, bundle.pem)
        assert await source.poll(None) is True
        assert source.data is not None
        assert source.data.revoked == {0x1234: "revoked"}

    asyncio.run(scenario())


def test_a_feed_document_signed_by_a_new_intermediate_is_accepted_once_it_is_a_signer(
        fleet: Fleet, second: IssuingCA) -> None:
    """Refused ``signer`` while the bundle holds neither it nor its root (the first issuing
    CA alone); accepted after :meth:`FeedVerifier.replace` with the root in it (contract C1:
    a CA the root signed directly), as with the intermediate itself."""
    chain = load_ca_bundle(fleet.chain)
    issuing_only = [c for c in chain if c.subject != c.issuer]
    verifier = FeedVerifier(issuing_only, TRUST_DOMAIN, GATEWAY)
    body = Signer(second.key, second.cert).sign(snapshot(state(3), Issued().next()))
    with pytest.raises(Exception, match="signer") as info:
        verifier.verify(body)
    assert getattr(info.value, "reason", None) == "signer"
    verifier.replace(chain)
    assert verifier.verify(body).version == 3
    verifier.replace([*issuing_only, second.cert])
    assert verifier.verify(body).version == 3


# -- the feed's issuers (contract C1) ---------------------------------------------------------


def _subjects(certs: object) -> list[str]:
    assert isinstance(certs, tuple | list)
    return [c.subject.rfc4514_string() for c in certs]


def test_the_feeds_issuers_are_verified_against_client_cas_roots(
        fleet: Fleet, second: IssuingCA) -> None:
    """Taken: a CA of client_ca byte for byte, or a CA the root signed directly, in its
    validity. Not: a device certificate, a CA of another root, one expired, garbage."""
    chain = load_ca_bundle(fleet.chain)
    first = fleet.issuing_ca()
    other = second_intermediate(make_fleet(fleet.root.parent / "other-fleet").root)
    now = dt.datetime.now(dt.UTC)
    ders = [c.public_bytes(Encoding.DER) for c in (second.cert, first.cert, other.cert)]
    leaf = x509.load_pem_x509_certificate(_leaf(fleet)).public_bytes(Encoding.DER)
    taken, problems = verify_issuers([*ders, leaf, b"\x30\x00"], chain, now)
    assert _subjects(taken) == _subjects([second.cert, first.cert])
    assert len(problems) == 3
    assert "issuers[2]" in problems[0]
    assert "not signed by a root of client_ca" in problems[0]
    assert "issuers[3]" in problems[1]
    assert "not a CA certificate" in problems[1]
    assert problems[2].startswith("issuers[4]: not a certificate")
    assert under_root(second.cert, chain, now + dt.timedelta(days=400)) is not None
    # One of client_ca itself, past its validity: not taken either.
    [(taken_late, [late])] = [verify_issuers(ders[1:2], chain, now + dt.timedelta(days=3650))]
    assert taken_late == ()
    assert "outside its validity" in late
    # Without the root, only what client_ca lists itself.
    issuing_only = [c for c in chain if c.subject != c.issuer]
    assert _subjects(verify_issuers(ders[:2], issuing_only, now)[0]) == _subjects([first.cert])


def test_compose_keeps_roots_and_the_intermediates_the_feed_still_names(
        fleet: Fleet, second: IssuingCA) -> None:
    chain = load_ca_bundle(fleet.chain)  # first issuing CA + root
    first, root = chain
    assert compose(chain, None) == tuple(chain)
    # Rotated: both named; the new one joins.
    assert _subjects(compose(chain, [second.cert, first])) == _subjects(
        [first, root, second.cert])
    # Retired: the first is named no longer and goes, though client_ca lists it.
    assert _subjects(compose([*chain, second.cert], [second.cert])) == _subjects(
        [root, second.cert])


def test_an_announcement_goes_in_force_through_the_same_path(
        tmp_path: Path, fleet: Fleet, second: IssuingCA) -> None:
    """The feed's issuers are composed with client_ca: a new generation, every user
    prepared; the same issuers again change nothing; a retire drops the first intermediate;
    None (the feed names none) gives client_ca back."""
    audit = Audit()
    _, watcher = _watcher(tmp_path, fleet, audit)
    generations: list[int] = []
    watcher.subscribe(lambda bundle: lambda: generations.append(bundle.generation))
    first = fleet.issuing_ca().cert

    async def scenario() -> None:
        watcher.announce([second.cert, first])
        assert await watcher.check() is True
        assert len(watcher.bundle.certificates) == 3
        watcher.announce([second.cert, first])
        assert await watcher.check() is False
        watcher.announce([second.cert])
        assert await watcher.check() is True
        assert first not in watcher.bundle.certificates
        watcher.announce(None)
        assert await watcher.check() is True
        assert list(watcher.bundle.certificates) == load_ca_bundle(fleet.chain)

    asyncio.run(scenario())
    assert generations == [2, 3, 4]
    assert [reason for _, reason in audit.rows] == [
        "trust changed by the feed's issuers: generation 2, 3 certificates",
        "trust changed by the feed's issuers: generation 3, 2 certificates",
        "trust changed by the feed's issuers: generation 4, 2 certificates"]
