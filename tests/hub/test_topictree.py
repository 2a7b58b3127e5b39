"""The topic tree answers exactly what matching every filter one by one would."""

from __future__ import annotations

import random

import pytest

from hub.topictree import TopicTree, valid_filter


def _matches(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 §4.7, written the slow, obvious way."""
    if topic.startswith("$") and topic_filter[0] in "+#":
        return False
    t, f = topic.split("/"), topic_filter.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or level not in ("+", t[i]):
            return False
    return len(t) == len(f)


LEVELS = ["a", "b", "c", "", "$SYS"]


def _random_filter(rng: random.Random) -> str:
    depth = rng.randint(1, 4)
    levels = [rng.choice([*LEVELS[:4], "+"]) for _ in range(depth)]
    if rng.random() < 0.3:
        levels[-1] = "#"
    if rng.random() < 0.1:
        levels[0] = "$SYS"
    return "/".join(levels)


def _random_topic(rng: random.Random) -> str:
    levels = [rng.choice(LEVELS[:4]) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.1:
        levels[0] = "$SYS"
    return "/".join(levels)


def test_tree_agrees_with_brute_force_on_random_filters_and_topics() -> None:
    rng = random.Random(7)
    tree = TopicTree()
    table: dict[str, dict[str, int]] = {}
    for n in range(400):
        client, topic_filter, qos = f"c{n % 40}", _random_filter(rng), rng.randint(0, 2)
        if not valid_filter(topic_filter):
            continue
        tree.subscribe(client, topic_filter, qos)
        table.setdefault(client, {})[topic_filter] = qos
    for n in range(100):  # and some go away again
        client = f"c{n % 40}"
        if table.get(client):
            topic_filter = rng.choice(sorted(table[client]))
            assert tree.unsubscribe(client, topic_filter)
            del table[client][topic_filter]
    for _ in range(2000):
        topic = _random_topic(rng)
        expected: dict[str, int] = {}
        for client, filters in table.items():
            for topic_filter, qos in filters.items():
                if _matches(topic, topic_filter):
                    expected[client] = max(expected.get(client, -1), qos)
        assert tree.match(topic) == expected, topic


def test_unsubscribe_all_prunes_the_tree() -> None:
    tree = TopicTree()
    tree.subscribe("x", "devices/x/cmd", 1)
    tree.subscribe("x", "devices/+/telemetry", 0)
    tree.subscribe("y", "devices/x/cmd", 0)
    assert len(tree) == 3
    assert tree.unsubscribe_all("x") == 2
    assert tree.match("devices/x/cmd") == {"y": 0}
    assert tree.unsubscribe("y", "devices/x/cmd")
    assert not tree.unsubscribe("y", "devices/x/cmd")
    assert tree._root.children == {}
    assert len(tree) == 0


def test_resubscribing_replaces_the_qos() -> None:
    tree = TopicTree()
    assert tree.subscribe("x", "a/#", 2)
    assert not tree.subscribe("x", "a/#", 0)
    assert tree.match("a/b") == {"x": 0}
    assert tree.filters_of("x") == {"a/#": 0}


@pytest.mark.parametrize(("topic_filter", "ok"), [
    ("a/b", True), ("#", True), ("+", True), ("a/+/c", True), ("a/#", True), ("/", True),
    ("", False), ("a/#/c", False), ("a#", False), ("a/b+", False), ("+a", False),
])
def test_valid_filter(topic_filter: str, ok: bool) -> None:
    assert valid_filter(topic_filter) is ok
