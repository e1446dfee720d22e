"""MetadataFollower, BrokerLifecycle and BrokerNode against fake in-process controllers.

``FakeCluster`` holds one scripted metadata log shared by several
``FakeController`` gRPC servers on 127.0.0.1. Every controller serves
FetchMetadata and FetchSnapshot; only the active one answers RegisterBroker and
BrokerHeartbeat, the others answer NOT_CONTROLLER with a hint. Faults are
knobs on the cluster (a gap or a duplicate in the stream, a stalled
controller, a stale broker epoch) or a controller's ``kill()``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
import pytest
from raftka.v1 import broker_pb2, broker_pb2_grpc, common_pb2, controller_pb2, controller_pb2_grpc
from raftka.v1 import metadata_pb2 as pb

from broker import metadata_follower
from broker.lifecycle import BrokerLifecycle
from broker.metadata_follower import MetadataFollower
from broker.node import BrokerNode
from client._controller import ControllerClient
from quorum import records as r
from quorum.config import NodeConfig
from quorum.image import EMPTY_IMAGE, Endpoint, MetadataImage
from quorum.replay import replay, replay_batch
from quorum.snapshot import encode_image

BROKER = 1


def eventually(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def build(records, image: MetadataImage = EMPTY_IMAGE) -> MetadataImage:
    for record in records:
        image, _ = replay(image, record, image.offset + 1)
    return image


def base_records(topics: int = 3) -> list[pb.MetadataRecord]:
    out = [r.controller_epoch(1, 10)]
    for b in (2, 3):
        out.append(r.register_broker(b, f"inc{b}", [Endpoint("PLAINTEXT", "127.0.0.1", 9000 + b)]))
    for t in range(topics):
        out.append(r.topic(f"topic{t}", f"id{t}"))
        out.append(r.partition(f"id{t}", 0, [BROKER, 2, 3], [BROKER, 2, 3], BROKER))
        out.append(r.partition(f"id{t}", 1, [2, BROKER, 3], [2, BROKER, 3], 2))
    return out


# -- the fake controllers ----------------------------------------------------


class FakeCluster:
    """The shared state behind every fake controller: the log, registrations, faults."""

    def __init__(self, records=(), *, log_start_offset: int = 0):
        self.cond = threading.Condition()
        self.entries: list[pb.MetadataLogEntry] = []
        self.image = EMPTY_IMAGE
        self.controllers: dict[int, FakeController] = {}
        self.active_id: int | None = None
        self.brokers: dict[int, dict] = {}
        self.registrations: list[tuple[int, str, int]] = []
        self.heartbeats: list[controller_pb2.BrokerHeartbeatRequest] = []
        self.heartbeat_served_by: list[int] = []
        self.fetches: list[tuple[int, int]] = []
        # Faults: drop / repeat the entry at this offset once in a stream.
        self.gap_at: int | None = None
        self.duplicate_at: int | None = None
        self.append(list(records))
        self.log_start_offset = log_start_offset
        self.snapshot = encode_image(build([e.record for e in self.entries[:log_start_offset]]))

    @property
    def next_offset(self) -> int:
        return len(self.entries)

    def append(self, records) -> int:
        with self.cond:
            for record in records:
                offset = len(self.entries)
                self.entries.append(pb.MetadataLogEntry(offset=offset, record=record))
                self.image, _ = replay(self.image, record, offset)
            self.cond.notify_all()
            return len(self.entries) - 1

    def start_controllers(self, *node_ids: int, active: int) -> list[FakeController]:
        started = []
        for node_id in node_ids:
            controller = FakeController(self, node_id)
            self.controllers[node_id] = controller
            started.append(controller)
        self.active_id = active
        return started

    def close(self) -> None:
        for controller in self.controllers.values():
            controller.kill()

    def voters(self) -> str:
        return ",".join(f"{c.node_id}@127.0.0.1:1:{c.port}" for c in self.controllers.values())

    def addresses(self) -> list[str]:
        return [c.address for c in self.controllers.values()]

    def hint(self) -> controller_pb2.ControllerHint:
        active = self.controllers.get(self.active_id) if self.active_id is not None else None
        if active is None:
            return controller_pb2.ControllerHint(leader_id=-1)
        return controller_pb2.ControllerHint(
            leader_id=active.node_id, leader_host="127.0.0.1", leader_port=active.port
        )

    def expire(self, broker_id: int) -> None:
        """The broker's session is gone: its next heartbeat gets STALE_BROKER_EPOCH."""
        with self.cond:
            self.brokers[broker_id]["stale"] = True


