"""The group coordinator's pure parts: Kafka's partition choice and record layout."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.coordinator import (
    CommittedOffset,
    decode_group_key,
    decode_group_value,
    decode_offset_key,
    decode_offset_value,
    encode_group_key,
    encode_group_value,
    encode_offset_key,
    encode_offset_value,
    java_string_hash,
    partition_for,
    replay,
    store_error,
)
from broker.group.messages import GroupError, StoredGroup, StoredMember
from broker.record_batch import Record


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


# -- group metadata records (GroupMetadataKey v2, GroupMetadataValue v3) ------------

_names = st.text(max_size=20)
_members = st.builds(
    StoredMember,
    member_id=_names,
    group_instance_id=st.none() | _names,
    client_id=_names,
    client_host=_names,
    rebalance_timeout_ms=st.integers(0, 2**31 - 1),
    session_timeout_ms=st.integers(0, 2**31 - 1),
    subscription=st.binary(max_size=50),
    assignment=st.binary(max_size=50),
)
_groups = st.builds(
    StoredGroup,
    protocol_type=_names,
    generation_id=st.integers(-1, 2**31 - 1),
    protocol_name=st.none() | _names,
    leader_id=st.none() | _names,
    members=st.lists(_members, max_size=4).map(tuple),
    current_state_timestamp_ms=st.integers(-1, 2**62),
)


@given(group_id=st.text(max_size=50), value=_groups)
def test_group_metadata_records_round_trip(group_id, value):
    assert decode_group_key(encode_group_key(group_id)) == group_id
    assert decode_group_value(encode_group_value(value)) == value


def test_the_group_records_are_kafkas_layout():
    assert encode_group_key("g") == b"\x00\x02\x00\x01g"
    # An offset commit key is not a group metadata key, and the other way round.
    assert decode_group_key(encode_offset_key("g", "t", 0)) is None
    assert decode_offset_key(encode_group_key("g")) is None
    member = StoredMember("m", None, "c", "/h", 300, 10, b"S", b"A")
    value = StoredGroup("consumer", 5, "range", "m", (member,), 7)
    assert encode_group_value(value) == (
        b"\x00\x03"  # version 3
        b"\x00\x08consumer"  # protocol type
        b"\x00\x00\x00\x05"  # generation
        b"\x00\x05range"  # protocol (nullable string)
        b"\x00\x01m"  # leader (nullable string)
        b"\x00\x00\x00\x00\x00\x00\x00\x07"  # current state timestamp
        b"\x00\x00\x00\x01"  # one member:
        b"\x00\x01m"  # member id
        b"\xff\xff"  # group instance id: null
        b"\x00\x01c"  # client id
        b"\x00\x02/h"  # client host
        b"\x00\x00\x01\x2c"  # rebalance timeout
        b"\x00\x00\x00\x0a"  # session timeout
        b"\x00\x00\x00\x01S"  # subscription (bytes)
        b"\x00\x00\x00\x01A"  # assignment (bytes)
    )


def test_older_group_metadata_versions_decode_and_unknown_ones_are_refused():
    # Version 0: no rebalance timeout (Kafka reads the session timeout), no timestamp,
    # no instance id.
    v0 = (
        b"\x00\x00\x00\x08consumer\x00\x00\x00\x02\xff\xff\xff\xff\x00\x00\x00\x01"
        b"\x00\x01m\x00\x01c\x00\x00\x00\x00\x00\x0a\x00\x00\x00\x00\x00\x00\x00\x00"
    )
    assert decode_group_value(v0) == StoredGroup(
        "consumer", 2, None, None, (StoredMember("m", None, "c", "", 10, 10, b"", b""),), -1
    )
    flexible = b"\x00\x04" + encode_group_value(StoredGroup("consumer", 1, None, None, ()))[2:]
    with pytest.raises(ValueError, match="version 4"):
        decode_group_value(flexible)
    with pytest.raises(ValueError):
        decode_group_value(encode_group_value(StoredGroup("consumer", 1, "r", "m", ()))[:-3])


def _group(generation: int, *member_ids: str) -> StoredGroup:
    members = tuple(StoredMember(m, None, "c", "", 300, 10, b"sub", m.encode()) for m in member_ids)
    return StoredGroup(
        "consumer", generation, "range", member_ids[0] if member_ids else None, members
    )


def test_replaying_the_log_keeps_the_latest_offsets_and_group_metadata():
    def rec(key, value=None):
        return Record(key, value, (), 0)

    log = [
        rec(encode_offset_key("g", "t", 0), encode_offset_value(CommittedOffset(5, -1, "", 1))),
        rec(encode_group_key("g"), encode_group_value(_group(1, "a"))),
        rec(encode_group_key("g"), encode_group_value(_group(2, "a", "b"))),
        rec(encode_group_key("h"), encode_group_value(_group(1, "x"))),
        rec(encode_group_key("h")),  # h became Empty: tombstone
        rec(encode_offset_key("g", "t", 0), encode_offset_value(CommittedOffset(9, -1, "", 2))),
        rec(None, b"keyless"),
        rec(b"\x00\x07future key", b"?"),  # a key version from the future: not ours
    ]
    offsets: dict = {}
    groups: dict = {}
    for record in log:
        replay(offsets, groups, record)
    assert groups == {"g": _group(2, "a", "b")}
    assert offsets == {"g": {("t", 0): CommittedOffset(9, -1, "", 2)}}
    # A value this version cannot read is not applied, and forgets what its key held:
    # an older record of the group must not come back as if it were the latest.
    with pytest.raises(ValueError):
        replay(offsets, groups, rec(encode_group_key("g"), b"\x00\x09..."))
    assert groups == {}


def test_compaction_keeps_the_latest_group_record(tmp_path):
    from broker.record_batch import decode_records, encode_batch, iter_batches, patch_batch
    from broker.storage import LogConfig, PartitionLog, compact

    with PartitionLog(tmp_path, LogConfig(segment_bytes=400)) as log_:
        for generation in range(1, 12):
            value = encode_group_value(_group(generation, "a", "b"))
            batch = encode_batch([Record(encode_group_key("g"), value, (), generation)])
            log_.append(patch_batch(batch, log_.log_end_offset, 0), now_ms=0)
        upto = log_.active_segment.base_offset
        assert upto > 0
        compact(log_, clean_upto_offset=upto, delete_retention_ms=0, now_ms=0)
        records = []
        offset = log_.log_start_offset
        while offset < log_.log_end_offset:
            data = log_.read(offset, 1 << 20)
            for position, header in iter_batches(data):
                records += decode_records(data[position : position + header.size_bytes])
                offset = header.next_offset
        assert len(records) < 11
        offsets: dict = {}
        groups: dict = {}
        for record in records:
            replay(offsets, groups, record)
        assert groups == {"g": _group(11, "a", "b")}


def test_failed_appends_become_kafkas_store_errors():
    from raftka.v1 import common_pb2

    def error(code):
        return common_pb2.Error(code=code)

    assert store_error(None) is GroupError.NONE
    assert (
        store_error(error(common_pb2.NOT_ENOUGH_REPLICAS)) is GroupError.COORDINATOR_NOT_AVAILABLE
    )
    assert store_error(error(common_pb2.NOT_COORDINATOR)) is GroupError.NOT_COORDINATOR
    assert store_error(error(common_pb2.KAFKA_STORAGE_ERROR)) is GroupError.NOT_COORDINATOR
    assert store_error(error(common_pb2.REQUEST_TIMED_OUT)) is GroupError.REBALANCE_IN_PROGRESS
    assert store_error(error(common_pb2.MESSAGE_TOO_LARGE)) is GroupError.UNKNOWN_SERVER_ERROR


# -- the coordinator over a real log, without sockets -----------------------------


def _coordinator(tmp_path, retention_ms: int = 1000, group_config=None):
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
        group_config=group_config,
    )
    _lead(coordinator)
    return coordinator, partition


def _lead(coordinator) -> None:
    """Make the coordinator lead the offsets partition and wait for its load."""
    import time as _time

    coordinator.on_role(0, "leader")
    deadline = _time.monotonic() + 10
    while coordinator._coordinating("g")[1] is not None and _time.monotonic() < deadline:
        _time.sleep(0.01)


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


def _member(coordinator, group: str = "g"):
    """One member joins (the KIP-394 round trip) and syncs: (member id, generation)."""
    from raftka.v1 import broker_pb2, common_pb2

    def join(member_id: str) -> broker_pb2.JoinGroupResponse:
        return coordinator.join(
            broker_pb2.JoinGroupRequest(
                group_id=group,
                session_timeout_ms=1000,
                rebalance_timeout_ms=5000,
                member_id=member_id,
                protocol_type="consumer",
                protocols=[broker_pb2.JoinGroupProtocol(name="range", metadata=b"sub")],
                client_id="c",
            )
        )

    first = join("")
    assert first.error.code == common_pb2.MEMBER_ID_REQUIRED
    joined = join(first.member_id)
    assert joined.error.code == common_pb2.NONE and joined.leader == first.member_id
    return first.member_id, joined.generation_id


def _sync(coordinator, member_id: str, generation: int, group: str = "g"):
    from raftka.v1 import broker_pb2

    return coordinator.sync(
        broker_pb2.SyncGroupRequest(
            group_id=group,
            generation_id=generation,
            member_id=member_id,
            assignments=[broker_pb2.SyncGroupAssignment(member_id=member_id, assignment=b"A")],
        )
    )


def _heartbeat(coordinator, member_id: str, generation: int, group: str = "g") -> int:
    from raftka.v1 import broker_pb2

    request = broker_pb2.HeartbeatRequest(
        group_id=group, generation_id=generation, member_id=member_id
    )
    return coordinator.heartbeat(request).error.code


def _stored_groups(partition) -> dict:
    from broker.coordinator import GroupCoordinator

    offsets: dict = {}
    groups: dict = {}
    for record in GroupCoordinator._read_all(partition):
        replay(offsets, groups, record)
    return groups


def test_membership_is_stored_reloaded_and_deleted_with_the_group(tmp_path):
    import time as _time

    from raftka.v1 import broker_pb2, common_pb2

    from broker.group import GroupConfig

    config = GroupConfig(min_session_timeout_ms=100, initial_rebalance_delay_ms=0)
    coordinator, partition = _coordinator(tmp_path, group_config=config)
    try:
        member, generation = _member(coordinator)
        assert _sync(coordinator, member, generation).assignment == b"A"
        # The sync was answered once the generation was in the log.
        stored = _stored_groups(partition)["g"]
        assert (stored.generation_id, stored.leader_id, stored.protocol_name) == (
            generation,
            member,
            "range",
        )
        assert [(m.member_id, m.subscription, m.assignment) for m in stored.members] == [
            (member, b"sub", b"A")
        ]
        assert stored.current_state_timestamp_ms > 0
        # Another broker takes over (here: this one, after losing the lead): it loads it.
        coordinator.on_role(0, "follower")
        assert _heartbeat(coordinator, member, generation) == common_pb2.NOT_COORDINATOR
        _lead(coordinator)
        described = coordinator.describe_groups(broker_pb2.DescribeGroupsRequest(group_ids=["g"]))
        group = described.groups[0]
        assert (group.state, group.generation_id, group.leader) == ("Stable", generation, member)
        assert [m.member_assignment for m in group.members] == [b"A"]
        assert _heartbeat(coordinator, member, generation) == common_pb2.NONE
        assert _commit(coordinator, "g", 5, generation, member) == common_pb2.NONE
        assert _commit(coordinator, "g", 6, generation - 1, member) == common_pb2.ILLEGAL_GENERATION
        # The member leaves: the group is Empty, and its metadata is deleted (tombstone).
        coordinator.leave(
            broker_pb2.LeaveGroupRequest(
                group_id="g", members=[broker_pb2.MemberIdentity(member_id=member)]
            )
        )
        deadline = _time.monotonic() + 10
        while "g" in _stored_groups(partition) and _time.monotonic() < deadline:
            _time.sleep(0.01)
        assert "g" not in _stored_groups(partition)
        coordinator.on_role(0, "follower")
        _lead(coordinator)
        described = coordinator.describe_groups(broker_pb2.DescribeGroupsRequest(group_ids=["g"]))
        assert described.groups[0].state == "Empty"  # its committed offsets remain
        assert _fetched(coordinator, "g") == 5
    finally:
        coordinator.stop()


def test_a_sync_whose_generation_cannot_be_stored_gets_the_error_and_the_group_rebalances(
    tmp_path, monkeypatch
):
    from raftka.v1 import broker_pb2, common_pb2

    from broker.group import GroupConfig
    from broker.partition import PartitionError

    config = GroupConfig(min_session_timeout_ms=100, initial_rebalance_delay_ms=0)
    coordinator, partition = _coordinator(tmp_path, group_config=config)
    try:
        member, generation = _member(coordinator)

        def refuse(*args, **kwargs):
            raise PartitionError("NOT_ENOUGH_REPLICAS", "only 1 in-sync replica")

        monkeypatch.setattr(partition, "append_as_leader", refuse)
        answer = _sync(coordinator, member, generation)
        assert answer.error.code == common_pb2.COORDINATOR_NOT_AVAILABLE
        assert answer.assignment == b""
        described = coordinator.describe_groups(broker_pb2.DescribeGroupsRequest(group_ids=["g"]))
        assert described.groups[0].state == "PreparingRebalance"
        assert _heartbeat(coordinator, member, generation) == common_pb2.REBALANCE_IN_PROGRESS
        assert _stored_groups(partition) == {}
    finally:
        coordinator.stop()
