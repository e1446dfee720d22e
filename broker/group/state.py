"""One consumer group, as Kafka's classic group coordinator sees it: a pure state machine.

Theory of operation
-------------------
A ``ClassicGroup`` holds one group's members and generation and decides what
every JoinGroup, SyncGroup, Heartbeat and LeaveGroup request gets, Kafka's
``GroupMetadata`` and ``GroupCoordinator`` for the classic protocol. It does no
I/O and reads no clock: every call takes ``now_ms``, and ``tick(now_ms)`` fires
whatever deadline has passed (``next_deadline_ms()`` says when to call it).

Some requests cannot be answered at once: a JoinGroup waits until the join
phase ends, and a follower's SyncGroup waits for the leader's assignment. So
``join``, ``sync`` and ``leave`` take a ``reply_to`` token (any object but
None, e.g. the RPC's future) and every operation that can end a wait returns
a list of ``Reply(reply_to, response)``: the caller's own response, if it is
ready, and any parked responses the call completed. Every parked request gets
exactly one reply, sooner or later; a request that is superseded (the same
member sends JoinGroup again while one is parked) is answered with
REBALANCE_IN_PROGRESS.

States (Kafka's names) and how the group moves between them:

    Empty --join--> PreparingRebalance --all rejoined, or deadline--> CompletingRebalance
    CompletingRebalance --leader's SyncGroup--> Stable
    Stable | CompletingRebalance --join, leave, session expiry--> PreparingRebalance
    PreparingRebalance --join phase ends with no members--> Empty
    any --delete (when Empty), unload--> Dead

- Joining. A new dynamic member first gets a member id (client id + "-" +
  uuid) with MEMBER_ID_REQUIRED and must join again with it (KIP-394), so that
  retries after a timeout do not pile up ghost members. Until then it is
  pending: it blocks the end of a join phase, and expires after its session
  timeout. A joining member, a member that changed its protocols, or the
  leader rejoining a Stable group starts a rebalance.
- The join phase (PreparingRebalance) ends when every member has a JoinGroup
  parked and no member is pending, or at the rebalance timeout (the largest
  of the members'). Dynamic members that did not rejoin by then are removed;
  static ones stay until their session expires. A group that was Empty waits
  ``initial_rebalance_delay_ms`` first, and each new member extends the wait,
  up to the rebalance timeout, so that a group starting up settles in one
  generation. The end of the join phase increments the generation, selects the
  protocol (each member votes for its most preferred protocol that every
  member supports; most votes wins, ties go to the smaller name) and answers
  every parked JoinGroup; the leader (the first member to join, or a
  rejoined member if the leader did not rejoin) also gets every member's
  metadata.
- CompletingRebalance waits for the leader's SyncGroup; followers' SyncGroups
  park until it comes. Members that have not sent SyncGroup one rebalance
  timeout after the join phase ended are removed, and the group rebalances.
- Sessions. Heartbeats, SyncGroups and allowed offset commits restart a
  member's session. A member whose session expires is removed, and a Stable
  or CompletingRebalance group rebalances. A member with a JoinGroup or
  SyncGroup parked cannot expire (it is waiting for us), except a member that
  joined in this rebalance: it expires after ``new_member_join_timeout_ms``.
- Static membership (group.instance.id). A JoinGroup with an unknown member
  id and a known instance id replaces the old member id: the old incarnation
  gets FENCED_INSTANCE_ID from then on. In a Stable group whose member comes
  back with unchanged protocols, nothing else happens: the generation and the
  assignment are kept and the member gets them with its next SyncGroup. (Kafka
  only checks that the selected protocol would not change; we also require the
  subscription metadata to be the same, so that a member that restarts with a
  new subscription gets an assignment for it.)
- Offsets. ``commit_allowed`` is Kafka's validateOffsetCommit: members commit
  with their member id and current generation; a consumer without group
  management commits with generation -1 and no member id, and only while the
  group is Empty.

- Persistence (Kafka's GroupMetadataManager.storeGroup). The group does no I/O:
  it hands its caller ``GroupWrite``s (``take_writes()``) to append to
  ``__consumer_offsets`` and is told the outcome with ``stored()``. The
  leader's SyncGroup writes the generation (members, subscriptions, the new
  assignment); the group stays CompletingRebalance and every SyncGroup stays
  parked until the write is stored, then it becomes Stable and answers them.
  If the write fails, every parked SyncGroup gets the error (REQUEST_TIMED_OUT
  becomes REBALANCE_IN_PROGRESS, as in Kafka) and the group rebalances. A
  static member that replaces itself in a Stable group writes its new member id
  too, and gets its JoinGroup answer once it is stored; if that fails, the
  replacement is undone and the JoinGroup gets the error. A group that becomes
  Empty writes a tombstone. ``loaded()`` rebuilds a group from what was
  stored: Stable (Empty without members), in that generation, every member's
  session starting at the load, so members that go on heartbeating keep their
  generation and the others expire and make it rebalance.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from broker.group.messages import (
    NO_MEMBER_ID,
    GroupDescription,
    GroupError,
    GroupResponse,
    GroupState,
    GroupWrite,
    HeartbeatRequest,
    HeartbeatResponse,
    JoinGroupMember,
    JoinGroupRequest,
    JoinGroupResponse,
    LeaveGroupRequest,
    LeaveGroupResponse,
    MemberDescription,
    MemberIdentity,
    MemberLeaveResult,
    Protocol,
    Reply,
    StoredGroup,
    StoredMember,
    SyncGroupRequest,
    SyncGroupResponse,
)

E = GroupError
S = GroupState

# The states a group may enter each state from (Kafka's GroupState.validPreviousStates).
VALID_PREVIOUS_STATES: Mapping[GroupState, frozenset[GroupState]] = {
    S.EMPTY: frozenset({S.PREPARING_REBALANCE}),
    S.PREPARING_REBALANCE: frozenset({S.EMPTY, S.STABLE, S.COMPLETING_REBALANCE}),
    S.COMPLETING_REBALANCE: frozenset({S.PREPARING_REBALANCE}),
    S.STABLE: frozenset({S.COMPLETING_REBALANCE}),
    S.DEAD: frozenset(GroupState),
}


@dataclass(frozen=True, slots=True)
class GroupConfig:
    """Broker settings for groups, with Kafka's defaults."""

    min_session_timeout_ms: int = 6_000  # group.min.session.timeout.ms
    max_session_timeout_ms: int = 1_800_000  # group.max.session.timeout.ms
    initial_rebalance_delay_ms: int = 3_000  # group.initial.rebalance.delay.ms
    max_size: int | None = None  # group.max.size; None is unbounded
    # How long a member that joined during a rebalance may wait for it to end.
    new_member_join_timeout_ms: int = 300_000