def _error(code: int, message: str = "") -> common_pb2.Error:
    return common_pb2.Error(code=code, message=message)


class FakeController(controller_pb2_grpc.ControllerServicer):
    def __init__(self, cluster: FakeCluster, node_id: int):
        self.cluster = cluster
        self.node_id = node_id
        self.stalled = False
        self.executor = futures.ThreadPoolExecutor(max_workers=16)
        self.server = grpc.server(self.executor, options=[("grpc.so_reuseport", 0)])
        controller_pb2_grpc.add_ControllerServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def kill(self) -> None:
        self.server.stop(grace=None).wait(5)
        self.executor.shutdown(wait=True, cancel_futures=True)

    @property
    def active(self) -> bool:
        return self.cluster.active_id == self.node_id

    # -- the metadata log, served by every controller --

    def FetchMetadata(self, request, context):  # noqa: N802
        cluster = self.cluster
        cluster.fetches.append((self.node_id, request.offset))
        offset = request.offset
        wait_s = max(request.max_wait_ms, 10) / 1000
        while context.is_active():
            if self.stalled:
                time.sleep(0.01)
                continue
            with cluster.cond:
                if offset < cluster.log_start_offset:
                    yield controller_pb2.FetchMetadataResponse(
                        error=_error(common_pb2.SNAPSHOT_REQUIRED)
                    )
                    return
                if offset > cluster.next_offset:
                    yield controller_pb2.FetchMetadataResponse(
                        error=_error(common_pb2.OFFSET_OUT_OF_RANGE)
                    )
                    return
                # Long-poll in slices, so a cancelled call frees its thread soon.
                deadline = time.monotonic() + wait_s
                while offset == cluster.next_offset and context.is_active():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    cluster.cond.wait(min(remaining, 0.05))
                sent = list(cluster.entries[offset : offset + (request.max_records or 100)])
                high_watermark = cluster.next_offset
                entries = self._inject_faults(sent)
            offset += len(sent)
            yield controller_pb2.FetchMetadataResponse(
                entries=entries,
                high_watermark=high_watermark,
                log_start_offset=cluster.log_start_offset,
            )

    def _inject_faults(self, entries):
        cluster = self.cluster
        offsets = [e.offset for e in entries]
        if cluster.gap_at in offsets:
            # Leave one entry out; the stream goes on past it.
            entries = [e for e in entries if e.offset != cluster.gap_at]
            cluster.gap_at = None
        if cluster.duplicate_at in offsets:
            index = offsets.index(cluster.duplicate_at)
            entries = entries[: index + 1] + [entries[index]] + entries[index + 1 :]
            cluster.duplicate_at = None
        return entries

    def FetchSnapshot(self, request, context):  # noqa: N802
        return controller_pb2.FetchSnapshotResponse(snapshot=self.cluster.snapshot)

    # -- the broker lifecycle, answered by the active controller only --

    def RegisterBroker(self, request, context):  # noqa: N802
        cluster = self.cluster
        if not self.active:
            return controller_pb2.RegisterBrokerResponse(
                error=_error(common_pb2.NOT_CONTROLLER), hint=cluster.hint()
            )
        listeners = [Endpoint(e.name, e.host, e.port) for e in request.listeners]
        with cluster.cond:
            epoch = cluster.append(
                [r.register_broker(request.broker_id, request.incarnation_id, listeners)]
            )
            cluster.brokers[request.broker_id] = {"epoch": epoch, "fenced": True}
            cluster.registrations.append((request.broker_id, request.incarnation_id, self.node_id))
        return controller_pb2.RegisterBrokerResponse(broker_epoch=epoch)

    def BrokerHeartbeat(self, request, context):  # noqa: N802
        cluster = self.cluster
        if not self.active:
            return controller_pb2.BrokerHeartbeatResponse(
                error=_error(common_pb2.NOT_CONTROLLER), hint=cluster.hint()
            )
        with cluster.cond:
            broker = cluster.brokers.get(request.broker_id)
            if broker is None:
                return controller_pb2.BrokerHeartbeatResponse(
                    error=_error(common_pb2.BROKER_ID_NOT_REGISTERED)
                )
            if broker.get("stale") or broker["epoch"] != request.broker_epoch:
                return controller_pb2.BrokerHeartbeatResponse(
                    error=_error(common_pb2.STALE_BROKER_EPOCH)
                )
            cluster.heartbeats.append(request)
            cluster.heartbeat_served_by.append(self.node_id)
            should_shut_down = False
            if request.want_shutdown:
                if "shutdown_offset" not in broker:
                    broker["shutdown_offset"] = cluster.append(self._move_leaders(request))
                should_shut_down = request.metadata_offset >= broker["shutdown_offset"]
            elif broker["fenced"] and request.metadata_offset >= broker["epoch"]:
                cluster.append([r.unfence_broker(request.broker_id, broker["epoch"])])
                broker["fenced"] = False
            return controller_pb2.BrokerHeartbeatResponse(
                is_caught_up=request.metadata_offset >= broker["epoch"],
                is_fenced=broker["fenced"],
                should_shut_down=should_shut_down,
            )

    def _move_leaders(self, request) -> list[pb.MetadataRecord]:
        out = [r.broker_shutdown(request.broker_id, request.broker_epoch)]
        for topic, index, part in self.cluster.image.iter_partitions():
            if part.leader == request.broker_id:
                isr = [b for b in part.isr if b != request.broker_id]
                out.append(
                    r.partition_change(topic.topic_id, index, leader=isr[0] if isr else -1, isr=isr)
                )
        return out


