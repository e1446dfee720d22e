"""Kafka's ConsumerProtocol encodings: hand-computed bytes, versions, then round trips."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.group.assignors import Subscription
from broker.group.assignors import TopicPartition as AssignorPartition
from client._brokers import TopicPartition
from client._consumer_protocol import (
    ConsumerProtocolAssignment,
    ConsumerProtocolSubscription,
    SchemaError,
    decode_assignment,
    decode_cooperative_user_data,
    decode_sticky_user_data,
    decode_subscription,
    encode_assignment,
    encode_cooperative_user_data,
    encode_sticky_user_data,
    encode_subscription,
    member_subscription,
    subscription_metadata,
)

FAST = settings(max_examples=200, deadline=None)


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(text.replace("|", " "))


# ---- bytes computed by hand from Kafka's schemas

SUBSCRIPTION_V1 = hexbytes(
    "0001"  # version 1
    "| 00000001 | 0001 74"  # topics: ["t"]
    "| ffffffff"  # user data: null
    "| 00000001 | 0001 74 | 00000001 | 00000000"  # owned: t -> [0]
)
SUBSCRIPTION_V0 = hexbytes(
    "0000"  # version 0
    "| 00000002 | 0001 61 | 0002 6263"  # topics: ["a", "bc"]
    "| 00000001 | 01"  # user data: b"\x01"
)
ASSIGNMENT_V1 = hexbytes(
    "0001"  # version 1
    "| 00000002"  # two topics
    "| 0001 61 | 00000002 | 00000000 | 00000001"  # a -> [0, 1]
    "| 0001 62 | 00000001 | 00000002"  # b -> [2]
    "| ffffffff"  # user data: null
)


def test_subscription_v1_bytes():
    subscription = ConsumerProtocolSubscription(("t",), None, (TopicPartition("t", 0),))
    assert encode_subscription(subscription) == SUBSCRIPTION_V1
    assert decode_subscription(SUBSCRIPTION_V1) == subscription


def test_subscription_v0_bytes_have_no_owned_partitions():
    subscription = ConsumerProtocolSubscription(("a", "bc"), b"\x01", (), version=0)
    assert encode_subscription(subscription) == SUBSCRIPTION_V0
    assert decode_subscription(SUBSCRIPTION_V0) == subscription
    with pytest.raises(ValueError, match="version 0 cannot carry owned partitions"):
        encode_subscription(
            ConsumerProtocolSubscription(("a",), None, (TopicPartition("a", 0),), version=0)
        )


def test_assignment_bytes_group_partitions_by_topic_in_order():
    assignment = ConsumerProtocolAssignment(
        (TopicPartition("b", 2), TopicPartition("a", 1), TopicPartition("a", 0))
    )
    assert encode_assignment(assignment) == ASSIGNMENT_V1
    assert decode_assignment(ASSIGNMENT_V1) == ConsumerProtocolAssignment(
        (TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 2))
    )


def test_newer_versions_decode_as_the_newest_known():
    # Subscription v2 appends the generation, v3 the rack: their prefix is v1.
    v3 = struct.pack(">h", 3) + SUBSCRIPTION_V1[2:] + struct.pack(">i", 7) + hexbytes("0002 7231")
    decoded = decode_subscription(v3)
    assert decoded.version == 3
    assert (decoded.topics, decoded.owned_partitions) == (("t",), (TopicPartition("t", 0),))
    assert decode_assignment(struct.pack(">h", 3) + ASSIGNMENT_V1[2:]).version == 3


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "wanted"),
        (hexbytes("ffff 00000000 ffffffff"), "version -1"),
        (SUBSCRIPTION_V1[:-1], "wanted"),
        (hexbytes("0001 00000001 ffff"), "null string"),
        (hexbytes("0000 ffffffff"), "null array"),
        (hexbytes("0000 7fffffff"), "an array of"),
        (hexbytes("0000 00000001 0001 ff ffffffff"), "not UTF-8"),
    ],
)
def test_malformed_subscriptions_are_schema_errors(data, why):
    with pytest.raises(SchemaError, match=why):
        decode_subscription(data)


def test_assignor_user_data():
    assert encode_cooperative_user_data(5) == hexbytes("00000005")
    assert decode_cooperative_user_data(hexbytes("00000005")) == 5
    assert decode_cooperative_user_data(None) == -1
    owned = (TopicPartition("a", 0), TopicPartition("a", 3))
    data = encode_sticky_user_data(owned, 9)
    assert data == hexbytes("00000001 | 0001 61 | 00000002 00000000 00000003 | 00000009")
    assert decode_sticky_user_data(data) == (owned, 9)
    assert decode_sticky_user_data(data[:-4]) == (owned, -1)  # StickyAssignorUserData v0.
    assert decode_sticky_user_data(None) == ((), -1)


def test_member_subscription_reads_what_each_assignor_needs():
    owned = [TopicPartition("t", 1)]
    last = [TopicPartition("t", 0), TopicPartition("t", 1)]
    cooperative = subscription_metadata("cooperative-sticky", ["t"], owned, last, 4)
    assert member_subscription("cooperative-sticky", cooperative, "i-1") == Subscription(
        frozenset({"t"}), "i-1", (AssignorPartition("t", 1),), 4
    )
    # The eager sticky assignor's members own nothing when they join: user data says.
    sticky = subscription_metadata("sticky", ["t"], [], last, 4)
    assert member_subscription("sticky", sticky, None) == Subscription(
        frozenset({"t"}), None, (AssignorPartition("t", 0), AssignorPartition("t", 1)), 4
    )
    ranged = subscription_metadata("range", ["u", "t", "t"], [], last, 4)
    assert decode_subscription(ranged).topics == ("t", "u")
    assert decode_subscription(ranged).user_data is None
    assert member_subscription("range", ranged, None) == Subscription(frozenset({"t", "u"}))


# ---- properties

topics = st.text(max_size=12)
partitions = st.lists(
    st.builds(TopicPartition, topics, st.integers(-(2**31), 2**31 - 1)), max_size=12
)
user_data = st.none() | st.binary(max_size=40)


@FAST
@given(st.lists(topics, max_size=8), user_data, partitions, st.sampled_from([0, 1]))
def test_subscriptions_round_trip(topic_names, data, owned, version):
    if version == 0:
        owned = []
    subscription = ConsumerProtocolSubscription(tuple(topic_names), data, tuple(owned), version)
    decoded = decode_subscription(encode_subscription(subscription))
    assert decoded == ConsumerProtocolSubscription(
        tuple(topic_names), data, tuple(sorted(owned)), version
    )


@FAST
@given(partitions, user_data, st.integers(0, 3))
def test_assignments_round_trip(assigned, data, version):
    assignment = ConsumerProtocolAssignment(tuple(assigned), data, version)
    decoded = decode_assignment(encode_assignment(assignment))
    assert decoded == ConsumerProtocolAssignment(tuple(sorted(assigned)), data, version)


@FAST
@given(st.binary(max_size=64))
def test_any_bytes_decode_or_raise_schema_error(data):
    for decode in (decode_subscription, decode_assignment, decode_sticky_user_data):
        try:
            decode(data)
        except SchemaError:
            pass
