"""fleet-sim: thousands of virtual devices exercising mutual TLS, attacks and revocation."""
