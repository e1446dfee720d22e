"""Admin: topics, partitions, leaders and the state of the cluster and its quorum.

The shape follows Kafka's AdminClient. Batch calls (``create_topics``,
``delete_topics``, ...) answer one result per item: ``None`` for success or
the ``RaftkaError`` for that item, so a caller can act on partial success.
Single-item calls (``create_topic``, ``delete_topic``, ...) raise instead.
An error of the whole request (no controller, quorum unavailable, timeout)
always raises.

Everything returned is a frozen dataclass of plain values; no protobuf
message leaves this module except the metadata records of
``read_metadata_log``, which are the log's own type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from raftka.v1 import common_pb2, controller_pb2, metadata_pb2

from client._controller import ControllerClient
from client.errors import RaftkaError, check, error_for


class _Caller(Protocol):
    def call(self, method: str, request: Any, *, timeout_s: float | None = None) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class NewTopic:
    """A topic to create. -1 means the cluster default (``num.partitions``,
    ``default.replication.factor``). ``assignments``, when given, lists the
    replicas of each partition and replaces the count and factor."""

    name: str
    num_partitions: int = -1
    replication_factor: int = -1
    configs: Mapping[str, str] = field(default_factory=dict)
    assignments: Sequence[Sequence[int]] = ()


@dataclass(frozen=True, slots=True)
class CreatedTopic:
    name: str
    topic_id: str
    num_partitions: int
    replication_factor: int


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    partition: int
    leader: int
    leader_epoch: int
    partition_epoch: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]

    @property
    def under_replicated(self) -> bool:
        return len(self.isr) < len(self.replicas)

    @property
    def offline(self) -> bool:
        return self.leader < 0


@dataclass(frozen=True, slots=True)
class TopicInfo:
    name: str
    topic_id: str
    partitions: tuple[PartitionInfo, ...]
    configs: Mapping[str, str] = field(default_factory=dict)

    @property
    def replication_factor(self) -> int:
        return max((len(p.replicas) for p in self.partitions), default=0)


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    broker_id: int
    broker_epoch: int
    incarnation_id: str
    listeners: tuple[Endpoint, ...]
    rack: str
    fenced: bool
    in_controlled_shutdown: bool
    # Partitions it leads, and ISRs it is in.
    leader_count: int = 0
    isr_count: int = 0

    @property
    def address(self) -> str:
        return self.listeners[0].address if self.listeners else ""


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    cluster_id: str
    controller_id: int
    controller_epoch: int
    brokers: tuple[BrokerInfo, ...]
    metadata_offset: int = -1


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """One voter or observer of the metadata log, as the active controller sees it.

    ``lag`` is how many committed records the replica is missing
    (high watermark minus its log end offset), -1 when unknown. Timestamps are
    milliseconds since the epoch, -1 when unknown.
    """

    replica_id: int
    log_end_offset: int
    lag: int
    last_fetch_timestamp_ms: int
    last_caught_up_timestamp_ms: int
    host: str = ""
    port: int = 0


@dataclass(frozen=True, slots=True)
class QuorumInfo:
    cluster_id: str
    leader_id: int
    leader_epoch: int
    high_watermark: int
    voters: tuple[ReplicaInfo, ...]
    observers: tuple[ReplicaInfo, ...]
    log_start_offset: int = 0


@dataclass(frozen=True, slots=True)
class ReplicaLog:
    """One replica's log of a partition, as the broker that hosts it reports it."""

    broker_id: int
    role: str
    leader_epoch: int
    log_start_offset: int
    log_end_offset: int
    high_watermark: int
    size_bytes: int


class LogEntry(NamedTuple):
    """A committed metadata record and where it sits in the log."""

    offset: int
    controller_epoch: int
    append_time_ms: int
    record: metadata_pb2.MetadataRecord


ELECTION_TYPES = {
    "preferred": controller_pb2.PREFERRED,
    "unclean": controller_pb2.UNCLEAN,
}


