"""amqtt with the fixes the hub needs: authenticate first, then touch sessions.

Stock amqtt 0.12.1 (see docs/amqtt-internals.md) cleans or takes over a session before it
authenticates, stores refused sessions, keeps the old connection's TLS object on resume,
never enforces keep-alive, hands every client the retained messages of everybody's
subscriptions, and leaves a connection that published to a ``$`` topic half-dead. Each
override here and in routing.py closes one of those; they rely on amqtt internals, hence the
exact pin.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.errors import MQTTError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from hub.broker import session
from hub.broker.connect import first_connect, refuse
from hub.broker.connection import HANG_UP_GRACE, STOP_TIMEOUT, Connection, abort
from hub.broker.delivery import Delivery
from hub.broker.handler import HubHandler
from hub.broker.router import Router
from hub.broker.routing import RoutingBroker
from hub.gatekeeper import Decision
from hub.limits import PublishBudgets
from hub.listener import TLSListener
from hub.runtime import HubRuntime
from hub.tasks import cancel_and_wait
from hub.tls import server_context

if TYPE_CHECKING:
    from hub.broker.session import HubSession
    from hub.broker.surface import Handler, Reader, Session, Writer
    from hub.cabundle import Bundle
    from hub.identity import DeviceIdentity

__all__ = ["HANG_UP_GRACE", "HubBroker"]

log = logging.getLogger("hub.broker")

TAKEOVER_TIMEOUT = 5.0
HOUSEKEEPING_SECONDS = 0.5  # keep-alive and expiry are enforced within this much
LISTENER = "default"


class HubBroker(RoutingBroker):
    """The broker ``fleet-hub serve`` runs: our listener, our plugins, authenticate-first."""

    def __init__(self, runtime: HubRuntime) -> None:
        self.hub_runtime = runtime  # before super(): the plugins look for it while loading
        session.install()
        self._connect_locks: dict[str, asyncio.Lock] = {}
        # Admitted, not yet stored by amqtt: the record and the client id's connect lock.
        self._admitting: dict[str, tuple[Connection, asyncio.Lock]] = {}
        source = str(runtime.config.source or "")
        plugin_config = {"config": source}
        super().__init__({
            # amqtt's own listener code never opens a socket: ours hands it finished TLS streams.
            "listeners": {LISTENER: {"type": "external", "bind": "127.0.0.1:0"}},
            "plugins": {"hub.plugins.FleetAuthPlugin": plugin_config,
                        "hub.plugins.FleetTopicPlugin": plugin_config},
        })
        # Subscriptions live in the router's topic tree; amqtt's own table stays empty, so
        # its per-CONNECT walk over every filter in the broker costs nothing.
        self.router = Router(self._sessions, runtime.metrics)
        limits = runtime.config.limits
        self.publish_budgets = PublishBudgets(limits.publish_rate, limits.publish_bytes_rate)
        self.delivery = Delivery(runtime, self.router, self._sessions, self._retained_messages,
                                 self._matches)
        listener = runtime.config.listener
        # The bundle as the runtime read it; later bundles swap the context (hub.cabundle).
        self.listener = TLSListener(server_context(listener, runtime.client_ca.bundle.pem),
                                    self._on_stream,
                                    runtime.gatekeeper.handshake_refused,
                                    handshake_timeout=listener.handshake_timeout,
                                    max_pending_tls=runtime.config.limits.max_pending_tls,
                                    audit=runtime.audit)
        runtime.client_ca.subscribe(self._prepare_context)
        # The findings' pass looks at every open connection, kicked ones included.
        runtime.findings.sessions = self._open_connections

    def _prepare_context(self, bundle: Bundle) -> Callable[[], None]:
        """A changed client_ca (worker thread): the listener's context for it, swapped in on
        the loop; handshakes under way and live connections keep theirs."""
        context = server_context(self.hub_runtime.config.listener, bundle.pem)
        return partial(self.listener.replace_context, context)

    async def start(self) -> None:
        await super().start()
        bind = self.hub_runtime.config.listener.bind
        await self.listener.start(bind.host, bind.port)
        self._housekeeping_task = asyncio.create_task(self._housekeeping(),
                                                      name="hub housekeeping")

    async def shutdown(self) -> None:
        await cancel_and_wait(getattr(self, "_housekeeping_task", None))
        await self.listener.close()
        await super().shutdown()

    async def _housekeeping(self) -> None:
        """Keep-alive and certificate expiry for every connection, in one pass per tick."""
        loop = asyncio.get_running_loop()
        gatekeeper = self.hub_runtime.gatekeeper
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            try:
                gatekeeper.sweep()
                now = loop.time()
                for _session, handler in list(self._sessions.values()):
                    if isinstance(handler, HubHandler):
                        handler.check_idle(now)
            except Exception:  # the pass must outlive any bug, or keep-alive would stop
                log.exception("housekeeping pass failed")

    @property
    def port(self) -> int:
        return self.listener.port

    async def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.external_connected(StreamReaderAdapter(reader), StreamWriterAdapter(writer),
                                      LISTENER)

    # -- CONNECT: authenticate the new connection before anything else -----------------------

    async def _initialize_client_session(self, reader: Reader, writer: Writer,
                                         remote_address: str, remote_port: int,
                                         ) -> tuple[HubHandler, HubSession]:
        peer = f"{remote_address}:{remote_port}"
        incoming = await first_connect(self.hub_runtime, reader, writer, peer)
        handler = HubHandler(self.plugins_manager)
        handler.hub = self
        client_id = incoming.client_id
        lock = self._connect_locks.setdefault(client_id, asyncio.Lock())
        await lock.acquire()  # two CONNECTs with one client id never interleave
        try:
            decision = await self._admit(incoming, peer)
            chosen = await self._choose_session(incoming, client_id, decision.identity, peer) \
                if decision.accepted else None
        except BaseException:
            self._release(client_id, lock)
            raise
        if chosen is None or decision.identity is None:
            self._release(client_id, lock)
            await refuse(writer)
            raise MQTTError(f"{client_id!r} refused: {decision.reason}")
        if chosen.keep_alive:
            # [MQTT-3.1.2-24]: silence is tolerated for one and a half keep-alive periods.
            chosen.keep_alive = -(-chosen.keep_alive * 3 // 2)
        # The certificate's bytes were needed for the decision only: not kept per session.
        chosen.ssl_object = None
        chosen.connection = Connection(decision.identity, peer, chosen, writer, self)
        self._admitting[client_id] = (chosen.connection, lock)
        return handler, chosen

    async def _admit(self, incoming: HubSession, peer: str) -> Decision:
        """The gatekeeper's decision on this connection's certificate and CONNECT."""
        runtime = self.hub_runtime
        der = incoming.ssl_object.getpeercert(binary_form=True)
        will_topic = incoming.will_topic if incoming.will_flag else None
        try:
            decision = await runtime.gatekeeper.admit(der, incoming.client_id,
                                                      incoming.password, peer,
                                                      will_topic=will_topic, acl=runtime.acl)
        except Exception:
            log.exception("the gatekeeper failed; refusing %s", incoming.client_id)
            return Decision(False, "gatekeeper-error")
        if decision.accepted and decision.identity is not None:
            runtime.findings.admitted(decision.identity, der, peer)  # O(1): looked at later
        return decision

    async def _choose_session(self, incoming: HubSession, client_id: str,
                              identity: DeviceIdentity | None, peer: str) -> HubSession:
        """Take over, clean or resume only now, for an authenticated client."""
        existing = self._sessions.get(client_id)
        if existing is not None and existing[0].transitions.is_connected():
            old = getattr(existing[0], "connection", None)
            if old is not None and identity is not None:
                handler = existing[1]
                idle = handler.idle_seconds(asyncio.get_running_loop().time()) \
                    if isinstance(handler, HubHandler) else None
                self.hub_runtime.findings.took_over(client_id, old, identity, peer, idle)
            await self._take_over(client_id, existing[1])  # the old one has ended on return
            existing = self._sessions.get(client_id)
        if incoming.clean_session or (existing is not None and existing[0].clean_session):
            # [MQTT-3.1.2-6]: clean session 1 discards the previous session, and a clean
            # session's own state is never reused (it normally went with its connection).
            await self._delete_session(client_id)
            existing = None
        if not incoming.clean_session and existing is not None:
            session: HubSession = existing[0]
            # Everything that belongs to the *new* connection, its TLS object above all.
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain",
                         "keep_alive", "username", "password", "ssl_object", "remote_address",
                         "remote_port", "clean_session"):
                setattr(session, name, getattr(incoming, name))
            session.parent = 1
            return session
        incoming.parent = 0
        return incoming

    async def _stop_handler(self, handler: BrokerProtocolHandler) -> None:
        """Stock, bounded: a handler whose reader ignored its cancellation is cut off.

        amqtt's reader awaits ``asyncio.wait_for(read, keep-alive)``; on Python 3.11 a
        cancellation that coincides with a packet arriving is swallowed (fixed in 3.12), the
        reader goes on and ``handler.stop()`` waits for it forever with the socket open.
        Aborting the transport ends the reader (EOF), which then finishes the stop itself.
        """
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await super()._stop_handler(handler)
        except TimeoutError:
            log.warning("a connection handler did not stop in %g s; aborting its socket",
                        STOP_TIMEOUT)
            if handler.writer is not None:
                abort(handler.writer)

    async def _take_over(self, client_id: str, old_handler: Handler) -> None:
        """End the connection that holds *client_id* [MQTT-3.1.4-2] and wait until the broker
        is done with it (:meth:`_handle_client_session` always sets ``finished``)."""
        self.hub_runtime.gatekeeper.detach(client_id)
        await old_handler.handle_connection_closed()
        finished = getattr(old_handler, "finished", None)
        if finished is None:
            return
        try:
            async with asyncio.timeout(TAKEOVER_TIMEOUT):
                await finished.wait()
        except TimeoutError:  # a safety net: every path sets it
            log.warning("old connection of %s did not close in time; stopping it", client_id)
            await self._stop_handler(old_handler)

    def _open_connections(self) -> list[Connection]:
        """The admitted connection of every session amqtt holds as connected."""
        return [s.connection for s, _ in self._sessions.values()
                if getattr(s, "connection", None) is not None and s.transitions.is_connected()]

    def _release(self, client_id: str, lock: asyncio.Lock) -> None:
        lock.release()
        if not lock.locked() and self._connect_locks.get(client_id) is lock and \
                not getattr(lock, "_waiters", None):
            del self._connect_locks[client_id]

    async def _authenticate(self, session: Session, _listener: object) -> bool:
        """Called by stock ``_handle_client_session``: the answer was computed already; the
        connection is tracked from now on (a revocation or its not-after closes it)."""
        pending = self._admitting.pop(session.client_id, None)
        if pending is None:
            return False
        connection, lock = pending
        admitted = connection.session is session
        if admitted:
            self.hub_runtime.gatekeeper.attach(connection)
        # From here to amqtt storing the session there is no await: still atomic.
        self._release(session.client_id, lock)
        return admitted

    async def _handle_client_session(self, reader: Reader, writer: Writer,
                                     client_session: Session, handler: Handler, server: object,
                                     listener_name: str) -> None:
        try:
            await super()._handle_client_session(reader, writer, client_session, handler,
                                                 server, listener_name)
        finally:
            await self._session_ended(client_session, handler)

    async def _session_ended(self, session: Session, handler: Handler) -> None:
        """However a connection's life ended (DISCONNECT, loss, take-over, kick, a bug): it is
        untracked and disconnected, a clean session's state goes with it [MQTT-3.1.2-6], and
        a take-over waiting for it is told."""
        client_id = session.client_id
        try:
            connection = getattr(session, "connection", None)
            if connection is not None:
                self.hub_runtime.gatekeeper.detach(client_id, connection)
            entry = self._sessions.get(client_id)
            ours = entry is not None and entry[1] is handler
            if ours and session.transitions.is_connected():
                # Ended by an exception, not through stock's _handle_disconnect.
                await self._stop_handler(handler)
                session.transitions.disconnect()
            if ours and session.clean_session:
                del self._sessions[client_id]
                await self._del_all_subscriptions(session)
                session.clear_queues()
        finally:
            if isinstance(handler, HubHandler):
                handler.finished.set()
