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


# -- the coordinator over a real log, without sockets -----------------------------


def _coordinator(tmp_path, retention_ms: int = 1000):
    import time as _time

    from test_controller_harness import Cluster

    from broker.coordinator import OFFSETS_TOPIC, GroupCoordinator
    from broker.partition import Partition, PartitionSettings
    from broker.storage.log import LogConfig, PartitionLog

    cluster = Cluster()
    cluster.start_brokers(1)
    cluster.create_topic(OFFSETS_TOPIC, partitions=1, rf=1)
    reg = cluster.partition(OFFSETS_TOPIC, 0)
    log_ = PartitionLog(tmp_path / f"{OFFSETS_TOPIC}-0", LogConfig())
    partition = Partition(OFFSETS_TOPIC, 0, "id", log_, 1, PartitionSettings())
    partition.become_leader(reg, partition.settings)
    coordinator = GroupCoordinator(
        1,
        partition_of=lambda topic, index: partition,
        image=lambda: cluster.image,
        create_topic=lambda request: None,  # type: ignore[arg-type,return-value]
        num_partitions=1,
        offsets_retention_ms=retention_ms,
    )
    coordinator.on_role(0, "leader")
    deadline = _time.monotonic() + 10
    while coordinator._coordinating("g")[1] is not None and _time.monotonic() < deadline:
        _time.sleep(0.01)
    return coordinator, partition


def _commit(coordinator, group: str, offset: int, generation: int = -1, member: str = ""):
    from raftka.v1 import broker_pb2

    request = broker_pb2.OffsetCommitRequest(
        group_id=group,
        generation_id=generation,
        member_id=member,
        topics=[
            broker_pb2.OffsetCommitTopic(
                topic="t",
                partitions=[broker_pb2.OffsetCommitPartition(partition=0, committed_offset=offset)],
            )
        ],
    )
    return coordinator.commit(request).topics[0].partitions[0].error.code


def _fetched(coordinator, group: str) -> int:
    from raftka.v1 import broker_pb2

    answer = coordinator.fetch(broker_pb2.OffsetFetchRequest(group_id=group))
    parts = [p.committed_offset for t in answer.topics for p in t.partitions]
    return parts[0] if parts else -1


def test_commits_are_logged_reloaded_and_expire_for_groups_without_members(tmp_path):
    import time as _time

    from raftka.v1 import common_pb2

    coordinator, partition = _coordinator(tmp_path)
    try:
        assert _commit(coordinator, "g", 5) == common_pb2.NONE
        assert _commit(coordinator, "g", 9) == common_pb2.NONE
        assert _fetched(coordinator, "g") == 9
        # A member that is not in the group cannot commit.
        assert (
            _commit(coordinator, "g", 1, generation=3, member="m") == common_pb2.UNKNOWN_MEMBER_ID
        )
        # Losing and regaining leadership reloads from the log.
        coordinator.on_role(0, "follower")
        assert _commit(coordinator, "g", 11) == common_pb2.NOT_COORDINATOR
        coordinator.on_role(0, "leader")
        deadline = _time.monotonic() + 10
        while _fetched(coordinator, "g") != 9 and _time.monotonic() < deadline:
            _time.sleep(0.01)
        assert _fetched(coordinator, "g") == 9
        # Past offsets.retention.minutes without a commit, the offsets go (tombstones).
        now = int(_time.time() * 1000)
        assert coordinator.expire_offsets(now) == []
        assert coordinator.expire_offsets(now + 5000) == ["g"]
        assert _fetched(coordinator, "g") == -1
        assert partition.log.log_end_offset == 3  # two commits and one tombstone
    finally:
        coordinator.stop()
