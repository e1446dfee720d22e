"""Each controller request's refusals and answers, one rule per test."""

from __future__ import annotations

import pytest
from raftka.v1 import common_pb2 as c
from raftka.v1 import controller_pb2 as cpb
from raftka.v1 import metadata_pb2 as pb
from test_controller_harness import CLUSTER_ID, Cluster, isr_outcome, isr_request

from quorum.controller import brokers, partitions, producer_ids, topics
from quorum.controller.configs import validate_topic_configs
from quorum.controller.names import collides, validate_topic_name
from quorum.controller.placement import PlacementError, place_replicas
from quorum.records import CONFIG_TOPIC


@pytest.fixture
def cluster() -> Cluster:
    cluster = Cluster()
    cluster.start_brokers(1, 2, 3)
    return cluster


def create(cluster: Cluster, *new_topics: cpb.CreatableTopic, validate_only: bool = False):
    request = cpb.CreateTopicsRequest(topics=new_topics, validate_only=validate_only)
    return cluster.run(topics.create_topics, request)


def topic(name: str, partitions: int = 1, rf: int = 1, **configs: str) -> cpb.CreatableTopic:
    return cpb.CreatableTopic(
        name=name, num_partitions=partitions, replication_factor=rf, configs=configs
    )


def manual(name: str, *assignment: list[int]) -> cpb.CreatableTopic:
    return cpb.CreatableTopic(
        name=name,
        num_partitions=-1,
        replication_factor=-1,
        assignments=[pb.ReplicaList(ids=ids) for ids in assignment],
    )


# Registration.


@pytest.mark.parametrize(
    ("broker_id", "incarnation", "cluster_id", "code"),
    [
        (1, "x", "another-cluster", c.INCONSISTENT_CLUSTER_ID),
        (-1, "x", CLUSTER_ID, c.INVALID_REQUEST),
        (1, "", CLUSTER_ID, c.INVALID_REQUEST),
        (1, "x", "", c.NONE),  # a broker that does not know the cluster id yet
    ],
)
def test_registration_checks(broker_id, incarnation, cluster_id, code):
    cluster = Cluster()
    request = cpb.RegisterBrokerRequest(
        broker_id=broker_id, incarnation_id=incarnation, cluster_id=cluster_id
    )
    response = cluster.run(brokers.register_broker, request)
    assert response.error.code == code
    assert (broker_id in cluster.image.brokers) == (code == c.NONE)


def test_registration_epoch_is_the_offset_of_its_record():
    cluster = Cluster()
    cluster.register(1)
    assert cluster.register(2) == 1 == cluster.image.brokers[2].broker_epoch


# Topic names and configs.


@pytest.mark.parametrize("name", ["", ".", "..", "a" * 250, "bad name", "bad/name", "ü", "a+b"])
def test_illegal_topic_names(name):
    assert validate_topic_name(name) is not None


@pytest.mark.parametrize("name", ["a", "a" * 249, "Orders.v2_test-1", "..."])
def test_legal_topic_names(name):
    assert validate_topic_name(name) is None


def test_dot_and_underscore_collide_but_a_name_does_not_collide_with_itself(cluster):
    cluster.create_topic("metrics.cpu", 1, 1)
    assert collides(cluster.image, "metrics_cpu") == "metrics.cpu"
    assert collides(cluster.image, "metrics.cpu") is None
    assert collides(cluster.image, "metrics-cpu") is None


@pytest.mark.parametrize(
    "configs",
    [
        {"cleanup.policy": "delete"},
        {"cleanup.policy": "compact,delete"},
        {"retention.ms": "-1", "retention.bytes": "-1"},
        {"segment.bytes": "14", "segment.ms": "1"},
        {"min.insync.replicas": "2"},
        {"unclean.leader.election.enable": "TRUE"},
        {"compression.type": "zstd", "message.timestamp.type": "LogAppendTime"},
        {"delete.retention.ms": "0", "max.message.bytes": "1048588"},
        {"flush.messages": "1", "flush.ms": "0"},
    ],
)
def test_valid_topic_configs(configs):
    assert validate_topic_configs(configs) is None


