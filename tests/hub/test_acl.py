"""The pure ACL logic: topic value objects, matching, covering and the per-device policy."""

from __future__ import annotations

import dataclasses
import itertools
import re

import pytest

from hub.acl import (
    EXPANSION_CACHE_SIZE,
    AclPolicy,
    AclRules,
    AclTemplate,
    Topic,
    TopicFilter,
    filter_covers,
    filter_matches,
)
from hub.errors import HubError, InvalidValueError

# ---------------------------------------------------------------------------------------------
# TopicFilter and Topic


@pytest.mark.parametrize(
    "value",
    ["#", "+", "a", "a/b", "a/#", "a/+/b", "+/+", "/", "//", "/#", "a//b", "+/#", "$SYS/#",
     "é/ü", "{x}", "a" * 65535],
)
def test_valid_filters_are_accepted(value: str) -> None:
    """Every filter MQTT 3.1.1 allows constructs, keeps its text and splits into levels."""
    topic_filter = TopicFilter(value)
    assert str(topic_filter) == value
    assert topic_filter.levels == tuple(value.split("/"))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "it is empty"),
        ("devices/#/x", "'#' must be last"),
        ("#/a", "'#' must be last"),
        ("a#", "'#' must be a whole level"),
        ("a/#b", "'#' must be a whole level"),
        ("a/b#/c", "'#' must be a whole level"),
        ("a+", "'+' must be a whole level"),
        ("a/+b/c", "'+' must be a whole level"),
        ("++", "'+' must be a whole level"),
        ("a\0b", "it contains a NUL character"),
        ("a" * 65536, "it is 65536 bytes long, the limit is 65535"),
        ("é" * 32768, "it is 65536 bytes long, the limit is 65535"),
        ("a/\ud800", "it is not valid UTF-8"),
    ],
)
def test_invalid_filters_say_why(value: str, reason: str) -> None:
    """A filter breaking an MQTT rule is refused with the rule it breaks."""
    with pytest.raises(InvalidValueError) as info:
        TopicFilter(value)
    assert str(info.value).endswith(f"is not a valid topic filter: {reason}")


def test_invalid_filter_message_quotes_the_value() -> None:
    """The message quotes the filter as the config shows it, escaping control characters."""
    with pytest.raises(InvalidValueError, match=re.escape('"a\\u0000" is not a valid topic')):
        TopicFilter("a\0")
    with pytest.raises(ValueError, match=re.escape('"devices/#/x" is not a valid topic filter')):
        TopicFilter("devices/#/x")


@pytest.mark.parametrize("value", ["a", "a/b", "/", "a//b", "$SYS/x", "é", "a" * 65535])
def test_valid_topic_names_are_accepted(value: str) -> None:
    """A topic name is any non-empty UTF-8 string without wildcards or NUL."""
    assert str(Topic(value)) == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "it is empty"),
        ("a/+", "it contains the wildcard '+'"),
        ("a/#", "it contains the wildcard '#'"),
        ("a+b", "it contains the wildcard '+'"),
        ("a\0", "it contains a NUL character"),
        ("a" * 65536, "it is 65536 bytes long, the limit is 65535"),
    ],
)
def test_invalid_topic_names_say_why(value: str, reason: str) -> None:
    """A PUBLISH topic with a wildcard or NUL is not a topic name [MQTT-3.3.2-2]."""
    with pytest.raises(InvalidValueError, match=re.escape(f"is not a valid topic name: {reason}")):
        Topic(value)


