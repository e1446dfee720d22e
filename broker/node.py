"""The broker process: metadata follower, lifecycle, data plane and the Broker gRPC service.

The control plane ends in ``on_local_changes``: every metadata change that
concerns this broker arrives there as a ``LocalChanges`` (deletes first, then
leaders and followers), on the follower's thread, before the follower
publishes the offset. The data plane (``ReplicaManager``: partition logs,
replication, produce and fetch) acts on it there, and keeps the
``partitions`` map of roles that DescribeBroker shows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from raftka.v1 import broker_pb2, broker_pb2_grpc, common_pb2

from broker.coordinator import OFFSETS_TOPIC, GroupCoordinator
from broker.fetcher import CHANNEL_OPTIONS
from broker.group.state import GroupConfig
from broker.lifecycle import RUNNING, STARTING, STOPPED, BrokerLifecycle
from broker.local_changes import LocalChanges, TopicPartition, local_changes
from broker.log_manager import LogManager
from broker.metadata_answer import metadata_response
from broker.metadata_follower import MetadataFollower
from broker.producer_ids import ProducerIdManager
from broker.replica_manager import CONSUMER, BrokerSettings, ReplicaManager
from broker.replication_link import LinkListener
from broker.storage import checkpoint
from client._controller import ControllerClient
from client.errors import RaftkaError
from quorum import gc_policy
from quorum.config import ConfigError, NodeConfig
from quorum.image import MetadataImage, PartitionRegistration
from quorum.snapshot import DigestCache
from quorum.streams import StreamSlots

log = logging.getLogger(__name__)

# Up to this many partition changes at once are logged one by one.
_DETAILED_CHANGES = 20

LEADER = "leader"
FOLLOWER = "follower"


@dataclass(frozen=True, slots=True)
class HostedPartition:
    """A partition replica this broker hosts, and its role as of the latest metadata."""

    topic: str
    partition: int
    topic_id: str
    role: str
    registration: PartitionRegistration


class BrokerNode:
    """One broker process. ``start()``, then ``stop()`` or ``wait()``."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        controlled_shutdown_timeout_s: float = 30.0,
        server_workers: int | None = None,
    ):
        gc_policy.install()
        if "broker" not in config.roles:
            raise ValueError(f"node {config.node_id} does not have the broker role")
        self.config = config
        self.broker_id = config.node_id
        self.controlled_shutdown_timeout_s = controlled_shutdown_timeout_s
        self.controller_addresses = [v.rpc_address for v in config.voters]
        # Replaced whole on every change, so readers on other threads need no lock.
        self.partitions: Mapping[TopicPartition, HostedPartition] = {}
        dial = config.dialer()
        self.client = ControllerClient(self.controller_addresses, dial=dial)
        self.follower = MetadataFollower(
            self.controller_addresses,
            self.broker_id,
            on_change=self._on_metadata_change,
            dial=dial,
        )
        self.lifecycle: BrokerLifecycle | None = None
        if not config["log.dirs"]:
            raise ConfigError(f"broker {config.node_id} needs log.dirs")
        log_dirs = [Path(d.strip()) for d in str(config["log.dirs"]).split(",") if d.strip()]
        self.settings = BrokerSettings.from_config(config)
        # With no flush policy, no broker file is fsynced (see broker/storage/checkpoint.py).
        checkpoint.set_sync(
            bool(config["log.flush.interval.messages"] or config["log.flush.interval.ms"])
        )
        self.replicas = ReplicaManager(
            self.broker_id,
            self.settings,
            LogManager(log_dirs, self.settings.log_config),
            image=lambda: self.follower.published()[0],
            broker_epoch=lambda: -1 if self.lifecycle is None else self.lifecycle.broker_epoch,
            # Unfenced ("running") only once caught up with the metadata log.
            caught_up=lambda: self.lifecycle is not None and self.lifecycle.state == RUNNING,
            alter_partition=lambda request: self.client.call("AlterPartition", request),
            dial=dial,
        )
        self.producer_ids = ProducerIdManager(
            self.broker_id,
            lambda: -1 if self.lifecycle is None else self.lifecycle.broker_epoch,
            lambda request: self.client.call("AllocateProducerIds", request),
        )
        self.coordinator = GroupCoordinator(
            self.broker_id,
            partition_of=self.replicas.get,
            image=lambda: self.follower.published()[0],
            create_topic=lambda request: self.client.call("CreateTopics", request),
            num_partitions=config["offsets.topic.num.partitions"],
            replication_factor=config["offsets.topic.replication.factor"],
            segment_bytes=config["offsets.topic.segment.bytes"],
            group_config=GroupConfig(
                min_session_timeout_ms=config["group.min.session.timeout.ms"],
                max_session_timeout_ms=config["group.max.session.timeout.ms"],
                initial_rebalance_delay_ms=config["group.initial.rebalance.delay.ms"],
                max_size=config["group.max.size"] or None,
            ),
            offsets_retention_ms=config["offsets.retention.minutes"] * 60_000,
            offsets_retention_check_interval_ms=config["offsets.retention.check.interval.ms"],
        )
        self.replicas.role_listeners.append(self._on_role)
        self._server_workers = server_workers or int(config["num.rpc.threads"])
        # Each open client stream holds a server thread: leave 32 for everything else.
        self.client_streams = StreamSlots(
            min(int(config["max.client.streams"]), max(0, self._server_workers - 32)),
            "max.client.streams",
        )
        self._server: grpc.Server | None = None
        self._link_listener: LinkListener | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self.port = 0
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._digests = DigestCache()

    @property
    def state(self) -> str:
        return STARTING if self.lifecycle is None else self.lifecycle.state

    def start(self) -> None:
        host, port = self.config.listener
        self._executor = futures.ThreadPoolExecutor(
            max_workers=self._server_workers, thread_name_prefix=f"broker-{self.broker_id}-rpc"
        )
        server = grpc.server(
            self._executor,
            # Without this, gRPC on Linux lets a second process bind the same port.
            options=[("grpc.so_reuseport", 0), *CHANNEL_OPTIONS],
        )
        broker_pb2_grpc.add_BrokerServicer_to_server(_BrokerService(self), server)
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise OSError(f"broker {self.broker_id} cannot listen on {host}:{port}: {exc}") from exc
        if bound == 0:
            raise OSError(f"broker {self.broker_id} cannot listen on {host}:{port}")
        self.port = bound
        server.start()
        self._server = server
        log.info("broker %d listening on %s:%d", self.broker_id, host, bound)
        replication = self.config.replication_listener
        if replication is not None:
            self._link_listener = LinkListener(
                *replication, self.replicas, name=f"broker-{self.broker_id}"
            )
            try:
                replication = (replication[0], self._link_listener.start())
            except OSError as exc:
                server.stop(None)
                raise OSError(
                    f"broker {self.broker_id} cannot listen on {replication[0]}:{replication[1]} "
                    f"for replication: {exc}"
                ) from exc
            log.info("broker %d replicating on %s:%d", self.broker_id, *replication)
        self.lifecycle = BrokerLifecycle(
            self.config,
            self.follower,
            self.client,
            listener=(host, bound),
            replication_listener=replication,
        )
        # Logs are opened (and recovered) before the broker follows metadata,
        # which is what tells it which partitions to lead and follow.
        self.replicas.start()
        self.follower.start()
        self.lifecycle.start()

    def stop(self, controlled: bool = True) -> None:
        """Stop the broker; with ``controlled``, hand leaderships over first."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            if self.lifecycle is not None:
                if controlled:
                    self.lifecycle.shutdown(self.controlled_shutdown_timeout_s)
                else:
                    self.lifecycle.stop()
            # The follower outlives the lifecycle so that a controlled shutdown
            # sees its leaderships move away.
            self.follower.stop()
            self.coordinator.stop()
            if self._server is not None:
                self._server.stop(grace=1.0).wait(5.0)
            if self._link_listener is not None:
                self._link_listener.stop()
            self.replicas.stop()
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
            self.client.close()
            self._stopped.set()
            log.info("broker %d stopped", self.broker_id)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the broker has stopped; False if ``timeout_s`` passed first."""
        return self._stopped.wait(timeout_s)

    # -- metadata -----------------------------------------------------------

    def _on_role(self, key: TopicPartition, role: str) -> None:
        if key[0] == OFFSETS_TOPIC:
            self.coordinator.on_role(key[1], role)

    def _on_metadata_change(
        self, old: MetadataImage, new: MetadataImage, topic_ids: frozenset[str] | None
    ) -> None:
        incarnation = None if self.lifecycle is None else self.lifecycle.incarnation_id
        changes = local_changes(old, new, self.broker_id, topic_ids, incarnation)
        if changes:
            self.on_local_changes(changes, new)

    def on_local_changes(self, changes: LocalChanges, image: MetadataImage) -> None:
        """Act on partition changes for this broker; runs on the follower thread."""
        self.replicas.apply(changes, image)
        partitions = dict(self.partitions)
        # Per partition at INFO for a few changes (as Kafka logs them); a bulk
        # change (a topic with many partitions, a snapshot) gets one line.
        total = len(changes.deletes) + len(changes.leaders) + len(changes.followers)
        detail = log.info if total <= _DETAILED_CHANGES else log.debug
        if total > _DETAILED_CHANGES:
            log.info(
                "broker %d: now leads %d, follows %d more partitions, dropped %d",
                self.broker_id,
                len(changes.leaders),
                len(changes.followers),
                len(changes.deletes),
            )
        for key in sorted(changes.deletes):
            if partitions.pop(key, None) is not None:
                detail("broker %d: no longer hosts %s-%d", self.broker_id, *key)
        for role, changed in ((LEADER, changes.leaders), (FOLLOWER, changes.followers)):
            for key, registration in sorted(changed.items()):
                hosted = HostedPartition(
                    key[0], key[1], changes.topic_ids.get(key[0], ""), role, registration
                )
                self._log_role_change(partitions.get(key), hosted, detail)
                partitions[key] = hosted
        self.partitions = partitions

    def _log_role_change(
        self,
        before: HostedPartition | None,
        after: HostedPartition,
        emit: Callable[..., None],
    ) -> None:
        reg = after.registration
        if (
            before is not None
            and before.role == after.role
            and before.registration.leader == reg.leader
            and before.registration.leader_epoch == reg.leader_epoch
        ):
            return
        if after.role == LEADER:
            emit(
                "broker %d: leader of %s-%d at leader epoch %d (isr %s)",
                self.broker_id,
                after.topic,
                after.partition,
                reg.leader_epoch,
                list(reg.isr),
            )
        else:
            emit(
                "broker %d: follower of %s-%d, leader %d at leader epoch %d",
                self.broker_id,
                after.topic,
                after.partition,
                reg.leader,
                reg.leader_epoch,
            )

    def describe(
        self, include_image_digest: bool = False, omit_partitions: bool = False
    ) -> broker_pb2.DescribeBrokerResponse:
        image, offset = self.follower.published()
        lifecycle = self.lifecycle
        response = broker_pb2.DescribeBrokerResponse(
            broker_id=self.broker_id,
            broker_epoch=-1 if lifecycle is None else lifecycle.broker_epoch,
            state=STOPPED if self._stopped.is_set() else self.state,
            metadata_offset=offset,
            controller_epoch=image.controller_epoch,
            partitions=[] if omit_partitions else self.replicas.describe(),
            registrations=0 if lifecycle is None else lifecycle.registrations,
            metadata_snapshots_loaded=self.follower.snapshots_loaded,
            metadata_high_watermark=self.follower.high_watermark,
            client_streams_open=self.client_streams.open,
            client_streams_limit=self.client_streams.limit,
            client_streams_refused=self.client_streams.refused,
        )
        if include_image_digest:
            # Of the image at metadata_offset (published together); only when
            # asked, since it costs CPU on a large image.
            response.image_digest = self._digests.digest(image)
        return response