@pytest.fixture
def cleanup():
    """Things to stop at the end of a test, last started first stopped."""
    stops: list[Callable[[], object]] = []
    yield stops.append
    for stop in reversed(stops):
        stop()


@pytest.fixture
def make_cluster(cleanup):
    def make(records=(), *, controllers=(10,), log_start_offset=0) -> FakeCluster:
        cluster = FakeCluster(records, log_start_offset=log_start_offset)
        cluster.start_controllers(*controllers, active=controllers[0])
        cleanup(cluster.close)
        return cluster

    return make


@pytest.fixture
def make_follower(cleanup):
    def make(addresses, on_change=None, **kwargs) -> MetadataFollower:
        follower = MetadataFollower(addresses, BROKER, on_change, **kwargs)
        follower.start()
        cleanup(lambda: _assert_stops(follower))
        return follower

    return make


def _assert_stops(follower: MetadataFollower) -> None:
    assert follower.stop(5.0), "follower thread did not stop"


@pytest.fixture
def recorded_offsets(monkeypatch):
    """Every offset the follower replays, in order."""
    offsets: list[int] = []

    def recording(image, records, base_offset):
        offsets.extend(range(base_offset, base_offset + len(records)))
        return replay_batch(image, records, base_offset)

    monkeypatch.setattr(metadata_follower, "replay_batch", recording)
    return offsets


# -- MetadataFollower ----------------------------------------------------------


def test_catch_up_from_snapshot_then_tail(make_cluster, make_follower, recorded_offsets):
    records = base_records(topics=5)
    cluster = make_cluster(records, log_start_offset=10)
    changes = []
    follower = make_follower(
        cluster.addresses(), lambda old, new, topics: changes.append((old, new))
    )
    last = len(records) - 1
    assert follower.wait_for_offset(last, 10)
    assert follower.offset == last
    assert follower.image == build(records)
    assert follower.snapshots_loaded == 1
    # The snapshot covers 0..9; then every tail offset is replayed exactly once, in order.
    assert recorded_offsets == list(range(10, last + 1))
    assert [offset for _, offset in cluster.fetches[:2]] == [0, 10]
    # on_change saw one unbroken chain of images: snapshot first, then the tail.
    assert changes[0][0].offset == -1 and changes[0][1].offset == 9
    for (_, before), (after, _) in zip(changes, changes[1:], strict=False):
        assert before is after
    assert changes[-1][1] is follower.image


def test_follows_new_entries_and_waits(make_cluster, make_follower, recorded_offsets):
    cluster = make_cluster(base_records())
    follower = make_follower(cluster.addresses(), max_wait_ms=50)
    assert follower.wait_for_offset(cluster.next_offset - 1, 10)
    assert not follower.wait_for_offset(cluster.next_offset + 5, 0.2)
    last = cluster.append([r.topic("late", "id-late"), r.partition("id-late", 0, [2], [2], 2)])
    assert follower.wait_for_offset(last, 10)
    assert follower.image.topic_by_name("late") is not None
    assert recorded_offsets == list(range(last + 1))
    image, offset = follower.published()
    assert image.offset == offset == last
    assert follower.high_watermark == last + 1


