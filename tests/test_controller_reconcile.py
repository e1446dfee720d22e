"""Broker transitions too large for one batch: the state record first, then the
partition changes in slices (quorum/controller/reconcile.py).

The pure tests drive ``Reconciler.step`` by hand and commit each slice; the
runtime tests run the same through ``ControllerRuntime`` over the in-memory log,
with a slice of two partitions so that every transition here is sliced.
"""

from __future__ import annotations

import pytest
from raftka.v1 import common_pb2 as c
from raftka.v1 import controller_pb2 as cpb
from test_controller_harness import CLUSTER_ID, Cluster, check_partitions, isr_request
from test_controller_runtime import Clock, become_active, create_topic, heartbeat, register

from quorum import records as r
from quorum.controller import brokers, partitions
from quorum.controller.reconcile import Reconciler
from quorum.controller.runtime import ControllerRuntime, RuntimeSettings
from quorum.image import NO_LEADER, MetadataImage
from quorum.log import InMemoryMetadataLog, ProposeOutcome
from quorum.replay import replay_batch


def six_partitions(count: int = 6) -> Cluster:
    """Brokers 1-3, topic "t" with 6 partitions, each replicated on all three:
    every broker is in 6 ISRs and leads 2 partitions."""
    cluster = Cluster()
    cluster.start_brokers(1, 2, 3)
    cluster.create_topic("t", partitions=count, rf=3)
    assert {cluster.partition("t", i).leader for i in range(6)} == {1, 2, 3}
    return cluster


def commit_raw(cluster: Cluster, records) -> None:
    """Commit without the harness's partition check, which a half-done transition
    (a fenced broker still leading) is allowed to fail."""
    image, no_ops = replay_batch(cluster.image, records, cluster.next_offset)
    assert no_ops == []
    cluster.image, cluster.next_offset = image, cluster.next_offset + len(records)


def finish(cluster: Cluster, reconciler: Reconciler) -> list[list]:
    """Step and commit until the reconciler is idle; return the slices."""
    slices = []
    for _ in range(100):
        if reconciler.idle:
            return slices
        records = reconciler.step(cluster.image)
        if records:
            commit_raw(cluster, records)
            slices.append(records)
    raise AssertionError("the reconciler never became idle")


def partitions_of(image: MetadataImage) -> dict:
    return {(topic.name, index): part for topic, index, part in image.iter_partitions()}


def in_isr_beside_others(image: MetadataImage, broker_id: int) -> list:
    return [
        (topic.name, index)
        for topic, index, part in image.iter_partitions()
        if broker_id in part.isr and len(part.isr) > 1
    ]


def test_a_fencing_too_large_for_one_batch_commits_alone_and_is_finished_in_slices():
    inline, sliced = six_partitions(12), six_partitions(12)  # broker 2 leads 4 of 12
    inline.commit(brokers.fence_broker(inline.image, 2).records)

    fencing = brokers.fence_broker(sliced.image, 2, limit=5)
    assert [rec.WhichOneof("record") for rec in fencing.records] == ["fence_broker"]
    assert fencing.leaving == (2,)
    commit_raw(sliced, fencing.records)
    assert sliced.image.brokers[2].fenced and sliced.image.leads(2)

    reconciler = Reconciler(slice_records=1)
    reconciler.leave(2)
    assert reconciler.settling == {2}
    slices = finish(sliced, reconciler)

    assert [len(s) for s in slices] == [1] * 12
    # Leaderships move first: the first four slices are the partitions broker 2
    # led (in map order they would come anywhere).
    assert [rec.partition_change.HasField("leader") for (rec,) in slices] == [True] * 4 + [
        False
    ] * 8
    assert not sliced.image.leads(2)
    assert reconciler.settling == frozenset()
    # The same end state, partition by partition, as the one-batch fencing.
    assert partitions_of(sliced.image) == partitions_of(inline.image)
    check_partitions(sliced.image)


