"""The leader's bookkeeping for a follower's fetch session (broker/fetch_session.py)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from raftka.v1 import broker_pb2, common_pb2

from broker import fetcher as fetcher_module
from broker.fetch_session import FetchSession
from broker.fetcher import FetcherSettings, ReplicaFetcher, _Entry
from broker.partition import Partition, PartitionSettings, Waiter
from broker.record_batch import Record, encode_batch
from broker.replica_manager import ReplicaManager
from broker.storage.log import LogConfig, PartitionLog
from quorum.image import PartitionRegistration


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


# -- the leader's reads in a session, over real partitions ---------------------------


def leader_partition(root, topic: str) -> Partition:
    log_ = PartitionLog(root / f"{topic}-0", LogConfig(segment_bytes=1_000_000))
    partition = Partition(topic, 0, f"id-{topic}", log_, 1, PartitionSettings())
    partition.become_leader(PartitionRegistration((1, 2), (1, 2), 1, 0, 0), partition.settings)
    return partition


def manager(partitions: list[Partition]) -> ReplicaManager:
    """Only what fetch_in_session reads; the rest of a ReplicaManager is not needed."""
    rm = object.__new__(ReplicaManager)
    rm._partitions = {(p.topic, p.index): p for p in partitions}
    rm._isr_wake = threading.Event()
    rm._isr_due = set()
    rm._isr_due_lock = threading.Lock()
    rm.settings = SimpleNamespace(replica_lag_time_max_ms=30_000)
    rm._check_replica = lambda *args: None
    rm._image = lambda: SimpleNamespace(topic_by_name=lambda name: None)  # Knows no other.
    return rm


def fetch_request(offsets: dict[str, int], incremental: bool) -> broker_pb2.FetchRequest:
    return broker_pb2.FetchRequest(
        replica_id=2,
        replica_epoch=-1,
        max_wait_ms=0,
        min_bytes=1,
        max_bytes=300,  # Room for one of the 400-byte batches below.
        incremental=incremental,
        topics=[
            broker_pb2.FetchTopic(
                topic=topic,
                partitions=[
                    broker_pb2.FetchPartition(
                        partition=0,
                        current_leader_epoch=0,
                        fetch_offset=offset,
                        last_fetched_epoch=-1,
                        partition_max_bytes=1 << 20,
                    )
                ],
            )
            for topic, offset in offsets.items()
        ],
    )


def told(response: broker_pb2.FetchResponse) -> dict[str, int]:
    return {t.topic: len(p.records) for t in response.topics for p in t.partitions}


def test_a_partition_left_unread_for_lack_of_room_is_read_first_next_time(tmp_path):
    big, small = leader_partition(tmp_path, "a"), leader_partition(tmp_path, "b")
    for _ in range(3):
        big.append_as_leader(encode_batch([Record(None, b"x" * 400, (), 1000)]), acks=1)
    rm = manager([big, small])
    session = rm.new_fetch_session()
    first = rm.fetch_in_session(session, fetch_request({"a": 0, "b": 0}, False))
    assert first.in_session and list(told(first)) == ["a"]  # b had no room: not told.
    small.append_as_leader(encode_batch([Record(None, b"acked", (), 1000)]), acks=1)
    # The follower lists only a, whose position moved; b must not wait for a full pass.
    second = rm.fetch_in_session(session, fetch_request({"a": 1}, True))
    assert told(second)["b"] > 0
    assert small.followers[2].log_end_offset == 0  # Its fetch was counted.
    session.close()
    assert not big._waiters and not small._waiters


def test_a_partition_the_leader_did_not_host_yet_is_read_again_until_it_is(tmp_path):
    """A follower may ask about a new topic before its leader has applied it. Its
    incremental requests list only partitions whose position moved, and nothing can
    wake the session for a partition that did not exist: the leader must read it
    again on every fetch, or the follower replicates it only at the next full pass
    (7.5 s; an acks=all write to a new topic waited that long)."""
    early = leader_partition(tmp_path, "a")
    rm = manager([early])
    session = rm.new_fetch_session()
    first = rm.fetch_in_session(session, fetch_request({"a": 0, "b": 0}, False))
    errors = {t.topic: p.error.code for t in first.topics for p in t.partitions}
    assert common_pb2.ErrorCode.Name(errors["b"]) == "UNKNOWN_TOPIC_OR_PARTITION"
    # Still unknown: told again (the follower keeps backing off).
    again = rm.fetch_in_session(session, fetch_request({}, True))
    assert common_pb2.ErrorCode.Name(again.topics[0].partitions[0].error.code) == (
        "UNKNOWN_TOPIC_OR_PARTITION"
    )
    late = leader_partition(tmp_path, "b")
    rm._partitions[("b", 0)] = late
    late.append_as_leader(encode_batch([Record(None, b"acked", (), 1000)]), acks=1)
    session._next_full_pass = float("inf")  # A full pass is not what finds it.
    found = rm.fetch_in_session(session, fetch_request({}, True))
    assert told(found)["b"] > 0
    assert late.followers[2].log_end_offset == 0  # Its fetch was counted.
    assert session.waiter in late._waiters and not session.unhosted
    session.close()
    assert not early._waiters and not late._waiters


def test_an_incremental_fetch_from_anyone_but_the_sessions_follower_is_refused(tmp_path):
    """After follower 2's full request started the session, an incremental request
    from a consumer or from another follower is refused, and the session starts over
    (a consumer's reads are never a session's, and positions are per follower)."""
    rm = manager([leader_partition(tmp_path, "a")])
    for intruder in (-1, 3):
        session = rm.new_fetch_session()
        assert rm.fetch_in_session(session, fetch_request({"a": 0}, False)).in_session
        request = fetch_request({"a": 0}, True)
        request.replica_id = intruder
        refused = rm.fetch_in_session(session, request)
        assert common_pb2.ErrorCode.Name(refused.error.code) == "INVALID_REQUEST"
        assert not refused.in_session and not session.started
        # Follower 2's own incremental now needs a full request first, too.
        again = rm.fetch_in_session(session, fetch_request({"a": 0}, True))
        assert common_pb2.ErrorCode.Name(again.error.code) == "INVALID_REQUEST"
        session.close()


# -- the follower's side: which positions it reads ------------------------------------


class PositionedPartition:
    """A followed partition whose position the test moves; counts its reads."""

    def __init__(self, topic: str):
        self.topic = topic
        self.index = 0
        self.topic_id = f"id-{topic}"
        self.offset = 0
        self.reads = 0

    def fetch_position(self) -> tuple[int, int, int]:
        self.reads += 1
        return self.offset, -1, 0


def listed(request: broker_pb2.FetchRequest) -> dict[str, int]:
    return {t.topic: p.fetch_offset for t in request.topics for p in t.partitions}


def test_between_scans_a_follower_reads_only_the_positions_its_last_answer_touched():
    fetcher = object.__new__(ReplicaFetcher)
    fetcher.broker_id = 2
    fetcher.settings = FetcherSettings()
    fetcher._broker_epoch = lambda: 7
    parts = {("a", 0): PositionedPartition("a"), ("b", 0): PositionedPartition("b")}
    entries = {key: _Entry(p, leader_epoch=0) for key, p in parts.items()}
    session = SimpleNamespace(sent=None, touched=set(), relist=set(), next_scan=0.0)

    first, _ = fetcher._build_request(entries, session)
    assert not first.incremental and listed(first) == {"a": 0, "b": 0}
    assert [p.reads for p in parts.values()] == [1, 1]
    # The answer held a; both moved, but only a's position is read before the scan.
    parts[("a", 0)].offset = parts[("b", 0)].offset = 5
    session.touched = {("a", 0)}
    second, _ = fetcher._build_request(entries, session)
    assert second.incremental and listed(second) == {"a": 5}
    assert [p.reads for p in parts.values()] == [2, 1]
    # Nothing touched, nothing listed; at the scan every position is read again.
    third, _ = fetcher._build_request(entries, session)
    assert third.incremental and listed(third) == {}
    # Touched but not moved (an answer with only a high watermark): read, not listed.
    session.touched = {("a", 0)}
    fourth, _ = fetcher._build_request(entries, session)
    assert fourth.incremental and listed(fourth) == {}
    assert [p.reads for p in parts.values()] == [3, 1]
    session.next_scan = 0.0
    scanned, _ = fetcher._build_request(entries, session)
    assert scanned.incremental and listed(scanned) == {"b": 5}
    assert [p.reads for p in parts.values()] == [4, 2]


def bare_fetcher() -> ReplicaFetcher:
    """A fetcher of broker 2 from broker 1 without a thread, a channel or entries."""
    fetcher = object.__new__(ReplicaFetcher)
    fetcher.broker_id = 2
    fetcher.source_id = 1
    fetcher.settings = FetcherSettings()
    fetcher._broker_epoch = lambda: 7
    fetcher._lock = threading.Lock()
    return fetcher


def test_a_partition_answered_with_an_error_is_listed_again_after_its_back_off():
    """The follower's side of the same hole: a partition whose answer was an error
    has not moved, so an incremental request would not list it and the leader,
    which may hold no waiter on it, would not read it again until its full pass."""
    fetcher = bare_fetcher()
    parts = {("a", 0): PositionedPartition("a"), ("b", 0): PositionedPartition("b")}
    entries = {key: _Entry(p, leader_epoch=0) for key, p in parts.items()}
    fetcher._entries = dict(entries)
    session = SimpleNamespace(sent=None, touched=set(), relist=set(), next_scan=0.0)
    fetcher._session = session
    fetcher._build_request(entries, session)
    unknown = broker_pb2.FetchPartitionResponse(partition=0)
    unknown.error.code = common_pb2.UNKNOWN_TOPIC_OR_PARTITION
    response = broker_pb2.FetchResponse(
        in_session=True, topics=[broker_pb2.FetchTopicResponse(topic="b", partitions=[unknown])]
    )
    fetcher._handle(response, entries)
    assert entries[("b", 0)].delayed_until > 0  # Backed off...
    again, _ = fetcher._build_request(entries, session)
    assert again.incremental and listed(again) == {"b": 0}  # ...then asked for again,
    then, _ = fetcher._build_request(entries, session)
    assert listed(then) == {}  # once.


def test_a_fetch_is_held_no_longer_than_a_backed_off_partition_waits():
    """While a partition backs off (a new topic its leader did not host yet), the
    others' fetch is held by the leader until there is data or max_wait_ms (500 ms):
    the backed-off one would wait that long to be asked for again. The request's
    max_wait_ms is cut to when it is due (a new topic's first acks=all writes took
    400-520 ms in 7 of 20 tries on a warm cluster, and at most 38 ms in 40 after)."""
    fetcher = bare_fetcher()
    fetcher._wake = threading.Event()
    fetcher._stopped = threading.Event()
    fetcher._generation = 0
    fetcher._last_rpc_error = None
    fetcher.fetches = 0
    sent: list[broker_pb2.FetchRequest] = []
    session = SimpleNamespace(
        sent=None,
        touched=set(),
        relist=set(),
        next_scan=0.0,
        closed=False,
        exchange=lambda request: sent.append(request) or broker_pb2.FetchResponse(in_session=True),
    )
    fetcher._session = session
    parts = {("a", 0): PositionedPartition("a"), ("b", 0): PositionedPartition("b")}
    fetcher._entries = {key: _Entry(p, leader_epoch=0) for key, p in parts.items()}
    fetcher._fetch_once()
    assert sent[-1].max_wait_ms == 500 and listed(sent[-1]) == {"a": 0, "b": 0}
    fetcher._entries[("b", 0)].delayed_until = time.monotonic() + 0.2
    fetcher._fetch_once()
    assert listed(sent[-1]) == {"a": 0}
    assert 1 <= sent[-1].max_wait_ms <= 200


def test_a_partition_that_keeps_failing_backs_off_longer_each_time(monkeypatch):
    """100 ms after a first error (a new topic is soon hosted), doubling up to 1 s
    while errors go on, and back to 100 ms once an answer is appended: a partition
    that keeps failing must not turn every other request into a full one."""
    monkeypatch.setattr(fetcher_module, "time", SimpleNamespace(monotonic=lambda: 100.0))
    fetcher = bare_fetcher()
    fetcher._session = None
    partition = PositionedPartition("a")
    partition.append_as_follower = lambda *args: None
    entry = _Entry(partition, leader_epoch=0)
    waits = []
    for _ in range(6):
        fetcher._delay({("a", 0): entry}, 100)
        waits.append(round(entry.delayed_until - 100.0, 3))
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    fetcher._handle_partition(entry, broker_pb2.FetchPartitionResponse(partition=0))
    fetcher._delay({("a", 0): entry}, 100)
    assert round(entry.delayed_until - 100.0, 3) == 0.1


class _SignallingWaiter(Waiter):
    """Sets ``entered`` each time a fetch starts waiting on it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()

    def wait(self, timeout_s: float) -> bool:
        self.entered.set()
        return super().wait(timeout_s)


