"""Controller stories: a cluster's life told through the pure decisions.

Each test drives ``Cluster`` (see test_controller_harness) as brokers and an
operator would, and compares the partitions with the picture expected.
"""

from __future__ import annotations

from collections import Counter

from raftka.v1 import common_pb2 as c
from raftka.v1 import controller_pb2 as cpb
from test_controller_harness import Cluster, isr_outcome, isr_request, picture

from quorum import records as r
from quorum.controller import brokers, partitions


def three_brokers_with_orders() -> Cluster:
    cluster = Cluster()
    cluster.start_brokers(1, 2, 3)
    cluster.create_topic("orders", partitions=3, rf=3)
    return cluster


def test_a_new_cluster_places_and_leads_every_partition_on_unfenced_brokers():
    cluster = three_brokers_with_orders()
    assert cluster.show("orders") == picture("""
        orders-0 replicas=[1, 2, 3] isr=[1, 2, 3] leader=1 epochs=0/0
        orders-1 replicas=[2, 1, 3] isr=[2, 1, 3] leader=2 epochs=0/0
        orders-2 replicas=[3, 1, 2] isr=[3, 1, 2] leader=3 epochs=0/0
    """)


def test_registered_brokers_stay_fenced_until_they_have_caught_up():
    cluster = Cluster()
    epoch = cluster.register(1)
    behind = cpb.BrokerHeartbeatRequest(broker_id=1, broker_epoch=epoch, metadata_offset=epoch - 1)
    response = cluster.run(brokers.heartbeat, behind, cluster.heartbeats)
    assert (response.is_caught_up, response.is_fenced) == (False, True)
    response = cluster.heartbeat(1)
    assert (response.is_caught_up, response.is_fenced) == (True, False)
    assert not cluster.image.brokers[1].fenced


def test_fencing_a_leader_moves_its_leaderships_and_shrinks_isrs_in_one_batch():
    cluster = three_brokers_with_orders()
    records = brokers.fence_broker(cluster.image, 2).records
    cluster.commit(records)
    assert cluster.show("orders") == picture("""
        orders-0 replicas=[1, 2, 3] isr=[1, 3] leader=1 epochs=0/1
        orders-1 replicas=[2, 1, 3] isr=[1, 3] leader=1 epochs=1/1
        orders-2 replicas=[3, 1, 2] isr=[3, 1] leader=3 epochs=0/1
    """)
    assert cluster.image.brokers[2].fenced
    assert len(records) == 4  # the fence record and three partition changes


def test_the_last_isr_member_keeps_its_place_when_fenced_and_leads_again_on_unfence():
    cluster = Cluster()
    cluster.start_brokers(1, 2)
    cluster.create_topic("logs", partitions=1, rf=2)
    cluster.fence(2)
    cluster.fence(1)
    assert cluster.show("logs") == picture("""
        logs-0 replicas=[1, 2] isr=[1] leader=-1 epochs=1/2
    """)
    # Broker 2 comes back first but was not in the ISR: no clean leader yet.
    cluster.heartbeat(2)
    assert cluster.partition("logs").leader == -1
    cluster.heartbeat(1)
    assert cluster.show("logs") == picture("""
        logs-0 replicas=[1, 2] isr=[1] leader=1 epochs=2/3
    """)


def test_a_topic_that_allows_unclean_election_gets_a_leader_outside_the_isr():
    cluster = Cluster()
    cluster.start_brokers(1, 2)
    cluster.create_topic("lossy", partitions=1, rf=2, **{"unclean.leader.election.enable": "true"})
    cluster.create_topic("safe", partitions=1, rf=2)
    cluster.fence(2)
    # The last ISR member goes: the lossy topic stays leaderless only while no
    # other replica is active.
    cluster.fence(1)
    assert cluster.partition("lossy").leader == -1
    # Broker 2 comes back: it leads the lossy topic alone; the safe one waits for 1.
    cluster.heartbeat(2)
    assert cluster.show("lossy") == picture("""
        lossy-0 replicas=[1, 2] isr=[2] leader=2 epochs=2/3
    """)
    assert cluster.partition("safe").leader == -1


