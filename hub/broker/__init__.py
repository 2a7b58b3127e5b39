"""The amqtt boundary: with ``hub.plugins`` (amqtt's plugin base classes), all the hub's
code that imports amqtt.

``fleet-hub`` runs amqtt 0.12.1's Broker with the fixes of docs/amqtt-internals.md section 7;
everything amqtt-shaped (its Session, its protocol handler, its writer adapters, the session
table) stays in here, behind :class:`HubBroker`. The modules:

- ``core``: :class:`HubBroker`, amqtt's Broker with each override a short adapter
- ``connect``: the first packet read and checked, a CONNACK refusal when it must be
- ``connection``: one typed record per admitted connection, and the one kick path
- ``handler``: the per-connection reader, PUBLISH inline, the other packets checked
- ``checks``: the handler's per-connection state: topic ACL cache, [limits], audit
- ``delivery``: subscriptions, retained messages and QoS 2 deliveries on the topic tree
- ``router``: one tree lookup, one encoding, written to each subscriber
- ``session``: a lean amqtt Session, slim queues, the QoS 1/2 outbox
"""

from __future__ import annotations

from hub.broker.core import HANG_UP_GRACE, HubBroker

__all__ = ["HANG_UP_GRACE", "HubBroker"]
