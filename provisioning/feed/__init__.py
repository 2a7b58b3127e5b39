"""The fleet-state feed's CA side: ``GET /feed`` on ``fleet-provision serve`` (DESIGN section 9).

    follower.py  Follower: the registry followed event by event through a FleetView (every
                 25 ms), the current FeedState and its version, long-poll waiters woken
    history.py   History: the last change sets, so ``since`` gets one merged delta
    gateway.py   who may read the feed: a gateway certificate the CA issued (SPIFFE URI,
                 clientAuth, validity, a ``server.issue`` event)
    jws.py       the JWS header and the raw ``r || s`` signature (the CA worker signs)
    auditing.py  FeedAudit: which answers and refusals are worth an audit record
    route.py     FeedRoute: the handler that :mod:`provisioning.est.service` mounts

The document format itself is :mod:`provisioning.registry.feeddoc`, shared with the hub. This
package imports nothing of :mod:`provisioning.est`: the service hands it a signing function
(the CA worker process's key) and the request's audit note. Nothing is imported here, so the
CA worker process loads :mod:`.jws` alone.
"""