def test_fencing_the_last_isr_member_elects_an_active_replica_when_unclean_is_allowed():
    cluster = Cluster()
    cluster.start_brokers(1, 2, 3)
    topic_id = cluster.create_topic(
        "lossy", partitions=1, rf=3, **{"unclean.leader.election.enable": "true"}
    )
    leader = cluster.partition("lossy").leader
    others = [b for b in (1, 2, 3) if b != leader]
    # Shrink the ISR to the leader alone (followers fell behind), then fence it.
    cluster.commit([r.partition_change(topic_id, 0, isr=[leader])])
    cluster.fence(leader)
    moved = cluster.partition("lossy")
    assert moved.leader == others[0] and moved.isr == (others[0],)


def test_an_unfenced_broker_does_not_take_leaderships_that_others_hold():
    cluster = three_brokers_with_orders()
    cluster.fence(1)
    before = cluster.show("orders")
    cluster.heartbeat(1)
    assert not cluster.image.brokers[1].fenced
    # It rejoins ISRs only when leaders ask (AlterPartition); leaders stay.
    assert cluster.show("orders") == before


def test_an_isr_expansion_then_preferred_election_brings_leadership_home():
    cluster = three_brokers_with_orders()
    cluster.fence(1)
    cluster.heartbeat(1)
    part = cluster.partition("orders", 0)
    expand = isr_request(
        part.leader,
        cluster.epoch(part.leader),
        topic="orders",
        partition=0,
        leader_epoch=part.leader_epoch,
        partition_epoch=part.partition_epoch,
        new_isr=[*part.isr, 1],
    )
    response = isr_outcome(cluster.run(partitions.alter_partition, expand))
    assert response.error.code == c.NONE
    assert response.partition_epoch == part.partition_epoch + 1
    elect = cpb.ElectLeadersRequest(election_type=cpb.PREFERRED)
    results = cluster.run(partitions.elect_leaders, elect).results
    codes = {(x.partition.topic, x.partition.partition): x.error.code for x in results}
    assert codes == {
        ("orders", 0): c.NONE,
        ("orders", 1): c.ELECTION_NOT_NEEDED,
        ("orders", 2): c.ELECTION_NOT_NEEDED,
    }
    assert cluster.partition("orders", 0).leader == 1


def test_controlled_shutdown_hands_over_everything_before_the_broker_may_exit():
    cluster = three_brokers_with_orders()
    response = cluster.heartbeat(3, want_shutdown=True)
    assert response.should_shut_down and not response.is_fenced
    assert cluster.image.brokers[3].in_controlled_shutdown
    assert cluster.show("orders") == picture("""
        orders-0 replicas=[1, 2, 3] isr=[1, 2] leader=1 epochs=0/1
        orders-1 replicas=[2, 1, 3] isr=[2, 1] leader=2 epochs=0/1
        orders-2 replicas=[3, 1, 2] isr=[1, 2] leader=1 epochs=1/1
    """)
    # Asking again commits no second shutdown; it now fences the broker.
    response = cluster.heartbeat(3, want_shutdown=True)
    assert response.should_shut_down and response.is_fenced


def test_a_caught_up_broker_in_controlled_shutdown_is_not_unfenced():
    cluster = three_brokers_with_orders()
    cluster.heartbeat(3, want_shutdown=True)
    cluster.heartbeat(3, want_shutdown=True)
    response = cluster.heartbeat(3)
    assert response.is_fenced


def test_a_shutdown_broker_that_is_the_last_isr_member_still_gets_to_exit():
    cluster = Cluster()
    cluster.start_brokers(1)
    cluster.create_topic("solo", partitions=1, rf=1)
    response = cluster.heartbeat(1, want_shutdown=True)
    assert response.should_shut_down
    assert cluster.show("solo") == picture("""
        solo-0 replicas=[1] isr=[1] leader=-1 epochs=1/1
    """)


def test_a_restarted_broker_loses_its_leaderships_at_re_registration():
    cluster = three_brokers_with_orders()
    old_epoch = cluster.epoch(1)
    new_epoch = cluster.register(1, incarnation="inc-1-restarted")
    assert new_epoch == cluster.next_offset - 4  # the register record came first
    assert new_epoch > old_epoch and cluster.image.brokers[1].fenced
    assert all(1 not in p.isr for _, _, p in cluster.image.iter_partitions())
    assert cluster.partition("orders", 0).leader == 2