@pytest.mark.parametrize(
    "configs",
    [
        {"no.such.config": "1"},
        {"cleanup.policy": "forever"},
        {"cleanup.policy": ""},
        {"retention.ms": "-2"},
        {"retention.ms": "soon"},
        {"retention.bytes": "-2"},
        {"segment.bytes": "13"},
        {"segment.bytes": str(2**31)},
        {"segment.ms": "0"},
        {"min.insync.replicas": "0"},
        {"unclean.leader.election.enable": "yes"},
        {"compression.type": "brotli"},
        {"message.timestamp.type": "createtime"},
        {"flush.messages": "0"},
        {"delete.retention.ms": "-1"},
        {"max.message.bytes": "-1"},
    ],
)
def test_invalid_topic_configs(configs):
    assert validate_topic_configs(configs) is not None


# CreateTopics.


@pytest.mark.parametrize(
    ("new_topic", "code"),
    [
        (topic("bad name"), c.INVALID_TOPIC_EXCEPTION),
        (topic("t", partitions=0), c.INVALID_PARTITIONS),
        (topic("t", partitions=-2), c.INVALID_PARTITIONS),
        (topic("t", rf=0), c.INVALID_REPLICATION_FACTOR),
        (topic("t", rf=-2), c.INVALID_REPLICATION_FACTOR),
        (topic("t", rf=4), c.INVALID_REPLICATION_FACTOR),
        (topic("t", **{"retention.ms": "-5"}), c.INVALID_CONFIG),
        (topic("t", **{"retention.msec": "5"}), c.INVALID_CONFIG),
        (manual("t", [1, 9]), c.INVALID_REPLICA_ASSIGNMENT),
        (manual("t", [1, 1]), c.INVALID_REPLICA_ASSIGNMENT),
        (manual("t", [1, 2], [3]), c.INVALID_REPLICA_ASSIGNMENT),
        (manual("t", []), c.INVALID_REPLICA_ASSIGNMENT),
    ],
)
def test_create_topic_refusals(cluster, new_topic, code):
    offset = cluster.next_offset
    (result,) = create(cluster, new_topic).results
    assert result.error.code == code
    assert result.error.message
    assert cluster.next_offset == offset


def test_a_manual_assignment_with_a_partition_count_is_an_invalid_request(cluster):
    new_topic = manual("t", [1, 2])
    new_topic.num_partitions = 5
    (result,) = create(cluster, new_topic).results
    assert result.error.code == c.INVALID_REQUEST


def test_a_manual_assignment_on_fenced_brokers_only_is_refused(cluster):
    cluster.fence(3)
    (result,) = create(cluster, manual("t", [3])).results
    assert result.error.code == c.INVALID_REPLICA_ASSIGNMENT


def test_a_manual_assignment_starts_the_isr_with_the_unfenced_replicas(cluster):
    cluster.fence(1)
    (result,) = create(cluster, manual("t", [1, 2], [3, 1])).results
    assert (result.error.code, result.num_partitions, result.replication_factor) == (c.NONE, 2, 2)
    assert cluster.show("t") == (
        "t-0 replicas=[1, 2] isr=[2] leader=2 epochs=0/0\n"
        "t-1 replicas=[3, 1] isr=[3] leader=3 epochs=0/0"
    )


def test_an_existing_topic_is_refused_and_the_rest_of_the_request_goes_on(cluster):
    cluster.create_topic("a", 1, 1)
    results = create(cluster, topic("a"), topic("b")).results
    assert [x.error.code for x in results] == [c.TOPIC_ALREADY_EXISTS, c.NONE]
    assert cluster.image.topic_by_name("b") is not None


def test_a_name_given_twice_refuses_both_entries(cluster):
    results = create(cluster, topic("a"), topic("b"), topic("a")).results
    assert [x.error.code for x in results] == [c.INVALID_REQUEST, c.NONE, c.INVALID_REQUEST]
    assert cluster.image.topic_by_name("a") is None


def test_colliding_names_in_one_request_create_only_the_first(cluster):
    results = create(cluster, topic("a.b"), topic("a_b")).results
    assert [x.error.code for x in results] == [c.NONE, c.INVALID_TOPIC_EXCEPTION]


