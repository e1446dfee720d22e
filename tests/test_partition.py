"""One partition replica without sockets: leader and follower roles over real logs in
temp dirs, driven the way the fetcher and the request handlers drive them."""

from __future__ import annotations

import pytest

from broker.partition import (
    FOLLOWER,
    HIGH_WATERMARK,
    LEADER,
    NEW_DATA,
    STATE,
    Partition,
    PartitionError,
    PartitionSettings,
    Waiter,
    now_ms,
)
from broker.record_batch import Record, decode_records, encode_batch, iter_batches
from broker.storage.log import LogConfig, PartitionLog
from quorum.image import PartitionRegistration

LEADER_ID, F1, F2 = 1, 2, 3


def batch(*values: bytes, key: bytes | None = None, timestamp_ms: int = 1_000) -> bytes:
    return encode_batch([Record(key, v, (), timestamp_ms) for v in values])


def registration(leader: int, epoch: int, isr=(1, 2, 3), partition_epoch: int = 0):
    return PartitionRegistration((1, 2, 3), tuple(isr), leader, epoch, partition_epoch)


def make(tmp_path, broker_id: int, name: str = "p", **settings) -> Partition:
    log_ = PartitionLog(tmp_path / f"{name}-{broker_id}", LogConfig(segment_bytes=10_000))
    return Partition("t", 0, "id-1", log_, broker_id, PartitionSettings(**settings))


