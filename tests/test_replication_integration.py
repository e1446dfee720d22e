"""Replication over real processes: 3 controllers, 3 brokers on loopback.

Every test creates its own topic and leaves every node running and unfenced,
so the order of the tests does not matter. Timeouts are short (a 2 s broker
session, 2 s replica lag) so failures are detected in seconds.
"""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import pytest
from conftest import running_cluster
from dataplane import address, error_name, produce, read_all, stub, wait_until
from raftka.v1 import broker_pb2, broker_pb2_grpc, common_pb2

from broker.record_batch import decode_records
from client import Admin

pytestmark = pytest.mark.integration

SESSION_MS = 2000
LAG_MS = 2000
BROKERS = (100, 101, 102)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(
        tmp_path_factory.mktemp("replication"),
        controllers=3,
        brokers=3,
        overrides={
            "broker.session.timeout.ms": SESSION_MS,
            "broker.heartbeat.interval.ms": 250,
            "replica.lag.time.max.ms": LAG_MS,
            "replica.fetch.wait.max.ms": 200,
        },
    ) as cluster:
        yield cluster


@pytest.fixture
def admin(cluster):
    with Admin(cluster.bootstrap, timeout_s=10.0) as admin:
        yield admin
    for node in cluster.status():
        if node.state == "paused":
            cluster.resume(node.id)
    cluster.start()
    cluster.wait_ready(timeout_s=60)


def partition_info(admin: Admin, topic: str, index: int = 0):
    return admin.describe_topic(topic).partitions[index]


def local(cluster, broker_id: int, topic: str, index: int = 0) -> broker_pb2.LocalPartition | None:
    described = stub(cluster, broker_id).DescribeBroker(
        broker_pb2.DescribeBrokerRequest(), timeout=5
    )
    return next(
        (p for p in described.partitions if p.topic == topic and p.partition == index), None
    )


def create(cluster, admin: Admin, name: str, **configs: str) -> int:
    admin.create_topic(name, 1, 3, {k.replace("_", "."): v for k, v in configs.items()})
    info = wait_until(
        f"{name} to have a leader with a full ISR",
        lambda: (p := partition_info(admin, name)).leader > 0 and len(p.isr) == 3 and p,
    )
    leader = info.leader  # type: ignore[attr-defined]
    # The controller has committed the topic; wait for every broker to act on it.
    for broker_id in BROKERS:
        role = "leader" if broker_id == leader else "follower"
        wait_until(
            f"broker {broker_id} to be a {role} of {name}",
            lambda b=broker_id, r=role: (p := local(cluster, b, name)) is not None and p.role == r,
        )
    return leader