def test_value_objects_are_frozen_and_compare_by_value() -> None:
    """Topics, filters and templates are immutable values, usable as dict keys."""
    assert TopicFilter("a/+") == TopicFilter("a/+")
    assert len({Topic("a"), Topic("a"), Topic("b")}) == 2
    assert AclTemplate("d/{device_id}") == AclTemplate("d/{device_id}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        TopicFilter("a").value = "#"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Topic("a").value = "b"  # type: ignore[misc]


def test_invalid_value_error_is_in_the_hub_tree() -> None:
    """Callers can catch the hub's root or a plain ValueError."""
    assert issubclass(InvalidValueError, HubError)
    assert issubclass(InvalidValueError, ValueError)


# ---------------------------------------------------------------------------------------------
# filter_matches


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        # The examples of MQTT 3.1.1 section 4.7.1.
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        # Plain literals are exact and case-sensitive [MQTT-4.7.3-4].
        ("ACCOUNTS", "Accounts", False),
        ("a/b", "a/b", True),
        ("a/b", "a/b/", False),
        ("a/b", "a", False),
        # '#' matches the parent level and any depth; '+' one level, empty ones included.
        ("#", "a", True),
        ("#", "a/b/c", True),
        ("#", "/", True),
        ("a/#", "a/", True),
        ("a/#", "ab", False),
        ("a/+/#", "a", False),
        ("a/+/#", "a/b", True),
        ("+", "a", True),
        ("+/b", "/b", True),
        ("a/+/c", "a//c", True),
        # [MQTT-4.7.2-1]: a leading wildcard never matches a topic starting with '$'.
        ("#", "$SYS/broker/uptime", False),
        ("#", "$SYS", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("+", "$x", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/#", "$SYS", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("a/#", "a/$SYS", True),
        ("a/+", "a/$x", True),
    ],
)
def test_filter_matches(topic_filter: str, topic: str, expected: bool) -> None:
    """filter_matches follows MQTT 3.1.1 section 4.7, including the '$' rule."""
    assert filter_matches(topic_filter, topic) is expected
    assert filter_matches(TopicFilter(topic_filter), Topic(topic)) is expected


@pytest.mark.parametrize(("topic_filter", "topic"), [("a/#/b", "a"), ("a", "a/+"), ("", "a")])
def test_filter_matches_refuses_malformed_input(topic_filter: str, topic: str) -> None:
    """Malformed filters or topic names are a caller bug, not a silent False."""
    with pytest.raises(InvalidValueError):
        filter_matches(topic_filter, topic)


# ---------------------------------------------------------------------------------------------
# filter_covers


@pytest.mark.parametrize(
    ("allowed", "requested", "expected"),
    [
        ("devices/d1/#", "devices/d1/#", True),
        ("devices/d1/#", "devices/d1", True),  # '#' matches the parent level
        ("devices/d1/#", "devices/d1/+/x", True),
        ("devices/d1/#", "devices/d1/+", True),
        ("devices/d1/#", "devices/d1/a/#", True),
        ("devices/d1/#", "devices/+/telemetry", False),  # would admit other devices
        ("devices/d1/#", "devices/#", False),
        ("devices/d1/#", "devices/d1x", False),
        ("devices/d1/#", "devices", False),
        ("devices/d1/+", "devices/d1", False),  # '+' needs one more level, even an empty one
        ("devices/d1/+", "devices/d1/#", False),  # R matches devices/d1 and deeper levels
        ("devices/d1/+", "devices/d1/+", True),
        ("devices/d1/+", "devices/d1/x", True),
        ("devices/+/x", "devices/d1/x", True),
        ("devices/+/x", "devices/+/x", True),
        ("devices/d1/x", "devices/+/x", False),
        ("a/+", "a/+/b", False),
        ("a/+/#", "a/#", False),  # R matches "a", which A does not
        ("a/+/#", "a/+", True),
        ("a/+/#", "a/b", True),
        ("a", "a/#", False),
        ("a", "a", True),
        ("a/b", "a", False),
        # '#' alone: everything not starting with '$'.
        ("#", "a/b/c", True),
        ("#", "+/+", True),
        ("#", "#", True),
        ("#", "+/#", True),
        ("#", "/", True),
        ("#", "$SYS/#", False),
        ("#", "$SYS", False),
        ("#", "$other/x", False),
        ("+/#", "#", True),  # every topic has at least one level, so they are equal
        ("+/#", "+/#", True),
        ("+/+/#", "#", False),  # does not match single-level topics
        ("+", "#", False),
        ("+", "+", True),
        ("+", "$SYS", False),
        ("+/+", "/", True),
        # '$' topics need the '$' literal in the allowed filter.
        ("$SYS/#", "$SYS/broker/+", True),
        ("$SYS/#", "$SYS", True),
        ("$SYS/+", "$SYS/#", False),
        ("+/broker", "$SYS/broker", False),
        ("a/#", "a/$SYS/#", True),  # '$' is only special in the first level
        ("/#", "#", False),
        ("/+/#", "/#", True),  # "/#" cannot match its parent "", which is not a topic name
        ("+/+/#", "/#", True),
        ("/+", "/#", False),
        ("/#", "/", True),
        ("/#", "+/a", False),
        ("+/a", "/a", True),
    ],
)
def test_filter_covers(allowed: str, requested: str, expected: bool) -> None:
    """filter_covers is True only when every topic `requested` matches, `allowed` matches too."""
    assert filter_covers(allowed, requested) is expected
    assert filter_covers(TopicFilter(allowed), TopicFilter(requested)) is expected


# ---------------------------------------------------------------------------------------------
# Brute-force cross-checks: exhaustive enumeration over a small alphabet.
#
# Filters use the levels {"a", "$SYS", "", "+"} (up to 3, plus an optional final "#"); topics
# use {"a", "b", "$SYS", ""} up to depth 5. "b" never appears in a filter, so it is a fresh
# literal: whenever a topic outside this alphabet would tell two filters apart, the same topic
# with "b" in its unconstrained levels does too, and depth 5 is one more than the longest
# filter, so '#' and the parent-level rule are exercised at every depth that can differ.
# Exhaustive checking over these sets is therefore exact for covering, not a sample.

_FILTER_LEVELS = ("a", "$SYS", "", "+")
_TOPIC_LEVELS = ("a", "b", "$SYS", "")


def _all_filters() -> list[str]:
    found: list[str] = []
    for depth in range(4):
        for levels in itertools.product(_FILTER_LEVELS, repeat=depth):
            if depth:
                found.append("/".join(levels))
            found.append("/".join((*levels, "#")))
    return [f for f in found if f]  # "" is not a filter


def _all_topics() -> list[str]:
    topics: list[str] = []
    for depth in range(1, 6):
        topics.extend("/".join(p) for p in itertools.product(_TOPIC_LEVELS, repeat=depth))
    return [t for t in topics if t]  # "" is not a topic name


def _oracle_matches(topic_filter: str, topic: str) -> bool:
    """An independent matcher: the filter translated to a regular expression."""
    if topic.startswith("$") and topic_filter[0] in "+#":
        return False
    levels = topic_filter.split("/")
    plain = ["[^/]*" if level == "+" else re.escape(level) for level in levels if level != "#"]
    if levels[-1] != "#":
        pattern = "/".join(plain)
    elif plain:
        pattern = "/".join(plain) + "(/.*)?"  # the parent level, or any children
    else:
        pattern = ".*"
    return re.fullmatch(pattern, topic) is not None


@pytest.fixture(scope="module")
def matched_sets() -> dict[str, int]:
    """Each enumerated filter mapped to the bitmask of enumerated topics it matches."""
    topics = [Topic(t) for t in _all_topics()]
    sets = {}
    for text in _all_filters():
        topic_filter = TopicFilter(text)
        sets[text] = sum(1 << i for i, t in enumerate(topics) if filter_matches(topic_filter, t))
    return sets


def test_filter_matches_agrees_with_a_regex_oracle(matched_sets: dict[str, int]) -> None:
    """filter_matches equals an independent regex translation on every enumerated pair."""
    topics = _all_topics()
    for text, mask in matched_sets.items():
        oracle = sum(1 << i for i, t in enumerate(topics) if _oracle_matches(text, t))
        assert mask == oracle, text


def test_filter_covers_is_exactly_set_inclusion(matched_sets: dict[str, int]) -> None:
    """filter_covers(A, R) is True iff every enumerated topic R matches is matched by A."""
    assert len(matched_sets) == 168
    wrong = []
    for (allowed, a_mask), (requested, r_mask) in itertools.product(matched_sets.items(), repeat=2):
        if filter_covers(allowed, requested) != (r_mask & ~a_mask == 0):
            wrong.append((allowed, requested))
    assert wrong == []


# ---------------------------------------------------------------------------------------------
# AclTemplate


@pytest.mark.parametrize(
    ("pattern", "placeholders"),
    [
        ("devices/{device_id}/#", {"device_id"}),
        ("groups/{group}/{device_id}/+", {"device_id", "group"}),
        ("fleet/broadcast/#", set()),
        ("site-{group}/x", {"group"}),
        ("#", set()),
    ],
)
def test_valid_templates(pattern: str, placeholders: set[str]) -> None:
    """A template may use {device_id} and {group}, even inside a level."""
    assert AclTemplate(pattern).placeholders == placeholders


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("devices/{id}/#", '"devices/{id}/#" uses the unknown placeholder {id} '
         "(want {device_id} or {group})"),
        ("devices/{}/#", '"devices/{}/#" uses the unknown placeholder {} '
         "(want {device_id} or {group})"),
        ("devices/{device_id/#", '"devices/{device_id/#" has an unmatched brace '
         "(placeholders are {name})"),
        ("devices/}/#", '"devices/}/#" has an unmatched brace (placeholders are {name})'),
        ("devices/#/{device_id}", '"devices/#/{device_id}" is not a valid topic filter: '
         "'#' must be last"),
        ("devices/+{device_id}", '"devices/+{device_id}" is not a valid topic filter: '
         "'+' must be a whole level"),
        ("", '"" is not a valid topic filter: it is empty'),
        ("$SYS/#", '"$SYS/#" can never be granted: $SYS is closed to devices'),
        ("$SYS{group}", '"$SYS{group}" can never be granted: $SYS is closed to devices'),
    ],
)
def test_invalid_templates_say_why(pattern: str, message: str) -> None:
    """Bad placeholders, filters or $SYS patterns are refused when the policy is built."""
    with pytest.raises(InvalidValueError) as info:
        AclTemplate(pattern)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("pattern", "device_id", "group", "expected"),
    [
        ("devices/{device_id}/#", "d1", None, "devices/d1/#"),
        ("g/{group}/{device_id}", "d1", "ops", "g/ops/d1"),
        ("site-{group}/x", "d1", "7", "site-7/x"),
        ("fleet/broadcast/#", "d1", None, "fleet/broadcast/#"),
        ("g/{group}/#", "d1", None, None),  # no group: the rule grants nothing
        ("g/{group}/#", "d1", "", None),
        # Hostile values cannot smuggle in wildcards, extra levels or a '$' prefix.
        ("devices/{device_id}/#", "#", None, None),
        ("devices/{device_id}/#", "+", None, None),
        ("devices/{device_id}/#", "a/b", None, None),
        ("devices/{device_id}/#", "a\0", None, None),
        ("devices/{device_id}/#", "", None, None),
        ("{device_id}/#", "$SYS", None, None),
        ("g/{group}/#", "d1", "x/+", None),
        ("g/{group}/#", "d1", "#", None),
        ("{device_id}", "x" * 70000, None, None),  # too long for a filter
        # Values are substituted once: a device id reading "{group}" stays literal.
        ("devices/{device_id}/#", "{group}", "d2", "devices/{group}/#"),
        ("{group}/{device_id}", "{group}", "g", "g/{group}"),
    ],
)
def test_template_expansion(
    pattern: str, device_id: str, group: str | None, expected: str | None
) -> None:
    """Expansion substitutes plain values only; anything unsafe makes the rule grant nothing."""
    result = AclTemplate(pattern).expand(device_id, group)
    assert (None if result is None else result.value) == expected


