"""One virtual device: a paho-mqtt client driven by the running asyncio loop, no threads.

The wiring is aiomqtt's: paho's socket callbacks register its descriptor with
``loop.add_reader`` / ``loop.add_writer`` and the loop calls ``loop_read`` / ``loop_write``;
``loop_misc`` (keep-alive) is called by the owner for all its devices at once. So thousands
of clients share one loop (``loop_start()`` would cost a thread each, and its ``select()``
fails past 1,024 descriptors).

paho's ``connect()`` opens TCP and TLS itself, blocking. The one seam we use is
``Client._create_socket``, which ``reconnect()`` calls for the socket it then sets
non-blocking and sends CONNECT on: :class:`_PresetSocketClient` returns the TLS socket that
:func:`device_sim.transport.open_tls` connected on the loop, so TCP, TLS and
CONNECT-to-CONNACK are each timed (paho 2.0 to 2.2 have this method; a test pins it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_sim.errors import HandshakeError
from device_sim.transport import ClientTLS, Opened, TLSStream, open_tls, wait_ready

# paho 2 reports an MQTT 3.1.1 CONNACK return code as an MQTT 5 reason code.
_CONNACK_311 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
_CONNACK_TEXT = {1: "unacceptable protocol version", 2: "identifier rejected",
                 3: "server unavailable", 4: "bad user name or password", 5: "not authorised"}
SUBACK_FAILURE = 0x80
RAW_CHUNK = 16384  # one TLS record's worth of plaintext per write


@dataclass(frozen=True)
class Outcome:
    """How one connection attempt ended, seen from the device.

    ``stage``: 'accepted', 'tcp' or 'tls' (refused before MQTT), 'connack' (a refusing
    CONNACK), 'closed' (the broker closed the connection before any CONNACK) or 'timeout'.
    """

    stage: str
    detail: str
    tcp_s: float | None = None
    tls_s: float | None = None
    mqtt_s: float | None = None
    connack: int | None = None

    @property
    def accepted(self) -> bool:
        return self.stage == "accepted"

    @property
    def refused(self) -> bool:
        """The broker said no: in TLS, with a CONNACK, or by closing before CONNACK."""
        return self.stage in ("tls", "connack", "closed")

    def describe(self) -> str:
        if self.stage == "accepted":
            return "accepted (CONNACK 0)"
        if self.stage == "tls":
            return f"refused in TLS: {self.detail}"
        if self.stage in ("connack", "closed"):
            return f"refused: {self.detail}"
        if self.stage == "tcp":
            return f"TCP connect failed: {self.detail}"
        return self.detail

    @property
    def total_s(self) -> float | None:
        if self.tcp_s is None or self.tls_s is None or self.mqtt_s is None:
            return None
        return self.tcp_s + self.tls_s + self.mqtt_s


class _PresetSocketClient(mqtt.Client):
    """paho's client, made to use a socket the simulator connected itself."""

    preset: TLSStream | None = None

    def _create_socket(self) -> Any:
        sock, self.preset = self.preset, None
        if sock is None:
            raise ConnectionError("no connected socket was prepared for this client")
        return sock


async def _within(future: asyncio.Future[Any], timeout: float | None) -> Any:
    """*future*'s result, waiting at most *timeout* s; on timeout the future lives on."""
    if not future.done():
        async with asyncio.timeout(timeout):
            await asyncio.wait([future])
    return future.result()


def _code(value: object) -> int:
    number = getattr(value, "value", value)
    return int(number) if isinstance(number, int | str) else -1