def test_a_restarted_broker_is_not_unfenced_until_it_has_left_its_old_isrs():
    cluster = six_partitions()
    ctx = cluster.ctx()
    ctx.transition_slice = 5
    restart = cpb.RegisterBrokerRequest(
        broker_id=1, incarnation_id="inc-1-restarted", cluster_id=CLUSTER_ID
    )
    result = brokers.register_broker(cluster.image, restart, ctx)
    assert result.response.error.code == c.NONE
    assert [rec.WhichOneof("record") for rec in result.records] == ["register_broker"]
    assert result.leaving == (1,)
    assert result.response.broker_epoch == cluster.next_offset
    commit_raw(cluster, result.records)
    reconciler = Reconciler(slice_records=2)
    reconciler.leave(1)

    def beat() -> cpb.BrokerHeartbeatResponse:
        ctx = cluster.ctx()
        ctx.transition_slice, ctx.settling = 5, reconciler.settling
        request = cpb.BrokerHeartbeatRequest(
            broker_id=1, broker_epoch=cluster.epoch(1), metadata_offset=cluster.next_offset - 1
        )
        outcome = brokers.heartbeat(cluster.image, request, ctx, cluster.heartbeats)
        commit_raw(cluster, outcome.records)
        return outcome.response

    # Caught up, but still in ISRs of its previous incarnation: stays fenced.
    response = beat()
    assert response.is_caught_up and response.is_fenced
    commit_raw(cluster, reconciler.step(cluster.image))
    assert beat().is_fenced
    finish(cluster, reconciler)
    assert in_isr_beside_others(cluster.image, 1) == []
    assert not beat().is_fenced
    check_partitions(cluster.image)


def test_a_shutting_down_broker_may_exit_only_once_it_has_left_its_isrs():
    cluster = six_partitions(12)
    reconciler = Reconciler(slice_records=2)

    def beat() -> cpb.BrokerHeartbeatResponse:
        ctx = cluster.ctx()
        ctx.transition_slice, ctx.settling = 5, reconciler.settling
        request = cpb.BrokerHeartbeatRequest(
            broker_id=2,
            broker_epoch=cluster.epoch(2),
            metadata_offset=cluster.next_offset - 1,
            want_shutdown=True,
        )
        outcome = brokers.heartbeat(cluster.image, request, ctx, cluster.heartbeats)
        commit_raw(cluster, outcome.records)
        for broker_id in outcome.leaving:
            reconciler.leave(broker_id)
        return outcome.response

    assert not beat().should_shut_down  # the state record alone: it still leads
    assert cluster.image.brokers[2].in_controlled_shutdown
    while cluster.image.leads(2):
        commit_raw(cluster, reconciler.step(cluster.image))
    assert in_isr_beside_others(cluster.image, 2) != []
    assert not beat().should_shut_down, "it leads nothing, but is still in ISRs"
    finish(cluster, reconciler)
    assert in_isr_beside_others(cluster.image, 2) == []
    assert beat().should_shut_down
    check_partitions(cluster.image)


def test_unfencing_with_many_leaderless_partitions_elects_them_in_slices():
    """A whole cluster went down: the last broker fenced is the last ISR member of
    every partition, and its return elects it everywhere, two partitions a slice."""
    cluster = six_partitions()
    for broker_id in (1, 2, 3):
        cluster.fence(broker_id)
    assert len(cluster.image.leaderless) == 6
    unfence = brokers.unfence_broker(cluster.image, 3, cluster.epoch(3), limit=5)
    assert [rec.WhichOneof("record") for rec in unfence.records] == ["unfence_broker"]
    assert unfence.electing
    commit_raw(cluster, unfence.records)
    reconciler = Reconciler(slice_records=2)
    reconciler.elect()
    slices = finish(cluster, reconciler)
    assert [len(s) for s in slices] == [2, 2, 2]
    assert len(cluster.image.leaderless) == 0
    assert {part.leader for part in partitions_of(cluster.image).values()} == {3}
    check_partitions(cluster.image)


