"""The group protocol's wire messages (``raftka.v1`` protobuf) to and from the pure
``broker.group.messages``: one mapping, shared by the coordinator and test fakes."""

from __future__ import annotations

from raftka.v1 import broker_pb2, common_pb2

from broker.group import messages as gm


def group_error(error: gm.GroupError, context: str = "") -> common_pb2.Error | None:
    """The wire error for ``error`` (None for NONE); Kafka's names are the enum's names."""
    if error is gm.GroupError.NONE:
        return None
    return common_pb2.Error(
        code=common_pb2.ErrorCode.Value(str(error)),
        message=f"{context}: {error}" if context else "",
    )


def join_request(request: broker_pb2.JoinGroupRequest) -> gm.JoinGroupRequest:
    return gm.JoinGroupRequest(
        member_id=request.member_id,
        group_instance_id=request.group_instance_id or None,
        client_id=request.client_id,
        protocol_type=request.protocol_type,
        protocols=tuple((p.name, p.metadata) for p in request.protocols),
        session_timeout_ms=request.session_timeout_ms,
        rebalance_timeout_ms=request.rebalance_timeout_ms,
    )


def join_response(response: gm.JoinGroupResponse) -> broker_pb2.JoinGroupResponse:
    return broker_pb2.JoinGroupResponse(
        error=group_error(response.error),
        generation_id=response.generation_id,
        protocol_type=response.protocol_type or "",
        protocol_name=response.protocol_name or "",
        leader=response.leader_id,
        member_id=response.member_id,
        members=[
            broker_pb2.JoinGroupMember(
                member_id=m.member_id,
                group_instance_id=m.group_instance_id or "",
                metadata=m.metadata,
            )
            for m in response.members
        ],
    )


def sync_request(request: broker_pb2.SyncGroupRequest) -> gm.SyncGroupRequest:
    return gm.SyncGroupRequest(
        member_id=request.member_id,
        generation_id=request.generation_id,
        group_instance_id=request.group_instance_id or None,
        protocol_type=request.protocol_type or None,
        protocol_name=request.protocol_name or None,
        assignments=tuple((a.member_id, a.assignment) for a in request.assignments),
    )


def sync_response(response: gm.SyncGroupResponse) -> broker_pb2.SyncGroupResponse:
    return broker_pb2.SyncGroupResponse(
        error=group_error(response.error),
        protocol_type=response.protocol_type or "",
        protocol_name=response.protocol_name or "",
        assignment=response.assignment,
    )


def heartbeat_request(request: broker_pb2.HeartbeatRequest) -> gm.HeartbeatRequest:
    return gm.HeartbeatRequest(
        request.member_id, request.generation_id, request.group_instance_id or None
    )


def leave_request(request: broker_pb2.LeaveGroupRequest) -> gm.LeaveGroupRequest:
    return gm.LeaveGroupRequest(
        tuple(gm.MemberIdentity(m.member_id, m.group_instance_id or None) for m in request.members)
    )


def leave_response(response: gm.LeaveGroupResponse) -> broker_pb2.LeaveGroupResponse:
    return broker_pb2.LeaveGroupResponse(
        error=group_error(response.error),
        members=[
            broker_pb2.MemberLeaveResult(
                member_id=r.member.member_id,
                group_instance_id=r.member.group_instance_id or "",
                error=group_error(r.error),
            )
            for r in response.members
        ],
    )


def described_group(group_id: str, d: gm.GroupDescription) -> broker_pb2.DescribedGroup:
    return broker_pb2.DescribedGroup(
        group_id=group_id,
        state=str(d.state),
        protocol_type=d.protocol_type or "",
        protocol_name=d.protocol_name or "",
        generation_id=d.generation_id,
        leader=d.leader_id or "",
        members=[
            broker_pb2.DescribedGroupMember(
                member_id=m.member_id,
                group_instance_id=m.group_instance_id or "",
                client_id=m.client_id,
                member_metadata=m.metadata,
                member_assignment=m.assignment,
            )
            for m in d.members
        ],
    )
