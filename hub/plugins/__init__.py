"""amqtt plugins: the hub's checks, loadable by ``fleet-hub`` and by a stock amqtt.

A stock amqtt loads them from its own configuration::

    plugins:
      hub.plugins.FleetAuthPlugin: {config: /etc/fleet-hub/hub.toml}
      hub.plugins.FleetTopicPlugin: {config: /etc/fleet-hub/hub.toml}

What a stock amqtt still gets wrong around them is in docs/gateway.md.
"""

from __future__ import annotations

from hub.plugins.auth import FleetAuthPlugin
from hub.plugins.topic import FleetTopicPlugin

__all__ = ["FleetAuthPlugin", "FleetTopicPlugin"]