class Admin:
    """Administrative calls to a cluster, through its active controller.

    ``bootstrap`` is one or more controller RPC addresses (``host:port``, or a
    comma-separated string); any one that answers leads to the active
    controller. Thread-safe. Close it, or use it as a context manager.
    """

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        timeout_s: float = 10.0,
        *,
        client: _Caller | None = None,
    ):
        # ``client`` lets tests answer calls without a network.
        self._client: _Caller = client or ControllerClient(bootstrap, timeout_s=timeout_s)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any) -> Any:
        response = self._client.call(method, request, timeout_s=self.timeout_s)
        check(response.error)
        return response

    # -- topics ------------------------------------------------------------

    def create_topics(
        self, topics: Iterable[NewTopic], *, validate_only: bool = False
    ) -> dict[str, RaftkaError | None]:
        """Create topics; returns each topic's error, or None where it was created."""
        return {
            r.name: _error_of(r.error)
            for r in self._create_topics(list(topics), validate_only=validate_only)
        }

    def create_topic(
        self,
        name: str,
        num_partitions: int = -1,
        replication_factor: int = -1,
        configs: Mapping[str, str] | None = None,
        *,
        validate_only: bool = False,
    ) -> CreatedTopic:
        """Create one topic; raises ``TopicAlreadyExistsError`` and friends."""
        topic = NewTopic(name, num_partitions, replication_factor, dict(configs or {}))
        result = _single(self._create_topics([topic], validate_only=validate_only), name)
        return CreatedTopic(
            name=result.name,
            topic_id=result.topic_id,
            num_partitions=result.num_partitions,
            replication_factor=result.replication_factor,
        )

    def _create_topics(
        self, topics: list[NewTopic], *, validate_only: bool
    ) -> list[controller_pb2.CreateTopicResult]:
        request = controller_pb2.CreateTopicsRequest(
            topics=[_creatable(t) for t in topics], validate_only=validate_only
        )
        return list(self._call("CreateTopics", request).results)

    def delete_topics(self, names: Iterable[str]) -> dict[str, RaftkaError | None]:
        request = controller_pb2.DeleteTopicsRequest(names=list(names))
        response = self._call("DeleteTopics", request)
        return {r.name: _error_of(r.error) for r in response.results}

    def delete_topic(self, name: str) -> None:
        request = controller_pb2.DeleteTopicsRequest(names=[name])
        _single(self._call("DeleteTopics", request).results, name)

    def create_partitions(
        self, new_counts: Mapping[str, int], *, validate_only: bool = False
    ) -> dict[str, RaftkaError | None]:
        """Raise topics' partition counts to the given totals."""
        response = self._call("CreatePartitions", _partitions_request(new_counts, validate_only))
        return {r.name: _error_of(r.error) for r in response.results}

    def increase_partitions(
        self, name: str, total_count: int, *, validate_only: bool = False
    ) -> None:
        """Raise one topic's partition count to ``total_count``; raises on error."""
        request = _partitions_request({name: total_count}, validate_only)
        _single(self._call("CreatePartitions", request).results, name)

    def elect_leaders(
        self,
        partitions: Iterable[tuple[str, int]] | None = None,
        election_type: str = "preferred",
    ) -> dict[tuple[str, int], RaftkaError | None]:
        """Elect leaders ("preferred" or "unclean") for the given partitions, or all.

        A partition whose leader is already the preferred one answers
        ``ELECTION_NOT_NEEDED``, as in Kafka.
        """
        if election_type not in ELECTION_TYPES:
            raise ValueError(f"election type must be one of {sorted(ELECTION_TYPES)}")
        request = controller_pb2.ElectLeadersRequest(
            election_type=ELECTION_TYPES[election_type],
            partitions=[
                controller_pb2.TopicPartition(topic=t, partition=p) for t, p in partitions or ()
            ],
        )
        response = self._call("ElectLeaders", request)
        return {
            (r.partition.topic, r.partition.partition): _error_of(r.error) for r in response.results
        }

    def describe_topics(self, names: Iterable[str] | None = None) -> list[TopicInfo]:
        """Describe the named topics, or every topic; raises if a named one fails
        (``UnknownTopicError`` for a topic that does not exist)."""
        request = controller_pb2.DescribeTopicsRequest(names=list(names or ()))
        response = self._call("DescribeTopics", request)
        for topic in response.topics:
            error = _error_of(topic.error)
            if error is not None:
                raise _named(error, topic.name)
        return sorted((_topic_info(t) for t in response.topics), key=lambda t: t.name)

    def describe_topic(self, name: str) -> TopicInfo:
        topics = self.describe_topics([name])
        if not topics:
            raise error_for(common_pb2.UNKNOWN_TOPIC_OR_PARTITION, name)
        return topics[0]

    def list_topics(self) -> list[str]:
        return [t.name for t in self.describe_topics()]

    # -- cluster and quorum ------------------------------------------------

    def describe_cluster(self) -> ClusterInfo:
        response = self._call("DescribeCluster", controller_pb2.DescribeClusterRequest())
        return ClusterInfo(
            cluster_id=response.cluster_id,
            controller_id=response.controller_id,
            controller_epoch=response.controller_epoch,
            brokers=tuple(
                sorted((_broker_info(b) for b in response.brokers), key=lambda b: b.broker_id)
            ),
            metadata_offset=response.metadata_offset,
        )

    def describe_replica_logs(
        self, *, timeout_s: float = 3.0
    ) -> dict[tuple[str, int], tuple[ReplicaLog, ...]]:
        """Every hosted replica's log offsets, asked of each unfenced broker.

        A broker that does not answer within ``timeout_s`` is left out (its
        replicas are missing from the result), so one dead broker does not
        stop the others' answers.
        """
        import grpc
        from raftka.v1 import broker_pb2, broker_pb2_grpc

        found: dict[tuple[str, int], list[ReplicaLog]] = {}
        for broker in self.describe_cluster().brokers:
            if broker.fenced or not broker.address:
                continue
            with grpc.insecure_channel(broker.address) as channel:
                try:
                    described = broker_pb2_grpc.BrokerStub(channel).DescribeBroker(
                        broker_pb2.DescribeBrokerRequest(), timeout=timeout_s
                    )
                except grpc.RpcError:
                    continue
            for p in described.partitions:
                found.setdefault((p.topic, p.partition), []).append(
                    ReplicaLog(
                        broker_id=broker.broker_id,
                        role=p.role,
                        leader_epoch=p.leader_epoch,
                        log_start_offset=p.log_start_offset,
                        log_end_offset=p.log_end_offset,
                        high_watermark=p.high_watermark,
                        size_bytes=p.size_bytes,
                    )
                )
        return {key: tuple(sorted(logs, key=lambda r: r.broker_id)) for key, logs in found.items()}

    def describe_quorum(self) -> QuorumInfo:
        response = self._call("DescribeQuorum", controller_pb2.DescribeQuorumRequest())
        hwm = response.high_watermark
        return QuorumInfo(
            cluster_id=response.cluster_id,
            leader_id=response.leader_id,
            leader_epoch=response.leader_epoch,
            high_watermark=hwm,
            voters=tuple(_replica_info(r, hwm) for r in response.voters),
            observers=tuple(_replica_info(r, hwm) for r in response.observers),
            log_start_offset=response.log_start_offset,
        )

    def read_metadata_log(self, offset: int = 0, max_records: int = 100) -> list[LogEntry]:
        """Committed metadata records from ``offset`` on, at most ``max_records``.

        Read from the active controller, whose log holds every committed record.

        Raises ``RaftkaError`` with SNAPSHOT_REQUIRED when ``offset`` is older
        than the retained log.
        """
        request = controller_pb2.ReadMetadataLogRequest(
            offset=offset, max_records=max_records, active_only=True
        )
        response = self._call("ReadMetadataLog", request)
        return [
            LogEntry(e.offset, e.controller_epoch, e.append_time_ms, e.record)
            for e in response.entries
        ]


