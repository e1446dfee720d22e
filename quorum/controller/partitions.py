"""Partition decisions: ISR changes from partition leaders, and leader elections.

AlterPartition is the leader's request to shrink or expand the ISRs of its
partitions, as many as it has changes pending for. Each change is checked
against every epoch it carries, because the leader decided it on what it knew
then: a change from a deposed leader, or decided on an ISR that has changed
since, must not overwrite the newer state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from raftka.v1 import common_pb2
from raftka.v1 import controller_pb2 as cpb
from raftka.v1 import metadata_pb2 as pb

from quorum import records as r
from quorum.controller._common import ErrorCode, check_broker_epoch, error, ok
from quorum.controller.leadership import active_ids, elect_leader
from quorum.controller.result import ControllerContext, ControllerResult
from quorum.image import NO_LEADER, MetadataImage, PartitionRegistration, TopicImage


def alter_partition(
    image: MetadataImage, req: cpb.AlterPartitionRequest, ctx: ControllerContext
) -> ControllerResult[cpb.AlterPartitionResponse]:
    """A leader's pending ISR changes: each checked on its own, the accepted ones
    committed in one batch (Kafka's AlterPartition carries them the same way)."""
    broker, stale = check_broker_epoch(image, req.broker_id, req.broker_epoch)
    if stale.code != ErrorCode.NONE:
        return _refused(stale)
    if broker is not None and broker.fenced:
        # Its leaderships are being moved away (in slices, for a broker in many
        # ISRs: reconcile.py); a fenced broker decides nothing meanwhile.
        return _refused(
            error(
                ErrorCode.NOT_LEADER_OR_FOLLOWER,
                f"broker {req.broker_id} is fenced; its leaderships are moving to other brokers",
            )
        )
    one_change_form = not req.changes and bool(req.topic)
    changes = [_the_one_change(req)] if one_change_form else list(req.changes)
    if not changes:
        return _refused(error(ErrorCode.INVALID_REQUEST, "the request carries no ISR change"))
    asked = Counter((change.topic, change.partition) for change in changes)
    active = active_ids(image)
    records: list[pb.MetadataRecord] = []
    results: list[cpb.IsrChangeResult] = []
    for change in changes:
        duplicate = asked[(change.topic, change.partition)] > 1
        record, result = _alter_one(image, req.broker_id, change, active, duplicate)
        if record is not None:
            records.append(record)
        results.append(result)
    if one_change_form:
        (result,) = results
        response = cpb.AlterPartitionResponse(
            error=result.error,
            results=results,
            leader=result.leader,
            leader_epoch=result.leader_epoch,
            partition_epoch=result.partition_epoch,
            isr=result.isr,
        )
        return ControllerResult(records, response)
    return ControllerResult(records, cpb.AlterPartitionResponse(error=ok(), results=results))


def _the_one_change(req: cpb.AlterPartitionRequest) -> cpb.IsrChange:
    """A request in the form brokers sent before requests carried several changes."""
    return cpb.IsrChange(
        topic=req.topic,
        topic_id=req.topic_id,
        partition=req.partition,
        leader_epoch=req.leader_epoch,
        partition_epoch=req.partition_epoch,
        new_isr=req.new_isr,
    )


def _refused(why: common_pb2.Error) -> ControllerResult[cpb.AlterPartitionResponse]:
    return ControllerResult([], cpb.AlterPartitionResponse(error=why))


def _alter_one(
    image: MetadataImage,
    leader: int,
    change: cpb.IsrChange,
    active: frozenset[int],
    duplicate: bool = False,
) -> tuple[pb.MetadataRecord | None, cpb.IsrChangeResult]:
    """One change's record (None when nothing is to commit) and result. The epochs
    are checked first, so that every refusal after them (a change asked twice in
    the request, an ISR that cannot be) tells the leader its epochs are current:
    neither this change nor an earlier send of it was applied."""
    topic = image.topic_by_name(change.topic)
    part = None if topic is None else topic.partitions.get(change.partition)
    refusal = _stale_refusal(topic, leader, change, part)
    if refusal is None and duplicate:
        refusal = error(
            ErrorCode.INVALID_REQUEST,
            f"{change.topic}-{change.partition} is asked more than once in the request",
        )
    if refusal is None:
        assert part is not None
        refusal = _isr_refusal(leader, change, part, active)
    if refusal is not None:
        return None, _result(change, refusal)
    assert topic is not None and part is not None
    if set(change.new_isr) == set(part.isr):
        # Already the state asked for (a retry, or a reordering): nothing to commit.
        return None, _result(change, ok(), part, part.isr, part.partition_epoch)
    record = r.partition_change(topic.topic_id, change.partition, isr=list(change.new_isr))
    return record, _result(change, ok(), part, change.new_isr, part.partition_epoch + 1)


def _result(
    change: cpb.IsrChange,
    outcome: common_pb2.Error,
    part: PartitionRegistration | None = None,
    isr: Iterable[int] = (),
    partition_epoch: int = 0,
) -> cpb.IsrChangeResult:
    result = cpb.IsrChangeResult(topic=change.topic, partition=change.partition, error=outcome)
    if part is not None:
        result.leader = part.leader
        result.leader_epoch = part.leader_epoch
        result.partition_epoch = partition_epoch
        result.isr.extend(isr)
    return result


def _stale_refusal(
    topic: TopicImage | None,
    leader: int,
    change: cpb.IsrChange,
    part: PartitionRegistration | None,
) -> common_pb2.Error | None:
    """The refusal of a change decided on a state that is no longer the current one."""
    name = f"{change.topic}-{change.partition}"
    if topic is not None and change.topic_id and change.topic_id != topic.topic_id:
        return error(
            ErrorCode.UNKNOWN_TOPIC_ID,
            f"topic {change.topic!r} is now {topic.topic_id}, not {change.topic_id}",
        )
    if part is None:
        return error(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"unknown partition {name}")
    if part.leader != leader:
        return error(
            ErrorCode.NOT_LEADER_OR_FOLLOWER,
            f"broker {leader} is not the leader of {name} (leader {part.leader})",
        )
    if change.leader_epoch < part.leader_epoch:
        return error(
            ErrorCode.FENCED_LEADER_EPOCH,
            _epochs(name, "leader", change.leader_epoch, part.leader_epoch),
        )
    if change.leader_epoch > part.leader_epoch:
        return error(
            ErrorCode.UNKNOWN_LEADER_EPOCH,
            _epochs(name, "leader", change.leader_epoch, part.leader_epoch),
        )
    if change.partition_epoch != part.partition_epoch:
        return error(
            ErrorCode.INVALID_UPDATE_VERSION,
            _epochs(name, "partition", change.partition_epoch, part.partition_epoch),
        )
    return None


def _epochs(name: str, what: str, asked: int, current: int) -> str:
    return f"{name}: {what} epoch {asked} in the request, {current} in the controller"


def _isr_refusal(
    leader: int, change: cpb.IsrChange, part: PartitionRegistration, active: frozenset[int]
) -> common_pb2.Error | None:
    new_isr = list(change.new_isr)
    if len(set(new_isr)) != len(new_isr):
        return error(ErrorCode.INVALID_REQUEST, f"duplicate brokers in the new ISR {new_isr}")
    if leader not in new_isr:
        return error(ErrorCode.INVALID_REQUEST, f"the new ISR {new_isr} leaves out the leader")
    outside = sorted(set(new_isr) - set(part.replicas))
    if outside:
        return error(
            ErrorCode.INVALID_REQUEST, f"brokers {outside} in the new ISR are not replicas"
        )
    # A broker that is fenced or shutting down would leave again at once, and
    # an ISR member that is not alive makes acks=all writes wait for nothing.
    ineligible = sorted(b for b in set(new_isr) - set(part.isr) if b not in active)
    if ineligible:
        return error(
            ErrorCode.INELIGIBLE_REPLICA,
            f"brokers {ineligible} cannot join the ISR: fenced or in controlled shutdown",
        )
    return None


def elect_leaders(
    image: MetadataImage, req: cpb.ElectLeadersRequest, ctx: ControllerContext
) -> ControllerResult[cpb.ElectLeadersResponse]:
    targets = list(req.partitions) or _every_partition(image)
    active = active_ids(image)
    elect = _elect_unclean if req.election_type == cpb.UNCLEAN else _elect_preferred
    records: list[pb.MetadataRecord] = []
    results = []
    for target in targets:
        topic = image.topic_by_name(target.topic)
        part = None if topic is None else topic.partitions.get(target.partition)
        if topic is None or part is None:
            outcome = error(
                ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                f"unknown partition {target.topic}-{target.partition}",
            )
        else:
            outcome, change = elect(part, active)
            if change is not None:
                records.append(r.partition_change(topic.topic_id, target.partition, **change))
        results.append(cpb.ElectLeaderResult(partition=target, error=outcome))
    return ControllerResult(records, cpb.ElectLeadersResponse(error=ok(), results=results))


# An election's outcome: the error to answer, and the PartitionChange fields to commit.
_Election = tuple[common_pb2.Error, dict[str, Any] | None]


def _every_partition(image: MetadataImage) -> list[cpb.TopicPartition]:
    return sorted(
        (
            cpb.TopicPartition(topic=t.name, partition=index)
            for t, index, _ in image.iter_partitions()
        ),
        key=lambda tp: (tp.topic, tp.partition),
    )


def _elect_preferred(part: PartitionRegistration, active: frozenset[int]) -> _Election:
    preferred = part.preferred_leader
    if part.leader == preferred:
        return error(ErrorCode.ELECTION_NOT_NEEDED, "the preferred replica already leads"), None
    if preferred not in part.isr or preferred not in active:
        return (
            error(
                ErrorCode.PREFERRED_LEADER_NOT_AVAILABLE,
                f"preferred replica {preferred} is not an active ISR member",
            ),
            None,
        )
    return ok(), {"leader": preferred}


def _elect_unclean(part: PartitionRegistration, active: frozenset[int]) -> _Election:
    if part.leader != NO_LEADER:
        return error(ErrorCode.ELECTION_NOT_NEEDED, f"broker {part.leader} leads"), None
    # An active ISR member wins a clean election, which loses nothing; the
    # unclean path only runs when no such member exists.
    clean = elect_leader(part.replicas, part.isr, active)
    if clean != NO_LEADER:
        return ok(), {"leader": clean}
    unclean = elect_leader(part.replicas, part.replicas, active)
    if unclean == NO_LEADER:
        return (
            error(ErrorCode.ELIGIBLE_LEADERS_NOT_AVAILABLE, "no replica is on an active broker"),
            None,
        )
    # The ISR restarts from the new leader alone: the others may hold
    # records it never had, so they must catch up from it first.
    return ok(), {"leader": unclean, "isr": [unclean]}
