"""The first packet of a connection: a CONNECT, read within its length and checked to the letter.

Unlike stock amqtt: the size is checked on the fixed header, before the body is read; the
body is read exactly and parsed within it (:func:`hub.wire.parse_connect`), every flag and
field checked; the session keeps the certificate by value. Whatever goes wrong is audited
here and ends as an ``AMQTTError`` amqtt logs, with the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import (
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.packet import CONNECT
from amqtt.utils import gen_client_id

from hub.broker.connection import abort, close
from hub.broker.session import HubSession
from hub.errors import MalformedPacketError
from hub.identity import DeviceIdentity, identity_from_der
from hub.wire import (
    MAX_REMAINING,
    PROTOCOL_LEVEL,
    PacketTooLargeError,
    packet_name,
    parse_connect,
)

if TYPE_CHECKING:
    from hub.broker.surface import Reader, Writer
    from hub.runtime import HubRuntime

log = logging.getLogger("hub.broker")


class ConnectRefusedError(MQTTError):  # type: ignore[misc]
    """A well-formed CONNECT answered with a CONNACK refusal (``reason`` for the audit)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PeerCertificate:
    """The verified client certificate of one connection, kept by value on its session.

    Stands in for the ``ssl_object`` amqtt keeps there: the SSL socket is gone once the
    client resets (stock's ``getpeercert`` then raised AttributeError inside the auth plugin,
    a ``plugin-error`` refusal), and on resume stock kept the previous connection's.
    """

    __slots__ = ("_der",)

    def __init__(self, der: bytes | None) -> None:
        self._der = der

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        return self._der if binary_form else None


async def first_connect(runtime: HubRuntime, reader: Reader, writer: Writer,
                        peer: str) -> HubSession:
    """The session of the CONNECT that must come first [MQTT-3.1.0-1], within the handshake
    timeout; any failure is audited, the connection closed and ``AMQTTError`` raised."""
    # Taken before anything is read: a client that resets after its CONNECT takes its
    # SSL socket with it, and the certificate must still be there to decide on.
    der = peer_der(writer)
    if der is None:
        await close(writer)
        raise AMQTTError(f"{peer} closed before its CONNECT was read")
    try:
        return await asyncio.wait_for(
            read_connect(reader, writer, max_bytes=runtime.config.limits.max_packet_bytes,
                         peer_der=der),
            # A client that completed TLS but sends no CONNECT loses its slot as fast as
            # one that stalls the handshake.
            runtime.config.listener.handshake_timeout)
    except PacketTooLargeError as exc:
        _audit(runtime, "limit", der, peer, "packet-too-large")
        log.info("%s: %s; closing", peer, exc)
        abort(writer)  # its body is not read, nor waited for
        raise AMQTTError(f"{peer}: {exc}") from None
    except MalformedPacketError as exc:
        audit_violation(runtime, str(exc), identity_of(der), peer)  # [MQTT-4.8.0-1]
        log.info("%s: protocol violation: %s; closing", peer, exc)
        await close(writer)
        raise AMQTTError(f"{peer}: protocol violation: {exc}") from None
    except ConnectRefusedError as exc:
        _audit(runtime, "reject", der, peer, exc.reason)
        runtime.metrics.refused(exc.reason)
        await close(writer)
        raise AMQTTError(f"{peer} refused: {exc}") from None
    except (AMQTTError, MQTTError, NoDataError, TimeoutError, ConnectionError,
            asyncio.IncompleteReadError) as exc:
        await close(writer)
        raise AMQTTError(f"no valid CONNECT from {peer}: {type(exc).__name__}") from exc


async def read_connect(reader: Reader, writer: Writer, *, max_bytes: int = MAX_REMAINING,
                       peer_der: bytes | None = None) -> HubSession:
    """A fresh session from the CONNECT at the start of *reader*.

    PacketTooLargeError past *max_bytes* (on the fixed header); MalformedPacketError for a
    violation; ConnectRefusedError, after its CONNACK refusal, for a level other than 4 or
    an empty client id with clean session 0.
    """
    stream: asyncio.StreamReader = reader._reader
    first = (await stream.readexactly(1))[0]
    if first >> 4 != CONNECT:
        raise MalformedPacketError(f"first packet is {packet_name(first >> 4)}, not "
                                   "CONNECT [MQTT-3.1.0-1]")
    length = 0
    for shift in (0, 7, 14, 21):
        byte = (await stream.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise MalformedPacketError("remaining length longer than four bytes [MQTT-4.8.0-1]")
    if length > max_bytes:
        raise PacketTooLargeError(f"CONNECT of {length} bytes, limit {max_bytes}")
    connect = parse_connect(first, await stream.readexactly(length))
    refusal = None
    if connect.level != PROTOCOL_LEVEL:
        refusal = (UNACCEPTABLE_PROTOCOL_VERSION, "unacceptable-protocol-version",
                   f"protocol level {connect.level}, want 4 [MQTT-3.1.2-2]")
    elif not connect.client_id and not connect.clean_session:
        refusal = (IDENTIFIER_REJECTED, "identifier-rejected",
                   "empty client id with clean session 0 [MQTT-3.1.3-8]")
    if refusal is not None:
        code, reason, detail = refusal
        with contextlib.suppress(Exception):
            await ConnackPacket.build(0, code).to_stream(writer)  # [MQTT-3.2.2-4]
        raise ConnectRefusedError(reason, detail)
    peer = writer.get_peer_info() or ("?", 0)
    session = HubSession()
    session.client_id = connect.client_id or gen_client_id()  # [MQTT-3.1.3-6]
    session.clean_session = connect.clean_session
    session.will_flag = connect.will_topic is not None
    session.will_retain = connect.will_retain
    session.will_qos = connect.will_qos
    session.will_topic = connect.will_topic
    session.will_message = connect.will_message
    session.username = connect.username
    session.password = connect.password  # bytes, as sent: binary data [MQTT-3.1.3.5]
    session.remote_address, session.remote_port = peer
    session.ssl_object = PeerCertificate(peer_der)
    session.keep_alive = connect.keep_alive
    return session


async def refuse(writer: Writer) -> None:
    """CONNACK 0x05 with session-present 0 [MQTT-3.2.2-4], then close; nothing else changed."""
    with contextlib.suppress(Exception):
        await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
    await close(writer)


def peer_der(writer: Writer) -> bytes | None:
    """The client certificate of a live TLS connection (DER), None once it is gone."""
    ssl_object = writer.get_ssl_info()
    if ssl_object is None:
        return None
    try:
        der: bytes | None = ssl_object.getpeercert(binary_form=True)
    except (AttributeError, ValueError, OSError):  # closed under us
        return None
    return der


def identity_of(der: bytes | None) -> DeviceIdentity | None:
    """Who a connection's certificate names, for the audit of a CONNECT that never got in."""
    found = identity_from_der(der)
    return found if isinstance(found, DeviceIdentity) else None


def audit_violation(runtime: HubRuntime, what: str, identity: DeviceIdentity | None,
                    peer: str | None) -> None:
    """One ``violation`` audit row: ``protocol-violation: <what> [MQTT-x.y.z-n]``."""
    runtime.audit.record("violation", device_id=(identity.device_id or None) if identity else None,
                         serial=identity.serial_hex if identity else None, peer=peer,
                         reason=f"protocol-violation: {what}")


def _audit(runtime: HubRuntime, event: str, der: bytes, peer: str, reason: str) -> None:
    identity = identity_of(der)
    runtime.audit.record(event, device_id=identity.device_id if identity else None,
                         serial=identity.serial_hex if identity else None, peer=peer,
                         reason=reason)