# ---------------------------------------------------------------------------------------------
# AclPolicy


@pytest.fixture
def policy() -> AclPolicy:
    """DESIGN section 5's example plus a group with publish and subscribe additions."""
    return AclPolicy(
        AclRules.of(
            publish=["devices/{device_id}/#"],
            subscribe=["devices/{device_id}/#", "fleet/broadcast/#"],
        ),
        {
            "operators": AclRules.of(subscribe=["#"], publish=["#"]),
            "line7": AclRules.of(publish=["lines/{group}/{device_id}"], subscribe=["lines/+/+"]),
        },
    )


@pytest.mark.parametrize(
    ("device_id", "group", "topic", "expected"),
    [
        ("d1", None, "devices/d1", True),
        ("d1", None, "devices/d1/telemetry", True),
        ("d1", None, "devices/d1/a/b/c", True),
        ("d1", None, "devices/d2/telemetry", False),
        ("d1", None, "devices/d10/telemetry", False),
        ("d1", None, "devices", False),
        ("d1", None, "fleet/broadcast/x", False),  # subscribe-only
        ("d1", "line7", "lines/line7/d1", True),
        ("d1", "line7", "lines/line7/d2", False),
        ("d1", "line7", "lines/other/d1", False),
        ("d1", "sensors", "lines/sensors/d1", False),  # a group without rules adds nothing
        ("d1", None, "lines/line7/d1", False),
        ("op", "operators", "anything/at/all", True),
        # $SYS is closed whatever the rules say; '#' never matched it anyway.
        ("op", "operators", "$SYS/broker/uptime", False),
        ("op", "operators", "$SYS", False),
        ("op", "operators", "$SYSTEM/x", False),
        # Malformed topic names are denied, not raised.
        ("d1", None, "devices/d1/+", False),
        ("d1", None, "devices/d1/#", False),
        ("d1", None, "", False),
        ("d1", None, "devices/d1/\0", False),
        # A hostile device id gets nothing from {device_id} rules.
        ("+", None, "devices/x/t", False),
        ("#", None, "devices/x/t", False),
    ],
)
def test_may_publish(
    policy: AclPolicy, device_id: str, group: str | None, topic: str, expected: bool
) -> None:
    """A device publishes only where an expanded rule matches; deny by default."""
    assert policy.may_publish(device_id, group, topic) is expected


