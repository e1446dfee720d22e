"""Leader election and ISR removal: the partition-change rules every decision shares.

Kafka keeps these rules in one PartitionChangeBuilder so that fencing,
controlled shutdown, unfencing and re-registration cannot disagree; this
module plays that part. A leader is always elected in replica order (the
first replica is the preferred leader), from ISR members that are active:
registered, unfenced and not in controlled shutdown. Only a topic with
``unclean.leader.election.enable=true`` gets a leader from outside the ISR,
and only when no ISR member is active; its ISR is then that leader alone
(records it never had are lost, which is what the topic accepted).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from raftka.v1 import metadata_pb2 as pb

from quorum import records as r
from quorum.image import NO_LEADER, MetadataImage, PartitionRegistration


def active_ids(image: MetadataImage) -> frozenset[int]:
    return frozenset(b.broker_id for b in image.active_brokers())


def elect_leader(replicas: Iterable[int], isr: Collection[int], active: Collection[int]) -> int:
    """The first replica (in replica order) that is in the ISR and active, else -1."""
    for replica in replicas:
        if replica in isr and replica in active:
            return replica
    return NO_LEADER


def leave_isrs(image: MetadataImage, broker_id: int) -> list[pb.MetadataRecord]:
    """Remove ``broker_id`` from every ISR and move its leaderships away.

    The broker is treated as inactive whatever the image says, since the
    callers (fencing, controlled shutdown, re-registration) are about to make
    it so. When it is the last ISR member, the ISR is kept and the partition
    goes leaderless, as Kafka does: the last replica known to hold every
    committed record must stay recorded, so a clean election stays possible.
    """
    active = active_ids(image) - {broker_id}
    out = []
    for topic, index, part in image.partitions_with_isr_member(broker_id):
        if broker_id in part.isr:
            unclean = unclean_enabled(image, topic.name)
            change = without(topic.topic_id, index, part, broker_id, active, unclean)
            if change is not None:
                out.append(change)
    return out


def without(
    topic_id: str,
    index: int,
    part: PartitionRegistration,
    broker_id: int,
    active: Collection[int],
    unclean: bool = False,
) -> pb.MetadataRecord | None:
    """The change that takes ``broker_id`` (in the ISR) out of the partition's ISR
    and leadership; None when there is nothing to change (it is the last ISR
    member of a leaderless partition)."""
    isr = tuple(b for b in part.isr if b != broker_id)
    if part.leader in (broker_id, NO_LEADER) and elect_leader(part.replicas, isr, active) < 0:
        chosen = elect_leader(part.replicas, part.replicas, active) if unclean else NO_LEADER
        if chosen != NO_LEADER:
            return r.partition_change(topic_id, index, leader=chosen, isr=[chosen])
    if not isr:
        if part.leader == NO_LEADER:
            return None
        return r.partition_change(topic_id, index, leader=NO_LEADER)
    if part.leader == broker_id or part.leader == NO_LEADER:
        leader = elect_leader(part.replicas, isr, active)
        if leader != part.leader:
            return r.partition_change(topic_id, index, leader=leader, isr=isr)
    return r.partition_change(topic_id, index, isr=isr)


def unclean_enabled(image: MetadataImage, topic_name: str) -> bool:
    value = image.topic_configs(topic_name).get("unclean.leader.election.enable", "false")
    return value.lower() == "true"


def elect(
    topic_id: str,
    index: int,
    part: PartitionRegistration,
    active: Collection[int],
    unclean: bool = False,
) -> pb.MetadataRecord | None:
    """A leader for a leaderless partition, when it can have one: an active ISR
    member, else (a topic that allows unclean election) an active replica, whose
    ISR is then itself alone."""
    if part.leader != NO_LEADER:
        return None
    leader = elect_leader(part.replicas, part.isr, active)
    if leader != NO_LEADER:
        return r.partition_change(topic_id, index, leader=leader)
    if unclean:
        chosen = elect_leader(part.replicas, part.replicas, active)
        if chosen != NO_LEADER:
            return r.partition_change(topic_id, index, leader=chosen, isr=[chosen])
    return None


def elect_leaderless(image: MetadataImage, broker_id: int) -> list[pb.MetadataRecord]:
    """Give a leader to every leaderless partition that can have one once
    ``broker_id`` is active again (it counts as active here whatever the image
    says, since its unfence record comes first in the batch).

    The leaderless index finds them, so the cost is theirs alone.
    """
    active = active_ids(image) | {broker_id}
    out = []
    for topic, index, part in image.leaderless_partitions():
        change = elect(topic.topic_id, index, part, active, unclean_enabled(image, topic.name))
        if change is not None:
            out.append(change)
    return out
