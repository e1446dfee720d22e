"""Consumer: assign, seek, poll and offset lookups against fake brokers on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fake_broker import FakeCluster
from raftka.v1 import common_pb2

from broker.record_batch import Record, encode_batch
from client import (
    Consumer,
    CorruptRecordError,
    NoOffsetForPartitionError,
    OffsetAndTimestamp,
    OffsetOutOfRangeError,
    TopicPartition,
)

T0 = 1_700_000_000_000
TP0 = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)
FAST = {"fetch_max_wait_ms": 50, "retry_backoff_ms": 5, "request_timeout_ms": 2000}


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    with FakeCluster(brokers=2) as fake:
        fake.create_topic("t", 2)  # Partition 0 led by broker 1, partition 1 by broker 2.
        yield fake


@contextmanager
def consumer(cluster: FakeCluster, **options: Any) -> Iterator[Consumer]:
    c = Consumer(cluster.bootstrap, **{**FAST, **options})
    try:
        yield c
    finally:
        c.close()


def fill(cluster: FakeCluster, tp: TopicPartition, count: int, per_batch: int = 3) -> None:
    """Append ``count`` records valued b"0", b"1", ... in batches, timestamps T0 + offset."""
    start = len(cluster.records(tp.topic, tp.partition))
    for first in range(start, start + count, per_batch):
        last = min(first + per_batch, start + count)
        batch = [Record(b"k%d" % i, b"%d" % i, (), T0 + i) for i in range(first, last)]
        cluster.append(tp.topic, tp.partition, encode_batch(batch))


def poll_all(c: Consumer, count: int, **poll: Any) -> list[Any]:
    """Poll until ``count`` records came (bounded: fails after 5 s without them)."""
    records: list[Any] = []
    for _ in range(100):
        for batch in c.poll(timeout_ms=50, **poll).values():
            records += batch
        if len(records) >= count:
            return records
    raise AssertionError(f"{len(records)} of {count} records after 100 polls")


def values(records: list[Any]) -> list[bytes]:
    return [r.value for r in records]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="group_id"):
        Consumer("127.0.0.1:1", group_id="")
    with pytest.raises(ValueError, match="auto_offset_reset"):
        Consumer("127.0.0.1:1", auto_offset_reset="smallest")
    with pytest.raises(ValueError, match="max_poll_records"):
        Consumer("127.0.0.1:1", max_poll_records=0)


def test_poll_from_the_beginning_returns_every_record_in_order(cluster):
    fill(cluster, TP0, 10)
    fill(cluster, TP1, 4)
    with consumer(cluster, auto_offset_reset="earliest") as c:
        c.assign([TP0, ("t", 1)])
        assert c.assignment() == {TP0, TP1}
        records = poll_all(c, 14)
        assert c.poll(timeout_ms=0) == {}
        by_partition = {
            tp: [r for r in records if r.partition == tp.partition] for tp in (TP0, TP1)
        }
        assert [r.offset for r in by_partition[TP0]] == list(range(10))
        assert values(by_partition[TP1]) == [b"%d" % i for i in range(4)]
        first = by_partition[TP0][0]
        assert (first.topic, first.key, first.timestamp, first.leader_epoch) == ("t", b"k0", T0, 0)
        assert (c.position(TP0), c.position(TP1)) == (10, 4)
        assert c.highwater(TP0) == 10


def test_latest_starts_after_what_is_there(cluster):
    fill(cluster, TP0, 5)
    with consumer(cluster) as c:
        c.assign([TP0])
        assert c.position(TP0) == 5
        fill(cluster, TP0, 2)
        assert values(poll_all(c, 2)) == [b"5", b"6"]


def test_seek_lands_mid_batch_and_max_records_caps_a_poll(cluster):
    fill(cluster, TP0, 12, per_batch=4)
    with consumer(cluster, max_poll_records=3) as c:
        c.assign([TP0])
        c.seek(TP0, 5)
        first = c.poll(timeout_ms=2000)[TP0]
        assert [r.offset for r in first] == [5, 6, 7] and c.position(TP0) == 8
        assert [r.offset for r in c.poll(timeout_ms=2000, max_records=2)[TP0]] == [8, 9]
        c.seek_to_beginning()
        assert c.position(TP0) == 0
        assert [r.offset for r in poll_all(c, 3)][:3] == [0, 1, 2]
        c.seek_to_end(TP0)
        assert c.position(TP0) == 12
        with pytest.raises(ValueError, match="not assigned"):
            c.seek(TP1, 0)


def test_offset_lookups(cluster):
    fill(cluster, TP0, 6)
    cluster.delete_records("t", 0, 3)
    with consumer(cluster) as c:
        assert c.beginning_offsets([TP0, TP1]) == {TP0: 3, TP1: 0}
        assert c.end_offsets([TP0, TP1]) == {TP0: 6, TP1: 0}
        assert c.offsets_for_times({TP0: T0 + 4, TP1: T0}) == {
            TP0: OffsetAndTimestamp(4, T0 + 4),
            TP1: None,
        }
        assert c.partitions_for_topic("t") == {0, 1}
        assert c.partitions_for_topic("nope") is None


def test_out_of_range_resets_by_auto_offset_reset(cluster):
    fill(cluster, TP0, 9)
    with consumer(cluster, auto_offset_reset="earliest") as c:
        c.assign([TP0])
        c.seek(TP0, 2)
        cluster.delete_records("t", 0, 6)  # Retention took offsets 0..5.
        assert [r.offset for r in poll_all(c, 3)] == [6, 7, 8]
    with consumer(cluster, auto_offset_reset="none") as c:
        c.assign([TP0])
        with pytest.raises(NoOffsetForPartitionError, match="seek"):
            c.poll(timeout_ms=0)
        c.seek(TP0, 50)
        with pytest.raises(OffsetOutOfRangeError, match="offset 50 is out of range") as info:
            poll_all(c, 1)
        assert info.value.partitions == {TP0: 50}


def test_a_leader_change_is_followed(cluster):
    fill(cluster, TP0, 3)
    with consumer(cluster, auto_offset_reset="earliest") as c:
        c.assign([TP0])
        assert len(poll_all(c, 3)) == 3
        cluster.move_leader("t", 0, 2)
        fill(cluster, TP0, 3)
        assert values(poll_all(c, 3)) == [b"3", b"4", b"5"]
    fetched_from = {broker for broker, _ in cluster.calls("Fetch")}
    assert fetched_from == {1, 2}
    epochs = [r.topics[0].partitions[0].current_leader_epoch for b, r in cluster.calls("Fetch")]
    assert epochs[0] == 0 and epochs[-1] == 1


def test_retriable_fetch_errors_are_retried(cluster):
    fill(cluster, TP0, 2)
    cluster.fail_fetch("t", 0, common_pb2.LEADER_NOT_AVAILABLE, common_pb2.KAFKA_STORAGE_ERROR)
    with consumer(cluster, auto_offset_reset="earliest") as c:
        c.assign([TP0])
        assert values(poll_all(c, 2)) == [b"0", b"1"]


def test_a_long_poll_returns_records_that_arrive_while_it_waits(cluster):
    with consumer(cluster, fetch_max_wait_ms=5000) as c:
        c.assign([TP0])
        assert c.position(TP0) == 0
        fetches = len(cluster.calls("Fetch"))
        writer = threading.Thread(
            target=lambda: (cluster.wait_for_calls("Fetch", fetches + 1), fill(cluster, TP0, 1))
        )
        writer.start()
        try:
            assert values(c.poll(timeout_ms=5000)[TP0]) == [b"0"]
        finally:
            writer.join(5)


def test_iteration_stops_after_consumer_timeout(cluster):
    fill(cluster, TP0, 4)
    with consumer(cluster, auto_offset_reset="earliest", consumer_timeout_ms=100) as c:
        c.assign([TP0])
        assert [r.offset for r in c] == [0, 1, 2, 3]


def test_closed_consumer_refuses_calls(cluster):
    c = Consumer(cluster.bootstrap, **FAST)
    c.close()
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.poll()


def test_an_idle_poll_waits_instead_of_spinning(cluster):
    cluster.fail_fetch("t", 0, common_pb2.NOT_LEADER_OR_FOLLOWER)
    with consumer(cluster, fetch_max_wait_ms=100) as c:
        c.assign([TP0])
        assert c.position(TP0) == 0
        assert c.poll(timeout_ms=500) == {}
    # One answered at once with the error, then long polls of 100 ms: not hundreds.
    assert len(cluster.calls("Fetch")) <= 8


def test_answers_for_an_earlier_assignment_are_dropped(cluster):
    fill(cluster, TP0, 5)
    with consumer(cluster, fetch_max_wait_ms=5000) as c:
        c.assign([TP0])
        c.seek(TP0, 5)  # At the end: the fetch waits.
        assert c.poll(timeout_ms=0) == {}
        cluster.wait_for_calls("Fetch", 1)
        c.assign([])
        c.assign([TP0])
        c.seek(TP0, 1)
        fill(cluster, TP0, 1)  # Answers the old fetch (from offset 5) at once.
        records = poll_all(c, 5)
        assert [r.offset for r in records] == [1, 2, 3, 4, 5]


def test_a_corrupt_answer_raises_and_the_next_poll_fetches_again(cluster):
    fill(cluster, TP0, 3)
    state = cluster.partitions[("t", 0)]
    base, last, ts, data = state.batches[0]
    state.batches[0] = (base, last, ts, data[:-1] + bytes([data[-1] ^ 1]))
    with consumer(cluster, auto_offset_reset="earliest") as c:
        c.assign([TP0])
        with pytest.raises(CorruptRecordError, match="t-0: batch at offset 0: CRC-32C"):
            poll_all(c, 1)
        state.batches[0] = (base, last, ts, data)
        assert values(poll_all(c, 3)) == [b"0", b"1", b"2"]


def test_paused_partitions_return_nothing_until_resumed(cluster):
    fill(cluster, TP0, 4)
    fill(cluster, TP1, 4)
    with consumer(cluster, auto_offset_reset="earliest") as c:
        c.assign([TP0, TP1])
        c.pause(TP1)
        assert c.paused() == {TP1}
        records = poll_all(c, 4)
        assert {r.partition for r in records} == {0}
        assert c.poll(timeout_ms=100) == {}
        c.resume(TP1)
        assert {r.partition for r in poll_all(c, 4)} == {1}
        with pytest.raises(ValueError, match="not assigned"):
            c.pause(TopicPartition("other", 0))


def test_commit_async_commits_in_order_and_calls_back(cluster):
    fill(cluster, TP0, 6)
    with consumer(
        cluster, group_id="async", auto_offset_reset="earliest", enable_auto_commit=False
    ) as c:
        c.assign([TP0])
        poll_all(c, 6)
        seen: list[tuple[dict[Any, int], Any]] = []
        c.commit_async({TP0: 3}, callback=lambda offsets, error: seen.append((offsets, error)))
        last = c.commit_async(callback=lambda offsets, error: seen.append((offsets, error)))
        last.result(timeout=10)
        assert seen == [({TP0: 3}, None), ({TP0: 6}, None)]
        assert c.committed(TP0) == 6