@pytest.mark.parametrize(
    ("device_id", "group", "topic_filter", "expected"),
    [
        ("d1", None, "devices/d1/#", True),
        ("d1", None, "devices/d1", True),
        ("d1", None, "devices/d1/+/telemetry", True),
        ("d1", None, "fleet/broadcast/#", True),
        ("d1", None, "fleet/broadcast/+", True),
        ("d1", None, "fleet/#", False),
        ("d1", None, "devices/+/telemetry", False),
        ("d1", None, "devices/#", False),
        ("d1", None, "#", False),
        ("d1", None, "+/#", False),
        ("d1", None, "devices/d2/#", False),
        ("d1", "line7", "lines/+/+", True),
        ("d1", "line7", "lines/a/b", True),
        ("d1", "line7", "lines/#", False),
        ("op", "operators", "#", True),
        ("op", "operators", "+/#", True),
        ("op", "operators", "devices/+/telemetry", True),
        # $SYS stays closed even to a group allowed '#'.
        ("op", "operators", "$SYS/#", False),
        ("op", "operators", "$SYS", False),
        ("op", "operators", "$SYS/broker/+", False),
        # Malformed filters are denied, not raised.
        ("d1", None, "devices/d1/#/x", False),
        ("d1", None, "devices/d1+", False),
        ("d1", None, "", False),
    ],
)
def test_may_subscribe(
    policy: AclPolicy, device_id: str, group: str | None, topic_filter: str, expected: bool
) -> None:
    """A subscription is granted only when one allowed filter covers it entirely."""
    assert policy.may_subscribe(device_id, group, topic_filter) is expected


