"""Errors raised by the client library, one class per kind a caller handles.

``retriable`` errors are transient: the same request may succeed later (the producer and
consumer retry them on their own until their timeouts). ``InvalidMetadataError`` and its
subclasses also mean the client's view of partition leaders is stale: it refreshes its
metadata before retrying, as Kafka's clients do for ``InvalidMetadataException``.
"""

from __future__ import annotations

from typing import Any

from raftka.v1 import common_pb2


class RaftkaError(Exception):
    """An error answered by the cluster, with its error code."""

    retriable = False

    def __init__(self, code: int, message: str = ""):
        self.code = code
        self.code_name = common_pb2.ErrorCode.Name(code) if code in _KNOWN else str(code)
        self.message = message
        super().__init__(f"{self.code_name}: {message}" if message else self.code_name)


class NotControllerError(RaftkaError):
    retriable = True


class QuorumUnavailableError(RaftkaError):
    retriable = True


class UnknownOutcomeError(RaftkaError):
    """The request may or may not have been applied; read back before retrying."""


class RequestTimedOutError(RaftkaError):
    retriable = True


class ClientTimeoutError(RequestTimedOutError):
    """The client gave up waiting: for metadata, for buffer space, or for a record's
    delivery (``delivery_timeout_ms``). Kafka's ``TimeoutException``."""


class TopicAlreadyExistsError(RaftkaError):
    pass


class InvalidMetadataError(RaftkaError):
    """The client's metadata is stale: refresh it, then retry."""

    retriable = True


class UnknownTopicError(InvalidMetadataError):
    """The topic or partition does not exist (yet, or any more) on the broker asked."""


class LeaderNotAvailableError(InvalidMetadataError):
    """The partition has no leader right now (an election is under way)."""


class NotLeaderOrFollowerError(InvalidMetadataError):
    """The broker asked does not lead the partition (any more)."""


class FencedLeaderEpochError(InvalidMetadataError):
    """The client's leader epoch is older than the broker's."""


class UnknownLeaderEpochError(InvalidMetadataError):
    """The client's leader epoch is newer than the broker's: it has not caught up yet."""


class KafkaStorageError(InvalidMetadataError):
    """The replica's log directory is offline; another replica may take over."""


class NetworkError(InvalidMetadataError):
    """A broker could not be reached, or the connection failed mid-request."""

    def __init__(self, message: str = ""):
        super().__init__(common_pb2.UNKNOWN_SERVER_ERROR, message)
        # Not an error code the cluster answers: the client's own name for it.
        self.code_name = "NETWORK_ERROR"
        self.args = (f"NETWORK_ERROR: {message}",)


class NotEnoughReplicasError(RaftkaError):
    """Fewer in-sync replicas than min.insync.replicas: nothing was appended."""

    retriable = True


class NotEnoughReplicasAfterAppendError(RaftkaError):
    """Appended by the leader, but the in-sync replicas shrank below min.insync.replicas
    before they all had it. A retry may duplicate the records."""

    retriable = True


class OffsetNotAvailableError(RaftkaError):
    retriable = True


class OffsetOutOfRangeError(RaftkaError):
    """The fetch offset is outside [log start, high watermark]. ``partitions`` maps each
    affected ``TopicPartition`` to the offset that was out of range, when known."""

    def __init__(self, code: int, message: str = "", partitions: dict[Any, int] | None = None):
        super().__init__(code, message)
        self.partitions = dict(partitions or {})


class NoOffsetForPartitionError(RaftkaError):
    """A partition has no position and ``auto_offset_reset`` is "none": seek first."""

    def __init__(self, message: str = ""):
        super().__init__(common_pb2.OFFSET_OUT_OF_RANGE, message)


class CorruptRecordError(RaftkaError):
    """Bytes that are not a well-formed record batch (bad CRC, length or field)."""


class RecordTooLargeError(RaftkaError):
    """A record (or its batch) exceeds max_request_size or the broker's limit."""


class RecordListTooLargeError(RaftkaError):
    pass


class InvalidRecordError(RaftkaError):
    pass


class InvalidTimestampError(RaftkaError):
    pass


class InvalidTopicError(RaftkaError):
    pass


class InvalidRequiredAcksError(RaftkaError):
    pass


class InvalidRequestError(RaftkaError):
    pass


class CoordinatorError(RaftkaError):
    """The group's coordinator moved, is loading, or is not there yet: find it again."""

    retriable = True


class GroupIdNotFoundError(RaftkaError):
    pass


class InvalidGroupIdError(RaftkaError):
    pass


class UnknownMemberIdError(RaftkaError):
    """The coordinator does not know the member id (any more): join the group again."""


class IllegalGenerationError(RaftkaError):
    """The request names a generation of the group that is over: join the group again."""