def test_defaults_come_from_the_context(cluster):
    ctx = cluster.ctx()
    ctx.defaults = {**ctx.defaults, "num.partitions": 4, "default.replication.factor": 2}
    request = cpb.CreateTopicsRequest(topics=[topic("d", partitions=-1, rf=-1)])
    result = topics.create_topics(cluster.image, request, ctx)
    cluster.commit(result.records)
    (answer,) = result.response.results
    assert (answer.num_partitions, answer.replication_factor) == (4, 2)
    assert answer.topic_id == cluster.image.topic_by_name("d").topic_id


def test_configs_are_written_with_the_topic(cluster):
    cluster.create_topic("c", 1, 1, **{"cleanup.policy": "compact", "retention.ms": "1000"})
    assert dict(cluster.image.topic_configs("c")) == {
        "cleanup.policy": "compact",
        "retention.ms": "1000",
    }
    assert (CONFIG_TOPIC, "c") in cluster.image.configs


def test_validate_only_answers_without_records(cluster):
    response = create(cluster, topic("v", partitions=3, rf=2), validate_only=True)
    offset = cluster.next_offset
    (result,) = response.results
    assert (result.error.code, result.num_partitions, result.replication_factor) == (c.NONE, 3, 2)
    assert result.topic_id == ""
    assert cluster.image.topic_by_name("v") is None and cluster.next_offset == offset


def test_validate_only_still_refuses_a_collision_within_the_request(cluster):
    response = create(cluster, topic("a.b"), topic("a_b"), validate_only=True)
    assert [x.error.code for x in response.results] == [c.NONE, c.INVALID_TOPIC_EXCEPTION]


# DeleteTopics and CreatePartitions.


def test_delete_topics(cluster):
    cluster.create_topic("gone", 2, 2, **{"retention.ms": "5"})
    request = cpb.DeleteTopicsRequest(names=["gone", "never", "x", "x"])
    results = cluster.run(topics.delete_topics, request).results
    codes = [x.error.code for x in results]
    assert codes == [c.NONE, c.UNKNOWN_TOPIC_OR_PARTITION, c.INVALID_REQUEST, c.INVALID_REQUEST]
    assert cluster.image.topic_by_name("gone") is None
    assert (CONFIG_TOPIC, "gone") not in cluster.image.configs


@pytest.mark.parametrize(
    ("name", "count", "code"),
    [
        ("p", 2, c.INVALID_PARTITIONS),
        ("p", 1, c.INVALID_PARTITIONS),
        ("unknown", 5, c.UNKNOWN_TOPIC_OR_PARTITION),
        ("p", 3, c.NONE),
    ],
)
def test_create_partitions_checks(cluster, name, count, code):
    cluster.create_topic("p", 2, 2)
    request = cpb.CreatePartitionsRequest(
        topics=[cpb.CreatePartitionsTopic(name=name, count=count)]
    )
    (result,) = cluster.run(topics.create_partitions, request).results
    assert result.error.code == code
    assert len(cluster.image.topic_by_name("p").partitions) == (3 if code == c.NONE else 2)


def test_create_partitions_refuses_when_too_few_brokers_are_active(cluster):
    cluster.create_topic("p", 1, 3)
    cluster.fence(3)
    request = cpb.CreatePartitionsRequest(topics=[cpb.CreatePartitionsTopic(name="p", count=2)])
    (result,) = cluster.run(topics.create_partitions, request).results
    assert result.error.code == c.INVALID_REPLICATION_FACTOR


# Placement.


def test_placement_refuses_a_replication_factor_above_the_active_brokers(cluster):
    cluster.fence(3)
    with pytest.raises(PlacementError, match="replication factor of 3 cannot be reached"):
        place_replicas(cluster.image, 1, 3)


def test_placement_is_deterministic_and_the_seed_turns_the_start(cluster):
    assert place_replicas(cluster.image, 3, 2) == place_replicas(cluster.image, 3, 2)
    assert place_replicas(cluster.image, 1, 1, seed=1) == [(2,)]


# AlterPartition.


