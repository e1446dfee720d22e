"""The leader's bookkeeping for a follower's fetch session (broker/fetch_session.py)."""

from __future__ import annotations

from raftka.v1 import broker_pb2

from broker.fetch_session import FetchSession


class FakePartition:
    def __init__(self, topic: str, index: int):
        self.topic = topic
        self.index = index
        self.waiters: set = set()

    def add_waiter(self, waiter) -> None:
        self.waiters.add(waiter)

    def remove_waiter(self, waiter) -> None:
        self.waiters.discard(waiter)

    def change(self) -> None:
        for waiter in list(self.waiters):
            waiter.notify(self)


def request(offsets: dict[tuple[str, int], int], incremental: bool) -> broker_pb2.FetchRequest:
    by_topic: dict[str, list[broker_pb2.FetchPartition]] = {}
    for (topic, index), offset in offsets.items():
        by_topic.setdefault(topic, []).append(
            broker_pb2.FetchPartition(partition=index, fetch_offset=offset)
        )
    return broker_pb2.FetchRequest(
        replica_id=2,
        incremental=incremental,
        topics=[broker_pb2.FetchTopic(topic=t, partitions=ps) for t, ps in by_topic.items()],
    )


def answer(hw: int, records: bytes = b"") -> broker_pb2.FetchPartitionResponse:
    return broker_pb2.FetchPartitionResponse(
        high_watermark=hw, log_start_offset=0, log_end_offset=hw, records=records
    )


def test_incremental_requests_update_only_what_they_list_and_a_full_one_starts_over():
    session = FetchSession(full_pass_s=1.0)
    assert not session.started
    assert session.take_request(request({("a", 0): 5, ("a", 1): 7}, False)) == [("a", 0), ("a", 1)]
    assert session.started and session.replica_id == 2
    assert session.take_request(request({("a", 1): 9}, True)) == [("a", 1)]
    assert {k: p.fetch_offset for k, (_, p) in session.asked.items()} == {("a", 0): 5, ("a", 1): 9}
    session.take_request(request({("b", 0): 1}, False))
    assert list(session.asked) == [("b", 0)]


def test_an_unchanged_partition_is_told_once_and_errors_always():
    session = FetchSession(full_pass_s=1.0)
    key = ("a", 0)
    assert session.should_tell(key, answer(10), listed=False)
    assert not session.should_tell(key, answer(10), listed=False)
    assert session.should_tell(key, answer(10), listed=True)
    assert session.should_tell(key, answer(10, b"x"), listed=False)
    assert session.should_tell(key, answer(11), listed=False)
    failed = answer(11)
    failed.error.code = 6
    assert session.should_tell(key, failed, listed=False)
    # After an error the partition is told again in full once it recovers.
    assert session.should_tell(key, answer(11), listed=False)


def test_the_waiter_follows_the_partition_hosted_under_a_key_and_leaves_on_close():
    session = FetchSession(full_pass_s=1.0)
    session.take_request(request({("a", 0): 0, ("a", 1): 0}, False))
    first, other = FakePartition("a", 0), FakePartition("a", 1)
    session.watch(("a", 0), first)
    session.watch(("a", 1), other)
    other.change()
    assert session.changed() == {("a", 1)}
    assert session.changed() == set()
    replaced = FakePartition("a", 0)
    session.watch(("a", 0), replaced)
    assert not first.waiters and replaced.waiters == {session.waiter}
    FakePartition("z", 9).add_waiter(session.waiter)  # Not in the session: ignored.
    session.close()
    assert not replaced.waiters and not other.waiters and not session.started


def test_a_full_pass_is_due_on_the_first_fetch_then_every_interval():
    session = FetchSession(full_pass_s=0.5)
    session.take_request(request({("a", 0): 0}, False))
    assert session.full_pass_due(100.0)
    assert not session.full_pass_due(100.4)
    assert session.full_pass_due(100.5)
