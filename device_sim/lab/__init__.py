"""The fleet lab: a PKI in a folder, a hub.toml, ``fleet-hub serve`` as a process, enrollment.

One harness for ``fleet-sim quickstart``, the tests (``tests/integration/fleet.py``,
``tests/device_sim``, ``tests/hub/test_config.py``) and the benchmarks (``bench/_brokers.py``):

- :mod:`device_sim.lab.hubconfig`: hub.toml from DESIGN section 5's example plus overrides
  (and stock amqtt's YAML);
- :mod:`device_sim.lab.process`: a server child process waited for by its ready line (the
  hub, stock amqtt);
- :mod:`device_sim.lab.pki`: a PKI with a hub certificate, devices enrolled from their CSRs;
- :mod:`device_sim.lab.gateways`: the CA service (``fleet-provision serve``) as a process and
  N gateways fed by its fleet-state feed, each in its own folder (DESIGN section 9);
- :mod:`device_sim.lab.policy`: a rotation run's policy (``policy set``, put back after) and
  the CA service it renews through.

Like all of ``device_sim`` it talks to the hub over the network and through its command line
only, never through ``hub``'s modules (STYLE's import rule).
"""

from __future__ import annotations

from device_sim.lab.gateways import (
    CA_READY,
    FEED_HUB,
    CAServiceProcess,
    Gateways,
    gateway_name,
    write_gateway_config,
)
from device_sim.lab.hubconfig import (
    DESIGN_EXAMPLE,
    LOOPBACK,
    amqtt_yaml,
    hub_settings,
    hub_toml,
    merge,
    write_hub_config,
)
from device_sim.lab.pki import TRUST_DOMAIN, Enrolled, enroll, make_pki
from device_sim.lab.process import (
    AMQTT_READY,
    HUB_READY,
    HubProcess,
    ReadyProcess,
    amqtt_argv,
    free_port,
    hub_argv,
    stop_process,
)

__all__ = ["AMQTT_READY", "CA_READY", "DESIGN_EXAMPLE", "FEED_HUB", "HUB_READY", "LOOPBACK",
           "TRUST_DOMAIN", "CAServiceProcess", "Enrolled", "Gateways", "HubProcess",
           "ReadyProcess", "amqtt_argv", "amqtt_yaml", "enroll", "free_port", "gateway_name",
           "hub_argv", "hub_settings", "hub_toml", "make_pki", "merge", "stop_process",
           "write_gateway_config", "write_hub_config"]
