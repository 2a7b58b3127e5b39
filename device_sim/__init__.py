"""fleet-sim: thousands of virtual devices exercising mutual TLS, attacks, revocation, renewal.

    factory.py    a device's own EC P-256 key and CSR
    enroll.py     certificates in bulk (provisioning library or EST), the fleet folder cache
    transport.py  TCP and TLS on the event loop, each phase timed
    device.py     one paho-mqtt client driven by the loop (aiomqtt's wiring), no threads
    worker.py     a worker process: its share of the fleet on one loop
    scenarios.py  the attack scenarios and their material
    defender.py   clones, client-id fights, expiring certificates: what the hub's audit
                  checks must report, read from its /metrics or audit store
    fleet.py      the parent: enrollment, workers, the hold, revocation
    report.py     the report: JSON and rich tables
    display.py    live progress
    lab/          a PKI, hub.toml, ``fleet-hub serve`` and the CA service in a folder
                  (quickstart, tests, benches); lab/policy.py the policy of a rotation run
    agent/        the device agent: when to renew, EST re-enrollment, the renewal loop
    rotation.py   ``--rotate``: an agent per device in the workers, the CA checked after
    cli.py        ``fleet-sim`` (typer)

Import rule: provisioning yes, hub never (the hub is a process on the network).
"""