def test_reset_finds_the_work_left_in_the_committed_image():
    """A new active controller knows nothing of its predecessor's slices; the
    image says what is left (an inactive broker still in ISRs, leaderless
    partitions that can have a leader)."""
    cluster = six_partitions()
    commit_raw(cluster, brokers.fence_broker(cluster.image, 2, limit=0).records)
    first = Reconciler(slice_records=2)
    first.leave(2)
    commit_raw(cluster, first.step(cluster.image))  # then the controller fails over

    second = Reconciler(slice_records=2)
    second.reset(cluster.image)
    assert second.settling == {2} and not second.idle
    finish(cluster, second)
    assert in_isr_beside_others(cluster.image, 2) == [] and not cluster.image.leads(2)
    check_partitions(cluster.image)

    healthy = Reconciler()
    healthy.reset(six_partitions().image)
    assert healthy.idle and healthy.step(six_partitions().image) == []


def test_a_slice_concerns_one_broker_and_stays_within_its_scan_budget():
    """Two brokers leaving the same partitions: a slice for both, worked out on one
    image, would let the second change of a partition put back the first's broker."""
    cluster = six_partitions()
    for broker_id in (1, 2):
        commit_raw(cluster, brokers.fence_broker(cluster.image, broker_id, limit=0).records)
    reconciler = Reconciler(slice_records=100, scan_budget=100)
    reconciler.leave(2)
    reconciler.leave(1)
    slices = finish(cluster, reconciler)
    # Broker 1's leaderships, then the rest of its ISRs, then broker 2's, though the
    # budget had room for more: one broker a slice, and each partition changed once
    # a slice (the second pass sees the first's changes).
    assert [len(s) for s in slices] == [2, 4, 2, 4]
    for records, leaving in zip(slices, (1, 1, 2, 2), strict=True):
        assert len({rec.partition_change.partition for rec in records}) == len(records)
        assert all(leaving not in rec.partition_change.isr.ids for rec in records)
        assert all(3 in rec.partition_change.isr.ids for rec in records)
    # A budget of four partitions examined per step: never more changes than that.
    again = six_partitions()
    commit_raw(again, brokers.fence_broker(again.image, 3, limit=0).records)
    small = Reconciler(slice_records=100, scan_budget=4)
    small.leave(3)
    slices = finish(again, small)
    assert max(map(len, slices)) <= 4 and sum(map(len, slices)) == 6 and len(slices) > 2
    for part in partitions_of(cluster.image).values():
        assert part.isr == (3,) and part.leader == 3
    check_partitions(cluster.image)


def test_a_fenced_leader_cannot_change_an_isr_while_its_leaderships_move():
    cluster = six_partitions()
    commit_raw(cluster, brokers.fence_broker(cluster.image, 2, limit=0).records)
    topic = cluster.image.topic_by_name("t")
    index, part = next((i, p) for i, p in sorted(topic.partitions.items()) if p.leader == 2)
    request = isr_request(
        2,
        cluster.epoch(2),
        topic="t",
        topic_id=topic.topic_id,
        partition=index,
        leader_epoch=part.leader_epoch,
        partition_epoch=part.partition_epoch,
        new_isr=[2],
    )
    result = partitions.alter_partition(cluster.image, request, cluster.ctx())
    assert result.records == []
    assert result.response.error.code == c.NOT_LEADER_OR_FOLLOWER
    assert "fenced" in result.response.error.message


# -- through the runtime -------------------------------------------------------------


@pytest.fixture
def sliced():
    clock = Clock()
    log = InMemoryMetadataLog(node_id=1, clock=clock)
    ids = iter(f"topic-{i}" for i in range(1000))
    runtime = ControllerRuntime(
        log,
        RuntimeSettings(node_id=1, cluster_id="c1", session_timeout_ms=3000, transition_slice=2),
        monotonic=clock,
        wall_ms=lambda: 1_700_000_000_000,
        new_topic_id=lambda: next(ids),
    )
    log.listener = runtime
    become_active(log, runtime)
    epochs = {b: register(log, runtime, b) for b in (1, 2, 3)}
    for b in (1, 2, 3):
        assert not heartbeat(log, runtime, b, epochs[b]).is_fenced
    created = create_topic(log, runtime, "t", 6, 3)
    assert created.results[0].error.code == c.NONE
    return log, runtime, clock, epochs