def alter(cluster: Cluster, **overrides) -> cpb.IsrChangeResult:
    part = cluster.partition("t", 0)
    broker_id = overrides.pop("broker_id", part.leader)
    broker_epoch = overrides.pop("broker_epoch", cluster.epoch(part.leader))
    fields = dict(
        topic="t",
        partition=0,
        leader_epoch=part.leader_epoch,
        partition_epoch=part.partition_epoch,
        new_isr=list(part.isr),
    )
    fields.update(overrides)
    request = isr_request(broker_id, broker_epoch, **fields)
    return isr_outcome(cluster.run(partitions.alter_partition, request))


@pytest.fixture
def t_on_three(cluster) -> Cluster:
    cluster.create_topic("t", 1, 3)
    assert cluster.partition("t").leader == 1
    return cluster


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"broker_epoch": 99}, c.STALE_BROKER_EPOCH),
        ({"broker_id": 9}, c.STALE_BROKER_EPOCH),
        ({"broker_id": 2, "broker_epoch": 1}, c.NOT_LEADER_OR_FOLLOWER),
        ({"partition": 5}, c.UNKNOWN_TOPIC_OR_PARTITION),
        ({"leader_epoch": -1}, c.FENCED_LEADER_EPOCH),
        ({"leader_epoch": 1}, c.UNKNOWN_LEADER_EPOCH),
        ({"partition_epoch": 1}, c.INVALID_UPDATE_VERSION),
        ({"new_isr": [1, 2, 2]}, c.INVALID_REQUEST),
        ({"new_isr": [2, 3]}, c.INVALID_REQUEST),
        ({"new_isr": [1, 4]}, c.INVALID_REQUEST),
    ],
)
def test_alter_partition_refusals(t_on_three, overrides, code):
    offset = t_on_three.next_offset
    assert alter(t_on_three, **overrides).error.code == code
    assert t_on_three.next_offset == offset


def test_alter_partition_shrinks_and_answers_the_new_state(t_on_three):
    response = alter(t_on_three, new_isr=[1, 3])
    assert response.error.code == c.NONE
    assert (list(response.isr), response.leader, response.leader_epoch) == ([1, 3], 1, 0)
    part = t_on_three.partition("t")
    assert (part.isr, part.partition_epoch) == ((1, 3), response.partition_epoch) == ((1, 3), 1)


def test_alter_partition_with_the_same_isr_commits_nothing(t_on_three):
    offset = t_on_three.next_offset
    response = alter(t_on_three, new_isr=[3, 2, 1])
    assert (response.error.code, response.partition_epoch) == (c.NONE, 0)
    assert t_on_three.next_offset == offset


def test_alter_partition_refuses_a_fenced_or_shutting_down_broker_joining(t_on_three):
    t_on_three.fence(2)
    assert alter(t_on_three, new_isr=[1, 3, 2]).error.code == c.INELIGIBLE_REPLICA
    t_on_three.heartbeat(3, want_shutdown=True)
    t_on_three.heartbeat(2)
    assert alter(t_on_three, new_isr=[1, 2]).error.code == c.NONE
    assert alter(t_on_three, new_isr=[1, 2, 3]).error.code == c.INELIGIBLE_REPLICA


def test_a_deposed_leaders_alter_partition_is_refused_after_the_leader_moves(t_on_three):
    old = t_on_three.partition("t")
    t_on_three.fence(1)
    t_on_three.heartbeat(1)
    request = isr_request(
        1,
        t_on_three.epoch(1),
        topic="t",
        partition=0,
        leader_epoch=old.leader_epoch,
        partition_epoch=old.partition_epoch,
        new_isr=[1],
    )
    response = t_on_three.run(partitions.alter_partition, request)
    assert isr_outcome(response).error.code == c.NOT_LEADER_OR_FOLLOWER


def change_for(cluster: Cluster, topic: str, index: int, new_isr: list[int]) -> cpb.IsrChange:
    part = cluster.partition(topic, index)
    return cpb.IsrChange(
        topic=topic,
        partition=index,
        leader_epoch=part.leader_epoch,
        partition_epoch=part.partition_epoch,
        new_isr=new_isr,
    )


