"""Broker lifecycle decisions: registration, heartbeats, fencing, controlled shutdown.

A broker's states, as Kafka's BrokerHeartbeatManager has them:

- registered: a new registration starts fenced; its broker epoch is the
  offset of the registration record.
- unfenced: once it has caught up with the metadata log past its own
  registration (metadata offset >= broker epoch), a heartbeat unfences it
  and it takes back leaderless partitions whose ISR it is in.
- controlled shutdown: it asked to stop; it leaves every ISR and leadership
  at once, and may exit when it leads nothing. Its next heartbeat fences it.
- fenced: its session expired (or it asked to be fenced); it leaves every
  ISR and leadership, except that the last ISR member stays in the ISR.

Every transition is one list of records, committed as one batch, so no
broker ever sees a fenced broker still leading.
"""

from __future__ import annotations

from collections.abc import Callable

from raftka.v1 import common_pb2
from raftka.v1 import controller_pb2 as cpb
from raftka.v1 import metadata_pb2 as pb

from quorum import records as r
from quorum.controller._common import ErrorCode, apply_records, error, ok
from quorum.controller.heartbeats import BrokerHeartbeatManager
from quorum.controller.leadership import elect_leaderless, elect_unclean, leave_isrs
from quorum.controller.result import ControllerContext, ControllerResult
from quorum.image import BrokerRegistration, MetadataImage


def register_broker(
    image: MetadataImage, req: cpb.RegisterBrokerRequest, ctx: ControllerContext
) -> ControllerResult[cpb.RegisterBrokerResponse]:
    refusal = _registration_refusal(req, ctx)
    if refusal is not None:
        return ControllerResult([], cpb.RegisterBrokerResponse(error=refusal, broker_epoch=-1))
    existing = image.brokers.get(req.broker_id)
    if existing is not None and existing.incarnation_id == req.incarnation_id:
        # A retry of a registration that already committed: answer it again.
        response = cpb.RegisterBrokerResponse(error=ok(), broker_epoch=existing.broker_epoch)
        return ControllerResult([], response)
    if existing is not None:
        too_large = _too_large(image, req.broker_id, ctx.max_transition_isrs)
        if too_large is not None:
            return ControllerResult(
                [], cpb.RegisterBrokerResponse(error=too_large, broker_epoch=-1)
            )
    register = r.register_broker(
        req.broker_id,
        req.incarnation_id,
        r.endpoints_from_pb(req.listeners),
        req.rack,
        fenced=True,
    )
    records = [register]
    if existing is not None:
        # The previous incarnation is gone, whatever its session says: it
        # must not keep leading or count towards any ISR.
        records += leave_isrs(image, req.broker_id)
    epoch = ctx.next_offset + records.index(register)
    return ControllerResult(records, cpb.RegisterBrokerResponse(error=ok(), broker_epoch=epoch))


def _too_large(image: MetadataImage, broker_id: int, limit: int | None) -> common_pb2.Error | None:
    """POLICY_VIOLATION when a state change of the broker would touch more than
    ``limit`` partitions; known from the ISR index at once, before any work."""
    count = len(image.isr_index.get(broker_id, ()))
    if limit is None or count <= limit:
        return None
    return error(
        ErrorCode.POLICY_VIOLATION,
        f"broker {broker_id} is in {count} ISRs; a state change of it would write more than "
        f"controller.max.records.per.request={limit} records in one batch (README: Known limit)",
    )


def _registration_refusal(
    req: cpb.RegisterBrokerRequest, ctx: ControllerContext
) -> common_pb2.Error | None:
    if ctx.cluster_id and req.cluster_id and ctx.cluster_id != req.cluster_id:
        return error(
            ErrorCode.INCONSISTENT_CLUSTER_ID,
            f"cluster id {req.cluster_id!r} does not match this cluster's {ctx.cluster_id!r}",
        )
    if req.broker_id < 0:
        return error(ErrorCode.INVALID_REQUEST, f"invalid broker id {req.broker_id}")
    if not req.incarnation_id:
        # Without it a retry cannot be told from a restart.
        return error(ErrorCode.INVALID_REQUEST, "a registration needs an incarnation id")
    return None


def fence_broker(image: MetadataImage, broker_id: int) -> list[pb.MetadataRecord]:
    """Fence the broker and remove it from every ISR and leadership."""
    broker = image.brokers.get(broker_id)
    if broker is None:
        return []
    return [r.fence_broker(broker_id, broker.broker_epoch), *leave_isrs(image, broker_id)]


def unfence_broker(
    image: MetadataImage, broker_id: int, broker_epoch: int
) -> list[pb.MetadataRecord]:
    """Unfence the broker and let it lead the leaderless partitions whose ISR it is in
    (or, for topics that allow unclean election, that it replicates with no ISR member
    active)."""
    return [
        r.unfence_broker(broker_id, broker_epoch),
        *elect_leaderless(image, broker_id),
        *elect_unclean(image, broker_id),
    ]


