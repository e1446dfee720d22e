"""Topic config validation: Kafka's names, types and ranges (``TopicConfig``/``LogConfig``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

INT_MAX = 2**31 - 1
INT_MIN = -(2**31)
LONG_MAX = 2**63 - 1
LONG_MIN = -(2**63)

_Check = Callable[[str], str | None]


def _number(low: int, high: int, at_least: int) -> _Check:
    def check(value: str) -> str | None:
        try:
            number = int(value.strip())
        except ValueError:
            return "Not a number of the expected type"
        if not low <= number <= high:
            return "Value out of range"
        if number < at_least:
            return f"Value must be at least {at_least}"
        return None

    return check


def _int(at_least: int) -> _Check:
    return _number(INT_MIN, INT_MAX, at_least)


def _long(at_least: int) -> _Check:
    return _number(LONG_MIN, LONG_MAX, at_least)


def _one_of(*choices: str, case_sensitive: bool = True) -> _Check:
    def fold(s: str) -> str:
        return s if case_sensitive else s.lower()

    allowed = {fold(c) for c in choices}

    def check(value: str) -> str | None:
        if fold(value.strip()) in allowed:
            return None
        return f"String must be one of: {', '.join(choices)}"

    return check


def _cleanup_policy(value: str) -> str | None:
    # A list, as in Kafka: "delete", "compact", or both in either order.
    policies = [p.strip() for p in value.split(",")]
    if not value.strip() or any(p not in ("delete", "compact") for p in policies):
        return "String must be one of: delete, compact, delete,compact"
    if len(set(policies)) != len(policies):
        return "Duplicate values are not allowed"
    return None


TOPIC_CONFIGS: dict[str, _Check] = {
    "cleanup.policy": _cleanup_policy,
    "compression.type": _one_of("producer", "uncompressed", "gzip", "snappy", "lz4", "zstd"),
    "delete.retention.ms": _long(0),
    "flush.messages": _long(1),
    "flush.ms": _long(0),
    "max.message.bytes": _int(0),
    "message.timestamp.type": _one_of("CreateTime", "LogAppendTime"),
    "min.insync.replicas": _int(1),
    "retention.bytes": _long(-1),
    "retention.ms": _long(-1),
    # The size of the smallest legacy record, as in Kafka.
    "segment.bytes": _int(14),
    "segment.ms": _long(1),
    "unclean.leader.election.enable": _one_of("true", "false", case_sensitive=False),
}


def validate_topic_configs(configs: Mapping[str, str]) -> str | None:
    """The first problem with ``configs`` (by name), or None when all are valid."""
    for name in sorted(configs):
        check = TOPIC_CONFIGS.get(name)
        if check is None:
            return f"Unknown topic config name: {name}"
        problem = check(configs[name])
        if problem is not None:
            return f"Invalid value {configs[name]} for configuration {name}: {problem}"
    return None
