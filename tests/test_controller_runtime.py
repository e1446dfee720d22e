"""The controller runtime over the in-memory log: activation, batching, answers
only after commit, unknown outcomes, resync and fencing of a deposed epoch."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
from raftka.v1 import common_pb2
from raftka.v1 import controller_pb2 as cpb
from test_controller_harness import isr_outcome, isr_request

from quorum import records as r
from quorum.controller.runtime import ControllerRuntime, RuntimeSettings
from quorum.log import InMemoryMetadataLog, ProposeOutcome


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env():
    clock = Clock()
    log = InMemoryMetadataLog(node_id=1, clock=clock)
    ids = iter(f"topic-{i}" for i in range(1000))
    runtime = ControllerRuntime(
        log,
        RuntimeSettings(node_id=1, cluster_id="c1", session_timeout_ms=3000),
        monotonic=clock,
        wall_ms=lambda: 1_700_000_000_000,
        new_topic_id=lambda: next(ids),
    )
    log.listener = runtime
    return log, runtime, clock


def become_active(log: InMemoryMetadataLog, runtime: ControllerRuntime) -> None:
    log.set_leader(1)
    log.run_pending()
    assert runtime.active
    assert log.state.image.controller_epoch == log.term()


def call(log: InMemoryMetadataLog, runtime: ControllerRuntime, kind: str, request) -> object:
    future = runtime.submit(kind, request)
    log.run_pending()
    assert future.done(), f"{kind} was not answered"
    return future.result()


def register(log, runtime, broker_id: int, incarnation: str = "") -> int:
    response = call(
        log,
        runtime,
        "register_broker",
        cpb.RegisterBrokerRequest(
            broker_id=broker_id,
            incarnation_id=incarnation or f"inc-{broker_id}",
            cluster_id="c1",
        ),
    )
    assert response.error.code == common_pb2.NONE, response.error
    return response.broker_epoch


def create_topic(log, runtime, name: str, partitions: int, rf: int) -> cpb.CreateTopicsResponse:
    """CreateTopics of one topic, run to its answer."""
    request = cpb.CreateTopicsRequest(
        topics=[cpb.CreatableTopic(name=name, num_partitions=partitions, replication_factor=rf)]
    )
    return call(log, runtime, "create_topics", request)  # type: ignore[return-value]


def heartbeat(log, runtime, broker_id: int, epoch: int, offset: int | None = None):
    return call(
        log,
        runtime,
        "heartbeat",
        cpb.BrokerHeartbeatRequest(
            broker_id=broker_id,
            broker_epoch=epoch,
            metadata_offset=log.state.next_offset if offset is None else offset,
        ),
    )


def test_inactive_until_epoch_claim_commits(env):
    log, runtime, _ = env
    assert not runtime.active
    response = call(log, runtime, "register_broker", cpb.RegisterBrokerRequest(broker_id=1))
    assert response.error.code == common_pb2.NOT_CONTROLLER
    assert log.state.next_offset == 0, "an inactive controller must write nothing"
    become_active(log, runtime)
    entry = log.state.entries()[0]
    assert entry.record.controller_epoch.controller_id == 1


def test_broker_epoch_is_registration_offset_and_answer_after_commit(env):
    log, runtime, _ = env
    become_active(log, runtime)
    future: Future = runtime.submit(
        "register_broker", cpb.RegisterBrokerRequest(broker_id=7, incarnation_id="a")
    )
    assert not future.done()
    log.run_pending()
    epoch = future.result().broker_epoch
    assert log.state.image.brokers[7].broker_epoch == epoch
    assert log.state.entries()[epoch - log.state.log_start_offset].record.HasField(
        "register_broker"
    )


def test_requests_queued_together_share_one_raft_entry(env):
    log, runtime, _ = env
    become_active(log, runtime)
    futures = [
        runtime.submit(
            "register_broker", cpb.RegisterBrokerRequest(broker_id=i, incarnation_id="x")
        )
        for i in range(5)
    ]
    entries = log.run_pending()
    assert entries == 1, "five queued registrations should commit as one batch"
    epochs = [f.result().broker_epoch for f in futures]
    assert epochs == sorted(set(epochs)), "each registration has its own offset"


def test_unknown_outcome_is_not_reported_as_failure_and_resyncs(env):
    log, runtime, _ = env
    become_active(log, runtime)
    log.fail_next(ProposeOutcome.UNKNOWN)
    response = call(
        log, runtime, "register_broker", cpb.RegisterBrokerRequest(broker_id=3, incarnation_id="i")
    )
    assert response.error.code == common_pb2.UNKNOWN_OUTCOME
    # The in-memory log applied it anyway, as Raft may after a timeout.
    assert 3 in log.state.image.brokers
    # After resync, the controller serves again from the committed image.
    log.run_pending()
    again = call(
        log, runtime, "register_broker", cpb.RegisterBrokerRequest(broker_id=3, incarnation_id="i")
    )
    assert again.error.code == common_pb2.NONE
    assert again.broker_epoch == log.state.image.brokers[3].broker_epoch


def test_not_applied_is_retriable_and_changes_nothing(env):
    log, runtime, _ = env
    become_active(log, runtime)
    before = log.state.next_offset
    log.fail_next(ProposeOutcome.NOT_APPLIED)
    response = call(
        log, runtime, "register_broker", cpb.RegisterBrokerRequest(broker_id=4, incarnation_id="i")
    )
    assert response.error.code == common_pb2.NOT_CONTROLLER
    assert log.state.next_offset == before
    assert 4 not in log.state.image.brokers


def test_deposed_controller_batches_are_refused_at_replay(env):
    log, runtime, _ = env
    become_active(log, runtime)
    old_epoch = runtime.epoch
    # Another controller takes over: its epoch claim commits first.
    claim = r.encode_batch(
        [r.controller_epoch(old_epoch + 5, 2)],
        controller_epoch=old_epoch + 5,
        proposer_id=2,
        expected_base_offset=-1,
        append_time_ms=0,
    )
    results = []
    log.propose(claim, lambda res, out: results.append(res))
    log.run_pending()
    assert results[0].accepted
    # A late batch from the old epoch must not apply.
    late = r.encode_batch(
        [r.topic("late", "late-id")],
        controller_epoch=old_epoch,
        proposer_id=1,
        expected_base_offset=log.state.next_offset,
        append_time_ms=0,
    )
    log.propose(late, lambda res, out: results.append(res))
    log.run_pending()
    assert not results[1].accepted and "stale controller epoch" in results[1].reason
    assert log.state.image.topic_by_name("late") is None


def test_leadership_loss_answers_queued_requests_not_controller(env):
    log, runtime, _ = env
    become_active(log, runtime)
    future = runtime.submit("register_broker", cpb.RegisterBrokerRequest(broker_id=1))
    log.set_leader(2)
    log.run_pending()
    assert future.result().error.code == common_pb2.NOT_CONTROLLER
    assert not runtime.active


def test_session_expiry_fences_and_moves_leadership(env):
    log, runtime, clock = env
    become_active(log, runtime)
    epochs = {b: register(log, runtime, b) for b in (1, 2, 3)}
    for b, e in epochs.items():
        assert not heartbeat(log, runtime, b, e).is_fenced
    created = create_topic(log, runtime, "orders", 3, 3)
    assert created.results[0].error.code == common_pb2.NONE, created
    topic = log.state.image.topic_by_name("orders")
    led_by_1 = [i for i, p in topic.partitions.items() if p.leader == 1]
    assert led_by_1
    # Brokers 2 and 3 keep heartbeating; broker 1 goes silent.
    for _ in range(4):
        clock.now += 1.0
        for b in (2, 3):
            heartbeat(log, runtime, b, epochs[b])
        log.run_pending()
    image = log.state.image
    assert image.brokers[1].fenced
    assert not image.brokers[2].fenced and not image.brokers[3].fenced
    for i, p in image.topic_by_name("orders").partitions.items():
        assert p.leader in (2, 3), f"partition {i} still led by a fenced broker"
        assert 1 not in p.isr


def test_committed_image_equals_a_replay_of_the_log_from_scratch(env, monkeypatch):
    """The leader skips replaying its own batches at commit when it already
    replayed them; the image must be exactly what a full replay gives."""
    log, runtime, clock = env
    from quorum import state as state_module

    replays = []
    real = state_module.replay_batch
    monkeypatch.setattr(state_module, "replay_batch", lambda *a: replays.append(a[2]) or real(*a))
    become_active(log, runtime)
    epochs = {b: register(log, runtime, b) for b in (1, 2, 3)}
    for b, e in epochs.items():
        heartbeat(log, runtime, b, e)
    futures = [
        runtime.submit(
            "create_topics",
            cpb.CreateTopicsRequest(
                topics=[cpb.CreatableTopic(name=f"t{i}", num_partitions=3, replication_factor=2)]
            ),
        )
        for i in range(10)
    ]
    log.run_pending()
    assert all(f.result().results[0].error.code == common_pb2.NONE for f in futures)
    call(log, runtime, "delete_topics", cpb.DeleteTopicsRequest(names=["t3"]))

    from quorum.image import EMPTY_IMAGE
    from quorum.replay import replay_batch

    tail = log.state.entries()
    assert tail[0].offset == 0
    rebuilt, _ = replay_batch(EMPTY_IMAGE, [e.record for e in tail], 0)
    assert rebuilt == log.state.image
    # Most batches took the fast path: only the epoch claim was replayed at commit.
    assert len(replays) <= 2, replays


def test_alter_partition_for_a_deleted_topic_cannot_touch_its_namesake(env):
    """A leader of the old 'orders' must not shrink the ISR of a new 'orders'."""
    log, runtime, _ = env
    become_active(log, runtime)
    epochs = {b: register(log, runtime, b) for b in (1, 2, 3)}
    for b, e in epochs.items():
        heartbeat(log, runtime, b, e)

    def create() -> str:
        request = cpb.CreateTopicsRequest(
            topics=[cpb.CreatableTopic(name="orders", num_partitions=1, replication_factor=3)]
        )
        result = call(log, runtime, "create_topics", request).results[0]
        assert result.error.code == common_pb2.NONE, result
        return result.topic_id

    old_id = create()
    old = log.state.image.partition(old_id, 0)
    call(log, runtime, "delete_topics", cpb.DeleteTopicsRequest(names=["orders"]))
    new_id = create()
    new = log.state.image.partition(new_id, 0)
    assert (old.leader_epoch, old.partition_epoch) == (new.leader_epoch, new.partition_epoch)

    def shrink(topic_id: str):
        return isr_outcome(
            call(
                log,
                runtime,
                "alter_partition",
                isr_request(
                    old.leader,
                    epochs[old.leader],
                    topic="orders",
                    topic_id=topic_id,
                    partition=0,
                    leader_epoch=old.leader_epoch,
                    partition_epoch=old.partition_epoch,
                    new_isr=[old.leader],
                ),
            )
        )

    stale = shrink(old_id)
    assert stale.error.code == common_pb2.UNKNOWN_TOPIC_ID
    assert log.state.image.partition(new_id, 0) == new, "the new topic was changed"
    if new.leader == old.leader:
        assert shrink(new_id).error.code == common_pb2.NONE


def test_a_request_too_large_for_one_batch_is_refused_whole():
    clock = Clock()
    log = InMemoryMetadataLog(node_id=1, clock=clock)
    runtime = ControllerRuntime(
        log,
        RuntimeSettings(node_id=1, cluster_id="c1", max_records_per_request=10),
        monotonic=clock,
        new_topic_id=lambda: "t-id",
    )
    log.listener = runtime
    become_active(log, runtime)
    epoch = register(log, runtime, 1)
    heartbeat(log, runtime, 1, epoch)
    before = (log.state.image, log.state.next_offset)
    response = create_topic(log, runtime, "huge", 50, 1)
    assert response.error.code == common_pb2.POLICY_VIOLATION
    assert "split it" in response.error.message
    assert (log.state.image, log.state.next_offset) == before
    small = create_topic(log, runtime, "small", 5, 1)
    assert small.results[0].error.code == common_pb2.NONE


def test_a_stream_ended_at_its_time_fences_only_after_two_missed_heartbeats():
    """A broker busy applying a large change reads its stream's end late; its
    heartbeats keep it in. Silent for two heartbeat intervals past the grace, it is
    fenced, long before the session timeout. A dropped stream fences after the grace."""
    clock = Clock()
    log = InMemoryMetadataLog(node_id=1, clock=clock)
    runtime = ControllerRuntime(
        log,
        RuntimeSettings(
            node_id=1,
            cluster_id="c1",
            session_timeout_ms=9000,
            heartbeat_interval_ms=2000,
            connection_loss_grace_ms=500,
        ),
        monotonic=clock,
        wall_ms=lambda: 1_700_000_000_000,
    )
    log.listener = runtime
    become_active(log, runtime)
    epochs = {b: register(log, runtime, b) for b in (1, 2, 3)}
    for b, e in epochs.items():
        assert not heartbeat(log, runtime, b, e).is_fenced

    def advance(seconds: float, beating: tuple[int, ...]) -> None:
        for _ in range(round(seconds / 0.1)):
            clock.now += 0.1
            for b in beating:
                if round(clock.now * 10) % 20 == 0:  # every 2 s
                    heartbeat(log, runtime, b, epochs[b])
            log.run_pending()

    runtime.broker_connection(1, opened=False, dropped=False)
    runtime.broker_connection(3, opened=False, dropped=False)
    log.run_pending()
    # Broker 1's heartbeat comes a second late: 3 s after the end, past grace plus
    # one interval (2.5 s), it is still in; broker 3 stays silent.
    advance(3.0, beating=(2,))
    heartbeat(log, runtime, 1, epochs[1])
    assert not log.state.image.brokers[1].fenced
    assert not log.state.image.brokers[3].fenced
    advance(1.7, beating=(1, 2))
    assert not log.state.image.brokers[1].fenced
    assert log.state.image.brokers[3].fenced  # 4.7 s: two heartbeats missed
    runtime.broker_connection(2, opened=False, dropped=True)
    log.run_pending()
    advance(0.7, beating=(1, 2))
    assert log.state.image.brokers[2].fenced
    assert not log.state.image.brokers[1].fenced


def test_a_controller_deposed_before_it_is_told_answers_not_controller(env):
    """Raft moves leadership on its own thread; until the log thread tells the
    runtime, a request must not be answered from the deposed controller's image,
    not even with a refusal (a broker acts on those)."""
    log, runtime, _ = env
    become_active(log, runtime)
    epoch = register(log, runtime, 1)
    log._leader = 2  # Raft has a new leader; the runtime has not heard yet
    stale = cpb.BrokerHeartbeatRequest(broker_id=1, broker_epoch=epoch + 5)
    future = runtime.submit("heartbeat", stale)
    log.run_pending()
    assert future.result().error.code == common_pb2.NOT_CONTROLLER
