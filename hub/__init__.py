"""fleet-hub: an amqtt edge broker that admits only valid, unrevoked device certificates."""
