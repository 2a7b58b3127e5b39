"""fleet-provision: a certificate authority for a device fleet.

Kept import-free on purpose: the hub imports the pure modules (:mod:`provisioning.identity`,
:mod:`provisioning.serial`, the read-only :mod:`provisioning.registry.view`) alone and must
not load the CA (cryptography builders, sqlite-utils) with them. Import from the modules:
``provisioning.authority.Authority``, ``provisioning.issuer.SignOptions``, ...
"""