def test_policy_accepts_value_objects(policy: AclPolicy) -> None:
    """Already-validated Topic and TopicFilter objects are accepted as well as strings."""
    assert policy.may_publish("d1", None, Topic("devices/d1/t"))
    assert policy.may_subscribe("d1", None, TopicFilter("devices/d1/#"))
    assert not policy.may_subscribe("d1", None, TopicFilter("$SYS/#"))


def test_empty_policy_denies_everything() -> None:
    """With no rules at all, nothing is allowed: deny by default."""
    empty = AclPolicy()
    assert not empty.may_publish("d1", None, "devices/d1")
    assert not empty.may_subscribe("d1", "operators", "devices/d1")


def test_group_rules_add_to_the_defaults(policy: AclPolicy) -> None:
    """A group's rules come after the defaults; the defaults still apply to its devices."""
    grants = policy.grants("d1", "line7")
    assert [f.value for f in grants.publish] == ["devices/d1/#", "lines/line7/d1"]
    assert [f.value for f in grants.subscribe] == [
        "devices/d1/#", "fleet/broadcast/#", "lines/+/+"
    ]


def test_duplicate_grants_are_collapsed() -> None:
    """The same filter granted twice (defaults and group) is checked once."""
    twice = AclPolicy(AclRules.of(subscribe=["a/#"]), {"g": AclRules.of(subscribe=["a/#"])})
    assert [f.value for f in twice.grants("d", "g").subscribe] == ["a/#"]


def test_expansion_is_cached_and_bounded(policy: AclPolicy) -> None:
    """Expansion runs once per (device, group) and the cache cannot grow without bound."""
    first = policy.grants("d1", None)
    assert policy.grants("d1", None) is first
    assert policy.grants("d1", "line7") is not first
    info = policy._grants.cache_info()  # type: ignore[attr-defined]
    assert info.maxsize == EXPANSION_CACHE_SIZE
    assert info.hits >= 1


def test_policies_are_frozen_values() -> None:
    """Equal configs give equal, hashable policies whose groups cannot be changed."""
    one, two = AclPolicy.default(), AclPolicy.default()
    assert one == two
    assert hash(one) == hash(two)
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.groups = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        one.groups["x"] = AclRules()  # type: ignore[index]


def test_default_policy_is_designs_example() -> None:
    """AclPolicy.default() is DESIGN section 5's [acl] example, operators group included."""
    default = AclPolicy.default()
    assert [t.pattern for t in default.defaults.publish] == ["devices/{device_id}/#"]
    assert [t.pattern for t in default.defaults.subscribe] == [
        "devices/{device_id}/#", "fleet/broadcast/#"
    ]
    assert dict(default.groups) == {"operators": AclRules.of(subscribe=["#"])}
