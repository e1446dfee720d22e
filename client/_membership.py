"""The group membership of a subscribed consumer: the member's side of Kafka's classic
group protocol (Kafka's AbstractCoordinator and ConsumerCoordinator).

Theory of operation
-------------------
A consumer that ``subscribe``s gets its partitions from its group: the coordinator (the
broker that FindCoordinator names) runs the group's rebalances and one member, the
leader, computes the assignment. ``GroupMembership.poll``, called by ``Consumer.poll`` on
the caller's thread, drives it without blocking past the poll's deadline: a JoinGroup or
SyncGroup in flight stays in flight across polls, and its answer wakes the consumer.

A rebalance, as a member sees it (states are Kafka's MemberState):

1. *Prepare* (once per rebalance, still STABLE, so commits carry the old generation,
   which the coordinator accepts until the join phase ends). With a valid generation,
   auto commit stores the positions of the owned partitions; then, under an EAGER
   protocol (range, roundrobin, sticky) every owned partition is revoked
   (``on_partitions_revoked``), under the COOPERATIVE one (cooperative-sticky) only
   those of topics no longer subscribed. Without a valid generation (the member was
   removed, fenced by a newer generation, or left on poll timeout) the partitions are
   *lost*: ``on_partitions_lost``, no commit.
2. *Join* (PREPARING_REBALANCE): JoinGroup, with one subscription per assignor in
   ``partition_assignment_strategy`` (``_consumer_protocol``). A new dynamic member is
   answered MEMBER_ID_REQUIRED with its member id and joins again with it at once
   (KIP-394). The answer ends the join phase for everyone: the generation, the chosen
   assignor, and for the leader every member's subscription.
3. *Sync* (COMPLETING_REBALANCE): the leader runs the chosen assignor over the members'
   subscriptions and the partition counts of every subscribed topic (from fresh
   metadata) and sends every assignment with its SyncGroup; a follower's SyncGroup waits
   for them.
4. *Complete* (STABLE): under COOPERATIVE, owned partitions missing from the new
   assignment are committed (auto commit) and revoked, and the member rejoins at once
   so that their new owners get them in a follow-up rebalance (KIP-429: the assignor
   never gives a partition to a member while another still owns it). The new
   assignment replaces the old one; kept partitions keep their positions, new ones start
   at the group's committed offsets (or ``auto_offset_reset``); then
   ``on_partitions_assigned`` gets the added partitions.

A background thread sends Heartbeat every ``heartbeat_interval_ms`` while the member is
in a generation (COMPLETING_REBALANCE or STABLE). REBALANCE_IN_PROGRESS makes the next
``poll`` rejoin; ILLEGAL_GENERATION and UNKNOWN_MEMBER_ID end the generation (the member
id is kept for ILLEGAL_GENERATION, which names a member the coordinator still knows, as
in Kafka 3.x), so the next ``poll`` declares the partitions lost and joins again;
FENCED_INSTANCE_ID is fatal: every later ``poll`` raises it. When ``poll`` was not
called for ``max_poll_interval_ms`` the thread leaves the group (LeaveGroup; a static
member sends none and is only forgotten when its session expires), as Kafka's does, and
the next ``poll`` loses the partitions and joins again. A coordinator that moved or is
loading (NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE, COORDINATOR_LOAD_IN_PROGRESS) or
unreachable is found again and the request retried after ``retry_backoff_ms``; a
heartbeat goes on with the same member id and generation, without rejoining: the new
coordinator loads the group's members and generation from ``__consumer_offsets``.

Other rejoins: the subscription changed (``subscribe`` again, or a pattern now matches
other topics: all topic names are listed every ``metadata_max_age_ms``), or, on the
leader only, the partition count of a subscribed topic changed since it assigned.

Commits of a member carry its member id and generation, and only a STABLE member
commits: during a rebalance ``commit`` raises ``RebalanceInProgressError``, and once the
generation is gone (or the coordinator refuses it: ILLEGAL_GENERATION,
UNKNOWN_MEMBER_ID) ``CommitFailedError``. ``close`` commits (auto commit), revokes, and
leaves the group (dynamic members only).

Listener callbacks run on the thread that calls ``poll`` (or ``unsubscribe``,
``close``). An exception from one does not stop the rebalance: it is raised by ``poll``
once the rebalance step is done.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
from raftka.v1 import broker_pb2, common_pb2

from broker.group.assignors import ASSIGNORS, REBALANCE_PROTOCOLS, RebalanceProtocol, Subscription
from client._brokers import Cluster, ClusterView, TopicPartition, rpc_error
from client._consumer_protocol import (
    CONSUMER_PROTOCOL_TYPE,
    ConsumerProtocolAssignment,
    SchemaError,
    decode_assignment,
    encode_assignment,
    member_subscription,
    subscription_metadata,
)
from client.errors import (
    CommitFailedError,
    CoordinatorError,
    FencedInstanceIdError,
    IllegalGenerationError,
    InconsistentGroupProtocolError,
    MemberIdRequiredError,
    RaftkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
    error_for,
)
from client.groups import GroupClient

__all__ = [
    "ConsumerGroupMetadata",
    "ConsumerHooks",
    "ConsumerRebalanceListener",
    "Generation",
    "GroupMembership",
    "MemberState",
    "MembershipConfig",
    "make_listener",
]

log = logging.getLogger(__name__)

# Topics a pattern never matches (Kafka's exclude.internal.topics=true).
INTERNAL_TOPICS = frozenset({"__consumer_offsets", "__transaction_state"})
# A JoinGroup may wait a whole rebalance timeout; its deadline allows this much more.
_JOIN_MARGIN_S = 5.0
# The longest a LeaveGroup, a FindCoordinator on leaving, or a topic listing may take.
_SHORT_CALL_S = 5.0


class MemberState(enum.Enum):
    """Kafka's MemberState."""

    UNJOINED = "unjoined"
    PREPARING_REBALANCE = "preparing-rebalance"
    COMPLETING_REBALANCE = "completing-rebalance"
    STABLE = "stable"