class RebalanceInProgressError(RaftkaError):
    """The group is rebalancing: finish the rebalance (``poll``), then try again."""


class MemberIdRequiredError(RaftkaError):
    """A new member must join again with the member id the coordinator gave it (KIP-394)."""


class FencedInstanceIdError(RaftkaError):
    """Another consumer joined with this ``group_instance_id``: this one is fenced for good."""


class InconsistentGroupProtocolError(RaftkaError):
    """The member's protocol type or assignors have nothing in common with the group's."""


class InvalidSessionTimeoutError(RaftkaError):
    """``session_timeout_ms`` is outside the broker's group.{min,max}.session.timeout.ms."""


class GroupMaxSizeReachedError(RaftkaError):
    """The group already has group.max.size members."""


class CommitFailedError(RaftkaError):
    """An offset commit of a group member was refused because the group moved on without
    it: it was removed, or rebalanced and the partitions may belong to another member now
    (Kafka's CommitFailedException). ``code`` says why (ILLEGAL_GENERATION,
    UNKNOWN_MEMBER_ID). The next ``poll`` joins the group again."""


_KNOWN = set(common_pb2.ErrorCode.values())
_BY_CODE: dict[int, type[RaftkaError]] = {
    common_pb2.NOT_CONTROLLER: NotControllerError,
    common_pb2.QUORUM_UNAVAILABLE: QuorumUnavailableError,
    common_pb2.UNKNOWN_OUTCOME: UnknownOutcomeError,
    common_pb2.REQUEST_TIMED_OUT: RequestTimedOutError,
    common_pb2.TOPIC_ALREADY_EXISTS: TopicAlreadyExistsError,
    common_pb2.UNKNOWN_TOPIC_OR_PARTITION: UnknownTopicError,
    common_pb2.INVALID_REQUEST: InvalidRequestError,
    common_pb2.OFFSET_OUT_OF_RANGE: OffsetOutOfRangeError,
    common_pb2.CORRUPT_MESSAGE: CorruptRecordError,
    common_pb2.LEADER_NOT_AVAILABLE: LeaderNotAvailableError,
    common_pb2.NOT_LEADER_OR_FOLLOWER: NotLeaderOrFollowerError,
    common_pb2.MESSAGE_TOO_LARGE: RecordTooLargeError,
    common_pb2.RECORD_LIST_TOO_LARGE: RecordListTooLargeError,
    common_pb2.INVALID_TOPIC_EXCEPTION: InvalidTopicError,
    common_pb2.NOT_ENOUGH_REPLICAS: NotEnoughReplicasError,
    common_pb2.NOT_ENOUGH_REPLICAS_AFTER_APPEND: NotEnoughReplicasAfterAppendError,
    common_pb2.INVALID_REQUIRED_ACKS: InvalidRequiredAcksError,
    common_pb2.INVALID_TIMESTAMP: InvalidTimestampError,
    common_pb2.KAFKA_STORAGE_ERROR: KafkaStorageError,
    common_pb2.FENCED_LEADER_EPOCH: FencedLeaderEpochError,
    common_pb2.UNKNOWN_LEADER_EPOCH: UnknownLeaderEpochError,
    common_pb2.OFFSET_NOT_AVAILABLE: OffsetNotAvailableError,
    common_pb2.INVALID_RECORD: InvalidRecordError,
    common_pb2.NOT_COORDINATOR: CoordinatorError,
    common_pb2.COORDINATOR_NOT_AVAILABLE: CoordinatorError,
    common_pb2.COORDINATOR_LOAD_IN_PROGRESS: CoordinatorError,
    common_pb2.GROUP_ID_NOT_FOUND: GroupIdNotFoundError,
    common_pb2.INVALID_GROUP_ID: InvalidGroupIdError,
    common_pb2.UNKNOWN_MEMBER_ID: UnknownMemberIdError,
    common_pb2.ILLEGAL_GENERATION: IllegalGenerationError,
    common_pb2.REBALANCE_IN_PROGRESS: RebalanceInProgressError,
    common_pb2.MEMBER_ID_REQUIRED: MemberIdRequiredError,
    common_pb2.FENCED_INSTANCE_ID: FencedInstanceIdError,
    common_pb2.INCONSISTENT_GROUP_PROTOCOL: InconsistentGroupProtocolError,
    common_pb2.INVALID_SESSION_TIMEOUT: InvalidSessionTimeoutError,
    common_pb2.GROUP_MAX_SIZE_REACHED: GroupMaxSizeReachedError,
}


def error_for(code: int, message: str = "") -> RaftkaError:
    return _BY_CODE.get(code, RaftkaError)(code, message)


def check(error: common_pb2.Error | None) -> None:
    """Raise the error carried by a response, if any."""
    if error is not None and error.code != common_pb2.NONE:
        raise error_for(error.code, error.message)
