"""A paho-mqtt client for tests: real TLS, real MQTT 3.1.1, answers awaited with timeouts."""

from __future__ import annotations

import contextlib
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

TIMEOUT = 10.0


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Client:
    """One device's MQTT connection; every wait has a deadline, no sleeps."""

    def __init__(self, port: int, ca: Path, cert: Path | None, key: Path | None,
                 client_id: str, *, clean: bool = True, username: str | None = None,
                 password: str | None = None, keepalive: int = 30,
                 will: tuple[str, bytes] | None = None) -> None:
        self.port = port
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=clean, protocol=mqtt.MQTTv311)
        context = ssl.create_default_context(cafile=str(ca))
        context.check_hostname = False  # the hub's certificate names localhost/127.0.0.1
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
        self.client.tls_set_context(context)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        self.keepalive = keepalive
        self.connack: int | None = None
        self.session_present: bool | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnected_at: float | None = None
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.messages: queue.Queue[Message] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, _c: object, _u: object, flags: mqtt.ConnectFlags,
                    reason: object, _p: object) -> None:
        self.connack = _code(reason)
        self.session_present = bool(flags.session_present)
        self.connected.set()

    def _on_disconnect(self, *_args: object) -> None:
        self.disconnected_at = time.monotonic()
        self.disconnected.set()

    def _on_subscribe(self, _c: object, _u: object, _mid: int, codes: list[object],
                      _p: object) -> None:
        self.subacks.put([_code(c) for c in codes])

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Message(msg.topic, msg.payload, msg.qos, bool(msg.retain)))

    def connect(self, timeout: float = TIMEOUT) -> int | None:
        """CONNACK return code (0 accepted, 5 not authorised), or None: refused before MQTT."""
        self.client.reconnect_delay_set(60, 120)
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        except (ssl.SSLError, OSError):
            return None
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected.wait(0.05):
                return self.connack
            if self.disconnected.is_set():
                return None
        raise TimeoutError("no CONNACK and no disconnect")

    def subscribe(self, *filters: str, qos: int = 1) -> list[int]:
        """SUBACK codes, one per filter (0x80 = refused)."""
        self.client.subscribe([(f, qos) for f in filters])
        return self.subacks.get(timeout=TIMEOUT)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            info.wait_for_publish(TIMEOUT)

    def receive(self, timeout: float = TIMEOUT) -> Message | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait_disconnected(self, timeout: float = TIMEOUT) -> bool:
        return self.disconnected.wait(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        with contextlib.suppress(Exception):
            self.client.loop_stop()
        # paho keeps a socket pair to wake its loop and closes it only when the client is
        # collected: a late collection is a ResourceWarning, an error under this suite.
        with contextlib.suppress(Exception):
            self.client._reset_sockets()


def _code(reason: object) -> int:
    value = getattr(reason, "value", reason)
    return int(value)  # type: ignore[call-overload]
