"""Properties of the controller decisions, over clusters and histories Hypothesis draws.

Every record a decision returns is committed through the harness, which
fails on a record that replay would ignore and on any invalid partition
(leader outside the ISR, ISR outside the replicas, a fenced leader).
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from raftka.v1 import common_pb2 as c
from raftka.v1 import controller_pb2 as cpb
from test_controller_harness import Cluster, isr_outcome, isr_request

from quorum.controller import brokers, partitions
from quorum.controller.placement import place_replicas
from quorum.image import NO_LEADER

FAST = settings(max_examples=150, deadline=None)


def spread(values: Counter, keys) -> int:
    counts = [values[k] for k in keys]
    return max(counts) - min(counts)


@st.composite
def topic_shapes(draw, brokers_max: int = 8):
    """A number of brokers and topics (partitions, replication factor) that fit on them."""
    n = draw(st.integers(1, brokers_max))
    shapes = draw(
        st.lists(st.tuples(st.integers(1, 24), st.integers(1, n)), min_size=1, max_size=4)
    )
    return n, shapes


@FAST
@given(topic_shapes())
def test_placement_keeps_replica_counts_within_one_across_topics(shape):
    # Each replica goes to a least-loaded broker, so the spread never exceeds one.
    n, shapes = shape
    cluster = Cluster()
    cluster.start_brokers(*range(n))
    for i, (num_partitions, rf) in enumerate(shapes):
        cluster.create_topic(f"t{i}", num_partitions, rf)
    parts = [p for _, _, p in cluster.image.iter_partitions()]
    assert spread(Counter(b for p in parts for b in p.replicas), range(n)) <= 1
    assert all(p.leader == p.replicas[0] for p in parts)


@FAST
@given(st.integers(1, 10), st.integers(1, 60), st.data())
def test_a_topic_on_a_fresh_cluster_spreads_preferred_leaders_within_one(n, count, data):
    # Across many topics the leader spread is only kept small, not bounded:
    # replica balance comes first.
    cluster = Cluster()
    cluster.start_brokers(*range(n))
    assignment = place_replicas(cluster.image, count, data.draw(st.integers(1, n)))
    assert spread(Counter(replicas[0] for replicas in assignment), range(n)) <= 1


@FAST
@given(st.text("abc", min_size=1, max_size=8), st.integers(1, 20), st.data())
def test_placement_puts_the_replicas_of_a_partition_on_distinct_racks(racks, count, data):
    cluster = Cluster()
    cluster.start_brokers(*range(len(racks)), racks=racks)
    rf = data.draw(st.integers(1, len(racks)))
    assignment = place_replicas(cluster.image, count, rf)
    assert assignment == place_replicas(cluster.image, count, rf)  # deterministic
    for replicas in assignment:
        assert len(set(replicas)) == rf
        assert len({racks[b] for b in replicas}) == min(rf, len(set(racks)))


@FAST
@given(topic_shapes(brokers_max=5), st.data())
def test_fencing_then_unfencing_a_broker_keeps_every_partition_valid(shape, data):
    n, shapes = shape
    cluster = Cluster()
    cluster.start_brokers(*range(n))
    for i, (num_partitions, rf) in enumerate(shapes):
        cluster.create_topic(f"t{i}", num_partitions, rf)
    victim = data.draw(st.integers(0, n - 1))
    cluster.fence(victim)  # the harness checks every partition after each commit
    for _, _, part in cluster.image.iter_partitions():
        assert part.leader != victim
        assert victim not in part.isr or part.isr == (victim,)
    cluster.heartbeat(victim)
    for _, _, part in cluster.image.iter_partitions():
        if part.isr == (victim,):
            assert part.leader == victim  # it takes back what only it could lead


OPERATIONS = st.sampled_from(
    ["fence", "heartbeat", "shutdown", "reregister", "alter", "preferred", "unclean", "expire"]
)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(st.tuples(OPERATIONS, st.integers(0, 3), st.integers(0, 2**16)), max_size=30),
)
def test_no_history_of_broker_events_yields_an_invalid_partition(n, history):
    cluster = Cluster()
    cluster.start_brokers(*range(n))
    cluster.create_topic("a", 4, min(n, 3))
    cluster.create_topic("b", 2, 1)
    for operation, broker, salt in history:
        broker %= n
        cluster.now_ms += 1_000
        STEPS[operation](cluster, broker, salt)
        # Commit already checked the partitions; check the brokers' promises too.
        for b in cluster.image.brokers.values():
            if b.fenced or b.in_controlled_shutdown:
                assert all(p.leader != b.broker_id for _, _, p in cluster.image.iter_partitions())


def _alter(cluster: Cluster, broker: int, salt: int) -> None:
    parts = sorted(
        (t.name, i, p) for t, i, p in cluster.image.iter_partitions() if p.leader != NO_LEADER
    )
    if not parts:
        return
    name, index, part = parts[salt % len(parts)]
    others = [b for b in part.replicas if b != part.leader]
    chosen = [b for bit, b in enumerate(others) if salt >> (bit + 4) & 1]
    request = isr_request(
        part.leader,
        cluster.epoch(part.leader),
        topic=name,
        partition=index,
        leader_epoch=part.leader_epoch,
        partition_epoch=part.partition_epoch,
        new_isr=[part.leader, *chosen],
    )
    response = cluster.run(partitions.alter_partition, request)
    assert isr_outcome(response).error.code in (c.NONE, c.INELIGIBLE_REPLICA)


def _elect(kind: int):
    def step(cluster: Cluster, broker: int, salt: int) -> None:
        cluster.run(partitions.elect_leaders, cpb.ElectLeadersRequest(election_type=kind))

    return step


def _expire(cluster: Cluster, broker: int, salt: int) -> None:
    cluster.now_ms += salt % 12_000
    cluster.commit(
        brokers.expire_sessions(cluster.image, cluster.heartbeats, cluster.now_ms).records
    )


STEPS = {
    "fence": lambda cluster, broker, salt: cluster.fence(broker),
    "heartbeat": lambda cluster, broker, salt: cluster.heartbeat(broker),
    "shutdown": lambda cluster, broker, salt: cluster.heartbeat(broker, want_shutdown=True),
    "reregister": lambda cluster, broker, salt: cluster.register(broker, incarnation=str(salt)),
    "alter": _alter,
    "preferred": _elect(cpb.PREFERRED),
    "unclean": _elect(cpb.UNCLEAN),
    "expire": _expire,
}