def values(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


def wait_replicated(cluster, topic: str, end: int, brokers=BROKERS) -> None:
    for broker_id in brokers:
        wait_until(
            f"broker {broker_id} to hold {topic} up to {end}",
            lambda b=broker_id: (
                (p := local(cluster, b, topic)) is not None and p.log_end_offset == end
            ),
        )


def test_acks_all_is_answered_once_every_isr_member_has_the_records(cluster, admin):
    leader = create(cluster, admin, "acks-all", min_insync_replicas="2")
    broker = stub(cluster, leader)
    offsets = []
    for i in range(5):
        answer = produce(broker, "acks-all", 0, values(f"b{i}", 10))
        assert error_name(answer) == "NONE", answer.error
        offsets.append(answer.base_offset)
    assert offsets == [0, 10, 20, 30, 40]
    # acks=all answered: the high watermark is past every record on the leader.
    described = local(cluster, leader, "acks-all")
    assert described.high_watermark == 50 and described.role == "leader"
    wait_replicated(cluster, "acks-all", 50)
    got = read_all(broker, "acks-all", 0)
    assert got == [(i, v) for i, v in enumerate(v for b in range(5) for v in values(f"b{b}", 10))]


def test_a_follower_or_unknown_partition_refuses_produce(cluster, admin):
    leader = create(cluster, admin, "not-here")
    follower = next(b for b in BROKERS if b != leader)
    answer = produce(stub(cluster, follower), "not-here", 0, [b"x"])
    assert error_name(answer) == "NOT_LEADER_OR_FOLLOWER"
    assert answer.current_leader.leader_id == leader
    assert error_name(produce(stub(cluster, leader), "no-such-topic", 0, [b"x"])) in (
        "UNKNOWN_TOPIC_OR_PARTITION",
    )
    bad = stub(cluster, leader).Produce(
        broker_pb2.ProduceRequest(
            acks=-1,
            timeout_ms=1000,
            topics=[
                broker_pb2.TopicProduceData(
                    topic="not-here",
                    partitions=[broker_pb2.PartitionProduceData(partition=0, records=b"\x00" * 70)],
                )
            ],
        ),
        timeout=10,
    )
    assert error_name(bad.topics[0].partitions[0]) == "CORRUPT_MESSAGE"
    assert local(cluster, leader, "not-here").log_end_offset == 0


def test_lagging_follower_leaves_the_isr_and_rejoins(cluster, admin):
    leader = create(cluster, admin, "shrink", min_insync_replicas="1")
    slow = next(b for b in BROKERS if b != leader)
    broker = stub(cluster, leader)
    assert error_name(produce(broker, "shrink", 0, values("a", 5))) == "NONE"
    cluster.pause(slow)
    try:
        # acks=1 is answered by the leader alone; the high watermark waits for
        # the paused ISR member until it leaves the ISR.
        answer = produce(broker, "shrink", 0, values("b", 5), acks=1)
        assert error_name(answer) == "NONE" and answer.base_offset == 5
        assert len(read_all(broker, "shrink", 0)) == 5
        wait_until(
            f"broker {slow} out of the ISR",
            lambda: slow not in partition_info(admin, "shrink").isr,
            timeout_s=LAG_MS / 1000 + 10,
        )
        wait_until("the high watermark to move", lambda: len(read_all(broker, "shrink", 0)) == 10)
    finally:
        cluster.resume(slow)
    wait_until(
        f"broker {slow} back in the ISR",
        lambda: slow in partition_info(admin, "shrink").isr,
        timeout_s=SESSION_MS / 1000 + 15,
    )
    wait_replicated(cluster, "shrink", 10)


def test_acks_all_is_refused_below_min_insync_replicas(cluster, admin):
    leader = create(cluster, admin, "min-isr", min_insync_replicas="3")
    victim = next(b for b in BROKERS if b != leader)
    broker = stub(cluster, leader)
    assert error_name(produce(broker, "min-isr", 0, [b"ok"])) == "NONE"
    cluster.kill(victim)
    wait_until(
        f"broker {victim} out of the ISR",
        lambda: victim not in local(cluster, leader, "min-isr").isr,
        timeout_s=SESSION_MS / 1000 + 10,
    )
    refused = produce(broker, "min-isr", 0, [b"refused"])
    assert error_name(refused) == "NOT_ENOUGH_REPLICAS"
    assert local(cluster, leader, "min-isr").log_end_offset == 1  # Nothing appended.
    assert error_name(produce(broker, "min-isr", 0, [b"acks-1"], acks=1)) == "NONE"


def test_leader_kill_loses_no_acknowledged_record(cluster, admin):
    leader = create(cluster, admin, "kill-leader", min_insync_replicas="2")
    broker = stub(cluster, leader)
    acked: list[tuple[int, bytes]] = []
    for i in range(20):
        batch = values(f"k{i}", 25)
        answer = produce(broker, "kill-leader", 0, batch)
        assert error_name(answer) == "NONE"
        acked += [(answer.base_offset + j, v) for j, v in enumerate(batch)]
    cluster.kill(leader)
    new_leader = wait_until(
        "a new leader",
        lambda: (p := partition_info(admin, "kill-leader")).leader not in (leader, -1) and p.leader,
        timeout_s=SESSION_MS / 1000 + 10,
    )
    survivor = stub(cluster, new_leader)  # type: ignore[arg-type]
    wait_until("the new leader to serve", lambda: len(read_all(survivor, "kill-leader", 0)) >= 500)
    assert read_all(survivor, "kill-leader", 0) == acked
    # Writes go on under the new epoch, and the old leader comes back as a follower.
    more = wait_until(
        "produce to the new leader",
        lambda: error_name(a := produce(survivor, "kill-leader", 0, [b"after"])) == "NONE" and a,
    )
    assert more.base_offset == 500  # type: ignore[attr-defined]
    cluster.start([leader])
    wait_until(
        f"broker {leader} back in the ISR",
        lambda: leader in partition_info(admin, "kill-leader").isr,
        timeout_s=30,
    )
    wait_replicated(cluster, "kill-leader", 501)


def test_returning_leader_truncates_what_was_never_committed(cluster, admin):
    leader = create(cluster, admin, "diverge", min_insync_replicas="2")
    broker = stub(cluster, leader)
    assert error_name(produce(broker, "diverge", 0, values("committed", 3))) == "NONE"
    followers = [b for b in BROKERS if b != leader]
    wait_replicated(cluster, "diverge", 3)
    for b in followers:
        cluster.pause(b)
    # A fetch the followers sent before the pause is still parked at the leader
    # and would carry the next records to them (they read it when resumed). It
    # is answered empty after replica.fetch.wait.max.ms (200 ms); only then can
    # the leader hold records no follower will see. There is nothing to wait on
    # but that timeout, so wait well past it.
    time.sleep(1.0)
    try:
        # Only the leader gets these: acks=1 answers, but they never commit.
        assert error_name(produce(broker, "diverge", 0, values("lost", 4), acks=1)) == "NONE"
        assert local(cluster, leader, "diverge").log_end_offset == 7
        cluster.kill(leader)
    finally:
        for b in followers:
            cluster.resume(b)
    new_leader = wait_until(
        "a new leader",
        lambda: (p := partition_info(admin, "diverge")).leader in followers and p.leader,
        timeout_s=SESSION_MS / 1000 + 10,
    )
    survivor = stub(cluster, new_leader)  # type: ignore[arg-type]
    answer = wait_until(
        "produce to the new leader",
        lambda: error_name(a := produce(survivor, "diverge", 0, values("new", 2))) == "NONE" and a,
    )
    assert answer.base_offset == 3  # type: ignore[attr-defined]
    cluster.start([leader])
    wait_until(
        f"broker {leader} back in the ISR",
        lambda: leader in partition_info(admin, "diverge").isr,
        timeout_s=30,
    )
    wait_replicated(cluster, "diverge", 5)
    # Make the returning broker lead again and read its log: the records only it
    # had are gone, the new ones are there, at the same offsets.
    admin.elect_leaders([("diverge", 0)])
    wait_until(
        f"broker {leader} to lead again",
        lambda: (p := local(cluster, leader, "diverge")) is not None and p.role == "leader",
    )
    wait_until(
        "the returned leader to serve",
        lambda: len(read_all(stub(cluster, leader), "diverge", 0)) == 5,
    )
    assert read_all(stub(cluster, leader), "diverge", 0) == [
        (0, b"committed-0"),
        (1, b"committed-1"),
        (2, b"committed-2"),
        (3, b"new-0"),
        (4, b"new-1"),
    ]


def test_paused_leader_cannot_acknowledge_under_its_stale_epoch(cluster, admin):
    leader = create(cluster, admin, "stale", min_insync_replicas="2")
    old = stub(cluster, leader)
    assert error_name(produce(old, "stale", 0, [b"before"])) == "NONE"
    cluster.pause(leader)
    try:
        new_leader = wait_until(
            "a new leader",
            lambda: (p := partition_info(admin, "stale")).leader not in (leader, -1) and p.leader,
            timeout_s=SESSION_MS / 1000 + 10,
        )
        survivor = stub(cluster, new_leader)  # type: ignore[arg-type]
        # The new leader may not have applied its leadership yet: nothing is
        # appended until it has, so retrying is safe.
        wait_until(
            "produce to the new leader",
            lambda: error_name(produce(survivor, "stale", 0, [b"new-epoch"])) == "NONE",
        )
    finally:
        cluster.resume(leader)
    # Right after it wakes up, the old leader may still think it leads; with
    # acks=all it must not acknowledge anything under its old epoch.
    answer = produce(old, "stale", 0, [b"stale-write"], timeout_ms=3000)
    assert error_name(answer) != "NONE"
    wait_until(
        f"broker {leader} to follow",
        lambda: (p := local(cluster, leader, "stale")) is not None and p.role == "follower",
        timeout_s=30,
    )
    wait_until(
        f"broker {leader} back in the ISR",
        lambda: leader in partition_info(admin, "stale").isr,
        timeout_s=30,
    )
    got = [v for _, v in read_all(survivor, "stale", 0)]
    assert got == [b"before", b"new-epoch"]
    wait_replicated(cluster, "stale", 2)


def test_brokers_answer_metadata_for_clients(cluster, admin):
    create(cluster, admin, "meta")
    any_broker = stub(cluster, BROKERS[0])
    answer = any_broker.Metadata(broker_pb2.MetadataRequest(topics=["meta", "nope"]), timeout=5)
    assert sorted(b.broker_id for b in answer.brokers) == list(BROKERS)
    assert {b.broker_id: f"{b.host}:{b.port}" for b in answer.brokers} == {
        b: address(cluster, b) for b in BROKERS
    }
    meta, nope = answer.topics
    assert meta.name == "meta" and meta.partitions[0].leader in BROKERS
    assert error_name(nope) == "UNKNOWN_TOPIC_OR_PARTITION"


class _Stream:
    """A FetchStream driven by hand: a request, then its answer."""

    def __init__(self, broker: broker_pb2_grpc.BrokerStub):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = broker.FetchStream(iter(self._requests.get, None), timeout=60)

    def exchange(self, request: broker_pb2.FetchRequest) -> broker_pb2.FetchResponse:
        self._requests.put(request)
        return next(self._call)

    def close(self) -> None:
        self._call.cancel()
        self._requests.put(None)


def _session_request(replica_id: int, topic: str, offsets: dict[int, int], **kw):
    return broker_pb2.FetchRequest(
        replica_id=replica_id,
        replica_epoch=-1,
        min_bytes=1,
        max_bytes=1 << 20,
        topics=[
            broker_pb2.FetchTopic(
                topic=topic,
                partitions=[
                    broker_pb2.FetchPartition(
                        partition=p,
                        current_leader_epoch=-1,
                        fetch_offset=offset,
                        last_fetched_epoch=-1,
                        partition_max_bytes=1 << 20,
                    )
                    for p, offset in offsets.items()
                ],
            )
        ]
        if offsets
        else [],
        **kw,
    )


def _answered(response: broker_pb2.FetchResponse) -> dict[int, broker_pb2.FetchPartitionResponse]:
    return {p.partition: p for t in response.topics for p in t.partitions}


def test_a_fetch_session_answers_only_what_changed(cluster, admin):
    admin.create_topic("sessions", 6, 3)

    def led_with_full_isr():
        described = admin.describe_topic("sessions").partitions
        return all(p.leader > 0 and len(p.isr) == 3 for p in described) and described

    parts = wait_until("every partition of sessions led with a full ISR", led_with_full_isr)
    leader = parts[0].leader  # type: ignore[index]
    mine = [p.partition for p in parts if p.leader == leader]  # type: ignore[attr-defined]
    assert len(mine) >= 2, parts
    quiet, busy = mine[0], mine[1]
    wait_until(
        f"broker {leader} to lead {mine}",
        lambda: all(
            (p := local(cluster, leader, "sessions", i)) and p.role == "leader" for i in mine
        ),
    )
    follower = next(b for b in BROKERS if b != leader)
    broker = stub(cluster, leader)
    stream = _Stream(broker)
    try:
        # The first request is full and every partition it lists is answered.
        first = stream.exchange(_session_request(follower, "sessions", {quiet: 0, busy: 0}))
        assert first.error.code == common_pb2.NONE, first.error
        assert sorted(_answered(first)) == sorted([quiet, busy])
        # Nothing moved: an incremental fetch waits out its time and says nothing.
        idle = stream.exchange(
            _session_request(follower, "sessions", {}, incremental=True, max_wait_ms=300)
        )
        assert _answered(idle) == {}
        # Records on one partition: answered though the request did not list it,
        # read from where the session last asked.
        assert error_name(produce(broker, "sessions", busy, values("s", 3), acks=1)) == "NONE"
        moved = stream.exchange(
            _session_request(follower, "sessions", {}, incremental=True, max_wait_ms=2000)
        )
        answered = _answered(moved)
        assert list(answered) == [busy]
        records = [r.value for r in decode_records(answered[busy].records)]
        assert records == values("s", 3)
        # A listed partition is answered; the quiet one still is not.
        listed = stream.exchange(
            _session_request(follower, "sessions", {busy: 3}, incremental=True, max_wait_ms=0)
        )
        assert list(_answered(listed)) == [busy] and not _answered(listed)[busy].records
    finally:
        stream.close()

    # An incremental fetch needs its session: refused as a unary call, and as the
    # first request of a stream.
    unary = broker.Fetch(_session_request(follower, "sessions", {}, incremental=True), timeout=10)
    assert error_name(unary) == "INVALID_REQUEST"
    fresh = _Stream(broker)
    try:
        refused = fresh.exchange(_session_request(follower, "sessions", {}, incremental=True))
        assert error_name(refused) == "INVALID_REQUEST"
    finally:
        fresh.close()


def replication_listeners(admin: Admin) -> dict[int, bool]:
    """Whether each unfenced broker advertises a replication listener."""
    return {
        b.broker_id: any(e.name == "REPLICATION" for e in b.listeners)
        for b in admin.describe_cluster().brokers
        if not b.fenced
    }


def test_a_broker_without_a_replication_link_replicates_over_grpc_both_ways(cluster, admin):
    # A rolling upgrade's mixed cluster: broker 102 is as before the replication
    # listener (broker/replication_link.py), the others have one. Every acks=all
    # write below needs all three replicas, so each partition's followers, whichever
    # broker leads it, must be fetching: over a link from 100 and 101, over the
    # FetchStream from 102.
    wait_until(
        "every broker to be up with a replication listener",
        lambda: replication_listeners(admin) == {100: True, 101: True, 102: True},
    )
    admin.create_topic("linked", 6, 3)
    wait_until(
        "every partition of linked in sync", lambda: all_in_sync(partitions(admin, "linked"))
    )
    # Each broker leads some of linked; both others fetch from it over a link.
    wait_until(
        "every follower on a link to every leader",
        lambda: linked_followers(cluster) == {100: {101, 102}, 101: {100, 102}, 102: {100, 101}},
    )
    old = 102
    port = next(n.replication_port for n in cluster.status() if n.id == old)
    cluster.stop([old])
    cluster.update_config(old, {"replication.listener": ""})
    try:
        cluster.start([old])
        cluster.wait_ready(timeout_s=60)
        wait_until(
            "broker 102 to be back, without a replication listener",
            lambda: replication_listeners(admin) == {100: True, 101: True, 102: False},
        )
        # 102 still fetches over links; nobody has one to 102.
        wait_until(
            "links to 100 and 101 only",
            lambda: linked_followers(cluster) == {100: {101, 102}, 101: {100, 102}, 102: set()},
        )
        admin.create_topic("mixed", 6, 3, {"min.insync.replicas": "3"})
        infos = wait_until(
            "every partition of mixed to have a leader and a full ISR",
            lambda: all_in_sync(partitions(admin, "mixed")),
        )
        assert {p.leader for p in infos} == set(BROKERS)  # type: ignore[attr-defined]
        for info in infos:  # type: ignore[attr-defined]
            wait_until(
                f"an acks=all write to mixed-{info.partition} with all three in sync",
                lambda i=info: (
                    error_name(produce(stub(cluster, i.leader), "mixed", i.partition, [b"v"]))
                    == "NONE"
                ),
            )
        assert all(len(p.isr) == 3 for p in partitions(admin, "mixed"))
    finally:
        cluster.stop([old])
        cluster.update_config(old, {"replication.listener": f"127.0.0.1:{port}"})
        cluster.start([old])
        cluster.wait_ready(timeout_s=60)


def partitions(admin: Admin, topic: str):
    return admin.describe_topic(topic).partitions


def linked_followers(cluster) -> dict[int, set[int]]:
    """For each running broker, the brokers with a link open to its replication
    listener (its old port, for a broker that has none now)."""
    brokers = [n for n in cluster.status() if n.role == "broker" and n.running]
    leader_at = {n.replication_port: n.id for n in brokers}
    linked: dict[int, set[int]] = {n.id: set() for n in brokers}
    for node in brokers:
        for remote_port in established_remote_ports(node.pid):
            if remote_port in leader_at:
                linked[leader_at[remote_port]].add(node.id)
    return linked


def established_remote_ports(pid: int) -> list[int]:
    """The remote ports of a process's established IPv4 TCP connections, from /proc
    (psutil's own parsing breaks in a process where pysyncobj replaced inet_ntop)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # Closed meanwhile.
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and inode in inodes:  # 01: ESTABLISHED
            ports.append(int(remote.split(":")[1], 16))
    return ports


def all_in_sync(infos):
    return all(p.leader > 0 and len(p.isr) == 3 for p in infos) and infos
