"""Committed offsets over real processes: stored in __consumer_offsets by the group's
coordinator, read back after a restart of the consumer and after the coordinator dies."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import running_cluster
from dataplane import stub, wait_until
from raftka.v1 import broker_pb2

from broker.coordinator import OFFSETS_TOPIC, partition_for
from client import Admin, Consumer, Producer, TopicPartition

pytestmark = pytest.mark.integration

OFFSETS_PARTITIONS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(
        tmp_path_factory.mktemp("groups"),
        controllers=3,
        brokers=3,
        overrides={
            "broker.session.timeout.ms": 3000,
            "broker.heartbeat.interval.ms": 250,
            "offsets.topic.num.partitions": OFFSETS_PARTITIONS,
            "group.initial.rebalance.delay.ms": 100,
            "group.min.session.timeout.ms": 1000,
        },
    ) as cluster:
        yield cluster


@pytest.fixture
def admin(cluster):
    with Admin(cluster.bootstrap, timeout_s=10.0) as admin:
        yield admin
    cluster.start()
    cluster.wait_ready(timeout_s=60)


def brokers(admin: Admin) -> str:
    return ",".join(b.address for b in admin.describe_cluster().brokers if not b.fenced)


def topic_with_records(admin: Admin, name: str, records: int) -> list[TopicPartition]:
    admin.create_topic(name, 2, 3, {"min.insync.replicas": "2"})
    with Producer(brokers(admin), acks="all") as producer:
        for i in range(records):
            producer.send(name, b"%s-%d" % (name.encode(), i), partition=i % 2)
        producer.flush(timeout=30)
    return [TopicPartition(name, 0), TopicPartition(name, 1)]


def read(consumer: Consumer, count: int) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []

    def more() -> bool:
        for records in consumer.poll(200, max_records=count - len(got)).values():
            got.extend((r.partition, r.offset) for r in records)
        return len(got) >= count

    wait_until(f"{count} records", more, timeout_s=30)
    return got


def test_a_consumer_resumes_from_the_committed_offsets(cluster, admin):
    tps = topic_with_records(admin, "resume", 40)
    with Consumer(
        brokers(admin), group_id="resumers", auto_offset_reset="earliest", enable_auto_commit=False
    ) as first:
        first.assign(tps)
        assert len(read(first, 10)) == 10
        first.commit()
        positions = {tp: first.position(tp) for tp in tps}
    assert sum(positions.values()) == 10
    with Consumer(brokers(admin), group_id="resumers", auto_offset_reset="earliest") as second:
        second.assign(tps)
        assert {tp: second.committed(tp) for tp in tps} == positions
        rest = read(second, 30)
        assert all(offset >= positions[TopicPartition("resume", p)] for p, offset in rest)
        assert len(set(rest)) == 30
    # Auto commit on close stored the end.
    with Consumer(brokers(admin), group_id="resumers") as third:
        assert sum(third.committed(tp) or 0 for tp in tps) == 40


def test_committed_offsets_survive_the_coordinators_death(cluster, admin):
    tps = topic_with_records(admin, "survive", 20)
    group = "survivors"
    with Consumer(brokers(admin), group_id=group, enable_auto_commit=False) as consumer:
        consumer.assign(tps)
        consumer.commit({tps[0]: 7, tps[1]: 9})
    index = partition_for(group, OFFSETS_PARTITIONS)
    coordinator = admin.describe_topic(OFFSETS_TOPIC).partitions[index].leader
    cluster.kill(coordinator)
    started = time.monotonic()
    with Consumer(brokers(admin), group_id=group, enable_auto_commit=False) as consumer:
        consumer.assign(tps)
        assert consumer.committed(tps[0]) == 7 and consumer.committed(tps[1]) == 9
        consumer.commit({tps[0]: 8, tps[1]: 10})
        took_s = time.monotonic() - started
        assert consumer.committed(tps[0]) == 8
    # Found again and written within the coordinator's failover (connection-loss
    # fencing takes about half a second; the load is small).
    assert took_s < 10, took_s
    new_coordinator = admin.describe_topic(OFFSETS_TOPIC).partitions[index].leader
    assert new_coordinator != coordinator


def test_cli_consume_with_a_group_commits_what_it_printed(cluster, admin):
    topic_with_records(admin, "cli-group", 10)
    any_broker = admin.describe_cluster().brokers[0].broker_id
    assert stub(cluster, any_broker).ListGroups(broker_pb2.ListGroupsRequest(), timeout=5)
    servers = brokers(admin)

    def raftka(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args, "-b", servers],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    first = raftka(
        "consume", "cli-group", "--group", "g", "--from-beginning", "--max-messages", "4"
    )
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 4
    described = raftka("group", "describe", "g", "--json")
    assert described.returncode == 0, described.stderr
    offsets = json.loads(described.stdout)["offsets"]
    assert sum(row["committed_offset"] for row in offsets) == 4
    assert all(row["lag"] == row["log_end_offset"] - row["committed_offset"] for row in offsets)
    # Partitions the group never committed start as --from-beginning says.
    rest = raftka("consume", "cli-group", "-g", "g", "--from-beginning", "--timeout-ms", "2000")
    assert len(rest.stdout.splitlines()) == 6, rest.stderr
    reset = raftka("group", "reset-offsets", "g", "--topic", "cli-group", "--to-earliest")
    assert reset.returncode == 0, reset.stderr
    again = raftka("consume", "cli-group", "--group", "g", "--timeout-ms", "2000")
    assert len(again.stdout.splitlines()) == 10
    assert raftka("group", "delete", "g").returncode == 0
    listed = json.loads(raftka("group", "list", "--json").stdout)
    assert "g" not in [row["group"] for row in listed]


def _coordinator_stub(cluster, admin: Admin, group: str):
    with Consumer(brokers(admin), group_id=group) as consumer:
        assert consumer._group is not None
        address = consumer._group.coordinator()
    node = next(n for n in cluster.status() if f"{n.host}:{n.rpc_port}" == address)
    return stub(cluster, node.id)


def _join(coordinator, group: str, member_id: str = "") -> broker_pb2.JoinGroupResponse:
    return coordinator.JoinGroup(
        broker_pb2.JoinGroupRequest(
            group_id=group,
            session_timeout_ms=10_000,
            rebalance_timeout_ms=5_000,
            member_id=member_id,
            protocol_type="consumer",
            protocols=[broker_pb2.JoinGroupProtocol(name="range", metadata=b"m")],
            client_id="test",
        ),
        timeout=30,
    )


def test_members_join_sync_heartbeat_and_commit_by_generation(cluster, admin):
    from concurrent.futures import ThreadPoolExecutor

    from raftka.v1 import common_pb2

    group = "members"
    coordinator = _coordinator_stub(cluster, admin, group)
    # KIP-394: the first join gets a member id to come back with.
    first = _join(coordinator, group)
    assert first.error.code == common_pb2.MEMBER_ID_REQUIRED and first.member_id
    second = _join(coordinator, group)
    with ThreadPoolExecutor(2) as pool:
        joins = list(
            pool.map(lambda m: _join(coordinator, group, m), [first.member_id, second.member_id])
        )
    assert all(j.error.code == common_pb2.NONE for j in joins), joins
    generation = joins[0].generation_id
    assert {j.generation_id for j in joins} == {generation} and generation >= 1
    leader = next(j for j in joins if j.leader == j.member_id)
    follower = next(j for j in joins if j.leader != j.member_id)
    assert sorted(m.member_id for m in leader.members) == sorted(
        [first.member_id, second.member_id]
    )

    def sync(member: str, assignments=()) -> broker_pb2.SyncGroupResponse:
        return coordinator.SyncGroup(
            broker_pb2.SyncGroupRequest(
                group_id=group,
                generation_id=generation,
                member_id=member,
                assignments=list(assignments),
            ),
            timeout=30,
        )

    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(sync, follower.member_id)
        plan = [
            broker_pb2.SyncGroupAssignment(member_id=leader.member_id, assignment=b"A"),
            broker_pb2.SyncGroupAssignment(member_id=follower.member_id, assignment=b"B"),
        ]
        assert sync(leader.member_id, plan).assignment == b"A"
        assert waiting.result(timeout=30).assignment == b"B"
    beat = coordinator.Heartbeat(
        broker_pb2.HeartbeatRequest(
            group_id=group, generation_id=generation, member_id=follower.member_id
        ),
        timeout=10,
    )
    assert beat.error.code == common_pb2.NONE
    described = coordinator.DescribeGroups(broker_pb2.DescribeGroupsRequest(group_ids=[group]))
    assert described.groups[0].state == "Stable" and len(described.groups[0].members) == 2

    def commit(member: str, gen: int) -> int:
        answer = coordinator.OffsetCommit(
            broker_pb2.OffsetCommitRequest(
                group_id=group,
                generation_id=gen,
                member_id=member,
                topics=[
                    broker_pb2.OffsetCommitTopic(
                        topic="t",
                        partitions=[
                            broker_pb2.OffsetCommitPartition(partition=0, committed_offset=5)
                        ],
                    )
                ],
            ),
            timeout=10,
        )
        return answer.topics[0].partitions[0].error.code

    assert commit(follower.member_id, generation) == common_pb2.NONE
    assert commit(follower.member_id, generation - 1) == common_pb2.ILLEGAL_GENERATION
    assert commit("stranger", generation) == common_pb2.UNKNOWN_MEMBER_ID
    # A member leaves: the other is told to rejoin on its next heartbeat.
    left = coordinator.LeaveGroup(
        broker_pb2.LeaveGroupRequest(
            group_id=group, members=[broker_pb2.MemberIdentity(member_id=leader.member_id)]
        ),
        timeout=10,
    )
    assert left.error.code == common_pb2.NONE
    beat = coordinator.Heartbeat(
        broker_pb2.HeartbeatRequest(
            group_id=group, generation_id=generation, member_id=follower.member_id
        ),
        timeout=10,
    )
    assert beat.error.code == common_pb2.REBALANCE_IN_PROGRESS


_MEMBER_SCRIPT = """
import sys, time
from client import Consumer
consumer = Consumer(sys.argv[1], group_id=sys.argv[2], session_timeout_ms=3000,
                    heartbeat_interval_ms=300, auto_offset_reset="earliest")
