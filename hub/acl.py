"""Pure ACL logic: MQTT topic names and filters, covering, and the per-device policy.

Nothing here does I/O or knows about the broker: the plugins ask ``AclPolicy.may_publish`` and
``AclPolicy.may_subscribe`` and turn a False into a refusal (SUBACK failure, message dropped).
MQTT references are to MQTT 3.1.1 section 4.7.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from hub.errors import InvalidValueError

__all__ = [
    "PLACEHOLDERS",
    "AclGrants",
    "AclPolicy",
    "AclRules",
    "AclTemplate",
    "Topic",
    "TopicFilter",
    "filter_covers",
    "filter_matches",
]

MAX_TOPIC_BYTES = 65535  # [MQTT-4.7.3-3]: a UTF-8 encoded string's length is a 16-bit integer
PLACEHOLDERS = ("device_id", "group")
# (device_id, group) pairs. Small: each connection remembers its own publish decisions
# (hub/handler.py), so an expansion is needed only at SUBSCRIBE and a first PUBLISH per topic,
# and every cached pair holds about 1 KB.
EXPANSION_CACHE_SIZE = 256
_WILDCARDS = ("+", "#")
_CLOSED_PREFIX = "$SYS"  # closed to devices whatever the rules say (DESIGN section 5)
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_EMPTY_PARENT = {("#",): ("+", "#"), ("", "#"): ("", "+", "#")}


def _show(value: str) -> str:
    """Quote a user value for a message, escaping control characters (NUL included)."""
    return json.dumps(value, ensure_ascii=False)


def _length_problem(value: str) -> str | None:
    if not value:
        return "it is empty"  # [MQTT-4.7.3-1]
    if "\0" in value:
        return "it contains a NUL character"  # [MQTT-4.7.3-2]
    if len(value) * 4 > MAX_TOPIC_BYTES:  # only long strings pay for the encode
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            return "it is not valid UTF-8"
        if size > MAX_TOPIC_BYTES:
            return f"it is {size} bytes long, the limit is {MAX_TOPIC_BYTES}"
    elif not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "it is not valid UTF-8"
    return None


def _filter_problem(value: str) -> str | None:
    """Why *value* is not a topic filter, or None; [MQTT-4.7.1-2] and [MQTT-4.7.1-3]."""
    problem = _length_problem(value)
    if problem is not None:
        return problem
    levels = value.split("/")
    for index, level in enumerate(levels):
        if "#" in level:
            if level != "#":
                return "'#' must be a whole level"
            if index != len(levels) - 1:
                return "'#' must be last"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def _topic_problem(value: str) -> str | None:
    """Why *value* is not a topic name (what a PUBLISH carries), or None; [MQTT-3.3.2-2]."""
    problem = _length_problem(value)
    if problem is not None:
        return problem
    for wildcard in _WILDCARDS:
        if wildcard in value:
            return f"it contains the wildcard '{wildcard}'"
    return None


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """A valid MQTT subscription filter; construction is validation."""

    value: str
    levels: tuple[str, ...] = field(init=False, repr=False, compare=False)
    # Most ACL filters are "literal/prefix/#" or plain literals: matching those is a string
    # comparison, which keeps the per-PUBLISH check cheap. "": no wildcard; None: level walk.
    _prefix: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problem = _filter_problem(self.value)
        if problem is not None:
            raise InvalidValueError(f"{_show(self.value)} is not a valid topic filter: {problem}")
        object.__setattr__(self, "levels", tuple(self.value.split("/")))
        prefix = None
        if "+" not in self.value and self.value.endswith("/#"):
            prefix = self.value[:-1]  # keeps the "/", and the first level is a literal
        elif "+" not in self.value and "#" not in self.value:
            prefix = ""  # no wildcard at all: equality
        object.__setattr__(self, "_prefix", prefix)

    def _matches(self, topic: str) -> bool:
        """Match a topic name already known to be valid."""
        if self._prefix == "":
            return topic == self.value
        if self._prefix is not None:  # "a/b/#" matches "a/b" [MQTT-4.7.1-2] and "a/b/..."
            return topic.startswith(self._prefix) or topic == self._prefix[:-1]
        return _match(self.levels, topic.split("/"))

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Topic:
    """A valid MQTT topic name: what a PUBLISH carries, so no wildcards."""

    value: str

    def __post_init__(self) -> None:
        problem = _topic_problem(self.value)
        if problem is not None:
            raise InvalidValueError(f"{_show(self.value)} is not a valid topic name: {problem}")

    def __str__(self) -> str:
        return self.value


def _match(filter_levels: tuple[str, ...], topic_levels: list[str]) -> bool:
    # [MQTT-4.7.2-1]: a filter starting with a wildcard does not match a topic starting with $.
    if topic_levels[0].startswith("$") and filter_levels[0] in _WILDCARDS:
        return False
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True  # matches the parent level and any number of children [MQTT-4.7.1-2]
        if index >= len(topic_levels):
            return False
        if level not in ("+", topic_levels[index]):  # '+' matches one level, even an empty one
            return False
    return len(topic_levels) == len(filter_levels)


def _covers(allowed: tuple[str, ...], requested: tuple[str, ...]) -> bool:
    if allowed[0] in _WILDCARDS and requested[0].startswith("$"):
        return False  # every topic `requested` matches starts with $, which `allowed` never matches
    # '#' matches its parent level, but when that parent would be the empty topic name it is
    # not a topic [MQTT-4.7.3-1]: "#" matches exactly what "+/#" does, "/#" what "/+/#" does.
    requested = _EMPTY_PARENT.get(requested, requested)
    return _covers_levels(allowed, requested)


def _covers_levels(allowed: tuple[str, ...], requested: tuple[str, ...]) -> bool:
    for index, level in enumerate(allowed):
        if level == "#":
            return True
        if index >= len(requested):
            return False  # `requested` matches a topic shorter than `allowed` needs
        wanted = requested[index]
        if wanted == "#":
            return False  # `requested` matches the parent level, `allowed` needs one more
        if level not in ("+", wanted):  # a literal covers only the same literal
            return False
    return len(requested) == len(allowed)


def _as_filter(value: TopicFilter | str) -> TopicFilter:
    return value if isinstance(value, TopicFilter) else TopicFilter(value)


def filter_matches(topic_filter: TopicFilter | str, topic: Topic | str) -> bool:
    """True when *topic* is delivered to a subscription on *topic_filter* (MQTT 4.7)."""
    name = topic if isinstance(topic, Topic) else Topic(topic)
    return _as_filter(topic_filter)._matches(name.value)


def filter_covers(allowed: TopicFilter | str, requested: TopicFilter | str) -> bool:
    """True when every topic *requested* matches is also matched by *allowed*.

    This is what makes a subscription safe to grant: ``devices/d1/#`` covers ``devices/d1/+/x``
    and ``devices/d1``, but nothing covers ``devices/+/telemetry`` except a filter that also
    admits every other device's telemetry.
    """
    return _covers(_as_filter(allowed).levels, _as_filter(requested).levels)


def _safe_value(value: str) -> bool:
    """A substituted value must stay one plain level: it can never add a wildcard or a level."""
    return bool(value) and not value.startswith("$") and not any(c in value for c in "/+#\0")


@dataclass(frozen=True, slots=True)
class AclTemplate:
    """An ACL pattern such as ``devices/{device_id}/#``, validated as a filter at construction."""

    pattern: str
    placeholders: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shown = _show(self.pattern)
        names = _PLACEHOLDER_RE.findall(self.pattern)
        for name in names:
            if name not in PLACEHOLDERS:
                raise InvalidValueError(
                    f"{shown} uses the unknown placeholder {{{name}}}"
                    " (want {device_id} or {group})"
                )
        sample = _PLACEHOLDER_RE.sub("x", self.pattern)
        if "{" in sample or "}" in sample:
            raise InvalidValueError(f"{shown} has an unmatched brace (placeholders are {{name}})")
        problem = _filter_problem(sample)
        if problem is not None:
            raise InvalidValueError(f"{shown} is not a valid topic filter: {problem}")
        if sample.startswith(_CLOSED_PREFIX):
            raise InvalidValueError(f"{shown} can never be granted: $SYS is closed to devices")
        object.__setattr__(self, "placeholders", frozenset(names))

    def expand(self, device_id: str, group: str | None) -> TopicFilter | None:
        """The filter for one device, or None when a value it needs is missing or unsafe."""
        values = {"device_id": device_id, "group": group}
        for name in self.placeholders:
            value = values[name]
            if value is None or not _safe_value(value):
                return None
        # One pass: a value that itself reads "{group}" is never substituted again.
        result = _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)] or "", self.pattern)
        try:
            return TopicFilter(result)
        except InvalidValueError:  # only the length limit can still fail here
            return None

    def __str__(self) -> str:
        return self.pattern


