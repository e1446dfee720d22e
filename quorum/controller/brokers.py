"""Broker lifecycle decisions: registration, heartbeats, fencing, controlled shutdown.

A broker's states, as Kafka's BrokerHeartbeatManager has them:

- registered: a new registration starts fenced; its broker epoch is the
  offset of the registration record.
- unfenced: once it has caught up with the metadata log past its own
  registration (metadata offset >= broker epoch), and has left every ISR its
  previous state had it leave, a heartbeat unfences it and it takes back
  leaderless partitions whose ISR it is in.
- controlled shutdown: it asked to stop; it leaves every ISR and leadership,
  and may exit once it has (as Kafka's broker waits for both). Its next
  heartbeat after its leaderships have moved fences it.
- fenced: its session expired (or it asked to be fenced); it leaves every
  ISR and leadership, except that the last ISR member stays in the ISR.

A transition is one list of records, committed as one batch (the state record
first), so no broker ever sees a fenced broker still leading, up to
``ctx.transition_slice`` partitions. A broker in more ISRs than that (or an
unfencing with more leaderless partitions) commits its state record alone and
the controller finishes the partition changes in slices (``reconcile.py``
says why that is safe); the ``Transition`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from raftka.v1 import common_pb2
from raftka.v1 import controller_pb2 as cpb
from raftka.v1 import metadata_pb2 as pb

from quorum import records as r
from quorum.controller._common import ErrorCode, apply_records, error, ok
from quorum.controller.heartbeats import BrokerHeartbeatManager
from quorum.controller.leadership import elect_leaderless, leave_isrs
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
    register = r.register_broker(
        req.broker_id,
        req.incarnation_id,
        r.endpoints_from_pb(req.listeners),
        req.rack,
        fenced=True,
    )
    # The previous incarnation is gone, whatever its session says: it must not
    # keep leading or count towards any ISR.
    change = _leaving(image, req.broker_id, register, ctx.transition_slice)
    epoch = ctx.next_offset
    return ControllerResult(
        change.records,
        cpb.RegisterBrokerResponse(error=ok(), broker_epoch=epoch),
        leaving=change.leaving,
    )


@dataclass(frozen=True, slots=True)
class Transition:
    """A broker's state change: its records (the state record first), and what
    later batches finish (``reconcile.Reconciler``)."""

    records: list[pb.MetadataRecord]
    # Brokers whose ISR memberships and leaderships are still to be removed.
    leaving: tuple[int, ...] = ()
    # Whether leaderless partitions are still to be given a leader.
    electing: bool = False


def _fits(count: int, limit: int | None) -> bool:
    return limit is None or count <= limit


def _leaving(
    image: MetadataImage, broker_id: int, state_record: pb.MetadataRecord, limit: int | None
) -> Transition:
    """``state_record`` makes the broker inactive; it leaves every ISR and
    leadership in the same batch when they fit in ``limit`` partitions."""
    if _fits(len(image.isr_index.get(broker_id, ())), limit):
        return Transition([state_record, *leave_isrs(image, broker_id)])
    return Transition([state_record], leaving=(broker_id,))


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


def fence_broker(image: MetadataImage, broker_id: int, limit: int | None = None) -> Transition:
    """Fence the broker and remove it from every ISR and leadership."""
    broker = image.brokers.get(broker_id)
    if broker is None:
        return Transition([])
    return _leaving(image, broker_id, r.fence_broker(broker_id, broker.broker_epoch), limit)


def unfence_broker(
    image: MetadataImage, broker_id: int, broker_epoch: int, limit: int | None = None
) -> Transition:
    """Unfence the broker and give a leader to the leaderless partitions that can
    now have one: those whose ISR it is in, and those of topics that allow unclean
    election that it replicates with no ISR member active."""
    unfence = r.unfence_broker(broker_id, broker_epoch)
    if _fits(len(image.leaderless), limit):
        return Transition([unfence, *elect_leaderless(image, broker_id)])
    return Transition([unfence], electing=True)


def controlled_shutdown(
    image: MetadataImage, broker_id: int, broker_epoch: int, limit: int | None = None
) -> Transition:
    """Mark the broker as shutting down and move its ISR memberships and leaderships away."""
    return _leaving(image, broker_id, r.broker_shutdown(broker_id, broker_epoch), limit)


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
    change = _heartbeat_transition(image, broker, req, caught_up, ctx)
    # The answer describes the state once the records have committed.
    after_image = apply_records(image, change.records, ctx.next_offset)
    after = after_image.brokers[req.broker_id]
    leaving = after.fenced or after.in_controlled_shutdown
    response = cpb.BrokerHeartbeatResponse(
        error=ok(),
        is_caught_up=caught_up,
        is_fenced=after.fenced,
        # Kafka's broker exits once the controller has moved its leaderships and taken
        # it out of every ISR: an ISR it stayed in would hold acks=all writes back
        # until its session expired. Past a slice, the ISRs follow the state record.
        should_shut_down=req.want_shutdown
        and leaving
        and not after_image.leads(broker.broker_id)
        and broker.broker_id not in ctx.settling,
        # Zero when the context does not say, so the serving layer fills in
        # its own configured interval.
        heartbeat_interval_ms=ctx.defaults.get("broker.heartbeat.interval.ms", 0),
    )
    return ControllerResult(
        change.records, response, leaving=change.leaving, electing=change.electing
    )


def _heartbeat_transition(
    image: MetadataImage,
    broker: BrokerRegistration,
    req: cpb.BrokerHeartbeatRequest,
    caught_up: bool,
    ctx: ControllerContext,
) -> Transition:
    """The state change this heartbeat asks for (no records when there is none)."""
    broker_id, epoch, limit = broker.broker_id, broker.broker_epoch, ctx.transition_slice
    if req.want_shutdown:
        if broker.fenced:
            return Transition([])  # A fenced broker leads nothing and may exit now.
        if not broker.in_controlled_shutdown:
            return controlled_shutdown(image, broker_id, epoch, limit)
        # Kafka's SHUTDOWN_NOW: it has handed everything over; fence it so
        # that it stops counting as a live broker before its session ends.
        if image.leads(broker_id):
            return Transition([])
        return fence_broker(image, broker_id, limit)
    if req.want_fence:
        return Transition([]) if broker.fenced else fence_broker(image, broker_id, limit)
    if (
        broker.fenced
        and caught_up
        and not broker.in_controlled_shutdown
        # A restarted broker must first leave the ISRs of its previous incarnation.
        and broker_id not in ctx.settling
    ):
        return unfence_broker(image, broker_id, epoch, limit)
    return Transition([])


def expire_sessions(
    image: MetadataImage,
    manager: BrokerHeartbeatManager,
    now_ms: int,
    limit: int | None = None,
) -> Transition:
    """Fence every unfenced broker whose session expired, in one list of records.

    A session recorded under an older broker epoch belongs to an incarnation
    that has re-registered since; it fences nothing. ``limit`` bounds the
    partition changes of all the fencings together: once it is used up, the
    next brokers' are left to later batches.
    """
    records: list[pb.MetadataRecord] = []
    leaving: list[int] = []
    changes = 0  # partition changes so far
    scratch = image
    for broker_id, broker_epoch in manager.expired(now_ms):
        broker = scratch.brokers.get(broker_id)
        if broker is None or broker.broker_epoch != broker_epoch or broker.fenced:
            continue
        room = None if limit is None else max(0, limit - changes)
        fencing = fence_broker(scratch, broker_id, room)
        changes += len(fencing.records) - 1
        # Later fencings must see earlier ones, so that no leadership moves to
        # a broker fenced in the same batch.
        scratch = apply_records(scratch, fencing.records)
        records += fencing.records
        leaving += fencing.leaving
    return Transition(records, leaving=tuple(leaving))