consumer.subscribe([sys.argv[3]])
while True:
    consumer.poll(200)
    print(len(consumer.assignment()), flush=True)
"""


def test_a_killed_member_s_partitions_move_to_the_others(cluster, admin):
    import threading

    admin.create_topic("shared", 6, 3)
    group, session_ms = "sharers", 3000
    servers = brokers(admin)
    stop = threading.Event()
    members = [
        Consumer(
            servers,
            group_id=group,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=300,
            auto_offset_reset="earliest",
        )
        for _ in range(2)
    ]
    for member in members:
        member.subscribe(["shared"])

    def poll_forever() -> None:
        while not stop.is_set():
            for member in members:
                member.poll(50)

    poller = threading.Thread(target=poll_forever, daemon=True)
    child = subprocess.Popen(
        [sys.executable, "-c", _MEMBER_SCRIPT, servers, group, "shared"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        poller.start()
        coordinator = _coordinator_stub(cluster, admin, group)

        def described():
            return coordinator.DescribeGroups(
                broker_pb2.DescribeGroupsRequest(group_ids=[group]), timeout=5
            ).groups[0]

        wait_until(
            "three members sharing six partitions",
            lambda: (
                (d := described()).state == "Stable"
                and len(d.members) == 3
                and sum(len(m.assignment()) for m in members) == 4
            ),
            timeout_s=60,
        )
        child.kill()  # kill -9: no LeaveGroup, the session has to expire
        child.wait(timeout=10)
        killed_at = time.monotonic()
        wait_until(
            "the two survivors to own all six partitions",
            lambda: (
                sum(len(m.assignment()) for m in members) == 6 and len(described().members) == 2
            ),
            timeout_s=30,
        )
        moved_s = time.monotonic() - killed_at
        print(f"partitions of the killed member moved in {moved_s:.2f} s")
        # Within the session timeout plus a second (the bound), as Kafka.
        assert moved_s < session_ms / 1000 + 1.0, moved_s
        owned = [tp for m in members for tp in m.assignment()]
        assert len(owned) == len(set(owned)) == 6
    finally:
        stop.set()
        poller.join(timeout=10)
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        for member in members:
            member.close()


def test_the_group_carries_on_when_its_coordinator_is_killed(cluster, admin):
    import threading

    admin.create_topic("carry-on", 4, 3, {"min.insync.replicas": "2"})
    group = "carriers"
    servers = brokers(admin)
    members = [
        Consumer(
            servers,
            group_id=group,
            session_timeout_ms=3000,
            heartbeat_interval_ms=300,
            auto_offset_reset="earliest",
        )
        for _ in range(2)
    ]
    for member in members:
        member.subscribe(["carry-on"])
    stop = threading.Event()

    def poll_forever() -> None:
        while not stop.is_set():
            for member in members:
                member.poll(50)

    poller = threading.Thread(target=poll_forever, daemon=True)
    poller.start()
    try:
        wait_until(
            "two members sharing four partitions",
            lambda: (
                sum(len(m.assignment()) for m in members) == 4
                and all(m.assignment() for m in members)
            ),
            timeout_s=60,
        )
        index = partition_for(group, OFFSETS_PARTITIONS)
        coordinator = admin.describe_topic(OFFSETS_TOPIC).partitions[index].leader
        cluster.kill(coordinator)
        killed_at = time.monotonic()

        def settled_elsewhere() -> bool:
            new = admin.describe_topic(OFFSETS_TOPIC).partitions[index].leader
            if new in (coordinator, -1):
                return False
            described = stub(cluster, new).DescribeGroups(
                broker_pb2.DescribeGroupsRequest(group_ids=[group]), timeout=5
            )
            state = described.groups[0]
            return (
                state.state == "Stable"
                and len(state.members) == 2
                and sum(len(m.assignment()) for m in members) == 4
            )

        wait_until("the group stable at the new coordinator", settled_elsewhere, timeout_s=30)
        took_s = time.monotonic() - killed_at
        print(f"group carried on at the new coordinator in {took_s:.2f} s")
        assert took_s < 3.0, took_s  # the bound
    finally:
        stop.set()
        poller.join(timeout=10)
        for member in members:
            member.close()


def test_the_group_keeps_its_generation_when_its_coordinator_is_killed(cluster, admin):
    """Kafka's group metadata in __consumer_offsets: the new coordinator loads the
    members and their generation, the members heartbeat there with the same member id
    and generation, and nobody rejoins."""
    import threading

    topic, group, session_ms = "keep-generation", "keepers", 4000
    admin.create_topic(topic, 4, 3, {"min.insync.replicas": "2"})
    servers = brokers(admin)
    events: list[tuple[int, str, frozenset[TopicPartition]]] = []

    def listener(i: int) -> dict:
        def record(kind: str):
            return lambda partitions: events.append((i, kind, frozenset(partitions)))

        return {
            "on_partitions_assigned": record("assigned"),
            "on_partitions_revoked": record("revoked"),
            "on_partitions_lost": record("lost"),
        }

    members = [
        Consumer(
            servers,
            group_id=group,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=300,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        for _ in range(2)
    ]
    for i, member in enumerate(members):
        member.subscribe([topic], **listener(i))
    stop = threading.Event()
    lock = threading.Lock()  # A consumer is used by one thread at a time.

    def poll_forever() -> None:
        while not stop.is_set():
            with lock:
                for member in members:
                    member.poll(50)

    poller = threading.Thread(target=poll_forever, daemon=True)
    poller.start()
    index = partition_for(group, OFFSETS_PARTITIONS)
    try:

        def described(broker_id: int) -> broker_pb2.DescribedGroup:
            return (
                stub(cluster, broker_id)
                .DescribeGroups(broker_pb2.DescribeGroupsRequest(group_ids=[group]), timeout=5)
                .groups[0]
            )

        def coordinator_of_group() -> int:
            return admin.describe_topic(OFFSETS_TOPIC).partitions[index].leader

        def stable_with_both() -> bool:
            with lock:
                owned = [m.assignment() for m in members]
            d = described(coordinator_of_group())
            return d.state == "Stable" and len(d.members) == 2 and list(map(len, owned)) == [2, 2]

        wait_until("two members sharing four partitions", stable_with_both, timeout_s=60)
        coordinator = coordinator_of_group()
        with lock:
            before = [m.group_metadata() for m in members]
            owned = [m.assignment() for m in members]
        generation = before[0].generation_id
        assert generation >= 1 and {b.generation_id for b in before} == {generation}
        assert described(coordinator).generation_id == generation
        events_before = len(events)

        cluster.kill(coordinator)  # kill -9
        killed_at = time.monotonic()

        def loaded_elsewhere() -> tuple[int] | None:
            new = coordinator_of_group()
            if new in (coordinator, -1):
                return None
            d = described(new)
            return (new,) if d.error.code == 0 and d.state == "Stable" else None

        found = wait_until("the group loaded at a new coordinator", loaded_elsewhere, 30)
        assert isinstance(found, tuple)
        (new_coordinator,) = found
        print(f"group loaded at broker {new_coordinator} {time.monotonic() - killed_at:.2f} s")
        loaded = described(new_coordinator)
        assert loaded.generation_id == generation
        assert sorted(m.member_id for m in loaded.members) == sorted(b.member_id for b in before)
        # The sessions started at the load: a member that did not heartbeat to the new
        # coordinator would expire within a session timeout and make the group rebalance.
        # Watch for longer than that: the generation holds.
        watch_until = time.monotonic() + 1.5 * session_ms / 1000
        while time.monotonic() < watch_until:
            d = described(new_coordinator)
            assert (d.state, d.generation_id, len(d.members)) == ("Stable", generation, 2), d
            time.sleep(0.1)
        with lock:
            after = [m.group_metadata() for m in members]
            assert [m.assignment() for m in members] == owned
            # Commits carry the generation and the new coordinator takes them.
            for member, partitions in zip(members, owned, strict=True):
                member.commit({tp: 1 for tp in partitions})
            committed = {tp: members[0].committed(tp) for tp in owned[0] | owned[1]}
        assert after == before  # same member ids, same generation
        assert set(committed.values()) == {1}
        assert events[events_before:] == []  # nothing revoked, lost or assigned again
        assert described(new_coordinator).generation_id == generation
    finally:
        stop.set()
        poller.join(timeout=10)
        for member in members:
            member.close()


_PROCESSING_MEMBER = """
import sys
from client import Consumer
from client.errors import RaftkaError
consumer = Consumer(sys.argv[1], group_id=sys.argv[2], session_timeout_ms=3000,
                    heartbeat_interval_ms=300, auto_offset_reset="earliest",
                    enable_auto_commit=False)