@dataclass(frozen=True, slots=True)
class Generation:
    """The generation a member belongs to; ``generation_id`` -1 when none."""

    generation_id: int = -1
    member_id: str = ""
    protocol_name: str | None = None

    @property
    def valid(self) -> bool:
        return self.generation_id >= 0 and bool(self.member_id)


NO_GENERATION = Generation()


class ConsumerGroupMetadata(NamedTuple):
    """Kafka's ConsumerGroupMetadata: who this consumer is in its group right now."""

    group_id: str
    generation_id: int
    member_id: str
    group_instance_id: str | None


class ConsumerRebalanceListener:
    """Kafka's ConsumerRebalanceListener: subclass it and override what you need.

    ``on_partitions_revoked``: partitions this consumer gives up while still in the
    group (commit their offsets here). ``on_partitions_assigned``: partitions it gained.
    ``on_partitions_lost``: partitions that may already belong to another member (the
    consumer dropped out of the group); by default the same as revoked, but do not commit.
    Each gets a set of ``TopicPartition`` and runs on the thread that calls ``poll``.
    """

    def on_partitions_revoked(self, partitions: set[TopicPartition]) -> None:
        """Partitions given up; the consumer can still commit their offsets."""

    def on_partitions_assigned(self, partitions: set[TopicPartition]) -> None:
        """Partitions gained; positions start at committed offsets unless you seek."""

    def on_partitions_lost(self, partitions: set[TopicPartition]) -> None:
        """Partitions lost with the generation; committing them would fail."""
        self.on_partitions_revoked(partitions)


Callback = Callable[[set[TopicPartition]], None]


class _CallbackListener(ConsumerRebalanceListener):
    """A listener made of an object's methods and/or plain callables."""

    def __init__(
        self,
        revoked: Callback | None,
        assigned: Callback | None,
        lost: Callback | None,
    ) -> None:
        self._revoked = revoked
        self._assigned = assigned
        self._lost = lost

    def on_partitions_revoked(self, partitions: set[TopicPartition]) -> None:
        if self._revoked is not None:
            self._revoked(partitions)

    def on_partitions_assigned(self, partitions: set[TopicPartition]) -> None:
        if self._assigned is not None:
            self._assigned(partitions)

    def on_partitions_lost(self, partitions: set[TopicPartition]) -> None:
        (self._lost or self.on_partitions_revoked)(partitions)


def make_listener(
    listener: object | None = None,
    *,
    on_partitions_revoked: Callback | None = None,
    on_partitions_assigned: Callback | None = None,
    on_partitions_lost: Callback | None = None,
) -> ConsumerRebalanceListener:
    """A listener from an object with any of the three methods, or from callables (which
    take precedence over the object's methods). Lost defaults to revoked, as in Kafka."""
    if isinstance(listener, ConsumerRebalanceListener) and not (
        on_partitions_revoked or on_partitions_assigned or on_partitions_lost
    ):
        return listener
    return _CallbackListener(
        on_partitions_revoked or getattr(listener, "on_partitions_revoked", None),
        on_partitions_assigned or getattr(listener, "on_partitions_assigned", None),
        on_partitions_lost or getattr(listener, "on_partitions_lost", None),
    )


