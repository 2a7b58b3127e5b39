"""The fleet lab: a PKI in a folder, a hub.toml, ``fleet-hub serve`` as a process, enrollment.

One harness for ``fleet-sim quickstart``, the tests (``tests/integration/fleet.py``,
``tests/device_sim``, ``tests/hub/test_config.py``) and the benchmarks (``bench/_brokers.py``):

- :mod:`device_sim.lab.hubconfig`: hub.toml from DESIGN section 5's example plus overrides
  (and stock amqtt's YAML);
- :mod:`device_sim.lab.process`: a server child process waited for by its ready line (the
  hub, stock amqtt);
- :mod:`device_sim.lab.pki`: a PKI with a hub certificate, devices enrolled from their CSRs.

Like all of ``device_sim`` it talks to the hub over the network and through its command line
only, never through ``hub``'s modules (STYLE's import rule).
"""

from __future__ import annotations

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

__all__ = ["AMQTT_READY", "DESIGN_EXAMPLE", "HUB_READY", "LOOPBACK", "TRUST_DOMAIN", "Enrolled",
           "HubProcess", "ReadyProcess", "amqtt_argv", "amqtt_yaml", "enroll", "free_port",
           "hub_argv", "hub_settings", "hub_toml", "make_pki", "merge", "stop_process",
           "write_hub_config"]