def test_a_retried_registration_is_answered_with_the_committed_epoch():
    cluster = Cluster()
    epoch = cluster.register(1)
    offset = cluster.next_offset
    assert cluster.register(1) == epoch
    assert cluster.next_offset == offset  # nothing committed


def test_requests_decided_under_an_old_broker_epoch_are_refused():
    cluster = three_brokers_with_orders()
    old_epoch = cluster.epoch(2)
    cluster.register(2, incarnation="inc-2-restarted")
    part = cluster.partition("orders", 1)
    stale_alter = isr_request(
        2,
        old_epoch,
        topic="orders",
        partition=1,
        leader_epoch=part.leader_epoch,
        partition_epoch=part.partition_epoch,
        new_isr=list(part.isr),
    )
    assert cluster.run(partitions.alter_partition, stale_alter).error.code == c.STALE_BROKER_EPOCH
    beat = cpb.BrokerHeartbeatRequest(broker_id=2, broker_epoch=old_epoch, metadata_offset=99)
    response = cluster.run(brokers.heartbeat, beat, cluster.heartbeats)
    assert response.error.code == c.STALE_BROKER_EPOCH


def test_an_expired_session_fences_the_broker_and_moves_its_leaderships():
    cluster = three_brokers_with_orders()
    cluster.now_ms = 5_000
    cluster.heartbeat(1)
    cluster.heartbeat(3)
    cluster.now_ms = 9_500  # broker 2 last heartbeated at 0
    cluster.commit(
        brokers.expire_sessions(cluster.image, cluster.heartbeats, cluster.now_ms).records
    )
    assert [b.broker_id for b in cluster.image.active_brokers()] == [1, 3]
    assert cluster.partition("orders", 1).leader == 1


def test_racks_spread_the_replicas_of_each_partition():
    cluster = Cluster()
    cluster.start_brokers(1, 2, 3, 4, 5, 6, racks="aabbcc")
    cluster.create_topic("events", partitions=6, rf=3)
    rack = {b.broker_id: b.rack for b in cluster.image.brokers.values()}
    for _, _, part in cluster.image.iter_partitions():
        assert sorted(rack[b] for b in part.replicas) == ["a", "b", "c"]
    load = Counter(b for _, _, p in cluster.image.iter_partitions() for b in p.replicas)
    assert set(load.values()) == {3}


def test_topics_created_one_by_one_still_spread_their_leaders():
    cluster = Cluster()
    cluster.start_brokers(1, 2, 3)
    for name in ("a", "b", "c"):
        cluster.create_topic(name, partitions=1, rf=1)
    leaders = sorted(cluster.partition(name).leader for name in ("a", "b", "c"))
    assert leaders == [1, 2, 3]


def test_added_partitions_keep_the_replication_factor_and_balance():
    cluster = three_brokers_with_orders()
    from quorum.controller import topics

    request = cpb.CreatePartitionsRequest(
        topics=[cpb.CreatePartitionsTopic(name="orders", count=6)]
    )
    (result,) = cluster.run(topics.create_partitions, request).results
    assert result.error.code == c.NONE
    found = cluster.image.topic_by_name("orders")
    assert sorted(found.partitions) == [0, 1, 2, 3, 4, 5]
    assert all(len(p.replicas) == 3 for p in found.partitions.values())
    leaders = Counter(p.leader for p in found.partitions.values())
    assert leaders == {1: 2, 2: 2, 3: 2}


def test_unclean_election_revives_a_partition_whose_isr_is_gone():
    cluster = Cluster()
    cluster.start_brokers(1, 2)
    cluster.create_topic("logs", partitions=1, rf=2)
    cluster.fence(2)
    cluster.fence(1)
    cluster.heartbeat(2)
    request = cpb.ElectLeadersRequest(
        election_type=cpb.UNCLEAN, partitions=[cpb.TopicPartition(topic="logs", partition=0)]
    )
    (result,) = cluster.run(partitions.elect_leaders, request).results
    assert result.error.code == c.NONE
    assert cluster.show("logs") == picture("""
        logs-0 replicas=[1, 2] isr=[2] leader=2 epochs=2/3
    """)