def test_one_request_changes_many_partitions_in_one_batch_and_answers_each(cluster):
    cluster.create_topic("m", 12, 3)
    leader = cluster.partition("m", 0).leader
    led = [i for i in range(12) if cluster.partition("m", i).leader == leader]
    assert len(led) >= 4
    changes = [change_for(cluster, "m", i, [leader]) for i in led]
    changes.append(change_for(cluster, "m", led[0], [leader]))  # asked twice: refused
    changes.append(cpb.IsrChange(topic="m", partition=99, new_isr=[leader]))
    stale = change_for(cluster, "m", led[1], [leader])
    stale.partition_epoch += 1
    request = cpb.AlterPartitionRequest(
        broker_id=leader, broker_epoch=cluster.epoch(leader), changes=[*changes, stale]
    )
    offset = cluster.next_offset
    response = cluster.run(partitions.alter_partition, request)
    assert response.error.code == c.NONE
    asked = [(x.topic, x.partition) for x in request.changes]
    assert [(x.topic, x.partition) for x in response.results] == asked
    codes = [x.error.code for x in response.results]
    # led[0] and led[1] are asked twice: every occurrence is refused, nothing half-done;
    # the epochs are checked first (a duplicate refused as such had current ones).
    expected = [c.INVALID_REQUEST, c.INVALID_REQUEST]
    expected += [c.NONE] * (len(led) - 2) + [c.INVALID_REQUEST, c.UNKNOWN_TOPIC_OR_PARTITION]
    expected += [c.INVALID_UPDATE_VERSION]
    assert codes == expected
    assert cluster.next_offset == offset + len(led) - 2  # a record per accepted change
    for i in led[2:]:
        part = cluster.partition("m", i)
        assert (part.isr, part.partition_epoch) == ((leader,), 1)
    for i in led[:2]:
        assert cluster.partition("m", i).partition_epoch == 0


def test_refused_changes_do_not_hold_back_the_others(cluster):
    cluster.create_topic("m", 6, 3)
    leader = cluster.partition("m", 0).leader
    led = [i for i in range(6) if cluster.partition("m", i).leader == leader]
    assert len(led) >= 2
    good = change_for(cluster, "m", led[0], [leader])
    bad = change_for(cluster, "m", led[1], [leader])
    bad.leader_epoch -= 1
    request = cpb.AlterPartitionRequest(
        broker_id=leader, broker_epoch=cluster.epoch(leader), changes=[bad, good]
    )
    offset = cluster.next_offset
    results = cluster.run(partitions.alter_partition, request).results
    assert [x.error.code for x in results] == [c.FENCED_LEADER_EPOCH, c.NONE]
    assert f"m-{led[1]}" in results[0].error.message
    assert (list(results[1].isr), results[1].partition_epoch) == ([leader], 1)
    assert cluster.next_offset == offset + 1
    assert cluster.partition("m", led[0]).isr == (leader,)
    assert cluster.partition("m", led[1]).partition_epoch == 0


@pytest.mark.parametrize(
    ("broker_epoch", "changes", "code"),
    [
        (None, [], c.INVALID_REQUEST),
        (99, [cpb.IsrChange(topic="t", new_isr=[1])], c.STALE_BROKER_EPOCH),
    ],
)
def test_a_refused_request_answers_no_result(t_on_three, broker_epoch, changes, code):
    epoch = t_on_three.epoch(1) if broker_epoch is None else broker_epoch
    request = cpb.AlterPartitionRequest(broker_id=1, broker_epoch=epoch, changes=changes)
    offset = t_on_three.next_offset
    response = t_on_three.run(partitions.alter_partition, request)
    assert (response.error.code, list(response.results)) == (code, [])
    assert t_on_three.next_offset == offset


def one_change_form(cluster: Cluster, new_isr: list[int], **more) -> cpb.AlterPartitionRequest:
    """Broker 1's change of t-0's ISR in the request's one-change fields."""
    part = cluster.partition("t")
    return cpb.AlterPartitionRequest(
        broker_id=1,
        broker_epoch=cluster.epoch(1),
        topic="t",
        partition=0,
        leader_epoch=part.leader_epoch,
        partition_epoch=part.partition_epoch,
        new_isr=new_isr,
        **more,
    )