class _BrokerService(broker_pb2_grpc.BrokerServicer):
    def __init__(self, node: BrokerNode):
        self._node = node

    def DescribeBroker(  # noqa: N802 (gRPC method name)
        self, request: broker_pb2.DescribeBrokerRequest, context: grpc.ServicerContext
    ) -> broker_pb2.DescribeBrokerResponse:
        return self._node.describe(request.include_image_digest, request.omit_partitions)

    def Metadata(  # noqa: N802
        self, request: broker_pb2.MetadataRequest, context: grpc.ServicerContext
    ) -> broker_pb2.MetadataResponse:
        image, offset = self._node.follower.published()
        return metadata_response(image, offset, list(request.topics), self._node.config.cluster_id)

    def Produce(  # noqa: N802
        self, request: broker_pb2.ProduceRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ProduceResponse:
        return self._node.replicas.produce(request)

    def ProduceStream(  # noqa: N802
        self, request_iterator: Iterator[broker_pb2.ProduceRequest], context: grpc.ServicerContext
    ) -> Iterator[broker_pb2.ProduceResponse]:
        # One answer per request, in order, one request at a time.
        slots = self._node.client_streams
        if not slots.acquire():
            slots.refuse(context)
        try:
            for request in request_iterator:
                yield self._node.replicas.produce(request)
        finally:
            slots.release()

    def Fetch(  # noqa: N802
        self, request: broker_pb2.FetchRequest, context: grpc.ServicerContext
    ) -> broker_pb2.FetchResponse:
        return self._node.replicas.fetch(request)

    def FetchStream(  # noqa: N802
        self, request_iterator: Iterator[broker_pb2.FetchRequest], context: grpc.ServicerContext
    ) -> Iterator[broker_pb2.FetchResponse]:
        # One answer per request, in order; the stream holds one server thread, as a
        # long poll does (num.rpc.threads). A follower's stream is a fetch session; a
        # consumer's is a client stream, counted against max.client.streams.
        replicas = self._node.replicas
        first = next(request_iterator, None)
        if first is None:
            return
        slots = self._node.client_streams if first.replica_id == CONSUMER else None
        session = replicas.new_fetch_session()
        if slots is not None and not slots.acquire():
            session.close()
            slots.refuse(context)
        try:
            yield replicas.fetch_in_session(session, first)
            for request in request_iterator:
                yield replicas.fetch_in_session(session, request)
        finally:
            session.close()
            if slots is not None:
                slots.release()

    def ListOffsets(  # noqa: N802
        self, request: broker_pb2.ListOffsetsRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ListOffsetsResponse:
        return self._node.replicas.list_offsets(request)

    def InitProducerId(  # noqa: N802
        self, request: broker_pb2.InitProducerIdRequest, context: grpc.ServicerContext
    ) -> broker_pb2.InitProducerIdResponse:
        if request.transactional_id:
            return broker_pb2.InitProducerIdResponse(
                error=common_pb2.Error(
                    code=common_pb2.UNSUPPORTED_VERSION,
                    message="transactions are not supported; leave transactional_id empty",
                )
            )
        try:
            producer_id, epoch = self._node.producer_ids.init_producer_id(
                request.producer_id, request.producer_epoch
            )
        except RaftkaError as e:
            return broker_pb2.InitProducerIdResponse(
                error=common_pb2.Error(code=e.code, message=e.message)
            )
        return broker_pb2.InitProducerIdResponse(producer_id=producer_id, producer_epoch=epoch)

    def FindCoordinator(  # noqa: N802
        self, request: broker_pb2.FindCoordinatorRequest, context: grpc.ServicerContext
    ) -> broker_pb2.FindCoordinatorResponse:
        return self._node.coordinator.find_coordinator(request.key)

    def OffsetCommit(  # noqa: N802
        self, request: broker_pb2.OffsetCommitRequest, context: grpc.ServicerContext
    ) -> broker_pb2.OffsetCommitResponse:
        return self._node.coordinator.commit(request)

    def OffsetFetch(  # noqa: N802
        self, request: broker_pb2.OffsetFetchRequest, context: grpc.ServicerContext
    ) -> broker_pb2.OffsetFetchResponse:
        return self._node.coordinator.fetch(request)

    def ListGroups(  # noqa: N802
        self, request: broker_pb2.ListGroupsRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ListGroupsResponse:
        return self._node.coordinator.list_groups()

    def DeleteGroups(  # noqa: N802
        self, request: broker_pb2.DeleteGroupsRequest, context: grpc.ServicerContext
    ) -> broker_pb2.DeleteGroupsResponse:
        return self._node.coordinator.delete_groups(request)

    def JoinGroup(  # noqa: N802
        self, request: broker_pb2.JoinGroupRequest, context: grpc.ServicerContext
    ) -> broker_pb2.JoinGroupResponse:
        return self._node.coordinator.join(request)

    def SyncGroup(  # noqa: N802
        self, request: broker_pb2.SyncGroupRequest, context: grpc.ServicerContext
    ) -> broker_pb2.SyncGroupResponse:
        return self._node.coordinator.sync(request)

    def Heartbeat(  # noqa: N802
        self, request: broker_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> broker_pb2.HeartbeatResponse:
        return self._node.coordinator.heartbeat(request)

    def LeaveGroup(  # noqa: N802
        self, request: broker_pb2.LeaveGroupRequest, context: grpc.ServicerContext
    ) -> broker_pb2.LeaveGroupResponse:
        return self._node.coordinator.leave(request)

    def DescribeGroups(  # noqa: N802
        self, request: broker_pb2.DescribeGroupsRequest, context: grpc.ServicerContext
    ) -> broker_pb2.DescribeGroupsResponse:
        return self._node.coordinator.describe_groups(request)