class Device:
    """A device's MQTT connection on the running loop: connect, subscribe, publish, leave."""

    def __init__(self, client_id: str, context: ClientTLS, host: str, port: int, *,
                 keepalive: int = 60, source: str | None = None,
                 on_message: Callable[[str, bytes], None] | None = None,
                 clean_session: bool = True) -> None:
        self.client_id = client_id
        self.host, self.port, self.source = host, port, source
        self._context = context
        self._keepalive = keepalive
        self._loop = asyncio.get_running_loop()
        self._on_message_cb = on_message
        self._sock: TLSStream | None = None
        self._fd = -1
        self._writer = False
        self._flush_scheduled = False
        self._connack: asyncio.Future[int] | None = None
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._gone: asyncio.Future[None] = self._loop.create_future()
        self._connect_started = 0.0
        self.connected_at: float | None = None  # time.monotonic(), comparable across processes
        self.disconnected_at: float | None = None
        self.closing = False  # we asked to leave: a disconnect now is not the broker's doing
        self.switching = False  # moving to a new certificate (switch): not gone meanwhile
        self.carried = 0  # QoS 1/2 messages unacknowledged at a switch, resent on the new one
        self._left: asyncio.Future[None] | None = None
        self.sent = 0
        self.acked = 0
        self.received = 0
        self.retained = 0  # messages delivered with the RETAIN flag (a new subscription's)
        client = _PresetSocketClient(CallbackAPIVersion.VERSION2, client_id=client_id,
                                     protocol=mqtt.MQTTv311, clean_session=clean_session,
                                     reconnect_on_failure=False)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe  # type: ignore[assignment]
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self.client = client

    # -- connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.connected_at is not None and self.disconnected_at is None

    async def connect(self, timeout: float = 30.0) -> Outcome:
        """TCP, TLS, CONNECT; the outcome says how far it got and how long each phase took."""
        try:
            # asyncio.timeout, not wait_for: no extra task per connect (the simulator's CPU
            # per connect must stay below the broker's).
            async with asyncio.timeout(timeout):
                opened = await open_tls(self.host, self.port, self._context, source=self.source)
        except HandshakeError as exc:
            return Outcome(exc.phase, exc.reason)
        except TimeoutError:
            return Outcome("timeout", f"no TLS handshake within {timeout:g} s")
        return await self._session(opened, timeout)

    async def _session(self, opened: Opened, timeout: float) -> Outcome:
        """CONNECT on a connected TLS stream and wait for the CONNACK."""
        self._sock = opened.sock
        self._connack = self._loop.create_future()
        self.client.preset = opened.sock
        self._connect_started = time.perf_counter()
        try:
            self.client.connect(self.host, self.port, keepalive=self._keepalive)
        except OSError as exc:
            self._force_close(closing=not self.switching)
            return Outcome("closed", f"connection lost while sending CONNECT: {exc}",
                           opened.tcp_s, opened.tls_s)
        try:
            # Awaited directly (a timeout cancels it, and nobody else waits for it): no
            # asyncio.wait and its extra future per connect.
            async with asyncio.timeout(timeout):
                code = await self._connack
        except TimeoutError:
            self._force_close(closing=not self.switching)
            return Outcome("timeout", f"no CONNACK within {timeout:g} s", opened.tcp_s,
                           opened.tls_s)
        except ConnectionError:
            failure = opened.sock.failure
            if failure is not None:
                return Outcome("tls", failure, opened.tcp_s, opened.tls_s)
            # TLS 1.3: a server refusing the client certificate after the client's side of
            # the handshake is done may close without an alert the client can read.
            return Outcome("closed", f"connection closed before CONNACK ({opened.version}, "
                           "no TLS alert)", opened.tcp_s, opened.tls_s)
        mqtt_s = time.perf_counter() - self._connect_started
        if code != 0:
            text = _CONNACK_TEXT.get(code, "refused")
            return Outcome("connack", f"CONNACK {code} ({text})", opened.tcp_s, opened.tls_s,
                           mqtt_s, code)
        if self.connected_at is None:
            self.connected_at = time.monotonic()
        return Outcome("accepted", "CONNACK 0", opened.tcp_s, opened.tls_s, mqtt_s, 0)

    async def switch(self, context: ClientTLS, timeout: float = 30.0) -> Outcome:
        """Move this device's MQTT session to a new certificate (after a renewal).

        The TLS handshake with the new certificate comes first, while the old connection
        still carries traffic: a certificate the broker refuses in TLS leaves the device where
        it was. Then DISCONNECT on the old connection and CONNECT, same client id, on the new
        one. With clean session 0 ([MQTT-3.1.2-4]) the broker keeps the subscriptions and the
        QoS 1 messages for the device across the gap and resends those it had not seen
        acknowledged; paho resends the PUBLISHes the broker had not acknowledged (DUP), and
        publishes made during the gap wait in paho's queue ([MQTT-4.4.0-1]). A device that
        was gone already, or whose CONNECT on the new connection fails, is gone.
        """
        if not self.connected:
            return Outcome("closed", "not connected")
        try:
            async with asyncio.timeout(timeout):
                opened = await open_tls(self.host, self.port, context, source=self.source)
        except HandshakeError as exc:
            return Outcome(exc.phase, exc.reason)
        except TimeoutError:
            return Outcome("timeout", f"no TLS handshake within {timeout:g} s")
        if not self.connected:  # the broker closed the old connection meanwhile
            opened.sock.close()
            return Outcome("closed", "not connected")
        self.switching = True
        try:
            await self._leave(timeout)
            self._context = context
            # paho keeps them (not acknowledged, or queued behind max_inflight) and sends
            # them after the CONNACK; no public call counts them.
            self.carried += len(self.client._out_messages)
            outcome = await self._session(opened, timeout)
        finally:
            self.switching = False
        if not outcome.accepted:
            self._force_close(closing=False)  # the broker's doing: not a clean leave
        return outcome

    async def _leave(self, timeout: float) -> None:
        """DISCONNECT on the current connection and wait until paho has closed it."""
        if self._sock is None:
            return
        self._left = self._loop.create_future()
        self.client.disconnect()
        try:
            await _within(self._left, timeout)
        except TimeoutError:
            sock, self._sock = self._sock, None
            self._drop_fd()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()

    async def subscribe(self, filters: list[str], qos: int = 1,
                        timeout: float = 30.0) -> list[int] | None:
        """SUBACK return codes, one per filter (0x80: refused); None if none came."""
        result, mid = self.client.subscribe([(f, qos) for f in filters])
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return None
        waiter: asyncio.Future[list[int]] = self._loop.create_future()
        self._subacks[mid] = waiter
        try:
            async with asyncio.timeout(timeout):
                codes: list[int] = await waiter
        except (TimeoutError, ConnectionError):
            return None
        finally:
            self._subacks.pop(mid, None)
        return codes

    def publish(self, topic: str, payload: bytes, qos: int = 1, *,
                retain: bool = False) -> bool:
        """Queue a PUBLISH; False when the client is not connected."""
        if not self.connected:
            return False
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        # While switching, paho keeps a QoS 1/2 message for the next connection (NO_CONN).
        queued = self.switching and qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN
        if info.rc != mqtt.MQTT_ERR_SUCCESS and not queued:
            return False
        self.sent += 1
        return True

    async def send_raw(self, data: bytes, timeout: float = 10.0) -> int:
        """Write *data* on the TLS stream behind paho's back: bytes no MQTT client would send.

        Returns how many bytes the TLS layer took before the connection closed or *timeout*
        passed (taken by the kernel's buffers, not necessarily read by the broker). paho must
        have nothing queued: the two writers would interleave.
        """
        taken = 0
        deadline = self._loop.time() + timeout
        chunks = [data[i:i + RAW_CHUNK] for i in range(0, len(data), RAW_CHUNK)]
        for chunk in chunks:
            while True:
                sock = self._sock
                if sock is None or not self.connected:
                    return taken
                try:
                    # The same bytes object again after "want write": OpenSSL insists.
                    taken += sock.send(chunk)
                    break
                except BlockingIOError:
                    remaining = deadline - self._loop.time()
                    if remaining <= 0 or self._writer:
                        return taken
                    try:
                        async with asyncio.timeout(remaining):
                            await wait_ready(self._loop, self._fd, write=True)
                    except TimeoutError:
                        return taken
                except OSError:
                    return taken
            await asyncio.sleep(0)  # let the reader see the broker's close
        return taken

    def tick(self) -> None:
        """Keep-alive (PINGREQ) and retries: call every few seconds."""
        if self._sock is not None:
            self.client.loop_misc()

    def when_gone(self, callback: Callable[[Device], None]) -> None:
        """Call *callback* once the connection is closed, by either side."""
        self._gone.add_done_callback(lambda _: callback(self))

    async def wait_gone(self, timeout: float | None = None) -> bool:
        """Until the connection is closed (by either side); False on timeout."""
        try:
            await _within(self._gone, timeout)
        except TimeoutError:
            return False
        return True

    async def disconnect(self, timeout: float = 5.0) -> None:
        """A clean MQTT DISCONNECT; the socket is closed anyway after *timeout*."""
        self.closing = True
        if self._sock is None:
            return
        self.client.disconnect()
        if not await self.wait_gone(timeout):
            self._force_close()

    def _force_close(self, *, closing: bool = True) -> None:
        self.closing = self.closing or closing
        sock, self._sock = self._sock, None
        if sock is not None:
            self._drop_fd()
            with contextlib.suppress(OSError):
                sock.close()
        if sock is not None or not closing:
            self._mark_gone()

    def _mark_gone(self) -> None:
        if self.disconnected_at is None:
            self.disconnected_at = time.monotonic()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionError("closed before CONNACK"))
            self._connack.exception()  # retrieved: nobody else may be waiting
        for waiter in self._subacks.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("closed before SUBACK"))
                waiter.exception()
        if not self._gone.done():
            self._gone.set_result(None)

    # -- paho's callbacks (all run on the loop, inside loop_read/loop_write) ----------------

    def _on_connect(self, _c: object, _u: object, _flags: object, reason: object,
                    _p: object) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(_CONNACK_311.get(_code(reason), _code(reason)))

    def _on_disconnect(self, *_args: object) -> None:
        self._sock = None
        if self.switching and self._left is not None and not self._left.done():
            self._left.set_result(None)  # the old connection, closed by our DISCONNECT
            return
        if self.switching and self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionError("closed before CONNACK"))
            self._connack.exception()  # the new connection died: switch() says why
            return
        self._mark_gone()

    def _on_subscribe(self, _c: object, _u: object, mid: int, codes: list[object],
                      _p: object) -> None:
        waiter = self._subacks.get(mid)
        if waiter is not None and not waiter.done():
            waiter.set_result([_code(c) for c in codes])

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        self.received += 1
        self.retained += int(message.retain)
        if self._on_message_cb is not None:
            self._on_message_cb(message.topic, bytes(message.payload))

    def _on_publish(self, *_args: object) -> None:
        self.acked += 1

    def _on_socket_open(self, _c: object, _u: object, sock: Any) -> None:
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable)

    def _on_socket_close(self, _c: object, _u: object, _sock: Any) -> None:
        self._drop_fd()

    def _drop_fd(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            if self._writer:
                self._loop.remove_writer(self._fd)
                self._writer = False
            self._fd = -1

    def _readable(self) -> None:
        sock = self._sock
        self.client.loop_read()
        # TLS may hold whole MQTT packets already decrypted: the descriptor will not
        # become readable for them, so drain what OpenSSL buffered.
        while sock is not None and self._sock is sock and sock.pending():
            self.client.loop_read()

    def _on_register_write(self, _c: object, _u: object, _sock: Any) -> None:
        # Try to write on the next loop pass instead of watching the descriptor: a small
        # packet almost always fits, and epoll changes cost more than a callback.
        if not self._writer and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._sock is None:
            return
        self.client.loop_write()
        # Still data left (socket buffer full): now wait for writability. paho keeps its
        # "registered" flag set meanwhile, so it will not ask again.
        if self._sock is not None and self.client.want_write() and not self._writer:
            self._loop.add_writer(self._fd, self._writable)
            self._writer = True

    def _writable(self) -> None:
        self.client.loop_write()

    def _on_unregister_write(self, _c: object, _u: object, _sock: Any) -> None:
        if self._writer and self._fd >= 0:
            self._loop.remove_writer(self._fd)
            self._writer = False