consumer.subscribe([sys.argv[3]])
while True:
    fetched = consumer.poll(100)
    lines = [f"{r.partition} {r.offset}" for batch in fetched.values() for r in batch]
    if not lines:
        continue
    print("\\n".join(lines), flush=True)  # processed
    try:
        consumer.commit()
        print("committed", flush=True)
    except RaftkaError:
        pass
"""


def test_at_least_once_duplicates_stay_within_the_uncommitted_window(cluster, admin):
    import threading

    admin.create_topic("alo", 6, 3, {"min.insync.replicas": "2"})
    group, servers = "alo-group", brokers(admin)
    survivors_seen: list[tuple[int, int]] = []
    survivors = [
        Consumer(
            servers,
            group_id=group,
            session_timeout_ms=3000,
            heartbeat_interval_ms=300,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        for _ in range(2)
    ]
    for member in survivors:
        member.subscribe(["alo"])
    stop = threading.Event()

    def run_survivors() -> None:
        while not stop.is_set():
            for member in survivors:
                fetched = member.poll(50)
                survivors_seen.extend((r.partition, r.offset) for b in fetched.values() for r in b)
                if fetched:
                    try:
                        member.commit()
                    except Exception:  # A rebalance: the next owner reads them again.
                        pass

    victim = subprocess.Popen(
        [sys.executable, "-c", _PROCESSING_MEMBER, servers, group, "alo"],
        stdout=subprocess.PIPE,
        text=True,
    )
    victim_lines: list[str] = []
    reader = threading.Thread(
        target=lambda: victim_lines.extend(line.strip() for line in victim.stdout or ()),
        daemon=True,
    )
    reader.start()
    worker = threading.Thread(target=run_survivors, daemon=True)
    worker.start()
    produced = 0
    with Producer(servers, acks="all", linger_ms=1) as producer:
        try:
            wait_until(
                "three members sharing the partitions",
                lambda: sum(len(m.assignment()) for m in survivors) == 4,
                timeout_s=60,
            )
            # About 2 s of records while all three consume, and on until the victim
            # has processed some: a fixed 2 s was once too short, in CI, for the
            # victim (a process started just before) to fetch anything.
            started = time.monotonic()
            while time.monotonic() - started < 2 or not _processed(victim_lines):
                assert time.monotonic() - started < 30, "the victim processed nothing"
                for p in range(6):
                    producer.send("alo", b"x", partition=p)
                    produced += 1
                time.sleep(0.05)
            victim.kill()  # dies without leaving and without committing what it holds
            victim.wait(timeout=10)
            for _ in range(40):
                for p in range(6):
                    producer.send("alo", b"y", partition=p)
                    produced += 1
                time.sleep(0.05)
            producer.flush(timeout=30)
            wait_until(
                "every record processed",
                lambda: len(set(survivors_seen) | _processed(victim_lines)) >= produced,
                timeout_s=30,
            )
        finally:
            stop.set()
            worker.join(timeout=10)
            reader.join(timeout=10)
            for member in survivors:
                member.close()
    victim_done = _processed(victim_lines)
    uncommitted = _processed(victim_lines, after_last_commit=True)
    assert victim_done  # the victim had partitions and processed some of them
    everything = set(survivors_seen) | victim_done
    assert len(everything) == produced  # at least once: nothing skipped
    twice = set(survivors_seen) & victim_done
    # Only what the dead member processed but had not committed is processed again.
    assert twice <= uncommitted, (len(twice), len(uncommitted))


def _processed(lines: list[str], after_last_commit: bool = False) -> set[tuple[int, int]]:
    if after_last_commit and "committed" in lines:
        lines = lines[len(lines) - lines[::-1].index("committed") :]
    out = set()
    for line in lines:
        if line and line != "committed":
            partition, offset = line.split()
            out.add((int(partition), int(offset)))
    return out