def test_catching_up_publishes_where_the_log_is_not_every_step_on_the_way(
    make_cluster, make_follower, recorded_offsets, monkeypatch
):
    # Starting far behind: nothing is published before the first high watermark, so a
    # topic created and deleted on the way is never acted on (however slow the replay).
    monkeypatch.setattr(metadata_follower, "_CATCH_UP_PUBLISH_S", 0.0)
    records = base_records()
    records += [r.topic("gone", "id-gone"), r.partition("id-gone", 0, [BROKER], [BROKER], BROKER)]
    records += [r.remove_topic("id-gone"), r.topic("kept", "id-kept")]
    cluster = make_cluster(records)
    changes = []
    follower = make_follower(
        cluster.addresses(),
        lambda old, new, topics: changes.append((old, new, topics)),
        max_records=2,  # The catch-up takes several responses.
    )
    last = len(records) - 1
    assert follower.wait_for_offset(last, 10)
    assert recorded_offsets == list(range(last + 1)), "every record is still replayed"
    assert len(changes) == 1
    old, new, topics = changes[0]
    assert old is EMPTY_IMAGE and new is follower.image == build(records)
    assert new.topic_by_name("gone") is None and new.topic_by_name("kept") is not None
    assert topics is not None and {"id-gone", "id-kept", "id0"} <= topics
    # Caught up, each new entry is published as it arrives.
    later = cluster.append([r.topic("late", "id-late")])
    assert follower.wait_for_offset(later, 10)
    assert len(changes) == 2 and changes[1][0] is new


@pytest.mark.parametrize("fault", ["gap", "duplicate"])
def test_offsets_stay_contiguous_under_a_faulty_stream(
    make_cluster, make_follower, recorded_offsets, fault
):
    records = base_records()
    cluster = make_cluster(records)
    setattr(cluster, f"{fault}_at", 3)
    follower = make_follower(cluster.addresses())
    assert follower.wait_for_offset(len(records) - 1, 10)
    assert recorded_offsets == list(range(len(records)))
    assert follower.image == build(records)
    assert getattr(cluster, f"{fault}_at") is None, "the fault was not injected"
    if fault == "gap":
        # The stream skipped an offset, so the follower fetched again from there.
        assert any(offset == 3 for _, offset in cluster.fetches[1:])


def test_switches_controller_when_one_dies(make_cluster, make_follower, recorded_offsets):
    cluster = make_cluster(base_records(), controllers=(10, 11, 12))
    follower = make_follower(cluster.addresses(), max_wait_ms=50)
    assert follower.wait_for_offset(cluster.next_offset - 1, 10)
    serving = cluster.controllers[cluster.fetches[-1][0]]
    serving.kill()
    last = cluster.append([r.topic("after", "id-after")])
    assert follower.wait_for_offset(last, 10)
    assert any(node != serving.node_id for node, _ in cluster.fetches)
    assert recorded_offsets == list(range(last + 1))


def test_leaves_a_stalled_controller(make_cluster, make_follower):
    # A paused controller keeps its connection up: only its silence shows, long
    # before the stream's deadline.
    cluster = make_cluster(base_records(), controllers=(10, 11))
    cluster.controllers[10].stalled = True
    follower = make_follower(cluster.addresses(), stream_timeout_s=60, silence_s=0.3)
    assert follower.wait_for_offset(cluster.next_offset - 1, 10)
    assert cluster.fetches[0][0] == 10
    assert any(node == 11 for node, _ in cluster.fetches)


def test_a_slow_apply_is_not_the_controllers_silence(make_cluster, make_follower):
    cluster = make_cluster(base_records(), controllers=(10, 11))
    applied = threading.Event()

    def slow_on_change(*args) -> None:
        if not applied.is_set():
            time.sleep(1.0)  # The broker is busy, far longer than silence_s.
        applied.set()

    follower = make_follower(
        cluster.addresses(), slow_on_change, stream_timeout_s=60, silence_s=0.3, max_wait_ms=50
    )
    assert follower.wait_for_offset(cluster.next_offset - 1, 10)
    last = cluster.append([r.topic("after", "id-after")])
    assert follower.wait_for_offset(last, 10)
    assert applied.is_set()
    assert [node for node, _ in cluster.fetches] == [10]


