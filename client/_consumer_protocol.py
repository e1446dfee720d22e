"""Kafka's ConsumerProtocol: what consumers put in the opaque bytes of the group protocol.

In the classic group protocol the coordinator relays bytes it never reads: each member's
JoinGroup carries, per assignor it supports, a *subscription* (the topics it wants, the
partitions it owns, assignor user data), and the leader's SyncGroup carries each
member's *assignment*. These are Kafka's ConsumerProtocolSubscription and
ConsumerProtocolAssignment, in Kafka's classic (non-flexible) byte layout, big-endian:

    string          int16 length, then UTF-8 bytes (-1: null, not allowed here)
    bytes           int32 length, then the bytes (-1: null, allowed for user data)
    array           int32 count, then the items (-1: null, not allowed here)

    Subscription    int16 version, topics: array of string, user_data: bytes,
                    (version >= 1) owned_partitions: array of (topic: string,
                    partitions: array of int32)
    Assignment      int16 version, partitions: array of (topic: string, partitions:
                    array of int32), user_data: bytes  (versions 0 to 3 are the same)

We write subscription version 1 and assignment version 1. As Kafka's decoders do, we read
a version newer than the newest we know as that newest one: later versions only append
fields (subscription v2 adds the generation, v3 the rack), so their prefix is ours, and
trailing bytes are ignored.

Two assignors carry user data of their own, as Kafka's do, so that a leader of either
Kafka or raftka consumers understands them: ``cooperative-sticky`` sends the generation of
the member's last assignment (an int32: CooperativeStickyAssignor's user data v0), and
``sticky``, an eager assignor whose members own nothing when they rejoin, sends the last
assignment itself and its generation (StickyAssignorUserData v1). ``member_subscription``
turns a member's bytes into what the assignors of ``broker.group.assignors`` read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from broker.group.assignors import DEFAULT_GENERATION, Subscription
from broker.group.assignors import TopicPartition as AssignorPartition
from client._brokers import TopicPartition

__all__ = [
    "CONSUMER_PROTOCOL_TYPE",
    "ConsumerProtocolAssignment",
    "ConsumerProtocolSubscription",
    "SchemaError",
    "decode_assignment",
    "decode_subscription",
    "encode_assignment",
    "encode_subscription",
    "member_subscription",
    "subscription_metadata",
]

# The JoinGroup protocol type of consumers.
CONSUMER_PROTOCOL_TYPE = "consumer"
SUBSCRIPTION_VERSION = 1
ASSIGNMENT_VERSION = 1
_STRING_MAX = 0x7FFF


class SchemaError(ValueError):
    """Bytes that are not a well-formed ConsumerProtocol message (Kafka's SchemaException)."""


@dataclass(frozen=True, slots=True)
class ConsumerProtocolSubscription:
    """A member's subscription: its topics, assignor user data, and (v1) what it owns."""

    topics: tuple[str, ...]
    user_data: bytes | None = None
    owned_partitions: tuple[TopicPartition, ...] = ()
    version: int = SUBSCRIPTION_VERSION


@dataclass(frozen=True, slots=True)
class ConsumerProtocolAssignment:
    """A member's assignment, as the leader sends it through SyncGroup."""

    partitions: tuple[TopicPartition, ...]
    user_data: bytes | None = None
    version: int = ASSIGNMENT_VERSION


# ---- encoding


def encode_subscription(subscription: ConsumerProtocolSubscription) -> bytes:
    """Version 0 or 1 bytes of ``subscription`` (v0 has no owned partitions)."""
    version = subscription.version
    if version not in (0, 1):
        raise ValueError(f"subscription version {version} is not 0 or 1")
    out = bytearray(struct.pack(">h", version))
    _put_strings(out, subscription.topics)
    _put_bytes(out, subscription.user_data)
    if version >= 1:
        _put_partitions(out, subscription.owned_partitions)
    elif subscription.owned_partitions:
        raise ValueError("subscription version 0 cannot carry owned partitions")
    return bytes(out)


def encode_assignment(assignment: ConsumerProtocolAssignment) -> bytes:
    """Bytes of ``assignment`` (versions 0 to 3 share one layout)."""
    if not 0 <= assignment.version <= 3:
        raise ValueError(f"assignment version {assignment.version} is not 0 to 3")
    out = bytearray(struct.pack(">h", assignment.version))
    _put_partitions(out, assignment.partitions)
    _put_bytes(out, assignment.user_data)
    return bytes(out)


def _put_string(out: bytearray, text: str) -> None:
    data = text.encode("utf-8")
    if len(data) > _STRING_MAX:
        raise ValueError(f"a string of {len(data)} bytes does not fit an int16 length")
    out += struct.pack(">h", len(data))
    out += data


def _put_bytes(out: bytearray, data: bytes | None) -> None:
    if data is None:
        out += struct.pack(">i", -1)
    else:
        out += struct.pack(">i", len(data))
        out += data


def _put_strings(out: bytearray, texts: Iterable[str]) -> None:
    texts = list(texts)
    out += struct.pack(">i", len(texts))
    for text in texts:
        _put_string(out, text)


def _put_partitions(out: bytearray, partitions: Iterable[TopicPartition]) -> None:
    """An array of (topic, int32 partitions), topics and partitions in sorted order."""
    by_topic: dict[str, list[int]] = {}
    for tp in sorted(partitions):
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    out += struct.pack(">i", len(by_topic))
    for topic, numbers in by_topic.items():
        _put_string(out, topic)
        out += struct.pack(f">i{len(numbers)}i", len(numbers), *numbers)


# ---- decoding


class _Reader:
    """Reads Kafka's classic types from a buffer; a short or malformed one is a SchemaError."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def take(self, size: int) -> memoryview:
        if size < 0 or self.pos + size > len(self.data):
            raise SchemaError(f"{size} bytes wanted at {self.pos}, {len(self.data)} in all")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def int16(self) -> int:
        value: int = struct.unpack(">h", self.take(2))[0]
        return value

    def int32(self) -> int:
        value: int = struct.unpack(">i", self.take(4))[0]
        return value

    def string(self) -> str:
        size = self.int16()
        if size < 0:
            raise SchemaError(f"a null string at {self.pos - 2}")
        try:
            return str(self.take(size), "utf-8")
        except UnicodeDecodeError as e:
            raise SchemaError(f"a string that is not UTF-8: {e}") from None

    def nullable_bytes(self) -> bytes | None:
        size = self.int32()
        return None if size == -1 else bytes(self.take(size))

    def count(self) -> int:
        count = self.int32()
        if count < 0:
            raise SchemaError(f"a null array at {self.pos - 4}")
        if count > len(self.data) - self.pos:  # Every item takes at least a byte.
            raise SchemaError(f"an array of {count} items in {len(self.data) - self.pos} bytes")
        return count

    def partitions(self) -> tuple[TopicPartition, ...]:
        found: list[TopicPartition] = []
        for _ in range(self.count()):
            topic = self.string()
            found.extend(TopicPartition(topic, self.int32()) for _ in range(self.count()))
        return tuple(found)


def decode_subscription(data: bytes) -> ConsumerProtocolSubscription:
    """A subscription of any version >= 0 (fields after version 1's are ignored)."""
    reader = _Reader(data)
    version = reader.int16()
    if version < 0:
        raise SchemaError(f"subscription version {version}")
    topics = tuple(reader.string() for _ in range(reader.count()))
    user_data = reader.nullable_bytes()
    owned = reader.partitions() if version >= 1 else ()
    return ConsumerProtocolSubscription(topics, user_data, owned, version)


def decode_assignment(data: bytes) -> ConsumerProtocolAssignment:
    """An assignment of any version >= 0 (all known versions share one layout)."""
    reader = _Reader(data)
    version = reader.int16()
    if version < 0:
        raise SchemaError(f"assignment version {version}")
    partitions = reader.partitions()
    return ConsumerProtocolAssignment(partitions, reader.nullable_bytes(), version)


# ---- assignor user data


def encode_cooperative_user_data(generation: int) -> bytes:
    """CooperativeStickyAssignor's user data: the generation of the last assignment."""
    return struct.pack(">i", generation)


def decode_cooperative_user_data(data: bytes | None) -> int:
    """The generation in CooperativeStickyAssignor user data; -1 when there is none."""
    if not data:
        return DEFAULT_GENERATION
    return _Reader(data).int32()


def encode_sticky_user_data(partitions: Iterable[TopicPartition], generation: int) -> bytes:
    """StickyAssignorUserData v1: the previous assignment, then its generation."""
    out = bytearray()
    _put_partitions(out, partitions)
    out += struct.pack(">i", generation)
    return bytes(out)


def decode_sticky_user_data(data: bytes | None) -> tuple[tuple[TopicPartition, ...], int]:
    """(previous assignment, generation) from StickyAssignorUserData v0 or v1."""
    if not data:
        return (), DEFAULT_GENERATION
    reader = _Reader(data)
    partitions = reader.partitions()
    generation = reader.int32() if reader.pos < len(reader.data) else DEFAULT_GENERATION
    return partitions, generation


def subscription_metadata(
    protocol_name: str,
    topics: Iterable[str],
    owned: Iterable[TopicPartition],
    last_assignment: Iterable[TopicPartition],
    last_generation: int,
) -> bytes:
    """The JoinGroup metadata of one protocol: the subscription, with the assignor's user
    data. ``owned`` is what the member holds now (nothing, under an eager protocol, once it
    revoked everything), ``last_assignment`` what it got in generation ``last_generation``.
    """
    user_data: bytes | None = None
    if protocol_name == "cooperative-sticky":
        user_data = encode_cooperative_user_data(last_generation)
    elif protocol_name == "sticky":
        user_data = encode_sticky_user_data(last_assignment, last_generation)
    return encode_subscription(
        ConsumerProtocolSubscription(tuple(sorted(set(topics))), user_data, tuple(sorted(owned)))
    )


def member_subscription(
    protocol_name: str, metadata: bytes, group_instance_id: str | None
) -> Subscription:
    """What an assignor reads of a member's JoinGroup metadata for ``protocol_name``."""
    decoded = decode_subscription(metadata)
    owned: Iterable[TopicPartition] = decoded.owned_partitions
    generation = DEFAULT_GENERATION
    if protocol_name == "cooperative-sticky":
        generation = decode_cooperative_user_data(decoded.user_data)
    elif protocol_name == "sticky":
        # An eager member owns nothing when it joins: its user data says what it had.
        owned, generation = decode_sticky_user_data(decoded.user_data)
    return Subscription(
        topics=frozenset(decoded.topics),
        group_instance_id=group_instance_id,
        owned_partitions=tuple(AssignorPartition(tp.topic, tp.partition) for tp in owned),
        generation=generation,
    )