def random_uuid() -> str:
    return str(uuid.uuid4())


@dataclass(slots=True)
class _Member:
    member_id: str
    group_instance_id: str | None
    client_id: str
    protocols: tuple[Protocol, ...]
    session_timeout_ms: int
    rebalance_timeout_ms: int
    heartbeat_deadline_ms: int
    is_new: bool = True
    assignment: bytes = b""
    client_host: str = ""
    # The tokens of this member's parked JoinGroup and SyncGroup, if any.
    join_waiter: object | None = None
    sync_waiter: object | None = None

    def metadata(self, protocol_name: str | None) -> bytes:
        return dict(self.protocols).get(protocol_name or "", b"")


@dataclass(frozen=True, slots=True)
class _SyncStore:
    """The leader's assignment of the current generation, being stored."""

    assignments: Mapping[str, bytes]


@dataclass(frozen=True, slots=True)
class _StaticStore:
    """A static member's new member id in a Stable group, being stored; what to
    restore if that fails."""

    old_id: str
    new_id: str
    protocols: tuple[Protocol, ...]
    session_timeout_ms: int
    rebalance_timeout_ms: int
    leader_before: str | None
    reply_to: object


@dataclass(slots=True)
class _InitialDelay:
    """The wait of a group's first join phase (Kafka's InitialDelayedJoin)."""

    remaining_ms: int
    new_member_added: bool = False