def test_offset_out_of_range_moves_on_and_never_rewinds(make_cluster, make_follower):
    cluster = make_cluster(base_records())
    follower = make_follower(cluster.addresses(), max_wait_ms=50)
    assert follower.wait_for_offset(cluster.next_offset - 1, 10)
    applied = follower.offset
    # A controller that lost its log answers OFFSET_OUT_OF_RANGE; the follower keeps its image.
    with cluster.cond:
        truncated = cluster.entries[:2]
        cluster.entries, saved = truncated, cluster.entries
    seen = len(cluster.fetches)
    eventually(
        lambda: sum(o == applied + 1 for _, o in cluster.fetches[seen:]) >= 2,
        what="refused fetches",
    )
    assert follower.offset == applied
    with cluster.cond:
        cluster.entries = saved
    last = cluster.append([r.no_op()])
    assert follower.wait_for_offset(last, 10)


def test_stop_is_bounded_while_long_polling(make_cluster):
    cluster = make_cluster(base_records())
    follower = MetadataFollower(cluster.addresses(), BROKER, max_wait_ms=60_000)
    follower.start()
    assert follower.wait_for_offset(cluster.next_offset - 1, 10)
    started = time.monotonic()
    assert follower.stop(5.0)
    assert time.monotonic() - started < 2.0
    assert not follower.running


def test_stop_is_bounded_with_no_controller_up():
    follower = MetadataFollower(["127.0.0.1:1", "127.0.0.1:2"], BROKER)
    follower.start()
    eventually(lambda: follower.current_address == "127.0.0.1:2", what="address switch")
    assert follower.stop(5.0)


# -- BrokerLifecycle -----------------------------------------------------------


def broker_config(cluster: FakeCluster, **overrides) -> NodeConfig:
    values = {
        "node.id": BROKER,
        "controller.quorum.voters": cluster.voters(),
        "listeners": "127.0.0.1:0",
        "cluster.id": "test-cluster",
        "broker.heartbeat.interval.ms": 100,
        "broker.session.timeout.ms": 3000,
    }
    values.update(overrides)
    return NodeConfig(values)


@pytest.fixture
def make_broker(make_follower, cleanup):
    def make(cluster: FakeCluster, client_addresses=None) -> BrokerLifecycle:
        follower = make_follower(cluster.addresses(), max_wait_ms=50)
        client = ControllerClient(client_addresses or cluster.addresses())
        cleanup(client.close)
        lifecycle = BrokerLifecycle(
            broker_config(cluster), follower, client, listener=("127.0.0.1", 9001)
        )
        lifecycle.start()
        cleanup(lambda: lifecycle.stop(5.0))
        return lifecycle

    return make


def test_registers_heartbeats_and_is_unfenced(make_cluster, make_broker):
    cluster = make_cluster(base_records())
    lifecycle = make_broker(cluster)
    eventually(lambda: lifecycle.state == "running", what="running")
    assert lifecycle.registrations == 1
    assert re.fullmatch(r"[0-9a-f]{32}", lifecycle.incarnation_id)
    ((broker_id, incarnation, _),) = cluster.registrations
    assert (broker_id, incarnation) == (BROKER, lifecycle.incarnation_id)
    registered = cluster.image.brokers[BROKER]
    assert registered.listeners == (Endpoint("PLAINTEXT", "127.0.0.1", 9001),)
    assert lifecycle.broker_epoch == registered.broker_epoch
    assert cluster.heartbeats[-1].metadata_offset >= lifecycle.broker_epoch
    offsets = [hb.metadata_offset for hb in cluster.heartbeats]
    assert offsets == sorted(offsets)


def test_controller_failover_does_not_reregister(make_cluster, make_broker):
    cluster = make_cluster(base_records(), controllers=(10, 11, 12))
    # Start from a standby: the client follows its NOT_CONTROLLER hint.
    lifecycle = make_broker(cluster, client_addresses=[cluster.controllers[11].address])
    eventually(lambda: lifecycle.state == "running", what="running")
    epoch = lifecycle.broker_epoch
    cluster.controllers[10].kill()
    cluster.active_id = 12
    beats = len(cluster.heartbeats)
    eventually(lambda: cluster.heartbeat_served_by[beats:].count(12) >= 3, what="heartbeats to 12")
    assert lifecycle.registrations == 1
    assert lifecycle.broker_epoch == epoch
    assert lifecycle.state == "running"
    assert [node for _, _, node in cluster.registrations] == [10]


