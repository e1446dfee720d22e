"""Broker sessions and heartbeats: when brokers are fenced, unfenced and let go."""

from __future__ import annotations

import pytest
from raftka.v1 import common_pb2 as c
from raftka.v1 import controller_pb2 as cpb
from test_controller_harness import Cluster

from quorum.controller import brokers
from quorum.controller.heartbeats import BrokerHeartbeatManager


def test_a_session_is_valid_up_to_the_timeout_and_expired_after_it():
    manager = BrokerHeartbeatManager(session_timeout_ms=100)
    manager.touch(1, broker_epoch=5, now_ms=1_000, metadata_offset=7)
    manager.touch(2, broker_epoch=6, now_ms=1_050, metadata_offset=7)
    assert manager.expired(1_100) == []
    assert manager.expired(1_101) == [(1, 5)]
    assert manager.expired(1_200) == [(1, 5), (2, 6)]
    manager.remove(1)
    assert manager.expired(1_200) == [(2, 6)]


def test_a_touch_renews_the_session():
    manager = BrokerHeartbeatManager(session_timeout_ms=100)
    manager.touch(1, 5, now_ms=0, metadata_offset=0)
    manager.touch(1, 5, now_ms=90, metadata_offset=3)
    assert manager.expired(150) == []
    assert manager.metadata_offset(1) == 3


def test_a_dropped_connection_expires_the_session_after_the_grace():
    manager = BrokerHeartbeatManager(session_timeout_ms=9_000)
    manager.touch(1, 5, now_ms=0, metadata_offset=0)
    manager.touch(2, 6, now_ms=0, metadata_offset=0)
    manager.connection_lost(1, now_ms=1_000, grace_ms=500)
    assert manager.expired(1_500) == []
    assert manager.expired(1_501) == [(1, 5)]


def test_a_broker_that_reconnects_or_heartbeats_within_the_grace_stays():
    manager = BrokerHeartbeatManager(session_timeout_ms=9_000)
    manager.touch(1, 5, now_ms=0, metadata_offset=0)
    manager.touch(2, 6, now_ms=0, metadata_offset=0)
    manager.connection_lost(1, now_ms=1_000, grace_ms=500)
    manager.connection_opened(1)
    manager.connection_lost(2, now_ms=1_000, grace_ms=500)
    manager.touch(2, 6, now_ms=1_200, metadata_offset=0)
    assert manager.expired(2_000) == []
    # A negative grace keeps Kafka's behaviour: only the session timeout fences.
    manager.connection_lost(1, now_ms=2_000, grace_ms=-1)
    assert manager.expired(8_999) == []
    # An unknown broker has no session to make suspect.
    manager.connection_lost(7, now_ms=2_000, grace_ms=0)
    assert manager.expired(3_000) == []


def test_reset_all_gives_every_unfenced_broker_a_fresh_session():
    cluster = Cluster()
    cluster.start_brokers(1, 2, 3)
    cluster.fence(3)
    manager = BrokerHeartbeatManager(session_timeout_ms=100)
    manager.touch(1, cluster.epoch(1), now_ms=0, metadata_offset=0)
    manager.touch(9, 0, now_ms=0, metadata_offset=0)  # no longer registered
    manager.reset_all(cluster.image, now_ms=1_000)
    assert 2 in manager and 3 not in manager and 9 not in manager
    assert manager.expired(1_100) == []
    assert manager.expired(1_101) == [(1, cluster.epoch(1)), (2, cluster.epoch(2))]


def test_the_session_timeout_must_be_positive():
    with pytest.raises(ValueError):
        BrokerHeartbeatManager(0)


def test_a_heartbeat_from_an_unknown_broker_is_refused():
    cluster = Cluster()
    request = cpb.BrokerHeartbeatRequest(broker_id=4, broker_epoch=0)
    response = cluster.run(brokers.heartbeat, request, cluster.heartbeats)
    assert response.error.code == c.BROKER_ID_NOT_REGISTERED
    assert 4 not in cluster.heartbeats


def test_a_heartbeat_touches_the_session_at_the_context_time():
    cluster = Cluster()
    cluster.start_brokers(1)
    cluster.now_ms = 40_000
    response = cluster.heartbeat(1)
    assert response.heartbeat_interval_ms == 0  # the serving layer fills in its own
    assert cluster.heartbeats.expired(40_000 + 9_000) == []
    assert cluster.heartbeats.expired(40_000 + 9_001) == [(1, cluster.epoch(1))]


def test_a_broker_that_wants_to_be_fenced_is_fenced_and_stays_so():
    cluster = Cluster()
    cluster.start_brokers(1, 2)
    cluster.create_topic("t", 1, 2)
    response = cluster.heartbeat(1, want_fence=True)
    assert response.is_fenced and cluster.image.brokers[1].fenced
    assert cluster.partition("t").leader == 2
    assert cluster.heartbeat(1, want_fence=True).is_fenced


def test_a_fenced_broker_asking_to_shut_down_may_go_at_once():
    cluster = Cluster()
    cluster.start_brokers(1)
    cluster.fence(1)
    offset = cluster.next_offset
    response = cluster.heartbeat(1, want_shutdown=True)
    assert response.should_shut_down and response.is_fenced
    assert cluster.next_offset == offset


def test_controlled_shutdown_is_recorded_once_then_the_broker_is_fenced():
    cluster = Cluster()
    cluster.start_brokers(1, 2)
    cluster.create_topic("t", 2, 2)
    cluster.heartbeat(1, want_shutdown=True)
    offset = cluster.next_offset
    cluster.heartbeat(1, want_shutdown=True)
    # The second request commits a lone fence record: nothing was left to move.
    assert cluster.next_offset == offset + 1
    assert cluster.image.brokers[1].fenced


def test_expiry_fences_several_brokers_without_electing_one_being_fenced():
    cluster = Cluster()
    cluster.start_brokers(1, 2, 3)
    cluster.create_topic("t", 3, 3)
    cluster.now_ms = 10_000
    cluster.heartbeat(3)
    records = brokers.expire_sessions(cluster.image, cluster.heartbeats, cluster.now_ms).records
    cluster.commit(records)
    assert [b.broker_id for b in cluster.image.active_brokers()] == [3]
    for _, _, part in cluster.image.iter_partitions():
        assert (part.leader, part.isr) == (3, (3,))


def test_expiry_skips_fenced_brokers():
    cluster = Cluster()
    cluster.start_brokers(1, 2)
    cluster.fence(1)
    assert cluster.heartbeats.expired(60_000)[0][0] == 1
    records = brokers.expire_sessions(cluster.image, cluster.heartbeats, 60_000).records
    assert [r.fence_broker.broker_id for r in records] == [2]


def test_expiry_skips_a_session_of_an_old_incarnation():
    cluster = Cluster()
    cluster.start_brokers(1)
    manager = BrokerHeartbeatManager(session_timeout_ms=100)
    manager.touch(1, cluster.epoch(1), now_ms=0, metadata_offset=0)
    epoch = cluster.register(1, incarnation="restarted")
    cluster.commit(brokers.unfence_broker(cluster.image, 1, epoch).records)
    assert brokers.expire_sessions(cluster.image, manager, 1_000).records == []


def test_fence_and_unfence_of_an_unknown_broker_decide_nothing_for_it():
    cluster = Cluster()
    assert brokers.fence_broker(cluster.image, 5).records == []