def controlled_shutdown(
    image: MetadataImage, broker_id: int, broker_epoch: int
) -> list[pb.MetadataRecord]:
    """Mark the broker as shutting down and move its ISR memberships and leaderships away."""
    return [r.broker_shutdown(broker_id, broker_epoch), *leave_isrs(image, broker_id)]


def heartbeat(
    image: MetadataImage,
    req: cpb.BrokerHeartbeatRequest,
    ctx: ControllerContext,
    manager: BrokerHeartbeatManager,
) -> ControllerResult[cpb.BrokerHeartbeatResponse]:
    broker = image.brokers.get(req.broker_id)
    if broker is None:
        refusal = error(ErrorCode.BROKER_ID_NOT_REGISTERED, f"broker {req.broker_id} is unknown")
        return ControllerResult([], cpb.BrokerHeartbeatResponse(error=refusal, is_fenced=True))
    if broker.broker_epoch != req.broker_epoch:
        refusal = error(
            ErrorCode.STALE_BROKER_EPOCH,
            f"broker {req.broker_id} has epoch {broker.broker_epoch}, not {req.broker_epoch}",
        )
        return ControllerResult([], cpb.BrokerHeartbeatResponse(error=refusal, is_fenced=True))
    manager.touch(req.broker_id, req.broker_epoch, ctx.now_ms, req.metadata_offset)
    caught_up = req.metadata_offset >= broker.broker_epoch
    transition = _heartbeat_transition(image, broker, req, caught_up)
    records: list[pb.MetadataRecord] = []
    if transition is not None:
        too_large = _too_large(image, req.broker_id, ctx.max_transition_isrs)
        if too_large is not None:
            response = cpb.BrokerHeartbeatResponse(
                error=too_large, is_caught_up=caught_up, is_fenced=broker.fenced
            )
            return ControllerResult([], response)
        records = transition()
    # The answer describes the state once the records have committed.
    after_image = apply_records(image, records, ctx.next_offset)
    after = after_image.brokers[req.broker_id]
    leaving = after.fenced or after.in_controlled_shutdown
    response = cpb.BrokerHeartbeatResponse(
        error=ok(),
        is_caught_up=caught_up,
        is_fenced=after.fenced,
        should_shut_down=req.want_shutdown and leaving and not _leads(after_image, after.broker_id),
        # Zero when the context does not say, so the serving layer fills in
        # its own configured interval.
        heartbeat_interval_ms=ctx.defaults.get("broker.heartbeat.interval.ms", 0),
    )
    return ControllerResult(records, response)


def _heartbeat_transition(
    image: MetadataImage,
    broker: BrokerRegistration,
    req: cpb.BrokerHeartbeatRequest,
    caught_up: bool,
) -> Callable[[], list[pb.MetadataRecord]] | None:
    """The state change this heartbeat asks for, not yet worked out (it touches each
    partition whose ISR holds the broker); None when there is none."""
    broker_id, epoch = broker.broker_id, broker.broker_epoch
    if req.want_shutdown:
        if broker.fenced:
            return None  # A fenced broker leads nothing and may exit now.
        if not broker.in_controlled_shutdown:
            return lambda: controlled_shutdown(image, broker_id, epoch)
        # Kafka's SHUTDOWN_NOW: it has handed everything over; fence it so
        # that it stops counting as a live broker before its session ends.
        return lambda: [] if _leads(image, broker_id) else fence_broker(image, broker_id)
    if req.want_fence:
        return None if broker.fenced else (lambda: fence_broker(image, broker_id))
    if broker.fenced and caught_up and not broker.in_controlled_shutdown:
        return lambda: unfence_broker(image, broker_id, epoch)
    return None


def _leads(image: MetadataImage, broker_id: int) -> bool:
    # A leader is always in its ISR, so the broker's ISR index finds it.
    return any(
        part.leader == broker_id for _, _, part in image.partitions_with_isr_member(broker_id)
    )


def expire_sessions(
    image: MetadataImage,
    manager: BrokerHeartbeatManager,
    now_ms: int,
    max_isrs: int | None = None,
    too_large: list[int] | None = None,
) -> list[pb.MetadataRecord]:
    """Fence every unfenced broker whose session expired, in one list of records.

    A session recorded under an older broker epoch belongs to an incarnation
    that has re-registered since; it fences nothing. A broker in more than
    ``max_isrs`` ISRs is not fenced (its fencing would be one batch too large to
    replay); its id goes in ``too_large``.
    """
    records: list[pb.MetadataRecord] = []
    scratch = image
    for broker_id, broker_epoch in manager.expired(now_ms):
        broker = scratch.brokers.get(broker_id)
        if broker is None or broker.broker_epoch != broker_epoch or broker.fenced:
            continue
        if _too_large(scratch, broker_id, max_isrs) is not None:
            if too_large is not None:
                too_large.append(broker_id)
            continue
        fencing = fence_broker(scratch, broker_id)
        # Later fencings must see earlier ones, so that no leadership moves to
        # a broker fenced in the same batch.
        scratch = apply_records(scratch, fencing)
        records += fencing
    return records