def test_a_moved_high_watermark_does_not_wake_a_follower_but_goes_in_its_answer(tmp_path):
    """While follower 2's fetch waits for data, follower 3's fetch moves the high
    watermark: follower 2 is not woken for it (Kafka's leader holds a follower's fetch
    until there is data), and its answer at the end of the wait tells the new one."""
    log_ = PartitionLog(tmp_path / "a-0", LogConfig(segment_bytes=1_000_000))
    leader = Partition("a", 0, "id-a", log_, 1, PartitionSettings())
    leader.become_leader(PartitionRegistration((1, 2, 3), (1, 2, 3), 1, 0, 0), leader.settings)
    rm = manager([leader])
    session = rm.new_fetch_session()
    waiter = session.waiter
    session.waiter = _SignallingWaiter(waiter.wakes, notes=waiter.notes)
    leader.append_as_leader(encode_batch([Record(None, b"v", (), 1000)]), acks=-1)
    first = rm.fetch_in_session(session, fetch_request({"a": 0}, False))
    assert told(first) == {"a": len(log_.read(0, 1 << 20))}
    waiting = fetch_request({"a": 1}, True)  # Follower 2 has the record now.
    waiting.max_wait_ms = 300
    result: list[broker_pb2.FetchResponse] = []
    fetch = threading.Thread(target=lambda: result.append(rm.fetch_in_session(session, waiting)))
    fetch.start()
    assert session.waiter.entered.wait(10)
    assert leader.high_watermark == 0
    for offset in (0, 1):  # Follower 3 fetches the record, then reports it.
        leader.read_for_follower(3, offset, -1, 0, 0, 1 << 20, update_state=True)
    assert leader.high_watermark == 1
    assert not session.waiter.event.is_set()
    fetch.join(10)
    assert not fetch.is_alive()
    (answer,) = [p for t in result[0].topics for p in t.partitions]
    assert answer.high_watermark == 1 and answer.records == b""
    # New data wakes it at once, long before its wait would end.
    waiting = fetch_request({"a": 1}, True)
    waiting.max_wait_ms = 60_000
    result.clear()
    session.waiter.entered.clear()
    fetch = threading.Thread(target=lambda: result.append(rm.fetch_in_session(session, waiting)))
    fetch.start()
    assert session.waiter.entered.wait(10)
    leader.append_as_leader(encode_batch([Record(None, b"w", (), 1000)]), acks=-1)
    fetch.join(10)
    assert not fetch.is_alive() and told(result[0])["a"] > 0
    session.close()
