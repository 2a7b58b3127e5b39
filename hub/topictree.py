"""Subscriptions as a tree of topic levels: a publish costs its depth, not the fleet's size.

amqtt keeps ``{filter: [(session, qos)]}`` and matches every filter against every message;
10,000 devices subscribed to their own command topics make each message 10,000 string
matches. Here a message walks its own levels (plus the ``+`` and ``#`` branches it meets),
so ``devices/sensor-0042/telemetry`` costs the same with ten devices or a hundred thousand.

Rules (MQTT 3.1.1 §4.7): ``+`` matches one whole level, ``#`` the parent level and everything
below; a topic starting with ``$`` is not matched by a filter starting with a wildcard
[MQTT-4.7.2-1]. A client with several matching filters gets the message once, at the
highest QoS among them (§3.3.5 allows either; one copy is what devices expect).
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["TopicTree", "valid_filter"]


_NO_CHILDREN: dict[str, _Node] = {}
_NO_SUBSCRIBERS: dict[str, int] = {}


class _Node:
    """One level. Its dicts are shared empty ones until used: a fleet of devices subscribed
    to ``devices/<id>/cmd`` has two nodes per device, most with one of the two empty."""

    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = _NO_CHILDREN
        self.subscribers: dict[str, int] = _NO_SUBSCRIBERS  # client id -> granted QoS


def valid_filter(topic_filter: str) -> bool:
    """[MQTT-4.7.1-2/3]: wildcards occupy whole levels, ``#`` only last; not empty."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


class TopicTree:
    """Filters -> subscribers, with per-client bookkeeping for unsubscribing everything."""

    __slots__ = ("_by_client", "_root", "generation")

    def __init__(self) -> None:
        self._root = _Node()
        self._by_client: dict[str, dict[str, int]] = {}
        self.generation = 0  # bumped on every change: callers may cache match results

    def __len__(self) -> int:
        """Number of (client, filter) subscriptions."""
        return sum(len(f) for f in self._by_client.values())

    def subscribe(self, client_id: str, topic_filter: str, qos: int) -> bool:
        """Add or replace; True when the client had no subscription on this filter yet."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                if node.children is _NO_CHILDREN:
                    node.children = {}
                child = node.children[level] = _Node()
            node = child
        new = client_id not in node.subscribers
        if node.subscribers is _NO_SUBSCRIBERS:
            node.subscribers = {}
        node.subscribers[client_id] = qos
        self._by_client.setdefault(client_id, {})[topic_filter] = qos
        self.generation += 1
        return new

    def unsubscribe(self, client_id: str, topic_filter: str) -> bool:
        """Remove one subscription; True when there was one."""
        filters = self._by_client.get(client_id)
        if filters is None or topic_filter not in filters:
            return False
        del filters[topic_filter]
        if not filters:
            del self._by_client[client_id]
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            path.append((node, level))
            node = node.children[level]
        del node.subscribers[client_id]
        if not node.subscribers:
            node.subscribers = _NO_SUBSCRIBERS
        # Prune the branch back to the first node still in use.
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.subscribers or child.children:
                break
            del parent.children[level]
            if not parent.children:
                parent.children = _NO_CHILDREN
        self.generation += 1
        return True

    def unsubscribe_all(self, client_id: str) -> int:
        """Remove every subscription of a client; how many there were."""
        filters = list(self._by_client.get(client_id, ()))
        for topic_filter in filters:
            self.unsubscribe(client_id, topic_filter)
        return len(filters)

    def filters_of(self, client_id: str) -> dict[str, int]:
        """A copy of one client's filters and their QoS."""
        return dict(self._by_client.get(client_id, {}))

    def items(self) -> Iterator[tuple[str, dict[str, int]]]:
        """(client id, {filter: qos}) for every subscribed client."""
        for client_id, filters in self._by_client.items():
            yield client_id, dict(filters)

    def match(self, topic: str) -> dict[str, int]:
        """Every client whose filters match *topic*, with the highest QoS granted."""
        found: dict[str, int] = {}
        levels = topic.split("/")
        root = self._root
        if topic.startswith("$"):
            # [MQTT-4.7.2-1]: only filters that spell out the first level literally.
            first = root.children.get(levels[0])
            if first is not None:
                self._walk(first, levels, 1, found)
            return found
        self._walk(root, levels, 0, found)
        return found

    @classmethod
    def _walk(cls, node: _Node, levels: list[str], index: int, found: dict[str, int]) -> None:
        children = node.children
        hash_node = children.get("#")
        if hash_node is not None:  # "a/#" matches "a" and everything below it
            _merge(found, hash_node.subscribers)
        if index == len(levels):
            _merge(found, node.subscribers)
            return
        level = levels[index]
        exact = children.get(level)
        if exact is not None:
            cls._walk(exact, levels, index + 1, found)
        plus = children.get("+")
        if plus is not None:
            cls._walk(plus, levels, index + 1, found)


def _merge(found: dict[str, int], subscribers: dict[str, int]) -> None:
    for client_id, qos in subscribers.items():
        if found.get(client_id, -1) < qos:
            found[client_id] = qos
