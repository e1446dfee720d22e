"""Topic decisions: create topics, delete topics, add partitions.

Each topic in a request stands alone: one that fails is answered with its
error and does not stop the others. Topics of one request are decided in
order on a scratch image that already holds the earlier ones, so placement
and name collisions see them exactly as replay will.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from raftka.v1 import controller_pb2 as cpb
from raftka.v1 import metadata_pb2 as pb

from quorum import records as r
from quorum.controller._common import ErrorCode, apply_records, error, ok
from quorum.controller.configs import validate_topic_configs
from quorum.controller.leadership import active_ids
from quorum.controller.names import collides, validate_topic_name
from quorum.controller.placement import PlacementError, place_replicas
from quorum.controller.result import ControllerContext, ControllerResult
from quorum.image import NO_LEADER, MetadataImage

DUPLICATE_MESSAGE = "Duplicate topic name."


class _Refused(Exception):
    """One topic of a request is refused; carries its error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.error = error(code, message)


@dataclass(frozen=True, slots=True)
class _Plan:
    assignment: list[tuple[int, ...]]

    @property
    def replication_factor(self) -> int:
        return len(self.assignment[0])


def create_topics(
    image: MetadataImage, req: cpb.CreateTopicsRequest, ctx: ControllerContext
) -> ControllerResult[cpb.CreateTopicsResponse]:
    seen = Counter(t.name for t in req.topics)
    scratch = image
    records: list[pb.MetadataRecord] = []
    results = []
    for topic in req.topics:
        result = cpb.CreateTopicResult(name=topic.name, error=ok())
        try:
            if seen[topic.name] > 1:
                raise _Refused(ErrorCode.INVALID_REQUEST, DUPLICATE_MESSAGE)
            plan = _plan_topic(scratch, topic, ctx)
        except _Refused as refused:
            result.error.CopyFrom(refused.error)
            results.append(result)
            continue
        # A validate-only request still builds the records, under a stand-in
        # id, so that the next topics are judged as they would be for real.
        topic_id = f"validate-only:{topic.name}" if req.validate_only else ctx.new_topic_id()
        topic_records = _topic_records(scratch, topic, topic_id, plan)
        scratch = apply_records(scratch, topic_records)
        if not req.validate_only:
            records += topic_records
            result.topic_id = topic_id
        result.num_partitions = len(plan.assignment)
        result.replication_factor = plan.replication_factor
        results.append(result)
    response = cpb.CreateTopicsResponse(error=ok(), results=results)
    # The scratch image is exactly what replaying the records gives, so the
    # runtime need not replay them again.
    return ControllerResult(records, response, None if req.validate_only else scratch)


def _plan_topic(image: MetadataImage, topic: cpb.CreatableTopic, ctx: ControllerContext) -> _Plan:
    problem = validate_topic_name(topic.name)
    if problem is not None:
        raise _Refused(ErrorCode.INVALID_TOPIC_EXCEPTION, problem)
    if image.topic_by_name(topic.name) is not None:
        raise _Refused(ErrorCode.TOPIC_ALREADY_EXISTS, f"Topic '{topic.name}' already exists.")
    other = collides(image, topic.name)
    if other is not None:
        raise _Refused(
            ErrorCode.INVALID_TOPIC_EXCEPTION,
            f"Topic '{topic.name}' collides with existing topic: {other}",
        )
    problem = validate_topic_configs(dict(topic.configs))
    if problem is not None:
        raise _Refused(ErrorCode.INVALID_CONFIG, problem)
    if topic.assignments:
        return _Plan(_manual_assignment(image, topic))
    return _Plan(_placed_assignment(image, topic, ctx))


def _placed_assignment(
    image: MetadataImage, topic: cpb.CreatableTopic, ctx: ControllerContext
) -> list[tuple[int, ...]]:
    partitions = topic.num_partitions
    if partitions == -1:
        partitions = ctx.defaults["num.partitions"]
    if partitions < 1:
        raise _Refused(
            ErrorCode.INVALID_PARTITIONS,
            "Number of partitions was set to an invalid non-positive value.",
        )
    factor = topic.replication_factor
    if factor == -1:
        factor = ctx.defaults["default.replication.factor"]
    if factor < 1:
        raise _Refused(
            ErrorCode.INVALID_REPLICATION_FACTOR,
            "Replication factor must be larger than 0, or -1 to use the default value.",
        )
    try:
        return place_replicas(image, partitions, factor)
    except PlacementError as exc:
        raise _Refused(ErrorCode.INVALID_REPLICATION_FACTOR, str(exc)) from exc


def _manual_assignment(image: MetadataImage, topic: cpb.CreatableTopic) -> list[tuple[int, ...]]:
    assignment = [tuple(a.ids) for a in topic.assignments]
    factor = len(assignment[0])
    # Kafka wants -1 in both counts; 0 (proto3's unset) and the values the
    # assignment implies are accepted too, since they cannot mean anything else.
    if topic.num_partitions not in (-1, 0, len(assignment)) or topic.replication_factor not in (
        -1,
        0,
        factor,
    ):
        raise _Refused(
            ErrorCode.INVALID_REQUEST,
            "A manual partition assignment was specified, but numPartitions or"
            " replicationFactor was not set to -1.",
        )
    active = active_ids(image)
    for index, replicas in enumerate(assignment):
        _check_manual_partition(image, index, replicas, factor, active)
    return assignment


