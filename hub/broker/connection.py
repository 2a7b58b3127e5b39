"""One record per admitted connection, and the one way a connection is kicked.

The record replaces the string keys the broker, the handler, the runtime and the plugins
kept in ``session.attributes``: who the certificate named (the identity the CONNECT was
admitted with), the peer, the amqtt session and the connection's writer. The gatekeeper
tracks these records and calls :meth:`Connection.kick`; ``fleet-hub`` and a stock amqtt
running our plugins go through the same kick.

Memory: one record per device, so ``__slots__`` and no closure (the kick used to be a
closure with four cells, about 400 bytes; this record is 72).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from hub.broker.surface import Handler, Session, SessionTable, Writer
from hub.tlssocket import transport_of

if TYPE_CHECKING:
    from hub.identity import DeviceIdentity

log = logging.getLogger("hub.broker")

STOP_TIMEOUT = 5.0
HANG_UP_GRACE = 1.0  # seconds a kicked device has to answer the TLS close_notify
# Kicks that mean the credential is gone: the session's queued state goes with the connection.
CREDENTIAL_GONE = frozenset({"revoked", "on-hold", "device-suspended", "device-revoked"})


class Connection:
    """An admitted connection: its identity, peer, amqtt session and writer."""

    __slots__ = ("_broker", "identity", "peer", "session", "writer")

    def __init__(self, identity: DeviceIdentity, peer: str, session: Session,
                 writer: Writer | None, broker: SessionTable) -> None:
        self.identity = identity
        self.peer = peer
        self.session = session
        self.writer = writer  # None: a stock amqtt whose handler was not found
        self._broker = broker

    @property
    def client_id(self) -> str:
        return self.session.client_id

    async def kick(self, reason: str) -> None:
        """Close the connection for *reason*; a credential that is gone takes the session too.

        Hangs up first, whatever state amqtt is in: no dependence on amqtt's handler stopping
        (on Python 3.11 its reader can swallow the cancellation), nor on a kick landing before
        amqtt started the handler. The gatekeeper tracks only the current connection of a
        client id (a take-over detaches the old one first), so the stored entry is the one
        to clean up.
        """
        self.session.will_flag = False  # a refused device's last will is not delivered
        if self.writer is not None:
            hang_up(self.writer)
        client_id = self.client_id
        entry = self._broker._sessions.get(client_id)
        if entry is None:
            return
        handler: Handler | None = entry[1]
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                if reason in CREDENTIAL_GONE:
                    await self._broker._cleanup_session(client_id)
                elif handler is not None:
                    await handler.handle_connection_closed()
        except TimeoutError:
            log.warning("clean-up after kicking %s took over %g s", client_id, STOP_TIMEOUT)


def hang_up(writer: Writer) -> None:
    """Close an amqtt writer's connection now: TLS close_notify, TCP abort after a grace.

    A device that reads sees a clean close at once (and mosquitto_sub, say, reconnects and is
    told "not authorised"); one that never reads cannot hold the socket past the grace.
    """
    transport = transport_of(writer)
    if transport is not None:
        transport.close()
        asyncio.get_running_loop().call_later(HANG_UP_GRACE, abort, writer)


def abort(writer: Writer) -> None:
    """Close the TCP connection under an amqtt writer adapter now, without a TLS goodbye."""
    transport = transport_of(writer)
    if transport is not None:
        with contextlib.suppress(Exception):  # already gone: nothing to do
            transport.abort()


async def close(writer: Writer) -> None:
    with contextlib.suppress(Exception):
        await writer.close()
