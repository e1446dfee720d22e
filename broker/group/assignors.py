"""Partition assignment strategies, as Kafka's consumer clients implement them.

In the classic group protocol the coordinator never assigns partitions: it
elects a leader among the members, hands it every member's subscription, and
relays the assignment the leader computed. These functions are that
computation. Each one is pure and deterministic: the same subscriptions give
the same assignment, whatever the order of the mappings passed in.

All assignors take Kafka's ``ConsumerPartitionAssignor.assign`` inputs:
``partitions_per_topic`` (a topic missing from it has no partitions) and the
subscription of every member keyed by member id. They return the partitions
of every member (an empty list for a member that gets none), each list sorted.

Member order. Where an assignor deals partitions in member order, static
members (those with a ``group.instance.id``) come first, sorted by instance
id, then dynamic members sorted by member id (Kafka's ``MemberInfo``). A static
member that restarts gets a new member id but keeps its instance id, so it
keeps its place and therefore its partitions.

- ``range``: per topic, the subscribed members in member order get contiguous
  ranges; the first ``partitions % members`` of them get one more.
- ``roundrobin``: every subscribed partition, sorted by topic then partition,
  is dealt to the members in member order, skipping members that are not
  subscribed to its topic.
- ``sticky``: balanced, and keeps as many of the partitions members already
  own as balance allows (see ``sticky_assign``).
- ``cooperative-sticky``: the sticky target, minus every partition that
  another member still owns (see ``cooperative_sticky_assign``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

# Kafka's ConsumerProtocol uses -1 for "no generation known" (DEFAULT_GENERATION).
DEFAULT_GENERATION = -1


class TopicPartition(NamedTuple):
    """A partition of a topic; sorts by topic, then partition."""

    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Subscription:
    """What one member asks for, as decoded from its JoinGroup protocol metadata.

    ``owned_partitions`` and ``generation`` are what the member held in the
    generation it last completed; only the sticky assignors read them.
    """

    topics: Collection[str]
    group_instance_id: str | None = None
    owned_partitions: tuple[TopicPartition, ...] = ()
    generation: int = DEFAULT_GENERATION


Assignment = dict[str, list[TopicPartition]]
Assignor = Callable[[Mapping[str, int], Mapping[str, Subscription]], Assignment]


class RebalanceProtocol(StrEnum):
    """How members give partitions up (Kafka's ConsumerPartitionAssignor.RebalanceProtocol).

    EAGER: every member revokes all its partitions before it rejoins.
    COOPERATIVE: members keep consuming what they own across a rebalance and
    revoke only what the new assignment takes away, then rejoin once more.
    """

    EAGER = "EAGER"
    COOPERATIVE = "COOPERATIVE"


def range_assign(
    partitions_per_topic: Mapping[str, int], subscriptions: Mapping[str, Subscription]
) -> Assignment:
    """Kafka's RangeAssignor: contiguous ranges per topic, the first members get one more."""
    assignment: Assignment = {member_id: [] for member_id in subscriptions}
    for topic in _subscribed_topics(subscriptions):
        members = _members_in_order(subscriptions, topic)
        per_member, with_extra = divmod(partitions_per_topic.get(topic, 0), len(members))
        for index, member_id in enumerate(members):
            start = per_member * index + min(index, with_extra)
            length = per_member + (1 if index < with_extra else 0)
            assignment[member_id].extend(
                TopicPartition(topic, p) for p in range(start, start + length)
            )
    return _sorted(assignment)


def round_robin_assign(
    partitions_per_topic: Mapping[str, int], subscriptions: Mapping[str, Subscription]
) -> Assignment:
    """Kafka's RoundRobinAssignor: deal sorted partitions over members, skip the unsubscribed."""
    assignment: Assignment = {member_id: [] for member_id in subscriptions}
    members = _members_in_order(subscriptions)
    if not members:
        return assignment
    topics_of = {member_id: set(subscriptions[member_id].topics) for member_id in members}
    turn = 0
    for partition in _all_partitions(partitions_per_topic, _subscribed_topics(subscriptions)):
        # Some member is subscribed to every topic we deal, so this loop ends.
        while partition.topic not in topics_of[members[turn % len(members)]]:
            turn += 1
        assignment[members[turn % len(members)]].append(partition)
        turn += 1
    return _sorted(assignment)


def sticky_assign(
    partitions_per_topic: Mapping[str, int], subscriptions: Mapping[str, Subscription]
) -> Assignment:
    """Kafka's StickyAssignor: balanced, and moving as few owned partitions as it can.

    1. Ownership claims are checked. Only members of the newest generation
       among the subscriptions are believed (an older member may have missed
       a rebalance in which its partitions went elsewhere); a claim on a topic
       the member no longer subscribes to, or on a partition that no longer
       exists, is dropped; a partition claimed by two members of that
       generation is believed for neither (Kafka's
       ``partitionsWithMultiplePreviousOwners``).
    2. Every member keeps the partitions it validly owns.
    3. Partitions nobody owns are placed one at a time, those with the fewest
       eligible members first, each on the eligible member with the fewest
       partitions.
    4. While some member has at least two partitions more than another member
       that could take one of them, one such partition moves from the most
       loaded member to the least loaded one; partitions placed in step 3 move
       before owned ones. Each move lowers the sum of squared member sizes, so
       this ends.

    The result is balanced in Kafka's sense: no partition can move to a member
    with two fewer partitions. With equal subscriptions member sizes then differ
    by at most one. A balanced assignment whose member left is rebalanced
    without moving a partition between the members that remain.
    """
    return _sticky_target(partitions_per_topic, subscriptions)


def cooperative_sticky_assign(
    partitions_per_topic: Mapping[str, int], subscriptions: Mapping[str, Subscription]
) -> Assignment:
    """Kafka's CooperativeStickyAssignor: the sticky target, revoking before reassigning.

    Under the cooperative protocol members keep consuming their partitions
    while the group rebalances, so a partition must never have two owners at
    once. A partition that the sticky target gives to a member while another
    member still claims it (any claim, valid or not) is left out of this
    round's assignment altogether. Its old owner sees it missing from its new
    assignment, revokes it (commits and stops fetching) and rejoins; in that
    follow-up rebalance nobody claims the partition any more and it is
    assigned to its new owner. Partitions that do not move are not revoked,
    so their members keep fetching throughout.
    """
    target = _sticky_target(partitions_per_topic, subscriptions)
    claimants: dict[TopicPartition, set[str]] = defaultdict(set)
    for member_id, subscription in subscriptions.items():
        for partition in subscription.owned_partitions:
            claimants[partition].add(member_id)
    return {
        member_id: [p for p in partitions if claimants.get(p, set()) <= {member_id}]
        for member_id, partitions in target.items()
    }


ASSIGNORS: Mapping[str, Assignor] = {
    "range": range_assign,
    "roundrobin": round_robin_assign,
    "sticky": sticky_assign,
    "cooperative-sticky": cooperative_sticky_assign,
}

REBALANCE_PROTOCOLS: Mapping[str, RebalanceProtocol] = {
    "range": RebalanceProtocol.EAGER,
    "roundrobin": RebalanceProtocol.EAGER,
    "sticky": RebalanceProtocol.EAGER,
    "cooperative-sticky": RebalanceProtocol.COOPERATIVE,
}


def _member_order(member_id: str, subscription: Subscription) -> tuple[int, str]:
    # Kafka's MemberInfo.compareTo: static members by instance id, then the rest by member id.
    if subscription.group_instance_id is not None:
        return (0, subscription.group_instance_id)
    return (1, member_id)


def _members_in_order(
    subscriptions: Mapping[str, Subscription], topic: str | None = None
) -> list[str]:
    members = [m for m, s in subscriptions.items() if topic is None or topic in s.topics]
    return sorted(members, key=lambda m: _member_order(m, subscriptions[m]))


def _subscribed_topics(subscriptions: Mapping[str, Subscription]) -> list[str]:
    return sorted({topic for s in subscriptions.values() for topic in s.topics})


def _all_partitions(
    partitions_per_topic: Mapping[str, int], topics: Iterable[str]
) -> list[TopicPartition]:
    return [
        TopicPartition(topic, p)
        for topic in sorted(topics)
        for p in range(partitions_per_topic.get(topic, 0))
    ]


def _sorted(assignment: Assignment) -> Assignment:
    return {member_id: sorted(partitions) for member_id, partitions in assignment.items()}


class _StickyState:
    """The working assignment of the sticky algorithm, with the lookups it needs."""

    def __init__(
        self, partitions_per_topic: Mapping[str, int], subscriptions: Mapping[str, Subscription]
    ) -> None:
        self.members = _members_in_order(subscriptions)
        self.rank = {member_id: index for index, member_id in enumerate(self.members)}
        self.topics_of = {m: frozenset(subscriptions[m].topics) for m in self.members}
        self.candidates = {
            topic: _members_in_order(subscriptions, topic)
            for topic in _subscribed_topics(subscriptions)
        }
        self.owned = _valid_ownership(partitions_per_topic, subscriptions, self.members)
        self.assignment: dict[str, set[TopicPartition]] = {m: set() for m in self.members}
        for partition, member_id in self.owned.items():
            self.assignment[member_id].add(partition)

    def size(self, member_id: str) -> tuple[int, int]:
        return (len(self.assignment[member_id]), self.rank[member_id])

    def place(self, partition: TopicPartition) -> None:
        member_id = min(self.candidates[partition.topic], key=self.size)
        self.assignment[member_id].add(partition)

    def move_one(self) -> bool:
        """Move one partition from a loaded member to one with two fewer; False if none can."""
        by_size = sorted(self.members, key=self.size)
        for donor in reversed(by_size):
            for receiver in by_size:
                if len(self.assignment[donor]) - len(self.assignment[receiver]) < 2:
                    break
                movable = [p for p in self.assignment[donor] if p.topic in self.topics_of[receiver]]
                if movable:
                    # Prefer a partition the donor did not own before this round.
                    partition = max(movable, key=lambda p: (self.owned.get(p) != donor, p))
                    self.assignment[donor].remove(partition)
                    self.assignment[receiver].add(partition)
                    return True
        return False


def _sticky_target(
    partitions_per_topic: Mapping[str, int], subscriptions: Mapping[str, Subscription]
) -> Assignment:
    state = _StickyState(partitions_per_topic, subscriptions)
    unowned = [
        p for p in _all_partitions(partitions_per_topic, state.candidates) if p not in state.owned
    ]
    unowned.sort(key=lambda p: (len(state.candidates[p.topic]), p))
    for partition in unowned:
        state.place(partition)
    while state.move_one():
        pass
    return {m: sorted(state.assignment[m]) for m in subscriptions}


def _valid_ownership(
    partitions_per_topic: Mapping[str, int],
    subscriptions: Mapping[str, Subscription],
    members: list[str],
) -> dict[TopicPartition, str]:
    """The owner of every partition whose ownership claim step 1 of sticky_assign believes."""
    newest = max((s.generation for s in subscriptions.values()), default=DEFAULT_GENERATION)
    claimants: dict[TopicPartition, list[str]] = defaultdict(list)
    for member_id in members:
        subscription = subscriptions[member_id]
        if subscription.generation != newest:
            continue
        for partition in sorted(set(subscription.owned_partitions)):
            exists = 0 <= partition.partition < partitions_per_topic.get(partition.topic, 0)
            if exists and partition.topic in subscription.topics:
                claimants[partition].append(member_id)
    return {p: owners[0] for p, owners in claimants.items() if len(owners) == 1}
