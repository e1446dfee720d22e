"""The active controller: requests in, decisions, batches through Raft, answers out.

Theory of operation. Everything here runs on the metadata log's one thread
(``MetadataLog.call_soon`` and the ``LogListener`` callbacks), like Kafka's
single-threaded QuorumController, so there is no locking. gRPC threads call
``submit`` and wait on a ``Future``.

- **Activation.** When this node becomes Raft leader in term T it proposes an
  epoch claim (a batch holding ``ControllerEpochRecord(T, me)``) and serves
  nothing until that claim has been applied locally: that proves every entry
  of earlier terms is applied, and from then on any batch of an older epoch
  is refused at replay.
- **Decisions** are pure functions ``(image, request, ctx) -> (records,
  response)`` over a *speculative* image: the committed image plus every
  batch proposed but not yet committed. Records are grouped into Raft
  entries by group commit: with nothing in flight a request is proposed at
  once; while ``max_inflight_batches`` are in flight, records queue and go
  out together when one commits.
- **Answers** go out only after the batch has committed (accepted) on this
  node. Each batch names the offset it expects to start at, so a batch decided
  on speculation that did not hold is refused whole instead of misapplied.
- **Large broker transitions** (a broker in thousands of ISRs fenced, shut
  down, registered again or unfenced) commit their state record first and
  the partition changes in later slices, one per tick while the pipeline has
  room (``reconcile.py``). After a resync or a failover the remaining work
  is found again in the committed image.
- **Anything unexpected** (a refusal, an unknown outcome, a timeout, a batch we
  did not propose) makes the controller *resync*: it stops taking requests,
  waits for its in-flight batches, and rebuilds the speculative image from
  the committed one. Requests meanwhile get NOT_CONTROLLER, which clients
  retry. Outcomes that may still commit are answered UNKNOWN_OUTCOME, never as
  failed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from raftka.v1 import common_pb2
from raftka.v1 import controller_pb2 as cpb
from raftka.v1 import metadata_pb2 as pb

from quorum import records as r
from quorum.controller import brokers, partitions, producer_ids, topics
from quorum.controller.heartbeats import BrokerHeartbeatManager
from quorum.controller.reconcile import Reconciler
from quorum.controller.result import ControllerContext, ControllerResult
from quorum.image import MetadataImage
from quorum.log import MetadataLog, ProposeOutcome
from quorum.replay import replay_batch
from quorum.state import BatchResult, MetadataState

log = logging.getLogger(__name__)

Decision = Callable[[MetadataImage, Any, ControllerContext], ControllerResult[Any]]


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    node_id: int
    cluster_id: str = ""
    session_timeout_ms: int = 9000
    heartbeat_interval_ms: int = 2000
    request_timeout_s: float = 5.0
    batch_max_records: int = 2000
    # Group commit: while this many batches are in flight, new records wait
    # and go out together once one commits. Idle, a request is proposed at
    # once; under load, batches grow instead of Raft entries multiplying.
    max_inflight_batches: int = 2
    # One request's records are replayed in one go on every voter and broker;
    # past this many that would hold the Raft thread longer than an election
    # timeout, so such a request is refused (split it) instead.
    max_records_per_request: int = 20_000
    # A broker transition (fencing, shutdown, registration, unfencing) changes at
    # most this many partitions in its own batch; the controller writes the rest
    # in slices of this size, one per tick (reconcile.py).
    transition_slice: int = 1000
    session_check_interval_s: float = 0.1
    # How long a broker whose metadata stream dropped has to come back before
    # it is fenced; negative: wait for the session timeout as Kafka does.
    connection_loss_grace_ms: int = 500
    defaults: dict[str, int] = field(
        default_factory=lambda: {
            "num.partitions": 1,
            "default.replication.factor": 1,
            "producer.id.block.size": 1000,
        }
    )


@dataclass(slots=True)
class _Waiter:
    future: Future[Any]
    response: Any


@dataclass(slots=True)
class _Inflight:
    base_offset: int
    waiters: list[_Waiter]
    deadline: float


def error_response(response_type: type, code: int, message: str) -> Any:
    return response_type(error=common_pb2.Error(code=code, message=message))


class ControllerRuntime:
    """Implements ``LogListener``; drive it with a ``MetadataLog``."""

    def __init__(
        self,
        metadata_log: MetadataLog,
        settings: RuntimeSettings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        new_topic_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ):
        self.log = metadata_log
        self.settings = settings
        self._monotonic = monotonic
        self._wall_ms = wall_ms
        self._new_topic_id = new_topic_id
        self.sessions = BrokerHeartbeatManager(settings.session_timeout_ms)
        self.active = False
        self.epoch = 0
        self._claimed_term = 0
        self._claim_retry_at = 0.0
        self._resyncing = False
        self._spec_image: MetadataImage = metadata_log.state.image
        self._spec_next = metadata_log.state.next_offset
        self._batch: list[pb.MetadataRecord] = []
        self._batch_waiters: list[_Waiter] = []
        self._batch_base = 0
        self._batch_base_image = self._spec_image
        # In-flight batches by proposal id (not base offset: after a resync a
        # new batch can reuse the offset of one that timed out and may still
        # commit, and that late outcome must not answer the new batch).
        self._inflight: dict[int, _Inflight] = {}
        self._next_proposal = 0
        self._next_session_check = 0.0
        self.reconciler = Reconciler(settings.transition_slice)
        self._handlers: dict[str, tuple[Decision, type]] = {
            "register_broker": (brokers.register_broker, cpb.RegisterBrokerResponse),
            "heartbeat": (self._heartbeat_decision, cpb.BrokerHeartbeatResponse),
            "create_topics": (topics.create_topics, cpb.CreateTopicsResponse),
            "delete_topics": (topics.delete_topics, cpb.DeleteTopicsResponse),
            "create_partitions": (topics.create_partitions, cpb.CreatePartitionsResponse),
            "alter_partition": (partitions.alter_partition, cpb.AlterPartitionResponse),
            "elect_leaders": (partitions.elect_leaders, cpb.ElectLeadersResponse),
            "allocate_producer_ids": (producer_ids.allocate, cpb.AllocateProducerIdsResponse),
        }

    # -- from any thread ---------------------------------------------------------

    def submit(self, kind: str, request: Any) -> Future[Any]:
        """Queue a request for the controller thread; the future holds the response."""
        if kind not in self._handlers:
            raise ValueError(f"unknown controller request {kind!r}")
        future: Future[Any] = Future()
        self.log.call_soon(lambda: self._handle(kind, request, future))
        return future

    def broker_connection(self, broker_id: int, opened: bool, dropped: bool = True) -> None:
        """A broker's metadata stream opened, dropped, or ended at its deadline
        (``dropped=False``: the broker should reconnect at once). From any thread."""
        self.log.call_soon(lambda: self._broker_connection(broker_id, opened, dropped))

    def _broker_connection(self, broker_id: int, opened: bool, dropped: bool) -> None:
        if not self.active:
            return
        grace = self.settings.connection_loss_grace_ms
        if opened:
            self.sessions.connection_opened(broker_id)
        elif broker_id in self.sessions and grace >= 0:
            if dropped:
                log.info("broker %d dropped its metadata stream", broker_id)
            else:
                # Ended at its time: the broker reconnects as soon as it reads the end,
                # which can wait for it to apply a large change. Its heartbeats clear
                # the suspicion; it is fenced only when two in a row are missing. (With
                # room for one, a heartbeat half a second late fenced a live broker: the
                # likely cause of a fencing seen under heavy topic creation.)
                grace += 2 * self.settings.heartbeat_interval_ms
            self.sessions.connection_lost(broker_id, int(self._monotonic() * 1000), grace)

    def response_type(self, kind: str) -> type:
        return self._handlers[kind][1]

    # -- request handling, on the log thread --------------------------------------

    def _handle(self, kind: str, request: Any, future: Future[Any]) -> None:
        decide, response_type = self._handlers[kind]
        # Raft may have moved on before the log thread tells us (requests are handled
        # before its leadership check): a deposed controller must not answer from its
        # image, not even a refusal, which a broker may act on.
        deposed = not self.log.is_leader() or self.log.term() != self.epoch
        if not self.active or self._resyncing or deposed:
            why = "resynchronising" if self.active and not deposed else "not the active controller"
            future.set_result(error_response(response_type, common_pb2.NOT_CONTROLLER, why))
            return
        ctx = self._context()
        try:
            result = decide(self._spec_image, request, ctx)
        except Exception as exc:  # a bug in a decision must not take the loop down
            log.exception("controller decision %s failed", kind)
            future.set_result(
                error_response(response_type, common_pb2.UNKNOWN_SERVER_ERROR, repr(exc))
            )
            return
        if kind == "register_broker" and not result.response.error.code:
            self.sessions.touch(request.broker_id, result.response.broker_epoch, ctx.now_ms, -1)
        if len(result.records) > self.settings.max_records_per_request:
            future.set_result(
                error_response(
                    response_type,
                    common_pb2.POLICY_VIOLATION,
                    f"the request would write {len(result.records)} metadata records, more than"
                    f" controller.max.records.per.request={self.settings.max_records_per_request};"
                    " split it into smaller requests",
                )
            )
            return
        waiter = _Waiter(future, result.response)
        if result.records:
            self._add(result.records, waiter, result.image)
        else:
            self._answer_after_pending(waiter)
        self._follow_up(result.leaving, result.electing)

    def _follow_up(self, leaving: tuple[int, ...], electing: bool) -> None:
        for broker_id in leaving:
            log.info("broker %d leaves its ISRs in slices", broker_id)
            self.reconciler.leave(broker_id)
        if electing:
            log.info("leaderless partitions get leaders in slices")
            self.reconciler.elect()

    def _answer_after_pending(self, waiter: _Waiter) -> None:
        """Answer a request that wrote nothing once what it read has committed.

        It was decided on the speculative image; if the batches behind that
        image fail, so must the answer (Kafka defers such answers the same way).
        """
        if self._batch:
            self._batch_waiters.append(waiter)
        elif self._inflight:
            newest = max(self._inflight.values(), key=lambda f: f.base_offset)
            newest.waiters.append(waiter)
        else:
            _settle(waiter.future, waiter.response)

    def _heartbeat_decision(
        self, image: MetadataImage, request: Any, ctx: ControllerContext
    ) -> ControllerResult[Any]:
        result = brokers.heartbeat(image, request, ctx, self.sessions)
        if not result.response.heartbeat_interval_ms:
            result.response.heartbeat_interval_ms = self.settings.heartbeat_interval_ms
        return result

    def _context(self) -> ControllerContext:
        return ControllerContext(
            next_offset=self._spec_next,
            now_ms=int(self._monotonic() * 1000),
            cluster_id=self.settings.cluster_id,
            new_topic_id=self._new_topic_id,
            defaults=dict(self.settings.defaults),
            transition_slice=self.settings.transition_slice,
            settling=self.reconciler.settling,
        )

    def _add(
        self,
        records: list[pb.MetadataRecord],
        waiter: _Waiter | None,
        image_after: MetadataImage | None = None,
    ) -> None:
        if len(self._batch) + len(records) > self.settings.batch_max_records and self._batch:
            self._flush()
        if not self._batch:
            self._batch_base = self._spec_next
            self._batch_base_image = self._spec_image
        if image_after is None:
            image_after, _ = replay_batch(self._spec_image, records, self._spec_next)
        self._spec_image = image_after
        self._spec_next += len(records)
        self._batch.extend(records)
        if waiter is not None:
            self._batch_waiters.append(waiter)

    def _flush(self) -> None:
        if not self._batch:
            return
        base = self._batch_base
        payload = r.encode_batch(
            self._batch,
            controller_epoch=self.epoch,
            proposer_id=self.settings.node_id,
            expected_base_offset=base,
            append_time_ms=self._wall_ms(),
        )
        deadline = self._monotonic() + self.settings.request_timeout_s
        proposal = self._next_proposal
        self._next_proposal += 1
        self._inflight[proposal] = _Inflight(base, self._batch_waiters, deadline)
        self.log.state.expect(base, payload, self._batch_base_image, self._spec_image)
        self._batch = []
        self._batch_waiters = []
        self.log.propose(
            payload, lambda result, outcome: self._on_proposed(proposal, result, outcome)
        )

    def _on_proposed(
        self, proposal: int, result: BatchResult | None, outcome: ProposeOutcome | None
    ) -> None:
        inflight = self._inflight.pop(proposal, None)
        waiters = inflight.waiters if inflight is not None else []
        base = inflight.base_offset if inflight is not None else -1
        if result is not None and result.accepted:
            for w in waiters:
                _settle(w.future, w.response)
            return
        if result is not None or outcome is ProposeOutcome.NOT_APPLIED:
            reason = result.reason if result is not None else "not appended"
            log.warning("batch at %d not applied: %s; resynchronising", base, reason)
            self._fail(waiters, common_pb2.NOT_CONTROLLER, f"not applied ({reason}); retry")
        else:
            log.warning("batch at %d has an unknown outcome; resynchronising", base)
            self._fail(waiters, common_pb2.UNKNOWN_OUTCOME, "leadership changed mid-commit")
        self._start_resync()

    def _fail(self, waiters: list[_Waiter], code: int, message: str) -> None:
        for w in waiters:
            _settle(w.future, error_response(type(w.response), code, message))

    # -- LogListener ------------------------------------------------------------

    def on_commit(self, result: BatchResult, state: MetadataState) -> None:
        if self._claimed_term and not self.active:
            self._maybe_activate(state)
        elif self.active and result.accepted and not self._proposed_at(result.base_offset):
            # Someone else's batch committed while we lead: our speculation is off.
            if result.base_offset >= 0 and not self._resyncing:
                log.warning("foreign batch at %d committed; resynchronising", result.base_offset)
                self._start_resync()

    def _proposed_at(self, base_offset: int) -> bool:
        return any(f.base_offset == base_offset for f in self._inflight.values())

    def on_snapshot_loaded(self, state: MetadataState) -> None:
        if self.active:
            self._start_resync()

    def on_leadership_change(self, is_leader: bool, term: int) -> None:
        self._deactivate("leadership moved")
        if is_leader:
            self._claimed_term = term
            self._claim_retry_at = 0.0
            self._claim()

    def on_tick(self, now: float) -> None:
        if self._claimed_term and not self.active and now >= self._claim_retry_at:
            self._claim()
        if not self.active:
            return
        self._expire_inflight(now)
        if self._resyncing:
            self._finish_resync()
        elif now >= self._next_session_check:
            self._next_session_check = now + self.settings.session_check_interval_s
            fenced = brokers.expire_sessions(
                self._spec_image, self.sessions, int(now * 1000), self.settings.transition_slice
            )
            if fenced.records:
                log.info("fencing brokers whose sessions expired: %s", _fenced_ids(fenced.records))
                self._add(fenced.records, None)
                self._follow_up(fenced.leaving, False)
        if (
            not self._resyncing
            and not self.reconciler.idle
            and len(self._inflight) < self.settings.max_inflight_batches
        ):
            # At most one slice per tick, and only while a batch can go out: the
            # slices must not run ahead of the commits they depend on.
            try:
                records = self.reconciler.step(self._spec_image)
            except Exception:  # a bug here must not stop the batches below
                log.exception("working out a slice failed; looking for the work again")
                self.reconciler.reset(self._spec_image)
                records = []
            if records:
                self._add(records, None)
        if len(self._inflight) < self.settings.max_inflight_batches:
            self._flush()

    # -- activation and resync ---------------------------------------------------

    def _claim(self) -> None:
        term = self._claimed_term
        if not self.log.is_leader() or self.log.term() != term:
            return
        self._claim_retry_at = self._monotonic() + 0.2
        state = self.log.state
        if (
            state.image.controller_epoch == term
            and state.image.controller_id == self.settings.node_id
        ):
            self._maybe_activate(state)
            return
        payload = r.encode_batch(
            [r.controller_epoch(term, self.settings.node_id)],
            controller_epoch=term,
            proposer_id=self.settings.node_id,
            expected_base_offset=-1,
            append_time_ms=self._wall_ms(),
        )
        self.log.propose(payload, lambda result, outcome: None)

    def _maybe_activate(self, state: MetadataState) -> None:
        image = state.image
        term = self._claimed_term
        if image.controller_epoch != term or image.controller_id != self.settings.node_id:
            return
        if not self.log.is_leader() or self.log.term() != term:
            return
        self.active = True
        self.epoch = term
        self._spec_image = image
        self._spec_next = state.next_offset
        self.sessions.reset_all(image, int(self._monotonic() * 1000))
        self.reconciler.reset(image)
        log.info("node %d is the active controller in epoch %d", self.settings.node_id, term)

    def _deactivate(self, why: str) -> None:
        if self.active:
            log.info("node %d is no longer the active controller: %s", self.settings.node_id, why)
        self.active = False
        self._resyncing = False
        self._claimed_term = 0
        self._fail(self._batch_waiters, common_pb2.NOT_CONTROLLER, why)
        self._batch, self._batch_waiters = [], []
        for inflight in self._inflight.values():
            self._fail(inflight.waiters, common_pb2.UNKNOWN_OUTCOME, why)
        self._inflight.clear()
        self.log.state.forget_expectations()

    def _start_resync(self) -> None:
        self._resyncing = True
        self.log.state.forget_expectations()
        self._fail(self._batch_waiters, common_pb2.NOT_CONTROLLER, "resynchronising; retry")
        self._batch, self._batch_waiters = [], []

    def _finish_resync(self) -> None:
        if self._inflight:
            return
        state = self.log.state
        if not self.log.is_leader() or state.image.controller_epoch != self.epoch:
            self._deactivate("epoch ended during resync")
            return
        self._spec_image = state.image
        self._spec_next = state.next_offset
        self.reconciler.reset(state.image)
        self._resyncing = False
        log.info("controller resynchronised at offset %d", state.next_offset)

    def _expire_inflight(self, now: float) -> None:
        expired = [p for p, f in self._inflight.items() if f.deadline <= now]
        for proposal in expired:
            inflight = self._inflight.pop(proposal)
            self._fail(
                inflight.waiters,
                common_pb2.UNKNOWN_OUTCOME,
                "not committed within the request timeout (no quorum?); it may still apply",
            )
        if expired:
            self._start_resync()


def _settle(future: Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fenced_ids(records: list[pb.MetadataRecord]) -> list[int]:
    return [rec.fence_broker.broker_id for rec in records if rec.HasField("fence_broker")]
