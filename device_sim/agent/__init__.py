"""The device agent: a device that renews its own certificate before it ends.

Small and free of the simulator's machinery, so a firmware team can read it and port it
(docs/device-agent.md says what a port must keep):

    schedule.py   when to renew (a fraction of the lifetime, jitter from a seed) and how long
                  to wait after a failed attempt; pure arithmetic
    est.py        one renewal: a new key, a CSR, EST simplereenroll over mutual TLS with the
                  current certificate, the answer checked
    renewer.py    the loop: wait, renew with retries, store, switch the connection

The connection switch itself (reconnect with the new certificate, same client id, persistent
session) belongs to the MQTT client: :meth:`device_sim.device.Device.switch` for the
simulator's paho client.
"""

from __future__ import annotations

from device_sim.agent.est import ESTRenewal, Renewed
from device_sim.agent.renewer import FileStore, Renewer, Stats, read_validity, validity_of
from device_sim.agent.schedule import Schedule, Validity

__all__ = ["ESTRenewal", "FileStore", "Renewed", "Renewer", "Schedule", "Stats", "Validity",
           "read_validity", "validity_of"]