def _check_manual_partition(
    image: MetadataImage,
    index: int,
    replicas: tuple[int, ...],
    factor: int,
    active: frozenset[int],
) -> None:
    def refuse(message: str) -> _Refused:
        return _Refused(ErrorCode.INVALID_REPLICA_ASSIGNMENT, message)

    if not replicas:
        raise refuse(f"The manual partition assignment of partition {index} is empty.")
    if len(replicas) != factor:
        raise refuse(
            "All partitions in the manual partition assignment must have the same number of"
            " replicas."
        )
    for broker_id in replicas:
        if replicas.count(broker_id) > 1:
            raise refuse(
                f"The manual partition assignment includes the broker {broker_id} more than once."
            )
        if broker_id not in image.brokers:
            raise refuse(
                f"The manual partition assignment includes broker {broker_id}, but no such"
                " broker is registered."
            )
    if not active.intersection(replicas):
        raise refuse(
            f"All brokers specified in the manual partition assignment for partition {index}"
            " are fenced or in controlled shutdown."
        )


def _topic_records(
    image: MetadataImage, topic: cpb.CreatableTopic, topic_id: str, plan: _Plan
) -> list[pb.MetadataRecord]:
    out = [r.topic(topic.name, topic_id)]
    for name in sorted(topic.configs):
        out.append(r.config(r.CONFIG_TOPIC, topic.name, name, topic.configs[name]))
    out += _partition_records(image, topic_id, plan.assignment, start=0)
    return out


def _partition_records(
    image: MetadataImage, topic_id: str, assignment: Sequence[tuple[int, ...]], start: int
) -> list[pb.MetadataRecord]:
    # Kafka starts the ISR with the replicas that are active now; the leader
    # is the first of them, the preferred leader whenever it is up.
    active = active_ids(image)
    out = []
    for index, replicas in enumerate(assignment, start=start):
        isr = [b for b in replicas if b in active]
        out.append(r.partition(topic_id, index, replicas, isr, isr[0] if isr else NO_LEADER))
    return out


def delete_topics(
    image: MetadataImage, req: cpb.DeleteTopicsRequest, ctx: ControllerContext
) -> ControllerResult[cpb.DeleteTopicsResponse]:
    seen = Counter(req.names)
    records = []
    results = []
    for name in req.names:
        topic = image.topic_by_name(name)
        if seen[name] > 1:
            outcome = error(ErrorCode.INVALID_REQUEST, DUPLICATE_MESSAGE)
        elif topic is None:
            outcome = error(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"Topic '{name}' does not exist.")
        else:
            outcome = ok()
            records.append(r.remove_topic(topic.topic_id))
        results.append(cpb.DeleteTopicResult(name=name, error=outcome))
    return ControllerResult(records, cpb.DeleteTopicsResponse(error=ok(), results=results))


def create_partitions(
    image: MetadataImage, req: cpb.CreatePartitionsRequest, ctx: ControllerContext
) -> ControllerResult[cpb.CreatePartitionsResponse]:
    seen = Counter(t.name for t in req.topics)
    scratch = image
    records: list[pb.MetadataRecord] = []
    results = []
    for request in req.topics:
        result = cpb.CreatePartitionsResult(name=request.name, error=ok())
        try:
            if seen[request.name] > 1:
                raise _Refused(ErrorCode.INVALID_REQUEST, DUPLICATE_MESSAGE)
            added = _new_partitions(scratch, request, ctx)
        except _Refused as refused:
            result.error.CopyFrom(refused.error)
        else:
            # Later topics of the request must see these replicas when placing theirs.
            scratch = apply_records(scratch, added)
            if not req.validate_only:
                records += added
        results.append(result)
    return ControllerResult(records, cpb.CreatePartitionsResponse(error=ok(), results=results))


def _new_partitions(
    image: MetadataImage, request: cpb.CreatePartitionsTopic, ctx: ControllerContext
) -> list[pb.MetadataRecord]:
    topic = image.topic_by_name(request.name)
    if topic is None:
        raise _Refused(
            ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"Topic '{request.name}' does not exist."
        )
    current = len(topic.partitions)
    if request.count == current:
        raise _Refused(ErrorCode.INVALID_PARTITIONS, f"Topic already has {current} partition(s).")
    if request.count < current:
        raise _Refused(
            ErrorCode.INVALID_PARTITIONS,
            f"The topic {request.name} currently has {current} partition(s);"
            f" {request.count} would not be an increase.",
        )
    # New partitions get the replication factor of the existing ones, as in Kafka.
    first = topic.partitions.get(min(topic.partitions.keys(), default=0))
    factor = len(first.replicas) if first else ctx.defaults["default.replication.factor"]
    try:
        assignment = place_replicas(image, request.count - current, factor, start_partition=current)
    except PlacementError as exc:
        raise _Refused(ErrorCode.INVALID_REPLICATION_FACTOR, str(exc)) from exc
    return _partition_records(image, topic.topic_id, assignment, start=current)
