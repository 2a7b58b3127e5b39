"""fleet-provision: a certificate authority for a device fleet.

Kept import-free on purpose: the hub imports :mod:`provisioning.identity` alone and must not
load the CA (cryptography builders, the registry) with it. Import from the modules:
``provisioning.authority.Authority``, ``provisioning.issuer.SignOptions``, ...
"""
