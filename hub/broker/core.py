"""amqtt with the fixes the hub needs: authenticate first, then touch sessions.

Stock amqtt 0.12.1 (see docs/amqtt-internals.md) cleans or takes over a session before it
authenticates, stores refused sessions, keeps the old connection's TLS object on resume,
never enforces keep-alive, hands every client the retained messages of everybody's
subscriptions, and leaves a connection that published to a ``$`` topic half-dead. Each
override below closes one of those; they rely on amqtt internals, hence the exact pin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from hub.broker import session
from hub.broker.handler import ConnectRefusedError, HubHandler, audit_session, audit_violation
from hub.broker.router import Router
from hub.errors import MalformedPacketError
from hub.gatekeeper import Decision, LiveSession
from hub.identity import DeviceIdentity, identity_from_der
from hub.limits import PublishBudgets, RetainedQuota
from hub.listener import TLSListener
from hub.runtime import HubRuntime
from hub.tls import server_context
from hub.tlssocket import transport_of
from hub.topictree import valid_filter
from hub.wire import PacketTooLargeError, publish_packet

log = logging.getLogger("hub.broker")

TAKEOVER_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0
HOUSEKEEPING_SECONDS = 0.5  # keep-alive and expiry are enforced within this much
HANG_UP_GRACE = 1.0  # seconds a kicked device has to answer the TLS close_notify
LISTENER = "default"
_DECISION = "fleet_hub.decision"
_AUTHENTICATED = "fleet_hub.authenticated"
_LOCK = "fleet_hub.connect_lock"
_WRITER = "fleet_hub.writer"
# Kicks that mean the credential is gone: the session's queued state goes with the connection.
_CREDENTIAL_GONE = {"revoked", "on-hold", "device-suspended", "device-revoked"}


class HubBroker(Broker):  # type: ignore[misc]
    """The broker ``fleet-hub serve`` runs: our listener, our plugins, authenticate-first."""

    def __init__(self, runtime: HubRuntime) -> None:
        self.hub_runtime = runtime  # before super(): the plugins look for it while loading
        session.install()
        self._connect_locks: dict[str, asyncio.Lock] = {}
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
        self.retained_quota = RetainedQuota(limits.max_retained_per_device,
                                            limits.max_retained_bytes)
        listener = runtime.config.listener
        self.listener = TLSListener(server_context(listener), self._on_stream,
                                    runtime.gatekeeper.handshake_refused,
                                    handshake_timeout=listener.handshake_timeout,
                                    max_pending_tls=runtime.config.limits.max_pending_tls,
                                    audit=runtime.audit)

    async def start(self) -> None:
        await super().start()
        bind = self.hub_runtime.config.listener.bind
        await self.listener.start(bind.host, bind.port)
        self._housekeeping_task = asyncio.create_task(self._housekeeping(),
                                                      name="hub housekeeping")

    async def shutdown(self) -> None:
        task = getattr(self, "_housekeeping_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.listener.close()
        await super().shutdown()

    async def _housekeeping(self) -> None:
        """Keep-alive and certificate expiry for every connection, in one pass per tick."""
        loop = asyncio.get_running_loop()
        gatekeeper = self.hub_runtime.gatekeeper
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            try:
                gatekeeper.sweep(time.time())
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

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[Any, Any]:
        runtime = self.hub_runtime
        peer = f"{remote_address}:{remote_port}"
        # Taken before anything is read: a client that resets after its CONNECT takes its
        # SSL socket with it, and the certificate must still be there to decide on.
        der = _peer_der(writer)
        if der is None:
            await _close(writer)
            raise AMQTTError(f"{peer} closed before its CONNECT was read")
        try:
            handler, incoming = await asyncio.wait_for(
                HubHandler.init_from_connect(reader, writer, self.plugins_manager,
                                             max_bytes=runtime.config.limits.max_packet_bytes,
                                             peer_der=der),
                # A client that completed TLS but sends no CONNECT loses its slot as fast as
                # one that stalls the handshake.
                runtime.config.listener.handshake_timeout)
        except PacketTooLargeError as exc:
            identity = _identity(der)
            runtime.audit.record("limit", device_id=identity.device_id if identity else None,
                                 serial=identity.serial_hex if identity else None, peer=peer,
                                 reason="packet-too-large")
            log.info("%s: %s; closing", peer, exc)
            _abort(writer)  # its body is not read, nor waited for
            raise AMQTTError(f"{peer}: {exc}") from None
        except MalformedPacketError as exc:
            audit_violation(runtime, str(exc), _identity(der), peer)  # [MQTT-4.8.0-1]
            log.info("%s: protocol violation: %s; closing", peer, exc)
            await _close(writer)
            raise AMQTTError(f"{peer}: protocol violation: {exc}") from None
        except ConnectRefusedError as exc:
            identity = _identity(der)
            runtime.audit.record("reject", device_id=identity.device_id if identity else None,
                                 serial=identity.serial_hex if identity else None, peer=peer,
                                 reason=exc.reason)
            runtime.metrics.refused(exc.reason)
            await _close(writer)
            raise AMQTTError(f"{peer} refused: {exc}") from None
        except (AMQTTError, MQTTError, NoDataError, TimeoutError, ConnectionError,
                asyncio.IncompleteReadError) as exc:
            await _close(writer)
            raise AMQTTError(f"no valid CONNECT from {remote_address}:{remote_port}: "
                             f"{type(exc).__name__}") from exc
        handler.hub = self
        client_id = incoming.client_id or ""
        lock = self._connect_locks.setdefault(client_id, asyncio.Lock())
        await lock.acquire()  # two CONNECTs with one client id never interleave
        try:
            decision = await self._admit(incoming)
            session = await self._choose_session(incoming, client_id) \
                if decision.accepted else None
        except BaseException:
            self._release(client_id, lock)
            raise
        if session is None:
            self._release(client_id, lock)
            await _refuse(writer)
            raise MQTTError(f"{client_id!r} refused: {decision.reason}")
        if session.keep_alive:
            # [MQTT-3.1.2-24]: silence is tolerated for one and a half keep-alive periods.
            session.keep_alive = -(-session.keep_alive * 3 // 2)
        session.attributes[_LOCK] = lock
        session.attributes[_AUTHENTICATED] = True
        session.attributes[_WRITER] = writer
        return handler, session

    async def _admit(self, incoming: Any) -> Decision:
        try:
            ok = await Broker._authenticate(self, incoming, None)  # the plugins, as configured
        except Exception:
            log.exception("auth plugin failed; refusing %s", incoming.client_id)
            ok = False
        decision = incoming.attributes.get(_DECISION)
        if not isinstance(decision, Decision):
            return Decision(False, "plugin-error")
        return decision if ok else Decision(False, decision.reason or "refused",
                                            decision.detail, decision.identity, decision.group)

    async def _choose_session(self, incoming: Any, client_id: str) -> Any:
        """Take over, clean or resume only now, for an authenticated client."""
        existing = self._sessions.get(client_id)
        if existing is not None and existing[0].transitions.is_connected():
            await self._take_over(client_id, existing[1])  # the old one has ended on return
            existing = self._sessions.get(client_id)
        if incoming.clean_session or (existing is not None and existing[0].clean_session):
            # [MQTT-3.1.2-6]: clean session 1 discards the previous session, and a clean
            # session's own state is never reused (it normally went with its connection).
            await self._delete_session(client_id)
            existing = None
        if not incoming.clean_session and existing is not None:
            session = existing[0]
            # Everything that belongs to the *new* connection, its TLS object above all.
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain",
                         "keep_alive", "username", "password", "ssl_object", "remote_address",
                         "remote_port", "clean_session"):
                setattr(session, name, getattr(incoming, name))
            session.attributes[_DECISION] = incoming.attributes[_DECISION]
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
                _abort(handler.writer)

    async def _take_over(self, client_id: str, old_handler: Any) -> None:
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

    def _release(self, client_id: str, lock: asyncio.Lock) -> None:
        lock.release()
        if not lock.locked() and self._connect_locks.get(client_id) is lock and \
                not getattr(lock, "_waiters", None):
            del self._connect_locks[client_id]

    async def _authenticate(self, session: Any, _listener: Any) -> bool:
        """Called by stock ``_handle_client_session``: the answer was computed already."""
        lock = session.attributes.pop(_LOCK, None)
        authenticated = bool(session.attributes.pop(_AUTHENTICATED, False))
        if authenticated:
            self._track(session)
        if lock is not None:
            # From here to amqtt storing the session there is no await: still atomic.
            self._release(session.client_id, lock)
        return authenticated

    def _track(self, session: Any) -> None:
        decision: Decision = session.attributes[_DECISION]
        assert decision.identity is not None  # noqa: S101
        client_id = session.client_id
        peer = f"{session.remote_address}:{session.remote_port}"
        writer = session.attributes.get(_WRITER)

        async def kick(reason: str) -> None:
            session.will_flag = False  # a refused device's last will is not delivered
            # Hang up first, whatever state amqtt is in: no dependence on amqtt's handler
            # stopping (on Python 3.11 its reader can swallow the cancellation, see
            # _stop_handler), nor on a kick landing before amqtt started the handler.
            if writer is not None:
                _hang_up(writer)
            # The gatekeeper tracks only the current connection of a client id (a take-over
            # detaches the old one first), so the stored entry is the one to clean up.
            entry = self._sessions.get(client_id)
            if entry is None:
                return
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    if reason in _CREDENTIAL_GONE:
                        await self._cleanup_session(client_id)
                    else:
                        await entry[1].handle_connection_closed()
            except TimeoutError:
                log.warning("clean-up after kicking %s took over %g s", client_id, STOP_TIMEOUT)

        live = LiveSession(client_id, decision.identity, peer, kick)
        session.attributes["fleet_hub.live"] = live
        self.hub_runtime.gatekeeper.attach(live)

    async def _handle_client_session(self, reader: Any, writer: Any, client_session: Any,
                                     handler: Any, server: Any, listener_name: str) -> None:
        try:
            await super()._handle_client_session(reader, writer, client_session, handler,
                                                 server, listener_name)
        finally:
            await self._session_ended(client_session, handler)

    async def _session_ended(self, session: Any, handler: Any) -> None:
        """However a connection's life ended (DISCONNECT, loss, take-over, kick, a bug): it is
        untracked and disconnected, a clean session's state goes with it [MQTT-3.1.2-6], and
        a take-over waiting for it is told."""
        client_id = session.client_id
        try:
            live = session.attributes.get("fleet_hub.live")
            if live is not None:
                self.hub_runtime.gatekeeper.detach(client_id, live)
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

    async def _client_message_loop(self, client_session: Any, handler: Any) -> None:
        await self._message_loop(client_session, handler)

    async def _message_loop(self, session: Any, handler: Any) -> None:
        """Stock's loop, on one future: it kept four tasks per connection waiting forever.

        Subscriptions, unsubscriptions, QoS 2 deliveries and the end of the connection each
        wake the handler's single future (:meth:`HubHandler.poke`); they are then handled in
        stock's order with stock's methods.
        """
        subscriptions = handler._pending_subscriptions
        unsubscriptions = handler._pending_unsubscriptions
        deliveries = session.delivered_message_queue
        deliveries.notify = handler.poke
        try:
            while True:
                if handler.ended:
                    await self._handle_disconnect(session, handler, _Ready(handler.end_packet))
                    return
                if not subscriptions.empty():
                    await self._handle_subscription(session, handler,
                                                    _Ready(subscriptions.get_nowait()))
                elif not unsubscriptions.empty():
                    await self._handle_unsubscription(session, handler,
                                                      _Ready(unsubscriptions.get_nowait()))
                elif not deliveries.empty():
                    if not await self._handle_message_delivery(
                            session, handler, _Ready(deliveries.get_nowait())):
                        return
                else:
                    await handler.sleep()
        finally:
            if deliveries.notify == handler.poke:
                deliveries.notify = None

    # -- after CONNECT --------------------------------------------------------------------------

    async def _topic_filtering(self, session: Any, topic: str, action: Any) -> bool:
        # Same function the topic plugin calls, without a task per message (hot path).
        return self.hub_runtime.topic_allowed(session, topic, str(action.value))

    async def _publish_session_retained_messages(self, session: Any) -> None:
        """Nothing to do: messages queued while away wait in the session's outbox, which the
        handler's start resends and moves (stock awaited each acknowledgement here)."""

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Any) -> None:
        """Retained messages for a filter this client holds (stock also sent them for
        everybody's filters), with RETAIN 1 [MQTT-3.3.1-8]: QoS 0 written at once, QoS 1/2
        through the outbox (stock awaited each acknowledgement in the message loop)."""
        topic_filter = subscription[0]
        granted = self.router.tree.filters_of(session.client_id).get(topic_filter)
        entry = self._sessions.get(session.client_id)
        if not self._retained_messages or granted is None or entry is None:
            return
        writer = entry[1].writer if entry[1] is not None else None
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            qos = min(granted, retained.qos if retained.qos is not None else granted)
            encoded, payload = topic.encode(), bytes(retained.data)
            if qos:
                self.router.acknowledged(session, encoded, payload, qos, retain=True,
                                         writer=writer)
            elif writer is not None:
                writer.write(publish_packet(encoded, payload, retain=True))

    # -- routing: the topic tree instead of amqtt's filter table and broadcast loop -------------

    @property
    def subscriptions(self) -> dict[str, list[tuple[Any, int]]]:
        """Stock's shape, {filter: [(session, qos)]}, built from the tree (for plugins)."""
        table: dict[str, list[tuple[Any, int]]] = {}
        for client_id, filters in self.router.tree.items():
            entry = self._sessions.get(client_id)
            if entry is None:
                continue
            for topic_filter, qos in filters.items():
                table.setdefault(topic_filter, []).append((entry[0], qos))
        return table

    async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
        topic_filter, qos = subscription
        if not valid_filter(topic_filter):
            return 0x80  # [MQTT-4.7.1-2/3]
        limits = self.hub_runtime.config.limits
        if len(topic_filter.encode()) > limits.max_topic_bytes:
            self._note_limit(session, "topic-too-long")
            return 0x80
        if not self.hub_runtime.topic_allowed(session, topic_filter, "subscribe"):
            return 0x80
        held = self.router.tree.filters_of(session.client_id)
        if topic_filter not in held and len(held) >= limits.max_subscriptions:
            self._note_limit(session, "too-many-subscriptions")
            return 0x80
        max_qos = self.config.get("max-qos", qos)
        granted = min(qos, max_qos) if isinstance(max_qos, int) else qos
        self.router.tree.subscribe(session.client_id, topic_filter, granted)
        return granted

    def _note_limit(self, session: Any, reason: str) -> None:
        """A [limits] hit by *session*'s device: through its connection's handler (audited
        once per connection), or audited at once when it has none (a will)."""
        entry = self._sessions.get(session.client_id) if session is not None else None
        handler = entry[1] if entry is not None and entry[0] is session else None
        if isinstance(handler, HubHandler):
            handler.note_limit(reason)
        elif session is not None:
            self.hub_runtime.metrics.limit_hit(reason)
            audit_session(self.hub_runtime, session, "limit", reason)

    async def retain_message(self, source_session: Any, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        """Stock's, within the publishing device's retained quota (hub/limits.py).

        A message over the quota is not kept (it was routed live already) and the topic's
        older retained message goes too: no later subscriber gets a value the device has
        since replaced. An empty payload deletes and frees the quota [MQTT-3.3.1-10/11].
        Messages of a device revoked later are kept: they were legitimate when published.
        """
        if topic_name is None:
            return
        if data:
            owner = _device_of(source_session)
            size = len(topic_name.encode()) + len(data)
            if not self.retained_quota.store(owner, topic_name, size):
                self._note_limit(source_session, "retained-quota")
                self.retained_quota.remove(topic_name)
                data = b""
        else:
            self.retained_quota.remove(topic_name)
        await super().retain_message(source_session, topic_name, data, qos)

    async def _del_all_subscriptions(self, session: Any) -> None:
        self.router.tree.unsubscribe_all(session.client_id)

    def _del_subscription(self, a_filter: str, session: Any) -> int:
        return int(self.router.tree.unsubscribe(session.client_id, a_filter))

    async def _broadcast_message(self, session: Any, topic: str | None,
                                 data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        """Will messages and plugins' broadcasts: routed at once, like every PUBLISH."""
        if topic and data is not None:
            # Stock delivers these at the subscription's QoS when none is given.
            self.router.route(session, topic, bytes(data), 2 if force_qos is None else force_qos)

    async def _handle_message_delivery(self, client_session: Any, handler: Any,
                                       wait_deliver: Any) -> bool:
        """A PUBLISH that took amqtt's flow (QoS 2): checked and routed like the rest."""
        message = wait_deliver.result()
        if message is None:
            return True
        topic = message.topic
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            if topic and topic[0] == "$" and isinstance(handler, HubHandler):
                handler.deny_sys(topic)
            # Stock stops reading but keeps the socket open: close it [MQTT-4.8.0-1].
            await handler.handle_connection_closed()
            return False
        self.hub_runtime.metrics.messages_in()
        within = handler.limit_qos2(topic, len(message.data)) \
            if isinstance(handler, HubHandler) else True
        if within is None:
            await handler.handle_connection_closed()
            return False
        if within and self.hub_runtime.topic_allowed(client_session, topic, "publish"):
            self.router.route(client_session, topic, bytes(message.data), message.qos)
            if message.publish_packet is not None and message.publish_packet.retain_flag:
                await self.retain_message(client_session, topic, message.data, message.qos)
        return True


def _device_of(session: Any) -> str | None:
    """The device a session's connection was admitted as; None for the broker's own."""
    if session is None:
        return None
    identity = getattr(session.attributes.get(_DECISION), "identity", None)
    return str(identity.device_id) if identity is not None else str(session.client_id)


def _peer_der(writer: Any) -> bytes | None:
    """The client certificate of a live TLS connection (DER), None once it is gone."""
    ssl_object = writer.get_ssl_info()
    if ssl_object is None:
        return None
    try:
        der: bytes | None = ssl_object.getpeercert(binary_form=True)
    except (AttributeError, ValueError, OSError):  # closed under us
        return None
    return der


def _identity(der: bytes | None) -> DeviceIdentity | None:
    """Who a connection's certificate names, for the audit of a CONNECT that never got in."""
    found = identity_from_der(der)
    return found if isinstance(found, DeviceIdentity) else None


async def _refuse(writer: Any) -> None:
    """CONNACK 0x05 with session-present 0 [MQTT-3.2.2-4], then close; nothing else changed."""
    with contextlib.suppress(Exception):
        await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
    await _close(writer)


class _Ready:
    """A finished 'future' for stock handlers that take one and call ``result()``."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def result(self) -> Any:
        return self._value


def _hang_up(writer: Any) -> None:
    """Close an amqtt writer's connection now: TLS close_notify, TCP abort after a grace.

    A device that reads sees a clean close at once (and mosquitto_sub, say, reconnects and is
    told "not authorised"); one that never reads cannot hold the socket past the grace.
    """
    transport = transport_of(writer)
    if transport is not None:
        transport.close()
        asyncio.get_running_loop().call_later(HANG_UP_GRACE, _abort, writer)


def _abort(writer: Any) -> None:
    """Close the TCP connection under an amqtt writer adapter now, without a TLS goodbye."""
    transport = transport_of(writer)
    if transport is not None:
        with contextlib.suppress(Exception):  # already gone: nothing to do
            transport.abort()


async def _close(writer: Any) -> None:
    with contextlib.suppress(Exception):
        await writer.close()