def _templates(patterns: Iterable[AclTemplate | str]) -> tuple[AclTemplate, ...]:
    return tuple(p if isinstance(p, AclTemplate) else AclTemplate(p) for p in patterns)


@dataclass(frozen=True, slots=True)
class AclRules:
    """Publish and subscribe patterns: the defaults, or what one group adds to them."""

    publish: tuple[AclTemplate, ...] = ()
    subscribe: tuple[AclTemplate, ...] = ()

    @classmethod
    def of(
        cls, publish: Iterable[AclTemplate | str] = (), subscribe: Iterable[AclTemplate | str] = ()
    ) -> AclRules:
        """Build from pattern strings (each validated)."""
        return cls(_templates(publish), _templates(subscribe))


class AclGrants(NamedTuple):
    """The filters one (device, group) holds after expansion."""

    publish: tuple[TopicFilter, ...]
    subscribe: tuple[TopicFilter, ...]


def _expand_all(
    templates: Iterable[AclTemplate], device_id: str, group: str | None
) -> tuple[TopicFilter, ...]:
    expanded = (t.expand(device_id, group) for t in templates)
    return tuple(dict.fromkeys(f for f in expanded if f is not None))  # dedupe, keep order


@dataclass(frozen=True)
class AclPolicy:
    """Deny by default; a device gets the default rules plus those of its group.

    ``$SYS`` is closed to devices whatever the rules say. Expansion is cached per
    (device_id, group) because ``may_publish`` runs on every message.
    """

    defaults: AclRules = field(default_factory=AclRules)
    groups: Mapping[str, AclRules] = field(default_factory=dict)
    _grants: Callable[[str, str | None], AclGrants] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", MappingProxyType(dict(self.groups)))
        cached = functools.lru_cache(maxsize=EXPANSION_CACHE_SIZE)(self._expand)
        object.__setattr__(self, "_grants", cached)

    def __hash__(self) -> int:
        return hash((self.defaults, tuple(sorted(self.groups.items()))))

    @classmethod
    def default(cls) -> AclPolicy:
        """The policy of DESIGN section 5's example, used for ``serve --pki``."""
        return cls(
            AclRules.of(
                publish=["devices/{device_id}/#"],
                subscribe=["devices/{device_id}/#", "fleet/broadcast/#"],
            ),
            {"operators": AclRules.of(subscribe=["#"])},
        )

    def _expand(self, device_id: str, group: str | None) -> AclGrants:
        extra = self.groups.get(group) if group is not None else None
        publish = self.defaults.publish + (extra.publish if extra else ())
        subscribe = self.defaults.subscribe + (extra.subscribe if extra else ())
        return AclGrants(
            _expand_all(publish, device_id, group), _expand_all(subscribe, device_id, group)
        )

    def grants(self, device_id: str, group: str | None) -> AclGrants:
        """The expanded filters for one device (cached)."""
        return self._grants(device_id, group)

    def may_publish(self, device_id: str, group: str | None, topic: Topic | str) -> bool:
        """True when the device may publish to *topic*; a malformed topic is simply denied."""
        name = topic.value if isinstance(topic, Topic) else topic
        if name.startswith(_CLOSED_PREFIX) or _topic_problem(name) is not None:
            return False
        return any(f._matches(name) for f in self._grants(device_id, group).publish)

    def may_subscribe(
        self, device_id: str, group: str | None, topic_filter: TopicFilter | str
    ) -> bool:
        """True when an allowed filter covers *topic_filter* entirely; malformed is denied."""
        value = topic_filter.value if isinstance(topic_filter, TopicFilter) else topic_filter
        if value.startswith(_CLOSED_PREFIX) or _filter_problem(value) is not None:
            return False
        levels = tuple(value.split("/"))
        return any(_covers(f.levels, levels) for f in self._grants(device_id, group).subscribe)
