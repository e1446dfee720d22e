"""The raftka client library: ``Admin`` now; ``Producer`` and ``Consumer`` join it."""

from client.admin import (
    Admin,
    BrokerInfo,
    ClusterInfo,
    CreatedTopic,
    Endpoint,
    LogEntry,
    NewTopic,
    PartitionInfo,
    QuorumInfo,
    ReplicaInfo,
    TopicInfo,
)
from client.errors import (
    InvalidRequestError,
    NotControllerError,
    QuorumUnavailableError,
    RaftkaError,
    RequestTimedOutError,
    TopicAlreadyExistsError,
    UnknownOutcomeError,
    UnknownTopicError,
)

__all__ = [
    "Admin",
    "BrokerInfo",
    "ClusterInfo",
    "CreatedTopic",
    "Endpoint",
    "InvalidRequestError",
    "LogEntry",
    "NewTopic",
    "NotControllerError",
    "PartitionInfo",
    "QuorumInfo",
    "QuorumUnavailableError",
    "RaftkaError",
    "ReplicaInfo",
    "RequestTimedOutError",
    "TopicAlreadyExistsError",
    "TopicInfo",
    "UnknownOutcomeError",
    "UnknownTopicError",
]
