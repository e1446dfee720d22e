"""The consumer group coordinator's pure core: group state machine and partition assignors.

``ClassicGroup`` (state.py) is one group under Kafka's classic protocol
(JoinGroup, SyncGroup, Heartbeat, LeaveGroup, offset commit validation), with
no sockets, threads or clock; it asks its caller to store its metadata
(``GroupWrite``, ``StoredGroup``) and can be rebuilt from it
(``ClassicGroup.loaded``). ``assignors`` holds the strategies a group leader
uses to assign partitions (range, roundrobin, sticky, cooperative-sticky). The
network layer and ``__consumer_offsets`` sit on top.
"""

from broker.group.assignors import (
    ASSIGNORS,
    REBALANCE_PROTOCOLS,
    Assignment,
    Assignor,
    RebalanceProtocol,
    Subscription,
    TopicPartition,
    cooperative_sticky_assign,
    range_assign,
    round_robin_assign,
    sticky_assign,
)
from broker.group.messages import (
    NO_GENERATION,
    NO_MEMBER_ID,
    GroupDescription,
    GroupError,
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
    Reply,
    StoredGroup,
    StoredMember,
    SyncGroupRequest,
    SyncGroupResponse,
)
from broker.group.state import VALID_PREVIOUS_STATES, ClassicGroup, GroupConfig

__all__ = [
    "ASSIGNORS",
    "NO_GENERATION",
    "NO_MEMBER_ID",
    "REBALANCE_PROTOCOLS",
    "VALID_PREVIOUS_STATES",
    "Assignment",
    "Assignor",
    "ClassicGroup",
    "GroupConfig",
    "GroupDescription",
    "GroupError",
    "GroupState",
    "GroupWrite",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "JoinGroupMember",
    "JoinGroupRequest",
    "JoinGroupResponse",
    "LeaveGroupRequest",
    "LeaveGroupResponse",
    "MemberDescription",
    "MemberIdentity",
    "MemberLeaveResult",
    "RebalanceProtocol",
    "Reply",
    "StoredGroup",
    "StoredMember",
    "Subscription",
    "SyncGroupRequest",
    "SyncGroupResponse",
    "TopicPartition",
    "cooperative_sticky_assign",
    "range_assign",
    "round_robin_assign",
    "sticky_assign",
]
