"""Partition assignors: Kafka's known examples, then properties over drawn groups."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.group.assignors import (
    ASSIGNORS,
    Assignment,
    Subscription,
    TopicPartition,
    cooperative_sticky_assign,
    range_assign,
    round_robin_assign,
    sticky_assign,
)

FAST = settings(max_examples=100, deadline=None)


def tps(text: str) -> list[TopicPartition]:
    """'t1-0 t1-2 t2-1' -> sorted topic partitions."""
    out = []
    for item in text.split():
        topic, _, partition = item.rpartition("-")
        out.append(TopicPartition(topic, int(partition)))
    return sorted(out)


def subs(**topics: str) -> dict[str, Subscription]:
    """subs(c1="t1 t2") -> c1 subscribes to t1 and t2."""
    return {member: Subscription(frozenset(t.split())) for member, t in topics.items()}


def picture(assignment: Assignment) -> dict[str, str]:
    return {m: " ".join(f"{p.topic}-{p.partition}" for p in ps) for m, ps in assignment.items()}


# ---- Kafka's examples (RangeAssignorTest, RoundRobinAssignorTest)

RANGE_CASES = [
    ("one consumer, no topic", {"t1": 3}, subs(c1=""), {"c1": ""}),
    ("one consumer, nonexistent topic", {}, subs(c1="t1"), {"c1": ""}),
    ("one consumer, one topic", {"t1": 3}, subs(c1="t1"), {"c1": "t1-0 t1-1 t1-2"}),
    (
        "only the subscribed topic",
        {"t1": 3, "t2": 1},
        subs(c1="t1"),
        {"c1": "t1-0 t1-1 t1-2"},
    ),
    (
        "two consumers, one topic, one partition",
        {"t1": 1},
        subs(c1="t1", c2="t1"),
        {"c1": "t1-0", "c2": ""},
    ),
    (
        "two consumers, one topic, two partitions",
        {"t1": 2},
        subs(c1="t1", c2="t1"),
        {"c1": "t1-0", "c2": "t1-1"},
    ),
    (
        "two consumers, one topic, three partitions",
        {"t1": 3},
        subs(c1="t1", c2="t1"),
        {"c1": "t1-0 t1-1", "c2": "t1-2"},
    ),
    (
        "multiple consumers, mixed topics",
        {"t1": 3, "t2": 2},
        subs(c1="t1", c2="t1 t2", c3="t1"),
        {"c1": "t1-0", "c2": "t1-1 t2-0 t2-1", "c3": "t1-2"},
    ),
    (
        "two consumers, two topics, six partitions",
        {"t1": 3, "t2": 3},
        subs(c1="t1 t2", c2="t1 t2"),
        {"c1": "t1-0 t1-1 t2-0 t2-1", "c2": "t1-2 t2-2"},
    ),
    (
        "a topic with zero partitions",
        {"t1": 0, "t2": 2},
        subs(c1="t1 t2", c2="t1 t2"),
        {"c1": "t2-0", "c2": "t2-1"},
    ),
]

ROUND_ROBIN_CASES = [
    ("one consumer, no topic", {"t1": 3}, subs(c1=""), {"c1": ""}),
    ("one consumer, one topic", {"t1": 3}, subs(c1="t1"), {"c1": "t1-0 t1-1 t1-2"}),
    (
        "two consumers, one topic, three partitions",
        {"t1": 3},
        subs(c1="t1", c2="t1"),
        {"c1": "t1-0 t1-2", "c2": "t1-1"},
    ),
    (
        "multiple consumers, mixed topics",
        {"t1": 3, "t2": 2},
        subs(c1="t1", c2="t1 t2", c3="t1"),
        {"c1": "t1-0", "c2": "t1-1 t2-0 t2-1", "c3": "t1-2"},
    ),
    (
        "two consumers, two topics, six partitions",
        {"t1": 3, "t2": 3},
        subs(c1="t1 t2", c2="t1 t2"),
        {"c1": "t1-0 t1-2 t2-1", "c2": "t1-1 t2-0 t2-2"},
    ),
    (
        "more consumers than partitions",
        {"t1": 2},
        subs(c1="t1", c2="t1", c3="t1"),
        {"c1": "t1-0", "c2": "t1-1", "c3": ""},
    ),
]


@pytest.mark.parametrize("name, partitions, subscriptions, expected", RANGE_CASES)
def test_range_assignor_matches_kafka(name, partitions, subscriptions, expected):
    assert picture(range_assign(partitions, subscriptions)) == expected


@pytest.mark.parametrize("name, partitions, subscriptions, expected", ROUND_ROBIN_CASES)
def test_round_robin_assignor_matches_kafka(name, partitions, subscriptions, expected):
    assert picture(round_robin_assign(partitions, subscriptions)) == expected


@pytest.mark.parametrize("assign", [range_assign, round_robin_assign])
def test_static_members_keep_their_partitions_across_a_restart_with_a_new_member_id(assign):
    # Kafka's testStaticMemberRangeAssignmentPersistent: the instance id sets the order.
    before = {
        "consumer-b-1": Subscription({"t"}, group_instance_id="instance-1"),
        "consumer-a-2": Subscription({"t"}, group_instance_id="instance-2"),
        "consumer-z": Subscription({"t"}),
    }
    after = {
        "consumer-c-9": Subscription({"t"}, group_instance_id="instance-1"),
        "consumer-a-2": Subscription({"t"}, group_instance_id="instance-2"),
        "consumer-z": Subscription({"t"}),
    }
    first, second = assign({"t": 5}, before), assign({"t": 5}, after)
    assert second["consumer-c-9"] == first["consumer-b-1"]
    assert second["consumer-a-2"] == first["consumer-a-2"]
    assert first["consumer-b-1"][0] == TopicPartition("t", 0)  # static members come first


def test_sticky_keeps_owned_partitions_when_a_member_joins():
    owned = {"c1": tps("t-0 t-1 t-2"), "c2": tps("t-3 t-4 t-5")}
    members = {
        m: Subscription({"t"}, owned_partitions=tuple(p), generation=3) for m, p in owned.items()
    }
    members["c3"] = Subscription({"t"}, generation=3)
    target = sticky_assign({"t": 6}, members)
    assert [len(target[m]) for m in ("c1", "c2", "c3")] == [2, 2, 2]
    assert set(target["c1"]) < set(owned["c1"]) and set(target["c2"]) < set(owned["c2"])
    # Cooperatively, c3 gets nothing yet: both partitions it is due are still owned.
    cooperative = cooperative_sticky_assign({"t": 6}, members)
    assert cooperative["c3"] == [] and cooperative["c1"] == target["c1"]
    # c1 and c2 revoke one each and rejoin; now c3 gets them.
    rejoined = {
        m: Subscription({"t"}, owned_partitions=tuple(cooperative[m]), generation=4)
        for m in members
    }
    assert cooperative_sticky_assign({"t": 6}, rejoined) == target


def test_sticky_ignores_claims_of_older_generations_and_duplicate_claims():
    members = {
        "c1": Subscription({"t"}, owned_partitions=tuple(tps("t-0 t-1")), generation=5),
        "c2": Subscription({"t"}, owned_partitions=tuple(tps("t-1 t-2")), generation=5),
        "zombie": Subscription({"t"}, owned_partitions=tuple(tps("t-3")), generation=4),
    }
    target = sticky_assign({"t": 4}, members)
    assert TopicPartition("t", 0) in target["c1"] and TopicPartition("t", 2) in target["c2"]
    # t-1 (claimed twice) and t-3 (an old claim) are free to go anywhere; zombie gets one.
    assert len(target["zombie"]) == 1
    # But cooperatively no claimed partition goes to another member in this round.
    cooperative = cooperative_sticky_assign({"t": 4}, members)
    assert TopicPartition("t", 1) not in {p for ps in cooperative.values() for p in ps}


def test_sticky_drops_claims_on_unsubscribed_topics_and_vanished_partitions():
    members = {
        "c1": Subscription({"a"}, owned_partitions=tuple(tps("a-0 a-7 b-0")), generation=1),
        "c2": Subscription({"a", "b"}, generation=1),
    }
    target = sticky_assign({"a": 2, "b": 1}, members)
    assert picture(target) == {"c1": "a-0 a-1", "c2": "b-0"}


# ---- properties

TOPICS = ["a", "b", "c", "d"]


@st.composite
def groups(draw, equal_subscriptions: bool = False):
    """Partitions per topic and subscriptions of 1..8 members (some static)."""
    partitions = {t: draw(st.integers(0, 9)) for t in TOPICS}
    member_count = draw(st.integers(1, 8))
    shared = draw(st.sets(st.sampled_from(TOPICS), min_size=1))
    subscriptions = {}
    for i in range(member_count):
        topics = shared if equal_subscriptions else draw(st.sets(st.sampled_from(TOPICS)))
        instance = draw(st.sampled_from([None, f"instance-{i}"]))
        subscriptions[f"member-{i}"] = Subscription(frozenset(topics), group_instance_id=instance)
    return partitions, subscriptions


def subscribed_partitions(partitions, subscriptions) -> set[TopicPartition]:
    topics = {t for s in subscriptions.values() for t in s.topics}
    return {TopicPartition(t, p) for t in topics for p in range(partitions.get(t, 0))}


def check_valid(partitions, subscriptions, assignment: Assignment) -> None:
    """Every subscribed partition goes exactly once to a member subscribed to its topic."""
    assert set(assignment) == set(subscriptions)
    given_out = Counter(p for ps in assignment.values() for p in ps)
    assert set(given_out) == subscribed_partitions(partitions, subscriptions)
    assert set(given_out.values()) <= {1}
    for member, ps in assignment.items():
        assert ps == sorted(ps)
        assert all(p.topic in subscriptions[member].topics for p in ps)


def with_ownership(assignment: Assignment, subscriptions, generation: int):
    return {
        m: Subscription(s.topics, s.group_instance_id, tuple(assignment[m]), generation)
        for m, s in subscriptions.items()
    }


@FAST
@given(groups(), st.sampled_from(sorted(ASSIGNORS)))
def test_every_assignor_gives_each_partition_once_to_a_subscribed_member(group, name):
    partitions, subscriptions = group
    assignment = ASSIGNORS[name](partitions, subscriptions)
    check_valid(partitions, subscriptions, assignment)
    # Deterministic whatever the order of the members.
    reordered = dict(reversed(list(subscriptions.items())))
    assert ASSIGNORS[name](partitions, reordered) == assignment


@FAST
@given(groups(equal_subscriptions=True), st.sampled_from(["roundrobin", "sticky"]))
def test_equal_subscriptions_give_sizes_within_one(group, name):
    partitions, subscriptions = group
    sizes = [len(ps) for ps in ASSIGNORS[name](partitions, subscriptions).values()]
    assert max(sizes) - min(sizes) <= 1


@FAST
@given(groups())
def test_sticky_is_balanced_in_kafkas_sense(group):
    """No partition could move to an eligible member that has two fewer partitions."""
    partitions, subscriptions = group
    assignment = sticky_assign(partitions, subscriptions)
    for ps in assignment.values():
        for receiver, theirs in assignment.items():
            if len(ps) - len(theirs) >= 2:
                assert not any(p.topic in subscriptions[receiver].topics for p in ps)


@FAST
@given(groups())
def test_sticky_keeps_a_balanced_assignment_as_it_is(group):
    partitions, subscriptions = group
    first = sticky_assign(partitions, subscriptions)
    assert sticky_assign(partitions, with_ownership(first, subscriptions, 7)) == first


@FAST
@given(groups(equal_subscriptions=True), st.data())
def test_sticky_moves_nothing_between_survivors_when_a_member_leaves(group, data):
    partitions, subscriptions = group
    first = sticky_assign(partitions, subscriptions)
    leaving = data.draw(st.sampled_from(sorted(subscriptions)))
    survivors = with_ownership(first, subscriptions, 1)
    del survivors[leaving]
    second = sticky_assign(partitions, survivors)
    check_valid(partitions, survivors, second)
    for member in survivors:
        assert set(first[member]) <= set(second[member])


@st.composite
def groups_with_claims(draw):
    """A group whose members claim arbitrary partitions, in arbitrary generations."""
    partitions, subscriptions = draw(groups())
    everything = sorted(TopicPartition(t, p) for t in TOPICS for p in range(partitions[t] + 1))
    claimed = {}
    for member, s in subscriptions.items():
        owned = draw(st.lists(st.sampled_from(everything), max_size=6)) if everything else []
        generation = draw(st.integers(-1, 2))
        claimed[member] = Subscription(s.topics, s.group_instance_id, tuple(owned), generation)
    return partitions, claimed


@FAST
@given(groups_with_claims())
def test_cooperative_never_gives_a_partition_that_another_member_still_claims(group):
    partitions, subscriptions = group
    target = sticky_assign(partitions, subscriptions)
    check_valid(partitions, subscriptions, target)
    assignment = cooperative_sticky_assign(partitions, subscriptions)
    for member, ps in assignment.items():
        assert set(ps) <= set(target[member])
        others = {p for m, s in subscriptions.items() if m != member for p in s.owned_partitions}
        assert not set(ps) & others
        # What is withheld is exactly what someone else claims.
        assert set(target[member]) - set(ps) <= others


@FAST
@given(groups_with_claims())
def test_cooperative_rebalancing_settles_with_every_partition_assigned(group):
    """Members revoke what they lose and rejoin; after a few rounds nothing is withheld."""
    partitions, subscriptions = group
    everything = subscribed_partitions(partitions, subscriptions)
    for generation in range(3, 10):
        assignment = cooperative_sticky_assign(partitions, subscriptions)
        if {p for ps in assignment.values() for p in ps} == everything:
            break
        subscriptions = with_ownership(assignment, subscriptions, generation)
    else:
        pytest.fail("cooperative rebalancing did not settle in seven rounds")
    check_valid(partitions, subscriptions, assignment)