def _error_of(error: common_pb2.Error | None) -> RaftkaError | None:
    if error is None or error.code == common_pb2.NONE:
        return None
    return error_for(error.code, error.message)


def _named(error: RaftkaError, name: str) -> RaftkaError:
    """The error with the item's name in its message, once."""
    if name in error.message:
        return error
    return error_for(error.code, f"{name}: {error.message}" if error.message else name)


def _single(results: Iterable[Any], name: str) -> Any:
    """The result for ``name`` of a batch of one; raises its error."""
    for result in results:
        if result.name == name:
            error = _error_of(result.error)
            if error is not None:
                raise _named(error, name)
            return result
    raise error_for(common_pb2.UNKNOWN_SERVER_ERROR, f"no result for {name!r} in the response")


def _creatable(topic: NewTopic) -> controller_pb2.CreatableTopic:
    return controller_pb2.CreatableTopic(
        name=topic.name,
        num_partitions=topic.num_partitions,
        replication_factor=topic.replication_factor,
        configs={str(k): str(v) for k, v in topic.configs.items()},
        assignments=[metadata_pb2.ReplicaList(ids=list(a)) for a in topic.assignments],
    )


def _partitions_request(
    new_counts: Mapping[str, int], validate_only: bool
) -> controller_pb2.CreatePartitionsRequest:
    return controller_pb2.CreatePartitionsRequest(
        topics=[
            controller_pb2.CreatePartitionsTopic(name=n, count=c) for n, c in new_counts.items()
        ],
        validate_only=validate_only,
    )


def _topic_info(topic: controller_pb2.TopicDescription) -> TopicInfo:
    partitions = sorted(
        (
            PartitionInfo(
                partition=p.partition,
                leader=p.leader,
                leader_epoch=p.leader_epoch,
                partition_epoch=p.partition_epoch,
                replicas=tuple(p.replicas),
                isr=tuple(p.isr),
            )
            for p in topic.partitions
        ),
        key=lambda p: p.partition,
    )
    return TopicInfo(
        name=topic.name,
        topic_id=topic.topic_id,
        partitions=tuple(partitions),
        configs=dict(topic.configs),
    )


def _broker_info(broker: controller_pb2.BrokerDescription) -> BrokerInfo:
    return BrokerInfo(
        broker_id=broker.broker_id,
        broker_epoch=broker.broker_epoch,
        incarnation_id=broker.incarnation_id,
        listeners=tuple(Endpoint(e.name, e.host, e.port) for e in broker.listeners),
        rack=broker.rack,
        fenced=broker.fenced,
        in_controlled_shutdown=broker.in_controlled_shutdown,
        leader_count=broker.leader_count,
        isr_count=broker.isr_count,
    )


def _replica_info(replica: controller_pb2.ReplicaState, high_watermark: int) -> ReplicaInfo:
    leo = replica.log_end_offset
    return ReplicaInfo(
        replica_id=replica.replica_id,
        log_end_offset=leo,
        lag=max(0, high_watermark - leo) if leo >= 0 else -1,
        last_fetch_timestamp_ms=replica.last_fetch_timestamp_ms,
        last_caught_up_timestamp_ms=replica.last_caught_up_timestamp_ms,
        host=replica.host,
        port=replica.port,
    )