def record_batches(log: InMemoryMetadataLog) -> list[list[str]]:
    """From now on, the record kinds of each committed batch, batch by batch."""
    batches: list[list[str]] = []
    on_commit = log.listener.on_commit

    def seen(result, state) -> None:
        if result.accepted and result.last_offset >= 0:
            kinds = [e.record.WhichOneof("record") for e in state.entries()]
            first = result.base_offset - state.entries()[0].offset
            batches.append(kinds[first : first + result.last_offset - result.base_offset + 1])
        on_commit(result, state)

    log.listener.on_commit = seen  # type: ignore[method-assign]
    return batches


def test_an_expired_session_of_a_broker_in_many_isrs_is_fenced_then_finished(sliced):
    log, runtime, clock, epochs = sliced
    batches = record_batches(log)
    clock.now += 2.0
    for b in (1, 3):
        heartbeat(log, runtime, b, epochs[b])
    clock.now += 2.0  # broker 2's session (3 s) has expired
    log.run_pending()
    image = log.state.image
    assert image.brokers[2].fenced
    assert in_isr_beside_others(image, 2) == [] and not image.leads(2)
    assert runtime.reconciler.idle
    kinds = [k for k in batches if k]
    fencing = next(i for i, k in enumerate(kinds) if "fence_broker" in k)
    # The state record first; the first slice may share its batch.
    assert kinds[fencing][0] == "fence_broker" and len(kinds[fencing]) <= 3
    changes = [k for batch in kinds[fencing:] for k in batch if k == "partition_change"]
    assert len(changes) == 6  # one change per partition broker 2 was in
    assert all(len(batch) <= 3 for batch in kinds[fencing:])
    check_partitions(image)


def test_a_restarted_broker_registers_and_is_unfenced_after_its_slices(sliced):
    log, runtime, clock, epochs = sliced
    epoch = register(log, runtime, 1, incarnation="inc-1-restarted")
    assert epoch > epochs[1]
    # run_pending ran every slice before it returned; the broker left every ISR
    # it shared with others, and only now may its heartbeat unfence it.
    assert in_isr_beside_others(log.state.image, 1) == []
    response = heartbeat(log, runtime, 1, epoch)
    assert not response.is_fenced
    check_partitions(log.state.image)


def test_work_left_by_a_batch_of_unknown_outcome_is_found_again_after_the_resync(sliced):
    log, runtime, clock, epochs = sliced
    shutdown = runtime.submit(
        "heartbeat",
        cpb.BrokerHeartbeatRequest(
            broker_id=2,
            broker_epoch=epochs[2],
            metadata_offset=log.state.next_offset,
            want_shutdown=True,
        ),
    )
    # The batch with the shutdown record (and the first slice) commits, but the
    # controller does not learn it: it resynchronises and forgets its slices.
    log.fail_next(ProposeOutcome.UNKNOWN)
    log.run_pending()
    assert shutdown.result().error.code == c.UNKNOWN_OUTCOME
    image = log.state.image
    assert image.brokers[2].in_controlled_shutdown
    assert not image.leads(2) and in_isr_beside_others(image, 2) == []
    assert runtime.reconciler.idle
    check_partitions(image)


