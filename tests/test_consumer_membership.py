"""Consumer group membership against fake brokers whose coordinator is the real group
state machine (``broker.group.ClassicGroup``): subscribe, rebalances, listeners, leaving,
max.poll.interval, member commits, coordinator moves, pattern subscriptions.

Every consumer is polled from the test's thread, one after the other, so the order of
callbacks is the order of events; ``Owners`` fails a test as soon as a partition is
assigned to a consumer while another one still owns it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from fake_broker import FakeCluster
from raftka.v1 import common_pb2

from broker.group import GroupState
from broker.record_batch import Record, encode_batch
from client import Consumer, TopicPartition
from client._membership import make_listener
from client.consumer import ConsumerRebalanceListener
from client.errors import CommitFailedError

FAST = {
    "fetch_max_wait_ms": 50,
    "retry_backoff_ms": 10,
    "request_timeout_ms": 2000,
    "auto_offset_reset": "earliest",
}
GROUP = {
    "group_id": "g",
    "session_timeout_ms": 10000,
    "heartbeat_interval_ms": 50,
    "max_poll_interval_ms": 3000,
}


def tps(topic: str, *partitions: int) -> set[TopicPartition]:
    return {TopicPartition(topic, p) for p in partitions}


class Member:
    """A consumer with a name and the listener calls it got: (kind, partitions)."""

    def __init__(self, name: str, consumer: Consumer):
        self.name = name
        self.consumer = consumer
        self.events: list[tuple[str, frozenset[TopicPartition]]] = []
        self.records: list[tuple[int, int]] = []

    def poll(self) -> None:
        for records in self.consumer.poll(timeout_ms=10).values():
            self.records += [(r.partition, r.offset) for r in records]

    def calls(self, kind: str) -> list[frozenset[TopicPartition]]:
        return [partitions for k, partitions in self.events if k == kind]

    def owns(self) -> set[TopicPartition]:
        return self.consumer.assignment()


class Owners:
    """Who owns each partition, by the listeners' account."""

    def __init__(self) -> None:
        self.owner: dict[TopicPartition, str] = {}

    def listener(self, member: Member) -> dict[str, Callable[[set[TopicPartition]], None]]:
        def assigned(partitions: set[TopicPartition]) -> None:
            member.events.append(("assigned", frozenset(partitions)))
            for tp in partitions:
                other = self.owner.get(tp)
                assert other is None, f"{tp} assigned to {member.name}, {other} owns it"
                self.owner[tp] = member.name

        def revoked(partitions: set[TopicPartition]) -> None:
            member.events.append(("revoked", frozenset(partitions)))
            self._release(member, partitions)

        def lost(partitions: set[TopicPartition]) -> None:
            member.events.append(("lost", frozenset(partitions)))
            self._release(member, partitions)

        return {
            "on_partitions_assigned": assigned,
            "on_partitions_revoked": revoked,
            "on_partitions_lost": lost,
        }

    def _release(self, member: Member, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            if self.owner.get(tp) == member.name:
                del self.owner[tp]


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    with FakeCluster(brokers=2, workers=32) as fake:
        fake.create_topic("t", 6)
        yield fake


@pytest.fixture
def members(cluster: FakeCluster) -> Iterator[Callable[..., Member]]:
    """Makes subscribed members; closes them all at the end."""
    owners = Owners()
    with ExitStack() as stack:

        def make(name: str, topics: Any = ("t",), strict: bool = True, **options: Any) -> Member:
            consumer = Consumer(cluster.bootstrap, **{**FAST, **GROUP, **options})
            stack.callback(consumer.close)
            member = Member(name, consumer)
            listener = owners.listener(member) if strict else Owners().listener(member)
            if isinstance(topics, str):
                consumer.subscribe(pattern=topics, **listener)
            else:
                consumer.subscribe(topics, **listener)
            return member

        yield make


def poll_until(members: list[Member], condition: Callable[[], bool], timeout_s: float = 8.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for member in members:
            member.poll()
        if condition():
            return
    owned = {m.name: sorted(m.owns()) for m in members}
    raise AssertionError(f"not reached in {timeout_s} s; assignments: {owned}")


def split(members: list[Member], *sizes: int, topic: str = "t") -> Callable[[], bool]:
    """The members own these many partitions each, and every partition of the topic."""

    def check() -> bool:
        owned = [m.owns() for m in members]
        every = set().union(*owned)
        count = sum(sizes)
        return sorted(map(len, owned)) == sorted(sizes) and every == tps(topic, *range(count))

    return check


def fill(cluster: FakeCluster, topic: str, partitions: int, per_partition: int) -> None:
    for p in range(partitions):
        batch = [Record(b"k", b"%d" % i, (), 1_700_000_000_000) for i in range(per_partition)]
        cluster.append(topic, p, encode_batch(batch))


def stable(cluster: FakeCluster) -> Callable[[], bool]:
    return lambda: cluster.describe_group("g").state is GroupState.STABLE


def test_a_single_member_gets_every_partition_and_commits_as_a_member(cluster, members):
    fill(cluster, "t", 6, 5)
    a = members("a")
    poll_until([a], lambda: len(a.records) == 30)
    assert a.owns() == tps("t", *range(6))
    assert a.events == [("assigned", frozenset(tps("t", *range(6))))]
    joins = [request for _, request in cluster.calls("JoinGroup")]
    # KIP-394: the first JoinGroup has no member id and gets one to join with.
    assert joins[0].member_id == "" and joins[1].member_id.startswith("consumer-g-")
    assert [p.name for p in joins[0].protocols] == ["range", "cooperative-sticky"]
    metadata = a.consumer.group_metadata()
    assert metadata.member_id == joins[1].member_id and metadata.generation_id == 1

    a.consumer.commit()
    commit = cluster.calls("OffsetCommit")[-1][1]
    assert (commit.member_id, commit.generation_id) == (metadata.member_id, 1)
    assert cluster.committed["g"] == {("t", p): (5, -1, "") for p in range(6)}
    assert a.consumer.committed(TopicPartition("t", 3)) == 5

    a.consumer.close()
    leave = cluster.calls("LeaveGroup")[-1][1]
    assert [m.member_id for m in leave.members] == [metadata.member_id]
    assert cluster.describe_group("g").state is GroupState.EMPTY
    assert a.events[-1] == ("revoked", frozenset(tps("t", *range(6))))


def test_range_splits_and_a_third_member_takes_its_share_without_sharing(cluster, members):
    fill(cluster, "t", 6, 20)
    a, b = members("a"), members("b")
    poll_until([a, b], split([a, b], 3, 3))
    before = {m.name: frozenset(m.owns()) for m in (a, b)}
    c = members("c")
    poll_until([a, b, c], lambda: split([a, b, c], 2, 2, 2)() and stable(cluster)())
    # Eager: a and b gave everything up before the new assignment (Owners checked the order).
    assert before["a"] in a.calls("revoked") and before["b"] in b.calls("revoked")
    poll_until([a, b, c], lambda: sum(len(m.records) for m in (a, b, c)) >= 120)
    consumed = [record for m in (a, b, c) for record in m.records]
    # Positions were committed before each revocation: nothing read twice.
    assert sorted(consumed) == [(p, o) for p in range(6) for o in range(20)]


def test_a_member_that_closes_leaves_and_the_others_take_over(cluster, members):
    a, b, c = members("a"), members("b"), members("c")
    poll_until([a, b, c], split([a, b, c], 2, 2, 2))
    started = time.monotonic()
    c.consumer.close()
    assert len(cluster.calls("LeaveGroup")) == 1
    poll_until([a, b], split([a, b], 3, 3))
    # Well within the 10 s session: the LeaveGroup, not an expiry, made it.
    assert time.monotonic() - started < 5


def test_cooperative_sticky_keeps_partitions_that_do_not_move(cluster, members):
    fill(cluster, "t", 6, 10)
    cooperative = {"partition_assignment_strategy": "cooperative-sticky"}
    a = members("a", **cooperative)
    poll_until([a], lambda: len(a.records) == 60)
    b = members("b", **cooperative)
    poll_until([a, b], lambda: split([a, b], 3, 3)() and stable(cluster)())
    moved = b.owns()
    # a gave up only what b got, and kept consuming the rest throughout.
    assert a.calls("revoked") == [frozenset(moved)]
    assert a.calls("assigned")[0] == frozenset(tps("t", *range(6)))
    assert all(not added for added in a.calls("assigned")[1:])
    # b got nothing until a gave the partitions up (if it synced that generation at all).
    assert b.calls("assigned")[-1] == moved and not any(b.calls("assigned")[:-1])
    assert not a.calls("lost") and not b.calls("revoked")
    # Two rebalances: one took the partitions away, the follow-up gave them to b.
    assert a.consumer.group_metadata().generation_id == 3
    fill(cluster, "t", 6, 1)
    poll_until([a, b], lambda: len(a.records) + len(b.records) == 66)
    assert sorted(a.records + b.records) == [(p, o) for p in range(6) for o in range(11)]


def test_a_member_that_stops_polling_leaves_and_later_joins_again(cluster, members):
    a = members("a", strict=False, max_poll_interval_ms=400)
    b = members("b", strict=False)
    poll_until([a, b], split([a, b], 3, 3))
    owned_by_a = a.owns()
    member_id = a.consumer.group_metadata().member_id
    poll_until([b], lambda: b.owns() == tps("t", *range(6)))  # a stalls meanwhile.
    leave = cluster.calls("LeaveGroup")[-1][1]
    assert [m.member_id for m in leave.members] == [member_id]
    assert a.consumer.group_metadata().generation_id == -1
    with pytest.raises(CommitFailedError, match="not part of an active group"):
        a.consumer.commit()
    poll_until([a, b], split([a, b], 3, 3))
    assert a.calls("lost") == [frozenset(owned_by_a)]
    assert a.consumer.group_metadata().member_id != member_id


def test_a_commit_from_an_old_generation_fails_and_the_member_rejoins(cluster, members):
    # A static member that is slow to notice a rebalance: heartbeats every 5 s only.
    # Until a finds out, a and b both own partitions 3 to 5: not strict.
    slow = {"group_instance_id": "a-1", "heartbeat_interval_ms": 5000}
    a = members("a", strict=False, max_poll_interval_ms=1000, **slow)
    poll_until([a], lambda: a.owns() == tps("t", *range(6)))
    b = members("b", strict=False, max_poll_interval_ms=1000)
    poll_until([b], lambda: cluster.describe_group("g").state is GroupState.PREPARING_REBALANCE)
    # The rebalance timeout passes without a: being static, it stays a member, but the
    # group moves to generation 2 without it.
    cluster.advance_clock(1500)
    poll_until([b], lambda: b.owns() == tps("t", 3, 4, 5))
    assert cluster.describe_group("g").generation_id == 2
    with pytest.raises(CommitFailedError) as info:
        a.consumer.commit()
    assert info.value.code == common_pb2.ILLEGAL_GENERATION
    commit = cluster.calls("OffsetCommit")[-1][1]
    assert (commit.generation_id, commit.group_instance_id) == (1, "a-1")
    poll_until([a, b], lambda: split([a, b], 3, 3)() and stable(cluster)())
    assert a.calls("lost") == [frozenset(tps("t", *range(6)))]
    # Its subscription unchanged, a rejoined generation 2 and got what b assigned it.
    assert a.consumer.group_metadata().generation_id == 2
    a.consumer.close()
    assert len(cluster.calls("LeaveGroup")) == 0  # Static members do not leave.


def test_a_member_carries_on_in_its_generation_when_the_coordinator_moves(cluster, members):
    a, b = members("a"), members("b")
    poll_until([a, b], lambda: split([a, b], 3, 3)() and stable(cluster)())
    generation = cluster.describe_group("g").generation_id
    joins = len(cluster.calls("JoinGroup"))
    heartbeats_before = len(cluster.calls("Heartbeat"))
    cluster.move_coordinator(2)  # It loads the stored group: same generation, same members.
    # The old coordinator answers NOT_COORDINATOR; both members find the new one and
    # heartbeat there with their member id and generation, without rejoining.
    poll_until(
        [a, b],
        lambda: (
            {
                (r.member_id, r.generation_id)
                for broker, r in cluster.calls("Heartbeat")[heartbeats_before:]
                if broker == 2
            }
            == {(m.consumer.group_metadata().member_id, generation) for m in (a, b)}
        ),
    )
    assert len(cluster.calls("JoinGroup")) == joins
    assert cluster.describe_group("g").generation_id == generation
    assert [m.consumer.group_metadata().generation_id for m in (a, b)] == [generation] * 2
    assert not a.calls("lost") and not b.calls("lost") and split([a, b], 3, 3)()
    # Their commits carry that generation and the new coordinator takes them.
    fill(cluster, "t", 6, 1)
    poll_until([a, b], lambda: len(a.records) + len(b.records) == 6)
    a.consumer.commit()
    broker, commit = cluster.calls("OffsetCommit")[-1]
    assert (broker, commit.generation_id) == (2, generation)


def test_a_coordinator_that_lost_the_group_is_found_again_and_joined(cluster, members):
    a = members("a", strict=False)
    poll_until([a], lambda: a.owns() == tps("t", *range(6)))
    cluster.move_coordinator(2, keep_membership=False)
    # The new coordinator does not know the member: it loses its partitions and joins.
    poll_until([a], lambda: bool(a.calls("lost")) and a.owns() == tps("t", *range(6)))
    assert cluster.describe_group("g").state is GroupState.STABLE
    finds = [broker for broker, _ in cluster.calls("FindCoordinator")]
    assert len(finds) >= 2
    assert {broker for broker, _ in cluster.calls("Heartbeat")} == {1, 2}


def test_a_pattern_subscription_picks_up_new_topics(cluster, members):
    cluster.create_topic("p-0", 2)
    cluster.create_topic("other", 1)
    a = members("a", topics=r"p-\d+", metadata_max_age_ms=100)
    poll_until([a], lambda: a.owns() == tps("p-0", 0, 1))
    cluster.create_topic("p-1", 1)
    poll_until([a], lambda: a.owns() == tps("p-0", 0, 1) | tps("p-1", 0))
    assert a.consumer.subscription() == {"p-0", "p-1"}


def test_listeners_from_objects_and_callables():
    calls: list[tuple[str, set[TopicPartition]]] = []

    class Revoking:
        def on_partitions_revoked(self, partitions):
            calls.append(("revoked", partitions))

    listener = make_listener(Revoking(), on_partitions_assigned=lambda p: calls.append(("a", p)))
    listener.on_partitions_assigned(tps("t", 0))
    listener.on_partitions_lost(tps("t", 1))  # Lost defaults to revoked, as in Kafka.
    assert calls == [("a", tps("t", 0)), ("revoked", tps("t", 1))]
    base = ConsumerRebalanceListener()
    assert make_listener(base) is base


def test_subscribe_and_assign_are_mutually_exclusive(cluster):
    with Consumer(cluster.bootstrap, **FAST) as no_group:
        with pytest.raises(ValueError, match="group_id"):
            no_group.subscribe(["t"])
    with Consumer(cluster.bootstrap, **FAST, **GROUP) as c:
        c.assign([TopicPartition("t", 0)])
        with pytest.raises(RuntimeError, match="mutually exclusive"):
            c.subscribe(["t"])
        c.unsubscribe()
        c.subscribe(["t"])
        assert c.subscription() == {"t"}
        with pytest.raises(RuntimeError, match="mutually exclusive"):
            c.assign([TopicPartition("t", 0)])
        with pytest.raises(ValueError, match="topics or a pattern"):
            c.subscribe(["t"], pattern="t")
        c.unsubscribe()
        assert c.subscription() == set()
        c.assign([TopicPartition("t", 0)])
    with pytest.raises(ValueError, match="partition_assignment_strategy"):
        Consumer(cluster.bootstrap, group_id="g", partition_assignment_strategy=["fair"])
    with pytest.raises(ValueError, match="heartbeat_interval_ms"):
        Consumer(cluster.bootstrap, group_id="g", heartbeat_interval_ms=50000)
    with pytest.raises(ValueError, match="group_instance_id"):
        Consumer(cluster.bootstrap, group_instance_id="i")