def values_of(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    for position, header in iter_batches(data):
        for record in decode_records(data[position : position + header.size_bytes]):
            out.append((header.base_offset + record.offset_delta, record.value or b""))
    return out


def replicate(leader: Partition, follower: Partition, replica_id: int) -> None:
    """One fetch round trip from ``follower`` to ``leader``, as the fetcher does it."""
    offset, last_epoch, log_start = follower.fetch_position()
    read = leader.read_for_follower(
        replica_id, offset, last_epoch, follower.leader_epoch, log_start, 1 << 20, update_state=True
    )
    if read.diverging is not None:
        follower.truncate_for_divergence(follower.leader_epoch, *read.diverging)
    else:
        follower.append_as_follower(
            read.records, follower.leader_epoch, read.high_watermark, read.log_start_offset
        )


@pytest.fixture
def trio(tmp_path):
    leader, f1, f2 = (make(tmp_path, b) for b in (LEADER_ID, F1, F2))
    reg = registration(LEADER_ID, 0)
    leader.become_leader(reg, leader.settings)
    f1.become_follower(reg, f1.settings)
    f2.become_follower(reg, f2.settings)
    return leader, f1, f2


def test_high_watermark_moves_when_every_isr_member_has_fetched(trio):
    leader, f1, f2 = trio
    result = leader.append_as_leader(batch(b"a", b"b"), acks=-1)
    assert (result.base_offset, result.last_offset) == (0, 1)
    assert leader.high_watermark == 0
    assert leader.acks_reached(result.last_offset, result.leader_epoch) is None
    replicate(leader, f1, F1)  # gets the records
    replicate(leader, f1, F1)  # tells the leader it has them
    assert leader.high_watermark == 0  # f2 has not fetched yet
    replicate(leader, f2, F2)
    replicate(leader, f2, F2)
    assert leader.high_watermark == 2
    assert leader.acks_reached(result.last_offset, result.leader_epoch) == "NONE"
    # Consumers see records up to the high watermark only.
    leader.append_as_leader(batch(b"c"), acks=1)
    data, hw, _, leo = leader.read_for_consumer(0, -1, 1 << 20)
    assert values_of(data) == [(0, b"a"), (1, b"b")] and (hw, leo) == (2, 3)
    # Followers learn the high watermark from their next fetch.
    replicate(leader, f1, F1)
    assert f1.high_watermark == 2


def test_acks_all_refused_below_min_insync_and_nothing_appended(tmp_path):
    leader = make(tmp_path, LEADER_ID, min_insync_replicas=2)
    leader.become_leader(registration(LEADER_ID, 0, isr=(1,)), leader.settings)
    with pytest.raises(PartitionError) as refused:
        leader.append_as_leader(batch(b"x"), acks=-1)
    assert refused.value.code == "NOT_ENOUGH_REPLICAS"
    assert leader.log.log_end_offset == 0
    assert leader.append_as_leader(batch(b"x"), acks=1).base_offset == 0


def test_a_corrupt_batch_in_a_request_appends_nothing(trio):
    leader, _, _ = trio
    good = batch(b"ok")
    bad = bytearray(batch(b"bad"))
    bad[-1] ^= 0xFF
    with pytest.raises(PartitionError) as refused:
        leader.append_as_leader(good + bytes(bad), acks=1)
    assert refused.value.code == "CORRUPT_MESSAGE"
    assert leader.log.log_end_offset == 0
    with pytest.raises(PartitionError) as too_big:
        leader.settings = PartitionSettings(max_message_bytes=50)
        leader.append_as_leader(good, acks=1)
    assert too_big.value.code == "MESSAGE_TOO_LARGE"


def test_followers_and_stale_epochs_are_refused(trio):
    leader, f1, _ = trio
    with pytest.raises(PartitionError) as not_leader:
        f1.append_as_leader(batch(b"x"), acks=1)
    assert not_leader.value.code == "NOT_LEADER_OR_FOLLOWER" and not_leader.value.leader == 1
    leader.become_leader(registration(LEADER_ID, 3), leader.settings)
    with pytest.raises(PartitionError) as fenced:
        leader.read_for_follower(F1, 0, -1, 2, 0, 100, update_state=True)
    assert fenced.value.code == "FENCED_LEADER_EPOCH"
    with pytest.raises(PartitionError) as unknown:
        leader.read_for_consumer(0, 4, 100)
    assert unknown.value.code == "UNKNOWN_LEADER_EPOCH"


def test_returning_leader_truncates_its_uncommitted_tail(tmp_path):
    old, new, other = (make(tmp_path, b) for b in (LEADER_ID, F1, F2))
    reg0 = registration(LEADER_ID, 0)
    old.become_leader(reg0, old.settings)
    new.become_follower(reg0, new.settings)
    other.become_follower(reg0, other.settings)
    old.append_as_leader(batch(b"c0", b"c1"), acks=-1)
    replicate(old, new, F1)
    replicate(old, other, F2)
    # Only the old leader gets these.
    old.append_as_leader(batch(b"lost0", b"lost1", b"lost2"), acks=1)
    assert old.log.log_end_offset == 5
    # F1 takes over in epoch 1 and writes on.
    reg1 = registration(F1, 1, isr=(2, 3))
    new.become_leader(reg1, new.settings)
    other.become_follower(reg1, other.settings)
    new.append_as_leader(batch(b"n0"), acks=1)
    # The old leader comes back as a follower: its first fetch learns where it
    # diverged, it cuts there and copies the new leader's records.
    old.become_follower(reg1, old.settings)
    assert old.role == FOLLOWER
    replicate(new, old, LEADER_ID)
    assert old.log.log_end_offset == 2
    replicate(new, old, LEADER_ID)
    assert old.log.log_end_offset == 3
    assert values_of(old.log.read(0, 1 << 20)) == [(0, b"c0"), (1, b"c1"), (2, b"n0")]
    assert [tuple(e) for e in old.log.leader_epoch_cache.entries()] == [(0, 0), (1, 2)]


def test_a_lagging_follower_leaves_the_isr_and_a_caught_up_one_joins(trio):
    leader, f1, f2 = trio
    leader.replica_lag_time_max_ms = 0
    leader.append_as_leader(batch(b"a"), acks=1)
    replicate(leader, f1, F1)
    replicate(leader, f1, F1)
    # Decisions take the time as an argument: a second from now, f2 (which never
    # fetched) has lagged past the (zero) lag time, f1 is at the log end.
    later = now_ms() + 1000
    change = leader.isr_change_due(later, eligible=[1, 2, 3])
    assert change is not None and change.new_isr == (1, 2)
    # While the change is pending no other is proposed, and the removed member
    # still counts for the high watermark.
    assert leader.isr_change_due(later, eligible=[1, 2, 3]) is None
    leader.isr_change_done(change, (1, 2), partition_epoch=1)
    assert leader.isr == (1, 2) and leader.high_watermark == 1
    replicate(leader, f2, F2)
    replicate(leader, f2, F2)
    leader.replica_lag_time_max_ms = 60_000
    join = leader.isr_change_due(now_ms(), eligible=[1, 2, 3])
    assert join is not None and join.new_isr == (1, 2, 3)
    # A refused change leaves the ISR as it was, and it can be asked again.
    leader.isr_change_done(join, None, -1)
    assert leader.isr == (1, 2) and leader.pending_isr is None
    # A fenced broker may not join.
    assert leader.isr_change_due(now_ms(), eligible=[1, 2]) is None


def test_retention_never_deletes_at_or_above_the_high_watermark(tmp_path):
    leader = make(tmp_path, LEADER_ID)
    leader.become_leader(registration(LEADER_ID, 0, isr=(1, 2)), leader.settings)
    for i in range(30):
        leader.append_as_leader(batch(b"x" * 900, timestamp_ms=1_000 + i), acks=1)
    assert len(leader.log.segments) > 2
    assert leader.high_watermark == 0  # follower 2 has not fetched
    assert leader.apply_retention(10**12, retention_ms=1, retention_bytes=None) == 0
    assert leader.log.log_start_offset == 0
    leader.high_watermark = 30
    segments = len(leader.log.segments)
    deleted = leader.apply_retention(10**12, retention_ms=1, retention_bytes=None)
    # Every segment but the active one was old enough and below the high watermark.
    assert deleted == segments - 1 and len(leader.log.segments) == 1
    assert leader.log.log_start_offset == leader.log.segments[0].base_offset > 0
    with pytest.raises(PartitionError) as gone:
        leader.read_for_consumer(0, -1, 100)
    assert gone.value.code == "OFFSET_OUT_OF_RANGE"


def test_compaction_keeps_the_latest_value_per_key_below_the_high_watermark(tmp_path):
    leader = make(tmp_path, LEADER_ID)
    leader.become_leader(registration(LEADER_ID, 0, isr=(1,)), leader.settings)
    for i in range(40):
        leader.append_as_leader(batch(b"v%d" % i + b"." * 800, key=b"k%d" % (i % 4)), acks=1)
    assert leader.high_watermark == 40
    result = leader.compact(now=10**12, delete_retention_ms=0)
    assert result is not None and result.records_removed > 0
    data = b""
    offset = 0
    while offset < leader.log.log_end_offset:
        chunk, _, _, _ = leader.read_for_consumer(offset, -1, 1 << 20)
        data += chunk
        # Batches emptied by compaction keep their offsets: advance by headers.
        offset = [h for _, h in iter_batches(chunk)][-1].next_offset
    kept = values_of(data)
    # Offsets never change, and every key's last write survives.
    assert [o for o, _ in kept] == sorted(o for o, _ in kept)
    assert {o for o, _ in kept} >= {36, 37, 38, 39}


def test_log_append_time_stamps_the_batch(trio):
    leader, _, _ = trio
    leader.settings = PartitionSettings(log_append_time=True)
    result = leader.append_as_leader(batch(b"a", timestamp_ms=5), acks=1)
    assert result.log_append_time_ms > 1_000_000
    (record,) = decode_records(leader.log.read(0, 1 << 20))
    assert record.timestamp_ms == result.log_append_time_ms


def test_roles_change_with_registrations(trio):
    leader, f1, _ = trio
    assert leader.role == LEADER and f1.role == FOLLOWER
    # A registration with a newer partition epoch updates the ISR in place.
    assert not leader.become_leader(registration(LEADER_ID, 0, (1, 2), 1), leader.settings)
    assert leader.isr == (1, 2)
    # An older one is ignored.
    leader.become_leader(registration(LEADER_ID, 0, (1, 2, 3), 0), leader.settings)
    assert leader.isr == (1, 2)
    assert f1.become_follower(registration(F2, 1), f1.settings)
    assert not f1.become_follower(registration(F2, 1), f1.settings)


def test_a_leader_that_wrote_nothing_in_its_epoch_follows_again(tmp_path):
    a, b = make(tmp_path, LEADER_ID), make(tmp_path, F1)
    reg0 = registration(LEADER_ID, 0)
    a.become_leader(reg0, a.settings)
    b.become_follower(reg0, b.settings)
    a.append_as_leader(batch(b"x"), acks=1)
    replicate(a, b, F1)
    # A leads epoch 1 and writes nothing; then B leads epoch 2.
    a.become_leader(registration(LEADER_ID, 1), a.settings)
    reg2 = registration(F1, 2)
    b.become_leader(reg2, b.settings)
    a.become_follower(reg2, a.settings)
    replicate(b, a, LEADER_ID)  # diverged at epoch 1: the empty epoch entry goes
    offset, last_epoch, _ = a.fetch_position()
    assert (offset, last_epoch) == (1, 0)
    b.append_as_leader(batch(b"y"), acks=1)
    replicate(b, a, LEADER_ID)
    assert values_of(a.log.read(0, 1 << 20)) == [(0, b"x"), (1, b"y")]


def test_clients_cannot_write_internal_topics_and_oversized_batches_append_nothing(tmp_path):
    log_ = PartitionLog(tmp_path / "__consumer_offsets-0", LogConfig(segment_bytes=10_000))
    internal = Partition("__consumer_offsets", 0, "id", log_, LEADER_ID, PartitionSettings())
    internal.become_leader(registration(LEADER_ID, 0, isr=(1,)), internal.settings)
    with pytest.raises(PartitionError) as refused:
        internal.append_as_leader(batch(b"x"), acks=1)
    assert refused.value.code == "INVALID_TOPIC_EXCEPTION"
    assert internal.append_as_leader(batch(b"x"), acks=1, internal=True).base_offset == 0
    # A batch larger than segment.bytes is refused before anything is appended.
    big = batch(b"a" * 500, b"b" * 12_000)
    with pytest.raises(PartitionError) as too_big:
        internal.append_as_leader(batch(b"small") + big, acks=1, internal=True)
    assert too_big.value.code == "MESSAGE_TOO_LARGE"
    assert internal.log.log_end_offset == 1


def test_a_new_leader_writes_its_epoch_with_its_first_batch(tmp_path):
    """Becoming leader of a new partition writes no file; the epoch entry reaches disk
    before the first batch appended under it, and a reopened log agrees."""
    from broker.storage import LEADER_EPOCH_CHECKPOINT, LeaderEpochCache

    leader = make(tmp_path, LEADER_ID)
    checkpoint = leader.log.directory / LEADER_EPOCH_CHECKPOINT
    leader.become_leader(registration(LEADER_ID, 4, isr=(1,)), leader.settings)
    assert leader.log.leader_epoch_cache.entries() == [(4, 0)]
    assert not checkpoint.exists()
    leader.append_as_leader(batch(b"a", b"b"), acks=1)
    assert LeaderEpochCache.load(checkpoint).entries() == [(4, 0)]
    leader.become_leader(registration(LEADER_ID, 6, isr=(1,)), leader.settings)
    assert LeaderEpochCache.load(checkpoint).entries() == [(4, 0)]
    leader.append_as_leader(batch(b"c"), acks=1)
    assert LeaderEpochCache.load(checkpoint).entries() == [(4, 0), (6, 2)]
    leader.log.close()
    with PartitionLog(leader.log.directory, LogConfig(segment_bytes=10_000)) as reopened:
        assert reopened.leader_epoch_cache.entries() == [(4, 0), (6, 2)]


def test_waiters_are_woken_only_by_the_changes_they_wait_for(trio):
    """A follower's session waits for new data (and notes a moved high watermark for
    its next answer); a consumer's fetch and an acks=all produce wait for the high
    watermark. Each append or advance wakes only the threads it concerns."""
    leader, f1, f2 = trio
    for_hw = Waiter(HIGH_WATERMARK | STATE)
    for_data = Waiter(NEW_DATA | STATE, notes=HIGH_WATERMARK)
    leader.add_waiter(for_hw)
    leader.add_waiter(for_data)
    leader.append_as_leader(batch(b"a"), acks=-1)
    assert for_data.event.is_set() and for_data.take() == {leader}
    assert not for_hw.event.is_set() and for_hw.take() == set()
    replicate(leader, f1, F1)
    replicate(leader, f1, F1)
    replicate(leader, f2, F2)
    assert leader.high_watermark == 0 and not for_hw.event.is_set()
    replicate(leader, f2, F2)  # The last of the ISR: the high watermark moves.
    assert leader.high_watermark == 1
    assert for_hw.event.is_set() and for_hw.take() == {leader}
    assert not for_data.event.is_set() and for_data.take() == {leader}  # Noted only.
    leader.become_follower(registration(F1, 1), leader.settings)  # A role change: both.
    assert for_hw.event.is_set() and for_data.event.is_set()
