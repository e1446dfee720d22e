"""The group coordinator's pure parts: Kafka's partition choice and record layout."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.coordinator import (
    CommittedOffset,
    decode_offset_key,
    decode_offset_value,
    encode_offset_key,
    encode_offset_value,
    java_string_hash,
    partition_for,
)


def test_java_string_hash_matches_java():
    assert java_string_hash("") == 0
    assert java_string_hash("a") == 97
    assert java_string_hash("hello") == 99162322
    # The famous one whose hash is Integer.MIN_VALUE: Kafka's abs maps it to 0.
    assert java_string_hash("polygenelubricants") == -(2**31)
    assert partition_for("polygenelubricants", 50) == 0
    # Outside the BMP, Java hashes the UTF-16 surrogate pair.
    assert java_string_hash("\U0001f600") == 31 * 0xD83D + 0xDE00


def test_partition_for_is_within_range_and_stable():
    assert {partition_for(f"group-{i}", 50) for i in range(500)} == set(range(50))
    assert partition_for("orders-app", 50) == partition_for("orders-app", 50)


@given(
    group=st.text(max_size=50),
    topic=st.text(min_size=1, max_size=50),
    partition=st.integers(0, 2**31 - 1),
    offset=st.integers(-1, 2**63 - 1),
    epoch=st.integers(-1, 2**31 - 1),
    metadata=st.text(max_size=100),
    stamp=st.integers(0, 2**62),
)
def test_offset_records_round_trip(group, topic, partition, offset, epoch, metadata, stamp):
    key = encode_offset_key(group, topic, partition)
    assert decode_offset_key(key) == (group, topic, partition)
    value = CommittedOffset(offset, epoch, metadata, stamp)
    assert decode_offset_value(encode_offset_value(value)) == value


def test_the_key_is_kafkas_offset_commit_key_v1():
    # version 1, group "g", topic "t", partition 3
    assert encode_offset_key("g", "t", 3) == b"\x00\x01\x00\x01g\x00\x01t\x00\x00\x00\x03"
    # Group metadata keys (version 2) are not offset commits.
    assert decode_offset_key(b"\x00\x02\x00\x01g") is None