def test_a_slice_that_is_not_applied_is_found_again_after_the_resync(sliced):
    """The registration commits; the first slice after it does not. The controller
    resynchronises and must find that slice's work again in the committed image, or
    the restarted broker is unfenced while still in ISRs beside others."""
    log, runtime, clock, epochs = sliced
    on_commit = runtime.on_commit
    armed = [True]

    def fail_the_slice_after_the_registration(result, state) -> None:
        on_commit(result, state)
        if armed[0] and result.accepted and result.last_offset >= 0:
            first = result.base_offset - state.entries()[0].offset
            kinds = [e.record.WhichOneof("record") for e in state.entries()[first:]]
            if "register_broker" in kinds:
                armed[0] = False
                log.fail_next(ProposeOutcome.NOT_APPLIED)

    runtime.on_commit = fail_the_slice_after_the_registration  # type: ignore[method-assign]
    epoch = register(log, runtime, 1, incarnation="inc-1-restarted")
    assert not armed[0], "no slice followed the registration"
    for _ in range(5):
        clock.now += 0.5
        log.run_pending()
    response = heartbeat(log, runtime, 1, epoch)
    assert in_isr_beside_others(log.state.image, 1) == []
    assert not response.is_fenced
    check_partitions(log.state.image)


def test_a_new_active_controller_finishes_what_the_last_one_began(sliced):
    log, runtime, clock, epochs = sliced
    # The previous controller committed the fencing and nothing after it.
    log.propose(
        r.encode_batch(
            [r.fence_broker(2, epochs[2])],
            controller_epoch=log.state.image.controller_epoch,
            proposer_id=1,
            expected_base_offset=log.state.next_offset,
            append_time_ms=0,
        ),
        lambda result, outcome: None,
    )
    log.set_leader(2)
    log.run_pending()
    assert not runtime.active and log.state.image.leads(2)
    log.set_leader(1)
    log.run_pending()
    assert runtime.active
    image = log.state.image
    assert in_isr_beside_others(image, 2) == [] and not image.leads(2)
    assert all(part.leader != NO_LEADER for part in partitions_of(image).values())
    check_partitions(image)


def test_a_slice_that_fails_to_be_worked_out_does_not_stop_the_controller(sliced, monkeypatch):
    """A bug in a slice is logged and the work looked for again; requests and the
    other batches go on."""
    log, runtime, clock, epochs = sliced
    calls = [0]
    real_step = Reconciler.step

    def step_once_broken(self, image):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("a bug")
        return real_step(self, image)

    monkeypatch.setattr(Reconciler, "step", step_once_broken)
    epoch = register(log, runtime, 1, incarnation="inc-1-restarted")
    assert calls[0] >= 2
    assert in_isr_beside_others(log.state.image, 1) == []
    assert not heartbeat(log, runtime, 1, epoch).is_fenced
    check_partitions(log.state.image)


def test_a_shutting_down_broker_is_told_to_exit_only_once_out_of_its_isrs(sliced):
    """Heartbeats asking to shut down, one after every commit while the broker's
    leaderships and ISRs are left in slices: none is answered should_shut_down while
    the broker is still in an ISR beside others (Kafka's broker waits for that too)."""
    log, runtime, clock, epochs = sliced
    assert create_topic(log, runtime, "wide", 30, 3).results[0].error.code == c.NONE
    answers: list[tuple[bool, list]] = []
    on_commit = log.listener.on_commit

    def beat() -> None:
        request = cpb.BrokerHeartbeatRequest(
            broker_id=2,
            broker_epoch=epochs[2],
            metadata_offset=log.state.next_offset,
            want_shutdown=True,
        )
        runtime.submit("heartbeat", request).add_done_callback(
            lambda f: answers.append(
                (f.result().should_shut_down, in_isr_beside_others(log.state.image, 2))
            )
        )

    def beat_after_each(result, state) -> None:
        on_commit(result, state)
        if len(answers) < 40 and not any(told for told, _ in answers):
            beat()

    log.listener.on_commit = beat_after_each  # type: ignore[method-assign]
    beat()
    log.run_pending()
    told = [still_in for should_shut_down, still_in in answers if should_shut_down]
    assert told, answers
    assert told[0] == [], "told to exit while still in ISRs beside others"
    assert len(answers) > 2  # it did ask while the slices were under way