def test_a_request_in_the_one_change_form_is_answered_in_it(t_on_three):
    """As a broker of the version before sends it: no `changes`, the change in the
    request's own fields, the answer in the response's."""
    request = one_change_form(t_on_three, [1, 2])
    response = t_on_three.run(partitions.alter_partition, request)
    assert response.error.code == c.NONE
    assert (list(response.isr), response.partition_epoch, response.leader) == ([1, 2], 1, 1)
    assert t_on_three.partition("t").isr == (1, 2)
    refused = t_on_three.run(partitions.alter_partition, request)  # its epoch is now stale
    assert refused.error.code == c.INVALID_UPDATE_VERSION
    assert t_on_three.partition("t").partition_epoch == 1


def test_the_one_change_fields_are_not_read_beside_changes(t_on_three):
    """A broker of this version repeats its first change there for older controllers."""
    change = change_for(t_on_three, "t", 0, [1, 3])
    request = one_change_form(t_on_three, [1, 2], changes=[change])
    response = t_on_three.run(partitions.alter_partition, request)
    assert [(x.error.code, list(x.isr)) for x in response.results] == [(c.NONE, [1, 3])]
    assert t_on_three.partition("t").isr == (1, 3)


# ElectLeaders.


def elect(cluster: Cluster, kind: int, *targets: tuple[str, int]) -> list[int]:
    request = cpb.ElectLeadersRequest(
        election_type=kind,
        partitions=[cpb.TopicPartition(topic=t, partition=p) for t, p in targets],
    )
    return [x.error.code for x in cluster.run(partitions.elect_leaders, request).results]


def test_preferred_election_needs_the_preferred_replica_in_the_isr(t_on_three):
    t_on_three.fence(1)
    assert elect(t_on_three, cpb.PREFERRED, ("t", 0)) == [c.PREFERRED_LEADER_NOT_AVAILABLE]
    t_on_three.heartbeat(1)  # active again, but not back in the ISR
    assert elect(t_on_three, cpb.PREFERRED, ("t", 0)) == [c.PREFERRED_LEADER_NOT_AVAILABLE]
    assert elect(t_on_three, cpb.PREFERRED, ("t", 7)) == [c.UNKNOWN_TOPIC_OR_PARTITION]


def test_unclean_election_is_refused_while_a_leader_exists(t_on_three):
    assert elect(t_on_three, cpb.UNCLEAN, ("t", 0)) == [c.ELECTION_NOT_NEEDED]


def test_unclean_election_without_any_active_replica(cluster):
    cluster.create_topic("one", 1, 1)
    leader = cluster.partition("one").leader
    cluster.fence(leader)
    assert elect(cluster, cpb.UNCLEAN, ("one", 0)) == [c.ELIGIBLE_LEADERS_NOT_AVAILABLE]


# Producer ids.


def test_producer_id_blocks_follow_each_other(cluster):
    first = cpb.AllocateProducerIdsRequest(broker_id=1, broker_epoch=cluster.epoch(1))
    second = cpb.AllocateProducerIdsRequest(broker_id=2, broker_epoch=cluster.epoch(2))
    a = cluster.run(producer_ids.allocate, first)
    b = cluster.run(producer_ids.allocate, second)
    assert (a.first_producer_id, a.block_size, b.first_producer_id) == (0, 1000, 1000)
    assert cluster.image.next_producer_id == 2000


def test_producer_ids_need_the_current_broker_epoch(cluster):
    offset = cluster.next_offset
    stale = cpb.AllocateProducerIdsRequest(broker_id=1, broker_epoch=cluster.epoch(1) + 1)
    assert cluster.run(producer_ids.allocate, stale).error.code == c.STALE_BROKER_EPOCH
    unknown = cpb.AllocateProducerIdsRequest(broker_id=7, broker_epoch=0)
    assert cluster.run(producer_ids.allocate, unknown).error.code == c.STALE_BROKER_EPOCH
    assert cluster.next_offset == offset