def test_stale_broker_epoch_registers_again(make_cluster, make_broker):
    cluster = make_cluster(base_records())
    lifecycle = make_broker(cluster)
    eventually(lambda: lifecycle.state == "running", what="running")
    first_epoch = lifecycle.broker_epoch
    cluster.expire(BROKER)
    eventually(lambda: lifecycle.registrations == 2, what="second registration")
    eventually(lambda: lifecycle.state == "running", what="running again")
    assert lifecycle.broker_epoch > first_epoch
    # The same process keeps its incarnation id.
    assert {inc for _, inc, _ in cluster.registrations} == {lifecycle.incarnation_id}


def test_controlled_shutdown_moves_leadership_first(make_cluster, make_broker):
    cluster = make_cluster(base_records())
    lifecycle = make_broker(cluster)
    eventually(lambda: lifecycle.state == "running", what="running")
    assert any(p.leader == BROKER for _, _, p in cluster.image.iter_partitions())
    assert lifecycle.shutdown(5.0)
    assert lifecycle.state == "stopped"
    assert any(hb.want_shutdown for hb in cluster.heartbeats)
    assert not any(p.leader == BROKER for _, _, p in cluster.image.iter_partitions())
    assert cluster.image.brokers[BROKER].in_controlled_shutdown


def test_controlled_shutdown_times_out_without_controller(make_cluster, make_broker):
    cluster = make_cluster(base_records())
    lifecycle = make_broker(cluster)
    eventually(lambda: lifecycle.state == "running", what="running")
    cluster.close()
    started = time.monotonic()
    assert not lifecycle.shutdown(1.0)
    assert time.monotonic() - started < 4.0
    assert lifecycle.state == "stopped"


# -- BrokerNode ----------------------------------------------------------------


def test_broker_node_serves_describe_and_tracks_leadership(make_cluster, cleanup, tmp_path):
    cluster = make_cluster(base_records(topics=2), controllers=(10, 11))
    config = broker_config(cluster, **{"log.dirs": str(tmp_path / "data")})
    node = BrokerNode(config, controlled_shutdown_timeout_s=5.0)
    node.start()
    cleanup(lambda: node.stop(controlled=False))
    channel = grpc.insecure_channel(f"127.0.0.1:{node.port}")
    cleanup(channel.close)
    stub = broker_pb2_grpc.BrokerStub(channel)

    def describe() -> broker_pb2.DescribeBrokerResponse:
        return stub.DescribeBroker(broker_pb2.DescribeBrokerRequest(), timeout=5)

    eventually(lambda: describe().state == "running", what="running")
    response = describe()
    assert response.broker_id == BROKER
    assert response.registrations == 1
    assert response.controller_epoch == 1
    assert response.broker_epoch == cluster.image.brokers[BROKER].broker_epoch
    roles = {(p.topic, p.partition): p.role for p in response.partitions}
    assert roles == {
        ("topic0", 0): "leader",
        ("topic0", 1): "follower",
        ("topic1", 0): "leader",
        ("topic1", 1): "follower",
    }
    # The broker registered the port it really listens on.
    assert cluster.image.brokers[BROKER].endpoint("PLAINTEXT").port == node.port

    last = cluster.append([r.partition_change("id0", 0, leader=2), r.remove_topic("id1")])
    eventually(lambda: describe().metadata_offset >= last, what="metadata caught up")
    after = {(p.topic, p.partition): (p.role, p.leader) for p in describe().partitions}
    assert after == {("topic0", 0): ("follower", 2), ("topic0", 1): ("follower", 2)}

    cluster.append([r.partition_change("id0", 1, leader=BROKER)])
    node.stop(controlled=True)
    assert node.wait(0)
    assert node.lifecycle is not None and node.lifecycle.state == "stopped"
    assert any(hb.want_shutdown for hb in cluster.heartbeats)
    assert not any(p.leader == BROKER for _, _, p in cluster.image.iter_partitions())
