"""Partition decisions: ISR changes from partition leaders, and leader elections.

AlterPartition is the leader's request to shrink or expand its ISR. It is
checked against every epoch it carries, because the leader decided it on
what it knew then: a request from a deposed leader, or decided on an ISR
that has changed since, must not overwrite the newer state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from raftka.v1 import common_pb2
from raftka.v1 import controller_pb2 as cpb
from raftka.v1 import metadata_pb2 as pb

from quorum import records as r
from quorum.controller._common import ErrorCode, check_broker_epoch, error, ok
from quorum.controller.leadership import active_ids, elect_leader
from quorum.controller.result import ControllerContext, ControllerResult
from quorum.image import NO_LEADER, MetadataImage, PartitionRegistration


def alter_partition(
    image: MetadataImage, req: cpb.AlterPartitionRequest, ctx: ControllerContext
) -> ControllerResult[cpb.AlterPartitionResponse]:
    topic = image.topic_by_name(req.topic)
    if topic is not None and req.topic_id and req.topic_id != topic.topic_id:
        return ControllerResult(
            [],
            cpb.AlterPartitionResponse(
                error=error(
                    ErrorCode.UNKNOWN_TOPIC_ID,
                    f"topic {req.topic!r} is now {topic.topic_id}, not {req.topic_id}",
                )
            ),
        )
    part = None if topic is None else topic.partitions.get(req.partition)
    refusal = _alter_refusal(image, req, part)
    if refusal is not None:
        return ControllerResult([], cpb.AlterPartitionResponse(error=refusal))
    assert topic is not None and part is not None
    if set(req.new_isr) == set(part.isr):
        # Already the state asked for (a retry, or a reordering): nothing to commit.
        return ControllerResult([], _alter_response(part, part.isr, part.partition_epoch))
    change = r.partition_change(topic.topic_id, req.partition, isr=list(req.new_isr))
    response = _alter_response(part, tuple(req.new_isr), part.partition_epoch + 1)
    return ControllerResult([change], response)


def _alter_response(
    part: PartitionRegistration, isr: Iterable[int], partition_epoch: int
) -> cpb.AlterPartitionResponse:
    return cpb.AlterPartitionResponse(
        error=ok(),
        leader=part.leader,
        leader_epoch=part.leader_epoch,
        partition_epoch=partition_epoch,
        isr=list(isr),
    )


def _alter_refusal(
    image: MetadataImage, req: cpb.AlterPartitionRequest, part: PartitionRegistration | None
) -> common_pb2.Error | None:
    broker, stale = check_broker_epoch(image, req.broker_id, req.broker_epoch)
    if stale.code != ErrorCode.NONE:
        return stale
    if broker is not None and broker.fenced:
        # Its leaderships are being moved away (in slices, for a broker in many
        # ISRs: reconcile.py); a fenced broker decides nothing meanwhile.
        return error(
            ErrorCode.NOT_LEADER_OR_FOLLOWER,
            f"broker {req.broker_id} is fenced; its leaderships are moving to other brokers",
        )
    if part is None:
        return error(
            ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"unknown partition {req.topic}-{req.partition}"
        )
    if part.leader != req.broker_id:
        return error(
            ErrorCode.NOT_LEADER_OR_FOLLOWER,
            f"broker {req.broker_id} is not the leader of {req.topic}-{req.partition}"
            f" (leader {part.leader})",
        )
    if req.leader_epoch < part.leader_epoch:
        return error(
            ErrorCode.FENCED_LEADER_EPOCH, _epochs("leader", req.leader_epoch, part.leader_epoch)
        )
    if req.leader_epoch > part.leader_epoch:
        return error(
            ErrorCode.UNKNOWN_LEADER_EPOCH, _epochs("leader", req.leader_epoch, part.leader_epoch)
        )
    if req.partition_epoch != part.partition_epoch:
        return error(
            ErrorCode.INVALID_UPDATE_VERSION,
            _epochs("partition", req.partition_epoch, part.partition_epoch),
        )
    return _isr_refusal(image, req, part)


def _epochs(what: str, asked: int, current: int) -> str:
    return f"{what} epoch {asked} in the request, {current} in the controller"


def _isr_refusal(
    image: MetadataImage, req: cpb.AlterPartitionRequest, part: PartitionRegistration
) -> common_pb2.Error | None:
    new_isr = list(req.new_isr)
    if len(set(new_isr)) != len(new_isr):
        return error(ErrorCode.INVALID_REQUEST, f"duplicate brokers in the new ISR {new_isr}")
    if req.broker_id not in new_isr:
        return error(ErrorCode.INVALID_REQUEST, f"the new ISR {new_isr} leaves out the leader")
    outside = sorted(set(new_isr) - set(part.replicas))
    if outside:
        return error(
            ErrorCode.INVALID_REQUEST, f"brokers {outside} in the new ISR are not replicas"
        )
    # A broker that is fenced or shutting down would leave again at once, and
    # an ISR member that is not alive makes acks=all writes wait for nothing.
    active = active_ids(image)
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
