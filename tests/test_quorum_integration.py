"""The metadata quorum over real processes on loopback: 5 controllers, 3 brokers.

Each test leaves the cluster whole again (every node running, brokers
unfenced), so the order of the tests does not matter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest
from conftest import running_cluster
from raftka.v1 import broker_pb2, broker_pb2_grpc, common_pb2

from cli.localcluster import LocalCluster
from client import Admin, NewTopic
from client.errors import RaftkaError

pytestmark = pytest.mark.integration

CONTROLLERS = (1, 2, 3, 4, 5)
SESSION_TIMEOUT_MS = 3000


def wait_until(what: str, check: Callable[[], object], timeout_s: float = 20.0) -> object:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (RaftkaError, grpc.RpcError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(
        tmp_path_factory.mktemp("quorum"),
        controllers=5,
        brokers=3,
        overrides={
            "broker.session.timeout.ms": SESSION_TIMEOUT_MS,
            "broker.heartbeat.interval.ms": 500,
            # A short tail, so a broker that was down must catch up from a snapshot.
            "metadata.log.tail.records": 100,
        },
    ) as cluster:
        yield cluster


@pytest.fixture
def admin(cluster):
    with Admin(cluster.bootstrap, timeout_s=10.0) as admin:
        yield admin
    # Put back whatever the test took down.
    cluster.start()
    cluster.wait_ready(timeout_s=60)


def create(admin: Admin, name: str, partitions: int = 1, rf: int = 1) -> None:
    admin.create_topic(name, num_partitions=partitions, replication_factor=rf)


def quorum_whole(admin: Admin) -> bool:
    """Every voter replicates from the active controller and has all it has."""
    quorum = admin.describe_quorum()
    return len(quorum.voters) == len(CONTROLLERS) and all(
        v.lag == 0 and v.log_end_offset >= quorum.high_watermark for v in quorum.voters
    )


def brokers_by_id(admin: Admin) -> dict[int, object]:
    return {b.broker_id: b for b in admin.describe_cluster().brokers}


def describe_broker(cluster: LocalCluster, broker_id: int) -> broker_pb2.DescribeBrokerResponse:
    node = next(n for n in cluster.status() if n.id == broker_id)
    with grpc.insecure_channel(f"{node.host}:{node.rpc_port}") as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        return stub.DescribeBroker(broker_pb2.DescribeBrokerRequest(), timeout=5)


def voters_caught_up(admin: Admin) -> bool:
    quorum = admin.describe_quorum()
    return len(quorum.voters) == len(CONTROLLERS) and all(
        v.log_end_offset >= quorum.high_watermark for v in quorum.voters
    )


def test_active_controller_kill_fails_over_without_refencing_brokers(cluster, admin):
    before = admin.describe_quorum()
    epochs = {i: b.broker_epoch for i, b in brokers_by_id(admin).items()}
    registrations = {i: describe_broker(cluster, i).registrations for i in epochs}

    t0 = time.monotonic()
    assert cluster.kill(before.leader_id)
    create(admin, "after-leader-kill")
    failover_s = time.monotonic() - t0

    after = admin.describe_quorum()
    assert after.leader_id != before.leader_id
    assert after.leader_epoch > before.leader_epoch
    # Liveness, not speed (raftka bench failover measures that): a new
    # controller takes over well within the client's own timeout.
    assert failover_s < 10.0, f"failover took {failover_s:.2f}s"
    # Brokers carried on with the new controller: same epochs, never fenced,
    # never registered again.
    now = brokers_by_id(admin)
    assert {i: b.broker_epoch for i, b in now.items()} == epochs
    assert not any(b.fenced for b in now.values())
    assert {i: describe_broker(cluster, i).registrations for i in epochs} == registrations

    # The killed voter comes back and catches up from its own journal.
    cluster.start([before.leader_id])
    wait_until("the restarted voter to catch up", lambda: voters_caught_up(admin))


def test_two_of_five_down_writes_still_commit(cluster, admin):
    quorum = admin.describe_quorum()
    follower = next(v.replica_id for v in quorum.voters if v.replica_id != quorum.leader_id)
    for node_id in (quorum.leader_id, follower):
        assert cluster.kill(node_id)
    create(admin, "with-two-down", partitions=3, rf=3)
    topic = admin.describe_topic("with-two-down")
    assert len(topic.partitions) == 3
    assert all(len(p.replicas) == 3 and p.leader in p.isr for p in topic.partitions)


def test_majority_down_fails_clearly_then_resumes_by_itself(cluster, admin):
    quorum = admin.describe_quorum()
    others = [v.replica_id for v in quorum.voters if v.replica_id != quorum.leader_id]
    down = [quorum.leader_id, *others[:2]]
    for node_id in down:
        assert cluster.kill(node_id)

    with Admin(cluster.bootstrap, timeout_s=3.0) as short:
        t0 = time.monotonic()
        with pytest.raises(RaftkaError) as failure:
            create(short, "without-majority", partitions=4, rf=3)
        elapsed = time.monotonic() - t0
    assert failure.value.code in (
        common_pb2.QUORUM_UNAVAILABLE,
        common_pb2.REQUEST_TIMED_OUT,
        common_pb2.UNKNOWN_OUTCOME,
    ), failure.value
    # The error comes within the request timeout (plus slack for a loaded
    # machine), not after waiting for a majority that is gone.
    assert elapsed < 3.0 + 5.0, f"the failure took {elapsed:.1f}s to surface"

    cluster.start(down)
    wait_until("metadata writes to commit again", lambda: create(admin, "majority-back") or True)
    # Nothing was half-applied: the refused topic is absent or whole.
    names = admin.list_topics()
    if "without-majority" in names:
        assert len(admin.describe_topic("without-majority").partitions) == 4
    # The next test starts on a whole quorum, every voter following one leader.
    wait_until("every voter to follow one leader", lambda: quorum_whole(admin))


def test_full_restart_keeps_every_committed_record(cluster, admin):
    for i in range(20):
        create(admin, f"durable-{i}", partitions=2, rf=2)
    quorum = admin.describe_quorum()
    before = admin.read_metadata_log(quorum.log_start_offset, 5000)
    assert before and before[-1].offset == quorum.high_watermark - 1

    for node_id in CONTROLLERS:
        assert cluster.kill(node_id)
    cluster.start(list(CONTROLLERS))
    wait_until("a leader after the full restart", lambda: admin.describe_quorum().leader_id > 0)

    after = admin.read_metadata_log(before[0].offset, 100_000)
    assert [(e.offset, e.record) for e in after[: len(before)]] == [
        (e.offset, e.record) for e in before
    ]
    assert all(f"durable-{i}" in admin.list_topics() for i in range(20))


def test_silent_broker_is_fenced_and_loses_its_leaderships(cluster, admin):
    create(admin, "fencing", partitions=6, rf=3)
    topic = admin.describe_topic("fencing")
    victim = topic.partitions[0].leader
    cluster.pause(victim)
    try:
        t0 = time.monotonic()
        wait_until(
            f"broker {victim} to be fenced",
            lambda: brokers_by_id(admin)[victim].fenced,
            timeout_s=SESSION_TIMEOUT_MS / 1000 + 8,
        )
        fenced_after_s = time.monotonic() - t0
        moved = admin.describe_topic("fencing")
        for p in moved.partitions:
            assert p.leader != victim and p.leader in p.isr
            assert victim not in p.isr
        # Fenced because the session expired, not much later (a liveness bound;
        # the chaos suite measures how long partitions take to move).
        assert SESSION_TIMEOUT_MS / 1000 - 1.0 < fenced_after_s < SESSION_TIMEOUT_MS / 1000 + 5.0
    finally:
        cluster.resume(victim)
    wait_until(f"broker {victim} unfenced again", lambda: not brokers_by_id(admin)[victim].fenced)


def test_broker_behind_the_retained_tail_catches_up_from_a_snapshot(cluster, admin):
    broker_id = max(brokers_by_id(admin))
    create(admin, "hosted-everywhere", partitions=3, rf=3)
    wait_until(
        "the broker to host the new topic",
        lambda: any(
            p.topic == "hosted-everywhere" for p in describe_broker(cluster, broker_id).partitions
        ),
    )
    cluster.stop([broker_id])
    # While it is down the topic goes, and enough follows to push the deletion
    # out of the retained tail (at most 2 x 100 records).
    admin.delete_topic("hosted-everywhere")
    admin.create_topics([NewTopic(f"while-down-{i}", 1, 1) for i in range(120)])
    assert admin.describe_quorum().log_start_offset > 0

    cluster.start([broker_id])
    high_watermark = admin.describe_quorum().high_watermark
    wait_until(
        "the restarted broker to reach the log end",
        lambda: describe_broker(cluster, broker_id).metadata_offset >= high_watermark - 1,
    )
    described = describe_broker(cluster, broker_id)
    assert described.metadata_snapshots_loaded >= 1
    assert not any(p.topic == "hosted-everywhere" for p in described.partitions)
    # Its logs of the topic deleted while it was down are strays: removed once caught up.
    data = cluster.directory / f"node-{broker_id}" / "data"
    wait_until(
        "the stray logs of the deleted topic to go",
        lambda: not any(d.name.startswith("hosted-everywhere-") for d in data.iterdir()),
    )
