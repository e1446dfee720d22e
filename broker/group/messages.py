"""Requests, responses and errors of the classic group protocol, as plain frozen dataclasses.

They carry what Kafka's JoinGroup, SyncGroup, Heartbeat and LeaveGroup
requests and responses carry that the coordinator's state machine needs; the
network layer maps them to and from its wire messages. Protocol metadata and
assignments stay opaque bytes here: only the members interpret them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# A JoinGroup from a member that has no member id yet (Kafka's UNKNOWN_MEMBER_ID).
NO_MEMBER_ID = ""
# The generation of a group that never completed a rebalance, and of a commit from
# a consumer that assigns its partitions itself.
NO_GENERATION = -1


class GroupError(StrEnum):
    """Kafka's error names for the group APIs; NONE is success."""

    NONE = "NONE"
    UNKNOWN_MEMBER_ID = "UNKNOWN_MEMBER_ID"
    ILLEGAL_GENERATION = "ILLEGAL_GENERATION"
    REBALANCE_IN_PROGRESS = "REBALANCE_IN_PROGRESS"
    MEMBER_ID_REQUIRED = "MEMBER_ID_REQUIRED"
    INCONSISTENT_GROUP_PROTOCOL = "INCONSISTENT_GROUP_PROTOCOL"
    FENCED_INSTANCE_ID = "FENCED_INSTANCE_ID"
    GROUP_MAX_SIZE_REACHED = "GROUP_MAX_SIZE_REACHED"
    INVALID_SESSION_TIMEOUT = "INVALID_SESSION_TIMEOUT"
    # The group was deleted or unloaded; the client looks up the coordinator again.
    COORDINATOR_NOT_AVAILABLE = "COORDINATOR_NOT_AVAILABLE"
    # Answers parked requests when this broker stops coordinating the group.
    NOT_COORDINATOR = "NOT_COORDINATOR"
    NON_EMPTY_GROUP = "NON_EMPTY_GROUP"
    GROUP_ID_NOT_FOUND = "GROUP_ID_NOT_FOUND"
    # Storing the group's metadata failed in a way the client cannot act on.
    UNKNOWN_SERVER_ERROR = "UNKNOWN_SERVER_ERROR"


class GroupState(StrEnum):
    """Kafka's GroupState for classic groups, with Kafka's names."""

    EMPTY = "Empty"
    PREPARING_REBALANCE = "PreparingRebalance"
    COMPLETING_REBALANCE = "CompletingRebalance"
    STABLE = "Stable"
    DEAD = "Dead"


# A protocol a member supports: (name, metadata), e.g. ("range", <subscription bytes>).
Protocol = tuple[str, bytes]


@dataclass(frozen=True, slots=True)
class JoinGroupRequest:
    """A member asks to join (or rejoin) the group.

    ``protocols`` lists the protocols the member supports, most preferred first.
    ``rebalance_timeout_ms`` is how long the coordinator waits for members to
    rejoin once a rebalance starts; Kafka's consumer sends max.poll.interval.ms.
    """

    member_id: str
    group_instance_id: str | None
    client_id: str
    protocol_type: str
    protocols: tuple[Protocol, ...]
    session_timeout_ms: int
    rebalance_timeout_ms: int


@dataclass(frozen=True, slots=True)
class JoinGroupMember:
    """One member as the leader sees it: its metadata for the selected protocol."""

    member_id: str
    group_instance_id: str | None
    metadata: bytes


@dataclass(frozen=True, slots=True)
class JoinGroupResponse:
    """The end of a member's join phase; ``members`` is filled for the leader only."""

    error: GroupError
    member_id: str
    generation_id: int = NO_GENERATION
    protocol_type: str | None = None
    protocol_name: str | None = None
    leader_id: str = ""
    members: tuple[JoinGroupMember, ...] = ()


@dataclass(frozen=True, slots=True)
class SyncGroupRequest:
    """A member asks for its assignment; the leader brings everyone's.

    ``protocol_type`` and ``protocol_name``, when given, must match the group's.
    ``assignments`` is read from the leader only: (member id, assignment bytes).
    """

    member_id: str
    generation_id: int
    group_instance_id: str | None = None
    protocol_type: str | None = None
    protocol_name: str | None = None
    assignments: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class SyncGroupResponse:
    error: GroupError
    protocol_type: str | None = None
    protocol_name: str | None = None
    assignment: bytes = b""


@dataclass(frozen=True, slots=True)
class HeartbeatRequest:
    member_id: str
    generation_id: int
    group_instance_id: str | None = None


@dataclass(frozen=True, slots=True)
class HeartbeatResponse:
    error: GroupError


@dataclass(frozen=True, slots=True)
class MemberIdentity:
    """A member to remove: by member id, or by instance id alone (member id empty)."""

    member_id: str
    group_instance_id: str | None = None


@dataclass(frozen=True, slots=True)
class LeaveGroupRequest:
    members: tuple[MemberIdentity, ...]


@dataclass(frozen=True, slots=True)
class MemberLeaveResult:
    member: MemberIdentity
    error: GroupError


@dataclass(frozen=True, slots=True)
class LeaveGroupResponse:
    error: GroupError
    members: tuple[MemberLeaveResult, ...] = ()


GroupResponse = JoinGroupResponse | SyncGroupResponse | LeaveGroupResponse


@dataclass(frozen=True, slots=True)
class Reply:
    """A response and the request it answers, named by the token the caller passed with it."""

    reply_to: object
    response: GroupResponse


@dataclass(frozen=True, slots=True)
class MemberDescription:
    member_id: str
    group_instance_id: str | None
    client_id: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    # The member's metadata for the group's protocol (b"" while none is selected).
    metadata: bytes
    # The assignment of the last completed SyncGroup (b"" before one).
    assignment: bytes


@dataclass(frozen=True, slots=True)
class GroupDescription:
    """What `raftka group describe` shows (Kafka's DescribeGroups)."""

    group_id: str
    state: GroupState
    protocol_type: str | None
    protocol_name: str | None
    generation_id: int
    leader_id: str | None
    members: tuple[MemberDescription, ...]


@dataclass(frozen=True, slots=True)
class StoredMember:
    """One member as ``__consumer_offsets`` keeps it (Kafka's GroupMetadataValue.MemberMetadata).

    ``subscription`` is the member's metadata for the group's selected protocol;
    ``assignment`` what the leader assigned it in that generation.
    """

    member_id: str
    group_instance_id: str | None
    client_id: str
    client_host: str
    rebalance_timeout_ms: int
    session_timeout_ms: int
    subscription: bytes
    assignment: bytes


@dataclass(frozen=True, slots=True)
class StoredGroup:
    """A group's membership as ``__consumer_offsets`` keeps it (Kafka's GroupMetadataValue),
    written when a generation's assignment is complete; a new coordinator loads it."""

    protocol_type: str
    generation_id: int
    protocol_name: str | None
    leader_id: str | None
    members: tuple[StoredMember, ...]
    # Wall-clock time of the write (Kafka's currentStateTimestamp); -1 when unknown.
    current_state_timestamp_ms: int = -1


@dataclass(frozen=True, slots=True)
class GroupWrite:
    """A record the group asks its caller to append to ``__consumer_offsets``: its
    metadata, or a tombstone (``group`` None) when it no longer has any. The caller
    reports how the append ended with ``ClassicGroup.stored(write_id, error, now_ms)``;
    some answers wait for it."""

    write_id: int
    group: StoredGroup | None
