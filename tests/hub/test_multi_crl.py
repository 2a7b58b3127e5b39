"""Several CRLs in one source, one per issuing CA (issuing-CA rotation, contract C1): each is
verified against its own issuer and has its own rollback floor; a serial listed by any is
refused. Real CRLs signed by the fleet's issuing CA and a second intermediate under its root."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hub.config import RevocationConfig
from hub.errors import SourceError
from hub.revocation import RevocationWatcher, load_ca_bundle
from hub.revocation.crl import CrlSet, CrlVerifier
from hub.revocation.crl_sources import PEM_CRLS
from provisioning.pki import IssuingCA
from tests.hub.cabundle_support import second_intermediate
from tests.hub.revocation_support import CrlServer, Fleet, der, make_crl, make_fleet, pem

KEY_COMPROMISE = x509.ReasonFlags.key_compromise
HOLD = x509.ReasonFlags.certificate_hold
OLD_SERIAL, NEW_SERIAL, HELD_SERIAL = 0x1111, 0x2222, 0x3333


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return make_fleet(tmp_path)


@pytest.fixture
def second(fleet: Fleet) -> IssuingCA:
    return second_intermediate(fleet.root)


def _cas(fleet: Fleet, second: IssuingCA) -> list[x509.Certificate]:
    return [*load_ca_bundle(fleet.chain), second.cert]


def _crl(ca: IssuingCA, number: int, *revoked: tuple[int, x509.ReasonFlags],
         next_update: dt.datetime | None = None) -> bytes:
    return pem(make_crl(ca.key, ca.cert.subject, number, list(revoked),
                        next_update=next_update))


def test_one_blob_of_two_issuers_refuses_the_serials_of_both(fleet: Fleet,
                                                             second: IssuingCA) -> None:
    verifier = CrlVerifier(_cas(fleet, second))
    blob = (_crl(second, 1, (NEW_SERIAL, KEY_COMPROMISE))
            + _crl(fleet.issuing_ca(), 7, (OLD_SERIAL, KEY_COMPROMISE), (HELD_SERIAL, HOLD)))
    crls = verifier.check(blob)
    assert [c.name for c in crls] == [second.cert.subject.rfc4514_string(),
                                      fleet.issuing_ca().cert.subject.rfc4514_string()]
    taken = CrlSet().take(crls, time.time(), verifier.issuers())
    assert taken.data is not None
    assert taken.data.revoked == {NEW_SERIAL: "revoked", OLD_SERIAL: "revoked",
                                  HELD_SERIAL: "on-hold"}
    assert taken.warning(time.time()) is None


def test_each_issuer_has_its_own_rollback_floor(fleet: Fleet, second: IssuingCA) -> None:
    """Issuer numbers are independent (the second's 2 after the first's 7 is no rollback);
    one issuer going back refuses the whole blob, naming that issuer."""
    first = fleet.issuing_ca()
    verifier = CrlVerifier(_cas(fleet, second))
    now = time.time()
    taken = CrlSet().take(verifier.check(_crl(first, 7) + _crl(second, 2)), now)
    taken = taken.take(verifier.check(_crl(first, 8, (OLD_SERIAL, KEY_COMPROMISE))
                                      + _crl(second, 2)), now)
    with pytest.raises(SourceError, match=r"Issuing CA .*CRL number 1 is below 2.*rollback"):
        taken.take(verifier.check(_crl(first, 9) + _crl(second, 1)), now)
    assert taken.data is not None
    assert taken.data.revoked == {OLD_SERIAL: "revoked"}


def test_an_issuer_left_out_keeps_its_refusals_while_it_is_trusted(
        fleet: Fleet, second: IssuingCA) -> None:
    """After a retire the set carries the new issuer only: the old one's revoked serials stay
    refused while client_ca still holds it (dropped once it does not), and its CRL's
    nextUpdate no longer makes the source stale."""
    first = fleet.issuing_ca()
    verifier = CrlVerifier(_cas(fleet, second))
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    taken = CrlSet().take(verifier.check(_crl(second, 1) + _crl(
        first, 3, (OLD_SERIAL, KEY_COMPROMISE), next_update=soon)), time.time())
    later = time.time() + 3600
    assert taken.warning(later) is not None  # the old issuer's CRL is past its nextUpdate
    alone = taken.take(verifier.check(_crl(second, 2, (NEW_SERIAL, KEY_COMPROMISE))),
                       time.time(), verifier.issuers())
    assert alone.data is not None
    assert alone.data.revoked == {OLD_SERIAL: "revoked", NEW_SERIAL: "revoked"}
    assert alone.warning(later) is None
    assert alone.data.next_update is not None
    assert alone.data.next_update > later
    verifier.replace([c for c in _cas(fleet, second) if c.subject != first.cert.subject])
    dropped = alone.take(verifier.check(_crl(second, 3, (NEW_SERIAL, KEY_COMPROMISE))),
                         time.time(), verifier.issuers())
    assert dropped.data is not None
    assert dropped.data.revoked == {NEW_SERIAL: "revoked"}


@pytest.mark.parametrize(("damage", "message"), [
    ("twice", "two CRLs of issuer"),
    ("cut", "not a valid CRL: want complete PEM X509 CRL blocks"),
    ("certificate", "not a valid CRL: want complete PEM X509 CRL blocks"),
])
def test_a_blob_with_one_bad_crl_is_refused_whole(fleet: Fleet, second: IssuingCA,
                                                  damage: str, message: str) -> None:
    first = fleet.issuing_ca()
    good = _crl(first, 2, (OLD_SERIAL, KEY_COMPROMISE))
    extra = {"twice": _crl(first, 3),
             "cut": _crl(second, 1)[:-40],
             "certificate": second.cert.public_bytes(Encoding.PEM)}
    verifier = CrlVerifier(load_ca_bundle(fleet.chain))  # client_ca without the second
    with pytest.raises(SourceError, match=message):
        verifier.check(good + extra[damage])


def test_a_crl_of_an_issuer_not_yet_in_client_ca_is_left_out_while_another_is_there(
        fleet: Fleet, second: IssuingCA) -> None:
    """crl.pem may carry a rotation's new intermediate before this gateway's client_ca does:
    the known issuer's CRL is enforced meanwhile. Alone, an unknown issuer's CRL is refused."""
    first = fleet.issuing_ca()
    verifier = CrlVerifier(load_ca_bundle(fleet.chain))  # client_ca without the second
    crls = verifier.check(_crl(second, 1, (NEW_SERIAL, KEY_COMPROMISE))
                          + _crl(first, 2, (OLD_SERIAL, KEY_COMPROMISE)))
    assert [c.name for c in crls] == [first.cert.subject.rfc4514_string()]
    with pytest.raises(SourceError, match="is not a CA of the client_ca bundle"):
        verifier.check(_crl(second, 1))


def test_a_client_ca_reload_takes_the_unchanged_crl_file_again(
        fleet: Fleet, second: IssuingCA) -> None:
    """The new intermediate's CRL, left out so far, counts once client_ca carries it, though
    the file did not change."""
    fleet.crl.write_bytes(_crl(second, 1, (NEW_SERIAL, KEY_COMPROMISE))
                          + _crl(fleet.issuing_ca(), 5, (OLD_SERIAL, KEY_COMPROMISE)))

    async def scenario() -> list[dict[int, str]]:
        watcher = RevocationWatcher(RevocationConfig(crl_file=fleet.crl, refresh_seconds=60),
                                    load_ca_bundle(fleet.chain))
        await watcher.start()
        try:
            seen = [dict(watcher.snapshot.revoked)]
            cas = _cas(fleet, second)
            watcher.replace_ca_certs(cas, "".join(
                c.public_bytes(Encoding.PEM).decode() for c in cas))
            assert await watcher.refresh() is True
            return [*seen, dict(watcher.snapshot.revoked)]
        finally:
            await watcher.stop()

    assert asyncio.run(scenario()) == [{OLD_SERIAL: "revoked"},
                                       {NEW_SERIAL: "revoked", OLD_SERIAL: "revoked"}]


def test_a_crl_file_of_two_issuers_through_the_watcher(fleet: Fleet, second: IssuingCA) -> None:
    fleet.crl.write_bytes(_crl(second, 1, (NEW_SERIAL, KEY_COMPROMISE))
                          + _crl(fleet.issuing_ca(), 5, (OLD_SERIAL, KEY_COMPROMISE)))

    async def scenario() -> dict[int, str]:
        watcher = RevocationWatcher(RevocationConfig(crl_file=fleet.crl, refresh_seconds=60),
                                    _cas(fleet, second))
        await watcher.start()
        try:
            [health] = watcher.health()
            assert (health.ok, health.stale, health.entries) == (True, False, 2)
            return dict(watcher.snapshot.revoked)
        finally:
            await watcher.stop()

    assert asyncio.run(scenario()) == {NEW_SERIAL: "revoked", OLD_SERIAL: "revoked"}


@pytest.mark.parametrize("form", ["pem", "der"])
def test_the_crl_url_asks_for_pem_and_takes_either_form(fleet: Fleet, second: IssuingCA,
                                                        form: str) -> None:
    """Contract C1: the fetch says Accept: application/x-pem-file; a CA service that answers
    every live issuer's CRL as PEM and an older one answering DER are both taken."""
    first = fleet.issuing_ca()
    body = (_crl(second, 1, (NEW_SERIAL, KEY_COMPROMISE))
            + _crl(first, 4, (OLD_SERIAL, KEY_COMPROMISE))) if form == "pem" else \
        der(make_crl(first.key, first.cert.subject, 4, [(OLD_SERIAL, KEY_COMPROMISE)]))
    want = {OLD_SERIAL: "revoked"} | ({NEW_SERIAL: "revoked"} if form == "pem" else {})

    async def scenario() -> None:
        server = await CrlServer(body).start()
        watcher = RevocationWatcher(RevocationConfig(crl_url=server.url, refresh_seconds=60),
                                    _cas(fleet, second))
        try:
            await watcher.start()
            assert dict(watcher.snapshot.revoked) == want
            assert server.accepts == [PEM_CRLS]
        finally:
            await watcher.stop()
            await server.stop()

    asyncio.run(scenario())