@dataclass(frozen=True, slots=True)
class ConsumerHooks:
    """What the membership needs of its consumer.

    ``owned()``: the partitions assigned now. ``assign(partitions)``: make them the
    assignment (kept ones keep their positions). ``commit(partitions)``: auto commit the
    positions of these partitions before they are given up (a no-op without auto
    commit; failures are logged, not raised). ``wake()``: end the consumer's wait, an
    answer has come (called from other threads).
    """

    owned: Callable[[], set[TopicPartition]]
    assign: Callable[[set[TopicPartition]], None]
    commit: Callable[[set[TopicPartition]], None]
    wake: Callable[[], None]


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """The consumer's group settings, with Kafka's names and defaults."""

    group_id: str
    client_id: str
    group_instance_id: str | None = None
    session_timeout_ms: int = 45000
    heartbeat_interval_ms: int = 3000
    max_poll_interval_ms: int = 300000
    strategies: tuple[str, ...] = ("range", "cooperative-sticky")
    request_timeout_ms: int = 30000
    retry_backoff_ms: int = 100
    metadata_max_age_ms: int = 300000


class GroupMembership:
    """One consumer's membership of its group; see the module's theory of operation.

    ``poll``, ``subscribe``, ``unsubscribe``, ``commit`` and ``close`` are for the
    consumer's thread; the heartbeat thread shares the generation and state under a lock.
    """

    def __init__(
        self,
        cluster: Cluster,
        group: GroupClient,
        config: MembershipConfig,
        hooks: ConsumerHooks,
    ) -> None:
        self._cluster = cluster
        self._group = group
        self._config = config
        self._hooks = hooks
        self._interval_s = config.heartbeat_interval_ms / 1000
        self._max_poll_s = config.max_poll_interval_ms / 1000
        self._request_timeout_s = config.request_timeout_ms / 1000
        self._backoff_s = config.retry_backoff_ms / 1000
        # Shared with the heartbeat thread, under the lock.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._state = MemberState.UNJOINED
        self._generation = NO_GENERATION
        self._rejoin_needed = True
        self._needs_join_prepare = True
        self._last_poll_s = time.monotonic()
        self._next_heartbeat_s = 0.0
        self._fatal: RaftkaError | None = None
        self._closing = False
        self._heartbeat_call: Any = None
        self._thread: threading.Thread | None = None
        # The consumer's thread only.
        self._subscribed = False
        self._topics: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self._next_listing_s = 0.0
        self._listener: ConsumerRebalanceListener = ConsumerRebalanceListener()
        self._joined_topics: frozenset[str] = frozenset()
        self._assigned_counts: dict[str, int] | None = None  # The leader's snapshot.
        self._last_assignment: tuple[TopicPartition, ...] = ()
        self._last_generation_id = -1
        self._join_call: Any = None
        self._sync_call: Any = None
        self._sync_generation = NO_GENERATION
        self._retry_at_s = 0.0
        self._callback_error: BaseException | None = None

    # -- what the consumer asks --------------------------------------------------

    @property
    def subscribed(self) -> bool:
        return self._subscribed

    def subscription(self) -> set[str]:
        """The topics subscribed to now (for a pattern: those it matched last)."""
        return set(self._topics)

    def group_metadata(self) -> ConsumerGroupMetadata:
        with self._lock:
            generation = self._generation
        return ConsumerGroupMetadata(
            self._config.group_id,
            generation.generation_id,
            generation.member_id,
            self._config.group_instance_id,
        )

    def state(self) -> MemberState:
        with self._lock:
            return self._state

    def generation_if_stable(self) -> Generation | None:
        """The generation while STABLE (commits may carry it), else None."""
        with self._lock:
            return self._generation if self._state is MemberState.STABLE else None

    def subscribe(
        self,
        topics: Collection[str] | None,
        pattern: re.Pattern[str] | None,
        listener: ConsumerRebalanceListener,
    ) -> None:
        """Subscribe to ``topics`` or to the topics ``pattern`` fully matches; the next
        ``poll`` joins, or rejoins if the topics changed."""
        self._pattern = pattern
        self._next_listing_s = 0.0
        self._topics = frozenset(topics or ()) if pattern is None else frozenset()
        self._listener = listener
        self._subscribed = True
        self._cluster.add_topics(self._topics)
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._heartbeat_loop,
                name=f"raftka-heartbeat-{self._config.group_id}",
                daemon=True,
            )
            self._thread.start()

    def unsubscribe(self) -> None:
        """Give up every partition (commit, then ``on_partitions_revoked``) and leave."""
        if not self._subscribed:
            return
        if self._valid_generation():
            self._hooks.commit(self._hooks.owned())
        self._on_leave_prepare()
        self._leave_group("the consumer unsubscribed")
        self._subscribed = False
        self._topics = self._joined_topics = frozenset()
        self._pattern = None
        self._raise_callback_error()

    def close(self) -> None:
        """Commit (auto commit), revoke, stop the heartbeat thread and leave the group."""
        if self._subscribed and self._valid_generation():
            self._hooks.commit(self._hooks.owned())
        with self._cond:
            self._closing = True
            call = self._heartbeat_call
            self._cond.notify_all()
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(_SHORT_CALL_S)
        if self._subscribed:
            self._on_leave_prepare()
            self._leave_group("the consumer is being closed")
            self._subscribed = False
        error, self._callback_error = self._callback_error, None
        if error is not None:
            log.warning("a rebalance listener failed while closing: %r", error)

    def poll(self, deadline: float) -> None:
        """Do what membership needs now: join, sync, rejoin, run the listener. Never waits
        for a JoinGroup or SyncGroup answer (it stays in flight for the next poll); a
        coordinator lookup takes until ``deadline`` at most (at least half a second)."""
        with self._lock:
            self._last_poll_s = time.monotonic()
            fatal = self._fatal
        if fatal is not None:
            raise fatal
        if not self._subscribed:
            return
        self._maybe_list_topics(deadline)
        self._check_rebalance_triggers()
        self._ensure_active_group(deadline)
        self._raise_callback_error()

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """OffsetCommit of ``offsets`` with this member's id and generation."""
        with self._lock:
            stable = self._state is MemberState.STABLE
            generation = self._generation
            rebalancing = self._state is not MemberState.UNJOINED
        if not stable:
            if rebalancing:
                raise RebalanceInProgressError(
                    common_pb2.REBALANCE_IN_PROGRESS,
                    "the group is rebalancing: complete the rebalance with poll(), "
                    "then commit again",
                )
            raise CommitFailedError(
                common_pb2.UNKNOWN_MEMBER_ID,
                "the consumer is not part of an active group (it may have been removed "
                "for not polling within max_poll_interval_ms): poll() joins it again",
            )
        by_topic: dict[str, list[broker_pb2.OffsetCommitPartition]] = {}
        for tp, offset in sorted(offsets.items()):
            by_topic.setdefault(tp.topic, []).append(
                broker_pb2.OffsetCommitPartition(
                    partition=tp.partition, committed_offset=offset, committed_leader_epoch=-1
                )
            )
        if not by_topic:
            return
        request = broker_pb2.OffsetCommitRequest(
            group_id=self._config.group_id,
            generation_id=generation.generation_id,
            member_id=generation.member_id,
            group_instance_id=self._config.group_instance_id or "",
            topics=[
                broker_pb2.OffsetCommitTopic(topic=t, partitions=p) for t, p in by_topic.items()
            ],
        )
        try:
            # GroupClient retries coordinator moves and raises what retrying cannot cure.
            self._group.call("OffsetCommit", request)
        except (IllegalGenerationError, UnknownMemberIdError) as e:
            with self._lock:
                if self._generation == generation:
                    self._reset(keep_member_id=isinstance(e, IllegalGenerationError))
            raise CommitFailedError(
                e.code,
                f"the group has rebalanced without generation {generation.generation_id} of "
                f"member {generation.member_id}; its partitions may belong to another member "
                f"now: {e.message}",
            ) from e
        except RebalanceInProgressError:
            with self._lock:
                self._rejoin_needed = True
            raise
        except FencedInstanceIdError as e:
            with self._lock:
                self._fatal = e
            raise

    # -- the rebalance, on the consumer's thread -----------------------------------

    def _ensure_active_group(self, deadline: float) -> None:
        while True:
            if self._sync_call is not None:
                if not self._sync_call.done():
                    return
                self._complete_sync()
                continue
            if self._join_call is not None:
                if not self._join_call.done():
                    return
                self._complete_join(deadline)
                continue
            with self._lock:
                needed = self._rejoin_needed or self._state is not MemberState.STABLE
            if not needed or time.monotonic() < self._retry_at_s:
                return
            if not self._send_join(deadline):
                return

    def _send_join(self, deadline: float) -> bool:
        address = self._coordinator(deadline)
        if address is None:
            return False
        with self._lock:
            prepare, self._needs_join_prepare = self._needs_join_prepare, False
        if prepare:
            self._on_join_prepare()
        with self._cond:
            generation = self._generation
            self._state = MemberState.PREPARING_REBALANCE
        self._joined_topics = self._topics
        owned = self._hooks.owned()
        protocols = [
            broker_pb2.JoinGroupProtocol(
                name=name,
                metadata=subscription_metadata(
                    name, self._topics, owned, self._last_assignment, self._last_generation_id
                ),
            )
            for name in self._config.strategies
        ]
        request = broker_pb2.JoinGroupRequest(
            group_id=self._config.group_id,
            session_timeout_ms=self._config.session_timeout_ms,
            rebalance_timeout_ms=self._config.max_poll_interval_ms,
            member_id=generation.member_id,
            group_instance_id=self._config.group_instance_id or "",
            protocol_type=CONSUMER_PROTOCOL_TYPE,
            protocols=protocols,
            client_id=self._config.client_id,
        )
        timeout_s = max(self._request_timeout_s, self._max_poll_s + _JOIN_MARGIN_S)
        self._join_call = self._start("JoinGroup", address, request, timeout_s)
        return True

    def _complete_join(self, deadline: float) -> None:
        call, self._join_call = self._join_call, None
        response, error = self._answer(call, "JoinGroup")
        with self._cond:
            if self._state is not MemberState.PREPARING_REBALANCE:
                return  # Left the group meanwhile.
            sent = self._generation
            if error is None:
                self._generation = Generation(
                    response.generation_id, response.member_id, response.protocol_name
                )
                self._state = MemberState.COMPLETING_REBALANCE
                self._next_heartbeat_s = time.monotonic() + self._interval_s
                self._cond.notify_all()
            elif isinstance(error, MemberIdRequiredError):
                # KIP-394: join again at once, with the member id the coordinator gave.
                self._generation = Generation(member_id=response.member_id)
                return
        if error is not None:
            self._on_group_error("JoinGroup", error, sent)
            return
        generation = Generation(response.generation_id, response.member_id, response.protocol_name)
        assignments: list[broker_pb2.SyncGroupAssignment] = []
        if response.leader == response.member_id:
            assignments = self._assign(response.protocol_name, response.members)
        else:
            self._assigned_counts = None
        log.info(
            "group %s: joined generation %d as %s (%s), assignor %s",
            self._config.group_id,
            generation.generation_id,
            generation.member_id,
            "leader" if assignments else "follower",
            generation.protocol_name,
        )
        request = broker_pb2.SyncGroupRequest(
            group_id=self._config.group_id,
            generation_id=generation.generation_id,
            member_id=generation.member_id,
            group_instance_id=self._config.group_instance_id or "",
            protocol_type=CONSUMER_PROTOCOL_TYPE,
            protocol_name=generation.protocol_name or "",
            assignments=assignments,
        )
        address = self._coordinator(deadline)
        if address is None:
            with self._lock:
                self._state = MemberState.PREPARING_REBALANCE
            self._retry_at_s = time.monotonic() + self._backoff_s
            return
        self._sync_generation = generation
        # A follower's SyncGroup waits for the leader's, which may take a rebalance timeout.
        timeout_s = max(self._request_timeout_s, self._max_poll_s + _JOIN_MARGIN_S)
        self._sync_call = self._start("SyncGroup", address, request, timeout_s)

    def _complete_sync(self) -> None:
        call, self._sync_call = self._sync_call, None
        response, error = self._answer(call, "SyncGroup")
        sent = self._sync_generation
        with self._cond:
            if self._generation != sent or self._state is not MemberState.COMPLETING_REBALANCE:
                # The heartbeat thread ended the generation meanwhile: join again.
                self._rejoin_needed = True
                return
            if error is None:
                self._state = MemberState.STABLE
                self._rejoin_needed = False
                self._needs_join_prepare = True
        if error is not None:
            self._on_group_error("SyncGroup", error, sent)
            return
        self._on_join_complete(sent, response.assignment)

    def _on_group_error(self, api: str, error: RaftkaError, sent: Generation) -> None:
        """What a JoinGroup or SyncGroup error means; the next ``_ensure_active_group``
        round joins again unless the error is fatal."""
        log.info("group %s: %s failed: %s", self._config.group_id, api, error)
        with self._cond:
            if self._state is MemberState.COMPLETING_REBALANCE:
                self._state = MemberState.PREPARING_REBALANCE
            if isinstance(error, IllegalGenerationError | UnknownMemberIdError):
                if self._generation == sent:
                    self._reset(keep_member_id=isinstance(error, IllegalGenerationError))
                return
            if isinstance(error, RebalanceInProgressError):
                self._rejoin_needed = True
                return
            if isinstance(error, FencedInstanceIdError):
                self._fatal = error
                raise error
        if isinstance(error, CoordinatorError) or error.retriable:
            self._forget_coordinator()
            self._retry_at_s = time.monotonic() + self._backoff_s
            return
        with self._lock:
            self._state = MemberState.UNJOINED
        raise error

    def _on_join_prepare(self) -> None:
        with self._lock:
            generation = self._generation
        owned = self._hooks.owned()
        self._assigned_counts = None
        if not generation.valid:
            self._last_assignment, self._last_generation_id = (), -1
            if owned:
                log.info("group %s: lost %s with the generation", self._config.group_id, owned)
                self._invoke(self._listener.on_partitions_lost, owned)
                self._hooks.assign(set())
            return
        self._hooks.commit(owned)
        if self._protocol(generation) is RebalanceProtocol.EAGER:
            self._invoke(self._listener.on_partitions_revoked, owned)
            self._hooks.assign(set())
            return
        revoked = {tp for tp in owned if tp.topic not in self._topics}
        if revoked:
            self._invoke(self._listener.on_partitions_revoked, revoked)
            self._hooks.assign(owned - revoked)

    def _on_join_complete(self, generation: Generation, data: bytes) -> None:
        try:
            assigned = set(decode_assignment(data).partitions)
        except SchemaError as e:
            log.error("group %s: an assignment that does not decode: %s", self._config.group_id, e)
            self._request_rejoin()
            return
        if any(tp.topic not in self._topics for tp in assigned):
            # The subscription changed since the join: the next one will match it.
            self._request_rejoin()
            return
        owned = self._hooks.owned()
        if self._protocol(generation) is RebalanceProtocol.COOPERATIVE:
            revoked = owned - assigned
            if revoked:
                self._hooks.commit(revoked)
                self._invoke(self._listener.on_partitions_revoked, revoked)
                self._request_rejoin()  # So that their new owners get them (KIP-429).
        self._last_assignment = tuple(sorted(assigned))
        self._last_generation_id = generation.generation_id
        self._hooks.assign(assigned)
        log.info(
            "group %s: generation %d assigns %s",
            self._config.group_id,
            generation.generation_id,
            sorted(assigned),
        )
        self._invoke(self._listener.on_partitions_assigned, assigned - owned)

    def _on_leave_prepare(self) -> None:
        owned = self._hooks.owned()
        if owned:
            lost = not self._valid_generation()
            callback = (
                self._listener.on_partitions_lost if lost else self._listener.on_partitions_revoked
            )
            self._invoke(callback, owned)
            self._hooks.assign(set())

    def _leave_group(self, reason: str) -> None:
        for call in (self._join_call, self._sync_call):
            if call is not None:
                call.cancel()
        self._join_call = self._sync_call = None
        with self._lock:
            generation = self._generation
            self._reset(keep_member_id=False)
            self._rejoin_needed = True
        self._send_leave(generation, reason)

    # -- the leader's assignment ---------------------------------------------------

    def _assign(
        self, protocol_name: str, members: Collection[broker_pb2.JoinGroupMember]
    ) -> list[broker_pb2.SyncGroupAssignment]:
        """Run the chosen assignor over every member's subscription."""
        subscriptions: dict[str, Subscription] = {}
        for member in members:
            instance_id = member.group_instance_id or None
            try:
                subscriptions[member.member_id] = member_subscription(
                    protocol_name, member.metadata, instance_id
                )
            except SchemaError as e:
                log.warning("member %s: a subscription that does not decode: %s", member, e)
                subscriptions[member.member_id] = Subscription(frozenset(), instance_id)
        assignor = ASSIGNORS.get(protocol_name)
        if assignor is None or protocol_name not in self._config.strategies:
            raise InconsistentGroupProtocolError(
                common_pb2.INCONSISTENT_GROUP_PROTOCOL,
                f"the group chose assignor {protocol_name!r}, not one of "
                f"{list(self._config.strategies)}",
            )
        topics = {topic for s in subscriptions.values() for topic in s.topics}
        counts = self._partition_counts(topics)
        result = assignor(counts, subscriptions)
        self._assigned_counts = counts
        return [
            broker_pb2.SyncGroupAssignment(
                member_id=member_id,
                assignment=encode_assignment(
                    ConsumerProtocolAssignment(tuple(TopicPartition(*tp) for tp in partitions))
                ),
            )
            for member_id, partitions in result.items()
        ]

    def _partition_counts(self, topics: set[str]) -> dict[str, int]:
        """Partition counts of ``topics`` from metadata, refreshed if some are unknown;
        a topic that does not exist has none."""
        self._cluster.add_topics(topics)
        view = self._cluster.view
        if any(_partition_count(view, t) is None for t in topics):
            try:
                view = self._cluster.update(timeout_s=min(self._request_timeout_s, _SHORT_CALL_S))
            except RaftkaError as e:
                log.info("group %s: no metadata to assign with: %s", self._config.group_id, e)
        return {t: _partition_count(view, t) or 0 for t in topics}

    # -- rebalance triggers --------------------------------------------------------

    def _check_rebalance_triggers(self) -> None:
        with self._lock:
            if self._state is not MemberState.STABLE or self._rejoin_needed:
                return
        if self._topics != self._joined_topics:
            log.info("group %s: the subscription changed, rejoining", self._config.group_id)
            self._request_rejoin()
            return
        if self._assigned_counts is None:
            return
        view = self._cluster.view
        for topic, count in self._assigned_counts.items():
            current = _partition_count(view, topic)
            if current is not None and current != count:
                log.info(
                    "group %s: %s has %d partitions, not %d: rebalancing",
                    self._config.group_id,
                    topic,
                    current,
                    count,
                )
                self._request_rejoin()
                return

    def _maybe_list_topics(self, deadline: float) -> None:
        """For a pattern subscription: list every topic every ``metadata_max_age_ms``."""
        now = time.monotonic()
        if self._pattern is None or now < self._next_listing_s:
            return
        pattern = self._pattern
        names = self._list_topics(max(deadline - now, min(self._request_timeout_s, 1.0)))
        if names is None:
            self._next_listing_s = now + self._backoff_s
            return
        self._next_listing_s = now + self._config.metadata_max_age_ms / 1000
        matched = frozenset(n for n in names if pattern.fullmatch(n) and n not in INTERNAL_TOPICS)
        if matched != self._topics:
            self._topics = matched
            self._cluster.add_topics(matched)

    def _list_topics(self, timeout_s: float) -> set[str] | None:
        timeout_s = min(timeout_s, _SHORT_CALL_S)
        for address in self._cluster.addresses():
            try:
                response = self._cluster.stub(address).Metadata(
                    broker_pb2.MetadataRequest(), timeout=timeout_s
                )
            except grpc.RpcError as exc:
                log.debug("listing topics at %s: %s", address, rpc_error(exc, "Metadata"))
                continue
            return {t.name for t in response.topics if t.error.code == common_pb2.NONE}
        return None

    # -- the heartbeat thread ------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while True:
            with self._cond:
                if self._closing:
                    return
                now = time.monotonic()
                if self._state not in (MemberState.COMPLETING_REBALANCE, MemberState.STABLE):
                    self._cond.wait(self._interval_s)
                    continue
                generation = self._generation
                poll_deadline = self._last_poll_s + self._max_poll_s
                expired = now >= poll_deadline
                if expired:
                    self._reset(keep_member_id=False)
                elif now < self._next_heartbeat_s:
                    self._cond.wait(min(self._next_heartbeat_s, poll_deadline) - now)
                    continue
                else:
                    self._next_heartbeat_s = now + self._interval_s
            if expired:
                log.warning(
                    "group %s: poll() was not called for max_poll_interval_ms (%d ms): "
                    "leaving the group; process records faster or lower max_poll_records",
                    self._config.group_id,
                    self._config.max_poll_interval_ms,
                )
                self._send_leave(generation, "consumer poll timeout has expired")
                self._hooks.wake()
            else:
                self._heartbeat(generation)

    def _heartbeat(self, generation: Generation) -> None:
        address = self._coordinator(time.monotonic() + self._interval_s)
        if address is None:
            return
        request = broker_pb2.HeartbeatRequest(
            group_id=self._config.group_id,
            generation_id=generation.generation_id,
            member_id=generation.member_id,
            group_instance_id=self._config.group_instance_id or "",
        )
        timeout_s = min(self._request_timeout_s, self._config.session_timeout_ms / 1000)
        call = self._cluster.stub(address).Heartbeat.future(request, timeout=timeout_s)
        with self._lock:
            if self._closing:
                call.cancel()
                return
            self._heartbeat_call = call
        response, error = self._answer(call, "Heartbeat")
        with self._lock:
            self._heartbeat_call = None
        if error is not None:
            self._on_heartbeat_error(error, generation)

    def _on_heartbeat_error(self, error: RaftkaError, sent: Generation) -> None:
        with self._cond:
            if self._closing:
                return
            unchanged = self._generation == sent
            if isinstance(error, RebalanceInProgressError):
                if unchanged and self._state is MemberState.STABLE and not self._rejoin_needed:
                    log.info("group %s: rebalancing, rejoining", self._config.group_id)
                    self._rejoin_needed = True
                    self._hooks.wake()
                return
            if isinstance(error, IllegalGenerationError | UnknownMemberIdError):
                if unchanged:
                    log.info("group %s: heartbeat: %s", self._config.group_id, error)
                    self._reset(keep_member_id=isinstance(error, IllegalGenerationError))
                    self._hooks.wake()
                return
            if isinstance(error, FencedInstanceIdError):
                if unchanged:
                    self._fatal = error
                    self._hooks.wake()
                return
            self._next_heartbeat_s = time.monotonic() + self._backoff_s
        log.info("group %s: heartbeat failed: %s", self._config.group_id, error)
        if isinstance(error, CoordinatorError) or error.retriable:
            self._forget_coordinator()

    # -- helpers -------------------------------------------------------------------

    def _reset(self, *, keep_member_id: bool) -> None:
        """End the generation (under the lock): the next poll loses the partitions and
        joins again."""
        member_id = self._generation.member_id if keep_member_id else ""
        self._generation = Generation(member_id=member_id)
        self._state = MemberState.UNJOINED
        self._rejoin_needed = True
        self._needs_join_prepare = True
        self._cond.notify_all()

    def _request_rejoin(self) -> None:
        with self._lock:
            self._rejoin_needed = True

    def _valid_generation(self) -> bool:
        with self._lock:
            return self._generation.valid

    def _protocol(self, generation: Generation) -> RebalanceProtocol:
        return REBALANCE_PROTOCOLS.get(generation.protocol_name or "", RebalanceProtocol.EAGER)

    def _invoke(self, callback: Callback, partitions: set[TopicPartition]) -> None:
        """Run a listener callback; its exception is kept for ``poll`` to raise."""
        try:
            callback(set(partitions))
        except Exception as e:
            log.error("group %s: rebalance listener failed: %r", self._config.group_id, e)
            if self._callback_error is None:
                self._callback_error = e

    def _raise_callback_error(self) -> None:
        error, self._callback_error = self._callback_error, None
        if error is not None:
            raise error

    def _coordinator(self, deadline: float) -> str | None:
        """The coordinator's address, found within ``deadline`` (at least a short while)."""
        try:
            return self._group.coordinator(max(deadline, time.monotonic() + 0.5))
        except RaftkaError as e:
            log.info("group %s: no coordinator: %s", self._config.group_id, e)
            return None

    def _forget_coordinator(self) -> None:
        # GroupClient caches the address until a call of its own fails; ours failed.
        self._group.forget_coordinator()

    def _start(self, method: str, address: str, request: Any, timeout_s: float) -> Any:
        call = getattr(self._cluster.stub(address), method).future(request, timeout=timeout_s)
        call.add_done_callback(lambda _call: self._hooks.wake())
        return call

    def _answer(self, call: Any, api: str) -> tuple[Any, RaftkaError | None]:
        """(response, its error or None) of a finished call."""
        try:
            response = call.result()
        except grpc.FutureCancelledError:
            return None, RebalanceInProgressError(common_pb2.REBALANCE_IN_PROGRESS, "cancelled")
        except grpc.RpcError as exc:
            return None, rpc_error(exc, f"{api} at the coordinator")
        if response.error.code != common_pb2.NONE:
            return response, error_for(response.error.code, response.error.message)
        return response, None

    def _send_leave(self, generation: Generation, reason: str) -> None:
        """LeaveGroup, for a dynamic member with a member id (static members never leave)."""
        if self._config.group_instance_id is not None or not generation.member_id:
            return
        address = self._coordinator(time.monotonic() + min(self._request_timeout_s, 1.0))
        if address is None:
            return
        log.info(
            "group %s: member %s leaves: %s", self._config.group_id, generation.member_id, reason
        )
        request = broker_pb2.LeaveGroupRequest(
            group_id=self._config.group_id,
            members=[broker_pb2.MemberIdentity(member_id=generation.member_id)],
        )
        try:
            self._cluster.stub(address).LeaveGroup(
                request, timeout=min(self._request_timeout_s, _SHORT_CALL_S)
            )
        except grpc.RpcError as exc:
            log.info("group %s: %s", self._config.group_id, rpc_error(exc, "LeaveGroup"))


def _partition_count(view: ClusterView, topic: str) -> int | None:
    """The topic's partition count in ``view``: 0 when it does not exist, None when the
    view does not say."""
    partitions = view.partitions(topic)
    if partitions is not None:
        return len(partitions)
    if view.topic_errors.get(topic) == common_pb2.UNKNOWN_TOPIC_OR_PARTITION:
        return 0
    return None