class ClassicGroup:
    """The coordinator's state for one group; see the module's theory of operation."""

    def __init__(
        self,
        group_id: str,
        config: GroupConfig | None = None,
        new_uuid: Callable[[], str] = random_uuid,
    ) -> None:
        self.group_id = group_id
        self._config = config or GroupConfig()
        self._new_uuid = new_uuid
        self._state = S.EMPTY
        self._generation_id = 0
        self._protocol_type: str | None = None
        self._protocol_name: str | None = None
        self._leader_id: str | None = None
        # Members in the order they joined; the first is the leader by default.
        self._members: dict[str, _Member] = {}
        self._static_members: dict[str, str] = {}  # instance id -> member id
        self._pending_members: dict[str, int] = {}  # member id -> expiry, KIP-394
        self._pending_sync: set[str] = set()
        self._join_deadline_ms: int | None = None
        self._initial_delay: _InitialDelay | None = None
        self._sync_deadline_ms: int | None = None
        self._replies: list[Reply] = []
        # Records for the caller to append, and those appended whose outcome is awaited.
        self._writes: list[GroupWrite] = []
        self._next_write_id = 1
        self._in_flight: dict[int, _SyncStore | _StaticStore] = {}
        self._sync_store: int | None = None  # The write of this generation's assignment.
        self._stored = False  # A record of this group may be in the log (not a tombstone).

    @classmethod
    def loaded(
        cls,
        group_id: str,
        stored: StoredGroup,
        now_ms: int,
        config: GroupConfig | None = None,
        new_uuid: Callable[[], str] = random_uuid,
    ) -> ClassicGroup:
        """The group as a new coordinator finds it in ``__consumer_offsets``: Stable in the
        stored generation (Empty if it has no members), every member's session starting
        now. A member supports the group's protocol only, with its stored subscription
        (as in Kafka's loadGroup)."""
        group = cls(group_id, config, new_uuid)
        group._generation_id = stored.generation_id
        group._protocol_type = stored.protocol_type or None
        group._stored = True
        if not stored.members:
            return group
        group._protocol_name = stored.protocol_name
        for m in stored.members:
            group._members[m.member_id] = _Member(
                member_id=m.member_id,
                group_instance_id=m.group_instance_id,
                client_id=m.client_id,
                protocols=((stored.protocol_name or "", m.subscription),),
                session_timeout_ms=m.session_timeout_ms,
                rebalance_timeout_ms=m.rebalance_timeout_ms,
                heartbeat_deadline_ms=now_ms + m.session_timeout_ms,
                is_new=False,
                assignment=m.assignment,
                client_host=m.client_host,
            )
            if m.group_instance_id is not None:
                group._static_members[m.group_instance_id] = m.member_id
        leader = stored.leader_id
        group._leader_id = leader if leader in group._members else next(iter(group._members))
        group._state = S.STABLE
        return group

    # ---- views

    @property
    def state(self) -> GroupState:
        return self._state

    @property
    def generation_id(self) -> int:
        return self._generation_id

    @property
    def leader_id(self) -> str | None:
        return self._leader_id

    @property
    def protocol_type(self) -> str | None:
        return self._protocol_type

    @property
    def protocol_name(self) -> str | None:
        return self._protocol_name

    @property
    def member_ids(self) -> tuple[str, ...]:
        return tuple(self._members)

    def describe(self) -> GroupDescription:
        members = tuple(
            MemberDescription(
                member_id=m.member_id,
                group_instance_id=m.group_instance_id,
                client_id=m.client_id,
                session_timeout_ms=m.session_timeout_ms,
                rebalance_timeout_ms=m.rebalance_timeout_ms,
                metadata=m.metadata(self._protocol_name),
                assignment=m.assignment,
            )
            for m in self._members.values()
        )
        return GroupDescription(
            group_id=self.group_id,
            state=self._state,
            protocol_type=self._protocol_type,
            protocol_name=self._protocol_name,
            generation_id=self._generation_id,
            leader_id=self._leader_id,
            members=members,
        )

    def next_deadline_ms(self) -> int | None:
        """The earliest time at which ``tick`` has something to do; None if nothing is due."""
        if self._state is S.DEAD:
            return None
        deadlines = [m.heartbeat_deadline_ms for m in self._members.values() if self._can_expire(m)]
        deadlines.extend(self._pending_members.values())
        if self._sync_deadline_ms is not None:
            deadlines.append(self._sync_deadline_ms)
        if self._state is S.PREPARING_REBALANCE and self._join_deadline_ms is not None:
            deadlines.append(self._join_deadline_ms)
        return min(deadlines, default=None)

    # ---- operations

    def join(self, request: JoinGroupRequest, now_ms: int, reply_to: object) -> list[Reply]:
        """JoinGroup. The reply to ``reply_to`` comes now or when the join phase ends."""
        _check_token(reply_to)
        error = self._join_error(request, now_ms)
        if error is not None:
            member_id = NO_MEMBER_ID if error is E.GROUP_MAX_SIZE_REACHED else request.member_id
            self._reply(reply_to, JoinGroupResponse(error, member_id))
        elif request.member_id == NO_MEMBER_ID:
            self._join_new_member(request, now_ms, reply_to)
        else:
            self._join_known_member(request, now_ms, reply_to)
        return self._finish(now_ms)

    def sync(self, request: SyncGroupRequest, now_ms: int, reply_to: object) -> list[Reply]:
        """SyncGroup. A follower's reply waits for the leader's assignment."""
        _check_token(reply_to)
        member = self._members.get(request.member_id)
        error = self._sync_error(request, member)
        if error is not None or member is None:
            self._reply(reply_to, SyncGroupResponse(error or E.UNKNOWN_MEMBER_ID))
        elif self._state is S.COMPLETING_REBALANCE:
            self._park_sync(member, request, now_ms, reply_to)
        else:
            self._synced(member.member_id)
            member.heartbeat_deadline_ms = now_ms + member.session_timeout_ms
            self._reply(reply_to, self._sync_response(member))
        return self._finish(now_ms)

    def heartbeat(self, request: HeartbeatRequest, now_ms: int) -> HeartbeatResponse:
        """Heartbeat: restarts the session; says REBALANCE_IN_PROGRESS while members must rejoin."""
        member = self._members.get(request.member_id)
        if self._state is S.DEAD:
            return HeartbeatResponse(E.COORDINATOR_NOT_AVAILABLE)
        if self._is_fenced(request.member_id, request.group_instance_id):
            return HeartbeatResponse(E.FENCED_INSTANCE_ID)
        if member is None:
            return HeartbeatResponse(E.UNKNOWN_MEMBER_ID)
        if request.generation_id != self._generation_id:
            return HeartbeatResponse(E.ILLEGAL_GENERATION)
        member.heartbeat_deadline_ms = now_ms + member.session_timeout_ms
        if self._state is S.PREPARING_REBALANCE:
            return HeartbeatResponse(E.REBALANCE_IN_PROGRESS)
        return HeartbeatResponse(E.NONE)

    def leave(self, request: LeaveGroupRequest, now_ms: int, reply_to: object) -> list[Reply]:
        """LeaveGroup for members named by member id, or by instance id alone (admin removal)."""
        _check_token(reply_to)
        if self._state is S.DEAD:
            self._reply(reply_to, LeaveGroupResponse(E.COORDINATOR_NOT_AVAILABLE))
        else:
            results = tuple(
                MemberLeaveResult(identity, self._leave_one(identity, now_ms))
                for identity in request.members
            )
            self._reply(reply_to, LeaveGroupResponse(E.NONE, results))
        return self._finish(now_ms)

    def commit_allowed(
        self,
        member_id: str,
        generation_id: int,
        now_ms: int,
        group_instance_id: str | None = None,
    ) -> GroupError | None:
        """Whether an OffsetCommit may be written: None, or the error for every partition.

        An allowed commit from a member restarts its session, as in Kafka.
        """
        if self._state is S.DEAD:
            return E.COORDINATOR_NOT_AVAILABLE
        if generation_id < 0 and member_id == NO_MEMBER_ID and group_instance_id is None:
            # A consumer that assigns its partitions itself: allowed while nobody manages the group.
            return None if self._state is S.EMPTY else E.UNKNOWN_MEMBER_ID
        if self._is_fenced(member_id, group_instance_id):
            return E.FENCED_INSTANCE_ID
        member = self._members.get(member_id)
        if member is None:
            return E.UNKNOWN_MEMBER_ID
        if generation_id != self._generation_id:
            return E.ILLEGAL_GENERATION
        if self._state is S.COMPLETING_REBALANCE:
            # The member knows the new generation but not yet its partitions.
            return E.REBALANCE_IN_PROGRESS
        member.heartbeat_deadline_ms = now_ms + member.session_timeout_ms
        return None

    def tick(self, now_ms: int) -> list[Reply]:
        """Expire sessions and pending members, and end the join or sync phase at its deadline."""
        if self._state is S.DEAD:
            return []
        for member in list(self._members.values()):
            if now_ms >= member.heartbeat_deadline_ms and self._can_expire(member):
                self._remove_member_and_update_group(member.member_id, now_ms)
        for member_id, expiry_ms in list(self._pending_members.items()):
            if now_ms >= expiry_ms:
                del self._pending_members[member_id]
        if self._sync_deadline_ms is not None and now_ms >= self._sync_deadline_ms:
            self._expire_pending_sync(now_ms)
        return self._finish(now_ms)

    def delete(self) -> GroupError:
        """DeleteGroups: only an Empty group can be deleted; it becomes Dead."""
        if self._state is S.DEAD:
            return E.GROUP_ID_NOT_FOUND
        if self._state is not S.EMPTY:
            return E.NON_EMPTY_GROUP
        self._pending_members.clear()
        self._transition(S.DEAD)
        return E.NONE

    def unload(self) -> list[Reply]:
        """This broker stops coordinating the group: parked requests get NOT_COORDINATOR."""
        for member in self._members.values():
            if member.join_waiter is not None:
                self._reply(
                    member.join_waiter, JoinGroupResponse(E.NOT_COORDINATOR, member.member_id)
                )
            if member.sync_waiter is not None:
                self._reply(member.sync_waiter, SyncGroupResponse(E.NOT_COORDINATOR))
            member.join_waiter = member.sync_waiter = None
        self._pending_members.clear()
        self._join_deadline_ms = self._sync_deadline_ms = None
        self._writes.clear()
        self._in_flight.clear()
        self._sync_store = None
        self._transition(S.DEAD)
        replies, self._replies = self._replies, []
        return replies

    def take_writes(self) -> list[GroupWrite]:
        """The records to append to ``__consumer_offsets``, in order; call ``stored`` for
        each once its append is replicated or failed."""
        writes, self._writes = self._writes, []
        return writes

    def stored(self, write_id: int, error: GroupError, now_ms: int) -> list[Reply]:
        """A write from ``take_writes`` is stored (``error`` NONE) or failed (the error for
        the requests that wait for it, e.g. NOT_COORDINATOR). Kafka's storeGroup callback:
        an outcome that the group moved past (a new rebalance) is ignored."""
        context = self._in_flight.pop(write_id, None)
        if isinstance(context, _SyncStore) and write_id == self._sync_store:
            self._assignment_stored(context, error, now_ms)
        elif isinstance(context, _StaticStore):
            self._static_member_stored(context, error, now_ms)
        return self._finish(now_ms)

    # ---- joining

    def _join_error(self, request: JoinGroupRequest, now_ms: int) -> GroupError | None:
        config = self._config
        timeout_ms = request.session_timeout_ms
        if not config.min_session_timeout_ms <= timeout_ms <= config.max_session_timeout_ms:
            return E.INVALID_SESSION_TIMEOUT
        if self._state is S.DEAD:
            return E.COORDINATOR_NOT_AVAILABLE
        if not self._accepts_joining_member(request):
            if request.member_id in self._members:
                self._remove_member_and_update_group(request.member_id, now_ms)
            return E.GROUP_MAX_SIZE_REACHED
        if not self._supports_protocols(request):
            return E.INCONSISTENT_GROUP_PROTOCOL
        return None

    def _accepts_joining_member(self, request: JoinGroupRequest) -> bool:
        """Kafka's acceptJoiningMember: existing members always, new ones up to group.max.size."""
        max_size = self._config.max_size
        if max_size is None or self._state is S.EMPTY:
            return True
        member_id = request.member_id
        if member_id == NO_MEMBER_ID and request.group_instance_id is not None:
            # A static member coming back replaces itself; it does not grow the group.
            member_id = self._static_members.get(request.group_instance_id, NO_MEMBER_ID)
        member = self._members.get(member_id)
        if self._state is S.PREPARING_REBALANCE:
            # Counting rejoined members (not all members) lets a shrunk max.size take effect.
            rejoined = sum(m.join_waiter is not None for m in self._members.values())
            return (member is not None and member.join_waiter is not None) or rejoined < max_size
        return member is not None or len(self._members) < max_size

    def _supports_protocols(self, request: JoinGroupRequest) -> bool:
        if not self._members:
            return bool(request.protocol_type) and bool(request.protocols)
        offered = {name for name, _ in request.protocols}
        return request.protocol_type == self._protocol_type and bool(
            offered & self._candidate_protocols()
        )

    def _join_new_member(self, request: JoinGroupRequest, now_ms: int, reply_to: object) -> None:
        instance_id = request.group_instance_id
        member_id = f"{instance_id or request.client_id}-{self._new_uuid()}"
        if instance_id is None:
            self._pending_members[member_id] = now_ms + request.session_timeout_ms
            self._reply(reply_to, JoinGroupResponse(E.MEMBER_ID_REQUIRED, member_id))
        elif instance_id in self._static_members:
            self._replace_static_member(instance_id, member_id, request, now_ms, reply_to)
        else:
            self._add_member_and_rebalance(member_id, request, now_ms, reply_to)

    def _join_known_member(self, request: JoinGroupRequest, now_ms: int, reply_to: object) -> None:
        member_id, instance_id = request.member_id, request.group_instance_id
        if member_id in self._pending_members and instance_id is None:
            del self._pending_members[member_id]
            self._add_member_and_rebalance(member_id, request, now_ms, reply_to)
            return
        if self._is_fenced(member_id, instance_id):
            self._reply(reply_to, JoinGroupResponse(E.FENCED_INSTANCE_ID, member_id))
            return
        member = self._members.get(member_id)
        if member is None or (instance_id is not None and instance_id not in self._static_members):
            self._reply(reply_to, JoinGroupResponse(E.UNKNOWN_MEMBER_ID, member_id))
            return
        unchanged = member.protocols == request.protocols
        if self._state is S.COMPLETING_REBALANCE and unchanged:
            # The member lost its JoinGroup response (or retried): send it again.
            self._reply(reply_to, self._join_response(member))
        elif self._state is S.STABLE and unchanged and member_id != self._leader_id:
            # Nothing changed for a follower: it goes on to SyncGroup in this generation.
            self._reply(reply_to, self._join_response(member))
        else:
            # A rejoin during the join phase, new protocols, or the leader asking for a
            # rebalance (it does so when the topics it assigns change).
            self._update_member(member, request, reply_to)
            self._maybe_prepare_rebalance(now_ms)

    def _add_member_and_rebalance(
        self, member_id: str, request: JoinGroupRequest, now_ms: int, reply_to: object
    ) -> None:
        member = _Member(
            member_id=member_id,
            group_instance_id=request.group_instance_id,
            client_id=request.client_id,
            protocols=request.protocols,
            session_timeout_ms=request.session_timeout_ms,
            rebalance_timeout_ms=request.rebalance_timeout_ms,
            heartbeat_deadline_ms=now_ms + self._config.new_member_join_timeout_ms,
            join_waiter=reply_to,
        )
        if not self._members:
            self._protocol_type = request.protocol_type
        if self._leader_id is None:
            self._leader_id = member_id
        self._members[member_id] = member
        if request.group_instance_id is not None:
            self._static_members[request.group_instance_id] = member_id
        if self._initial_delay is not None:
            self._initial_delay.new_member_added = True
        self._maybe_prepare_rebalance(now_ms)

    def _replace_static_member(
        self,
        instance_id: str,
        new_id: str,
        request: JoinGroupRequest,
        now_ms: int,
        reply_to: object,
    ) -> None:
        old_id = self._static_members[instance_id]
        leader_before = self._leader_id
        member = self._members[old_id]
        # The old incarnation may still be waiting for a response: fence it now.
        if member.join_waiter is not None:
            self._reply(member.join_waiter, JoinGroupResponse(E.FENCED_INSTANCE_ID, old_id))
        if member.sync_waiter is not None:
            self._reply(member.sync_waiter, SyncGroupResponse(E.FENCED_INSTANCE_ID))
        member.join_waiter = member.sync_waiter = None
        before = _StaticStore(
            old_id,
            new_id,
            member.protocols,
            member.session_timeout_ms,
            member.rebalance_timeout_ms,
            leader_before,
            reply_to,
        )
        self._rename_member(old_id, new_id)
        member.heartbeat_deadline_ms = now_ms + request.session_timeout_ms
        unchanged = member.protocols == request.protocols
        self._update_member(member, request, reply_to)
        if self._state is S.STABLE and unchanged:
            # The member keeps its assignment. Its new member id is stored first (a new
            # coordinator would fence it otherwise): the JoinGroup stays parked until then.
            write_id = self._store({m.member_id: m.assignment for m in self._members.values()})
            self._in_flight[write_id] = before
        elif self._state is not S.PREPARING_REBALANCE:
            # New protocols, or CompletingRebalance, where the leader may be assigning
            # partitions to the old member id: rebalance.
            self._prepare_rebalance(now_ms)

    def _static_member_stored(self, context: _StaticStore, error: GroupError, now_ms: int) -> None:
        member = self._members.get(context.new_id)
        if (
            self._state is not S.STABLE
            or member is None
            or member.join_waiter is not context.reply_to
        ):
            return  # Answered meanwhile: a rebalance, a removal, or another restart.
        member.join_waiter = None
        if error is E.NONE:
            # The response names the leader from before the replacement so that a
            # restarted leader does not compute an assignment that a Stable group would
            # never hand out.
            response = self._join_response(member)
            self._reply(context.reply_to, replace(response, leader_id=context.leader_before or ""))
            return
        # Kafka reverts the replacement: the old member id is the member again.
        self._rename_member(context.new_id, context.old_id)
        member.protocols = context.protocols
        member.session_timeout_ms = context.session_timeout_ms
        member.rebalance_timeout_ms = context.rebalance_timeout_ms
        member.heartbeat_deadline_ms = now_ms + member.session_timeout_ms
        self._reply(
            context.reply_to,
            JoinGroupResponse(
                error,
                NO_MEMBER_ID,
                self._generation_id,
                self._protocol_type,
                self._protocol_name,
                context.leader_before or "",
            ),
        )

    def _rename_member(self, old_id: str, new_id: str) -> None:
        member = self._members[old_id]
        member.member_id = new_id
        self._members = {(new_id if k == old_id else k): m for k, m in self._members.items()}
        if member.group_instance_id is not None:
            self._static_members[member.group_instance_id] = new_id
        if self._leader_id == old_id:
            self._leader_id = new_id
        if old_id in self._pending_sync:
            self._pending_sync = (self._pending_sync - {old_id}) | {new_id}

    def _update_member(self, member: _Member, request: JoinGroupRequest, reply_to: object) -> None:
        member.protocols = request.protocols
        member.session_timeout_ms = request.session_timeout_ms
        member.rebalance_timeout_ms = request.rebalance_timeout_ms
        if member.join_waiter is not None:
            self._reply(
                member.join_waiter, JoinGroupResponse(E.REBALANCE_IN_PROGRESS, member.member_id)
            )
        member.join_waiter = reply_to

    # ---- the join phase

    def _maybe_prepare_rebalance(self, now_ms: int) -> None:
        if self._state in (S.EMPTY, S.STABLE, S.COMPLETING_REBALANCE):
            self._prepare_rebalance(now_ms)

    def _prepare_rebalance(self, now_ms: int) -> None:
        self._sync_store = None  # An assignment being stored will not be used.
        if self._state is S.COMPLETING_REBALANCE:
            # The leader's assignment for this generation will never be used: members
            # waiting for it must rejoin.
            for member in self._members.values():
                member.assignment = b""
                if member.sync_waiter is not None:
                    self._reply(member.sync_waiter, SyncGroupResponse(E.REBALANCE_IN_PROGRESS))
                    member.sync_waiter = None
                    # It could not expire while it waited; its session starts now.
                    member.heartbeat_deadline_ms = now_ms + member.session_timeout_ms
        self._pending_sync.clear()
        self._sync_deadline_ms = None
        delay_ms = self._config.initial_rebalance_delay_ms
        rebalance_timeout_ms = self._rebalance_timeout_ms()
        if self._state is S.EMPTY and delay_ms > 0:
            self._initial_delay = _InitialDelay(max(rebalance_timeout_ms - delay_ms, 0))
            self._join_deadline_ms = now_ms + delay_ms
        else:
            self._initial_delay = None
            self._join_deadline_ms = now_ms + rebalance_timeout_ms
        self._transition(S.PREPARING_REBALANCE)

    def _maybe_complete_join(self, now_ms: int) -> None:
        if self._state is not S.PREPARING_REBALANCE or self._join_deadline_ms is None:
            return
        delay = self._initial_delay
        if delay is not None:
            # A new group waits for more members; each new one extends the wait.
            if now_ms < self._join_deadline_ms:
                return
            if delay.new_member_added and delay.remaining_ms > 0:
                extension_ms = min(self._config.initial_rebalance_delay_ms, delay.remaining_ms)
                self._initial_delay = _InitialDelay(delay.remaining_ms - extension_ms)
                self._join_deadline_ms = now_ms + extension_ms
                return
        elif now_ms < self._join_deadline_ms and not self._all_members_joined():
            return
        self._complete_join(now_ms)

    def _all_members_joined(self) -> bool:
        return not self._pending_members and all(
            m.join_waiter is not None for m in self._members.values()
        )

    def _complete_join(self, now_ms: int) -> None:
        for member in list(self._members.values()):
            if member.join_waiter is None and member.group_instance_id is None:
                self._remove_member(member.member_id)
        if self._members and not self._elect_joined_leader():
            # Only static members that have not rejoined are left: give them another
            # rebalance timeout (their sessions may expire meanwhile).
            self._initial_delay = None
            self._join_deadline_ms = now_ms + self._rebalance_timeout_ms()
            return
        self._generation_id += 1
        self._join_deadline_ms = None
        self._initial_delay = None
        if not self._members:
            self._protocol_name = None
            self._transition(S.EMPTY)
            if self._stored:
                self._stored = False
                self._emit(None)
            return
        self._protocol_name = self._select_protocol()
        self._transition(S.COMPLETING_REBALANCE)
        for member in self._members.values():
            if member.join_waiter is not None:
                self._reply(member.join_waiter, self._join_response(member))
                member.join_waiter = None
            member.heartbeat_deadline_ms = now_ms + member.session_timeout_ms
            member.is_new = False
        self._pending_sync = set(self._members)
        self._sync_deadline_ms = now_ms + self._rebalance_timeout_ms()

    def _elect_joined_leader(self) -> bool:
        """Keep the leader if it rejoined, else make the first rejoined member leader."""
        leader = self._members.get(self._leader_id or "")
        if leader is not None and leader.join_waiter is not None:
            return True
        for member in self._members.values():
            if member.join_waiter is not None:
                self._leader_id = member.member_id
                return True
        return False

    def _select_protocol(self) -> str:
        """Kafka's vote: each member names its favourite common protocol; most votes wins."""
        candidates = self._candidate_protocols()
        votes = Counter(
            next(name for name, _ in m.protocols if name in candidates)
            for m in self._members.values()
        )
        return min(votes, key=lambda name: (-votes[name], name))

    def _candidate_protocols(self) -> set[str]:
        members = iter(self._members.values())
        common = {name for name, _ in next(members).protocols}
        for member in members:
            common &= {name for name, _ in member.protocols}
        return common

    def _join_response(self, member: _Member) -> JoinGroupResponse:
        is_leader = member.member_id == self._leader_id
        members = tuple(
            JoinGroupMember(m.member_id, m.group_instance_id, m.metadata(self._protocol_name))
            for m in self._members.values()
        )
        return JoinGroupResponse(
            error=E.NONE,
            member_id=member.member_id,
            generation_id=self._generation_id,
            protocol_type=self._protocol_type,
            protocol_name=self._protocol_name,
            leader_id=self._leader_id or "",
            members=members if is_leader else (),
        )

    # ---- the sync phase

    def _sync_error(self, request: SyncGroupRequest, member: _Member | None) -> GroupError | None:
        if self._state is S.DEAD:
            return E.COORDINATOR_NOT_AVAILABLE
        if self._is_fenced(request.member_id, request.group_instance_id):
            return E.FENCED_INSTANCE_ID
        if member is None:
            return E.UNKNOWN_MEMBER_ID
        if request.generation_id != self._generation_id:
            return E.ILLEGAL_GENERATION
        if request.protocol_type is not None and request.protocol_type != self._protocol_type:
            return E.INCONSISTENT_GROUP_PROTOCOL
        if request.protocol_name is not None and request.protocol_name != self._protocol_name:
            return E.INCONSISTENT_GROUP_PROTOCOL
        if self._state is S.PREPARING_REBALANCE:
            return E.REBALANCE_IN_PROGRESS
        return None

    def _park_sync(
        self, member: _Member, request: SyncGroupRequest, now_ms: int, reply_to: object
    ) -> None:
        if member.sync_waiter is not None:
            self._reply(member.sync_waiter, SyncGroupResponse(E.REBALANCE_IN_PROGRESS))
        member.sync_waiter = reply_to
        self._synced(member.member_id)
        if member.member_id != self._leader_id or self._sync_store is not None:
            return
        # Members the leader left out get an empty assignment; unknown member ids are ignored.
        assignments = dict(request.assignments)
        plan = {m: assignments.get(m, b"") for m in self._members}
        # Kafka's doSyncGroup: store the generation, then hand the assignment out.
        self._sync_store = self._store(plan)
        self._in_flight[self._sync_store] = _SyncStore(plan)

    def _assignment_stored(self, context: _SyncStore, error: GroupError, now_ms: int) -> None:
        self._sync_store = None
        ok = error is E.NONE
        for m in self._members.values():
            m.assignment = context.assignments.get(m.member_id, b"") if ok else b""
            if m.sync_waiter is not None:
                self._reply(
                    m.sync_waiter, self._sync_response(m) if ok else SyncGroupResponse(error)
                )
                m.sync_waiter = None
                # It could not expire while it waited; its session starts now.
                m.heartbeat_deadline_ms = now_ms + m.session_timeout_ms
        if ok:
            self._transition(S.STABLE)
        else:
            self._prepare_rebalance(now_ms)

    def _sync_response(self, member: _Member) -> SyncGroupResponse:
        return SyncGroupResponse(
            E.NONE, self._protocol_type, self._protocol_name, member.assignment
        )

    def _synced(self, member_id: str) -> None:
        self._pending_sync.discard(member_id)
        if not self._pending_sync:
            self._sync_deadline_ms = None

    def _expire_pending_sync(self, now_ms: int) -> None:
        """Members that never sent SyncGroup after the join phase leave; the group rebalances."""
        late = [m for m in self._members if m in self._pending_sync]
        self._sync_deadline_ms = None
        if not late or self._state not in (S.COMPLETING_REBALANCE, S.STABLE):
            return
        for member_id in late:
            self._remove_member(member_id)
        self._prepare_rebalance(now_ms)

    # ---- leaving and expiry

    def _leave_one(self, identity: MemberIdentity, now_ms: int) -> GroupError:
        member_id = identity.member_id
        if member_id == NO_MEMBER_ID:
            instance_id = identity.group_instance_id
            found = None if instance_id is None else self._static_members.get(instance_id)
            if found is None:
                return E.UNKNOWN_MEMBER_ID
            member_id = found
        elif member_id in self._pending_members:
            del self._pending_members[member_id]
            return E.NONE
        elif self._is_fenced(member_id, identity.group_instance_id):
            return E.FENCED_INSTANCE_ID
        elif member_id not in self._members:
            return E.UNKNOWN_MEMBER_ID
        self._remove_member_and_update_group(member_id, now_ms)
        return E.NONE

    def _remove_member_and_update_group(self, member_id: str, now_ms: int) -> None:
        self._remove_member(member_id)
        if self._state in (S.STABLE, S.COMPLETING_REBALANCE):
            self._prepare_rebalance(now_ms)

    def _remove_member(self, member_id: str) -> None:
        member = self._members.pop(member_id)
        if member.join_waiter is not None:
            self._reply(member.join_waiter, JoinGroupResponse(E.UNKNOWN_MEMBER_ID, NO_MEMBER_ID))
        if member.sync_waiter is not None:
            self._reply(member.sync_waiter, SyncGroupResponse(E.UNKNOWN_MEMBER_ID))
        if member.group_instance_id is not None:
            del self._static_members[member.group_instance_id]
        if self._leader_id == member_id:
            self._leader_id = next(iter(self._members), None)
        self._synced(member_id)

    def _can_expire(self, member: _Member) -> bool:
        # A member with a parked request is waiting for us, unless it is new in this rebalance.
        return member.is_new or (member.join_waiter is None and member.sync_waiter is None)

    # ---- helpers

    def _is_fenced(self, member_id: str, instance_id: str | None) -> bool:
        """True when the instance id now belongs to another member id (a newer incarnation)."""
        if instance_id is None or instance_id not in self._static_members:
            return False
        return self._static_members[instance_id] != member_id

    def _rebalance_timeout_ms(self) -> int:
        return max((m.rebalance_timeout_ms for m in self._members.values()), default=0)

    def _store(self, assignments: Mapping[str, bytes]) -> int:
        """Ask for the generation, with these assignments, to be stored; the write's id."""
        members = tuple(
            StoredMember(
                member_id=m.member_id,
                group_instance_id=m.group_instance_id,
                client_id=m.client_id,
                client_host=m.client_host,
                rebalance_timeout_ms=m.rebalance_timeout_ms,
                session_timeout_ms=m.session_timeout_ms,
                subscription=m.metadata(self._protocol_name),
                assignment=assignments.get(m.member_id, b""),
            )
            for m in self._members.values()
        )
        self._stored = True
        return self._emit(
            StoredGroup(
                protocol_type=self._protocol_type or "",
                generation_id=self._generation_id,
                protocol_name=self._protocol_name,
                leader_id=self._leader_id,
                members=members,
            )
        )

    def _emit(self, group: StoredGroup | None) -> int:
        write_id = self._next_write_id
        self._next_write_id += 1
        self._writes.append(GroupWrite(write_id, group))
        return write_id

    def _transition(self, state: GroupState) -> None:
        if self._state not in VALID_PREVIOUS_STATES[state]:
            raise AssertionError(f"group {self.group_id}: {self._state} cannot become {state}")
        self._state = state

    def _reply(self, reply_to: object, response: GroupResponse) -> None:
        self._replies.append(Reply(reply_to, response))

    def _finish(self, now_ms: int) -> list[Reply]:
        self._maybe_complete_join(now_ms)
        replies, self._replies = self._replies, []
        return replies


def _check_token(reply_to: object) -> None:
    if reply_to is None:
        raise ValueError("reply_to must name the request: None is not a token")
