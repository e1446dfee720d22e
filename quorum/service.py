"""The Controller gRPC service of a controller node.

Writes go to the controller runtime (on the raft thread) and are answered
after commit. Reads are served from the committed state without a lock: the
image is immutable, and log entries carry their offsets, so a read that
raced a tail trim is detected and retried. Requests that need the active
controller (writes, quorum status, following the log) answered by another
node get NOT_CONTROLLER and a hint naming the leader.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import grpc
from raftka.v1 import common_pb2, controller_pb2_grpc
from raftka.v1 import controller_pb2 as cpb
from raftka.v1 import metadata_pb2 as pb

from quorum.config import Voter
from quorum.controller.runtime import ControllerRuntime, error_response
from quorum.image import MetadataImage
from quorum.raft import RaftMetadataLog
from quorum.records import CONFIG_TOPIC, endpoints_to_pb
from quorum.snapshot import DigestCache, encode_image
from quorum.state import frame
from quorum.streams import StreamSlots

log = logging.getLogger(__name__)

MAX_FETCH_RECORDS = 5000
# How long a woken metadata stream waits before reading (see FetchMetadata).
FETCH_LINGER_S = 0.010
# A metadata stream ends this long before the broker's deadline for it.
STREAM_END_MARGIN_S = 0.25
_FETCH_ENTRIES = cpb.FetchMetadataResponse.DESCRIPTOR.fields_by_name["entries"].number
_READ_ENTRIES = cpb.ReadMetadataLogResponse.DESCRIPTOR.fields_by_name["entries"].number


# The requests a Requests stream carries: for each field of its oneof, the unary
# method of the same name (register_broker -> RegisterBroker).
STREAM_METHODS = {
    field.name: "".join(part.title() for part in field.name.split("_"))
    for field in cpb.ControllerRequest.DESCRIPTOR.oneofs_by_name["request"].fields
}


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class _StreamEnd:
    """How a metadata stream ended, as far as the server made it end."""

    by_server: bool = False  # with an answer that sends the broker elsewhere
    at_time: bool = False  # at its time, just before the broker's deadline


@dataclass(slots=True)
class _Observer:
    log_end_offset: int = 0
    last_fetch_ms: int = -1
    last_caught_up_ms: int = -1


class ControllerService(controller_pb2_grpc.ControllerServicer):
    def __init__(
        self,
        node_id: int,
        voters: tuple[Voter, ...],
        raft_log: RaftMetadataLog,
        runtime: ControllerRuntime,
        *,
        cluster_id: str,
        request_timeout_s: float,
        max_client_streams: int = 32,
    ):
        self.node_id = node_id
        self.voters = {v.node_id: v for v in voters}
        self.raft_log = raft_log
        self.runtime = runtime
        self.cluster_id = cluster_id
        self.request_timeout_s = request_timeout_s
        self._observers: dict[int, _Observer] = {}
        self._voter_caught_up_ms: dict[int, int] = {}
        self._streams: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._digests = DigestCache()
        self.client_streams = StreamSlots(max_client_streams, "controller client streams")

    def stop(self) -> None:
        self._stopping.set()
        with self.raft_log.commit_condition:
            self.raft_log.commit_condition.notify_all()

    # -- helpers -----------------------------------------------------------------

    def hint(self) -> cpb.ControllerHint:
        leader = self.raft_log.leader_id()
        hint = cpb.ControllerHint(controller_epoch=self.raft_log.state.image.controller_epoch)
        if leader is not None and leader in self.voters:
            voter = self.voters[leader]
            hint.leader_id = leader
            hint.leader_host = voter.host
            hint.leader_port = voter.rpc_port
        else:
            hint.leader_id = -1
        return hint

    def _not_active(self) -> common_pb2.Error:
        """NOT_CONTROLLER for a request only the active controller answers.

        A newly elected Raft leader is not active until it has committed its
        controller epoch: until then its log may end before records that were
        committed under the previous leader, so it would answer from the past.
        """
        if self.raft_log.is_leader():
            why = f"node {self.node_id} was elected and has not yet claimed its epoch"
        elif self.raft_log.leader_id() is None:
            return common_pb2.Error(
                code=common_pb2.QUORUM_UNAVAILABLE,
                message="no controller has a majority of the quorum",
            )
        else:
            why = f"node {self.node_id} is not the active controller"
        return common_pb2.Error(code=common_pb2.NOT_CONTROLLER, message=why)

    def _write(self, kind: str, request: Any) -> Any:
        response_type = self.runtime.response_type(kind)
        if not self.runtime.active:
            response = error_response(
                response_type, common_pb2.NOT_CONTROLLER, f"node {self.node_id} is not active"
            )
        else:
            future = self.runtime.submit(kind, request)
            try:
                response = future.result(timeout=self.request_timeout_s + 1.0)
            except FutureTimeout:
                response = error_response(
                    response_type, common_pb2.UNKNOWN_OUTCOME, "no answer within the timeout"
                )
        if response.error.code in (common_pb2.NOT_CONTROLLER, common_pb2.UNKNOWN_OUTCOME):
            if not self.raft_log.is_leader() and self.raft_log.leader_id() is None:
                if response.error.code == common_pb2.NOT_CONTROLLER:
                    response.error.code = common_pb2.QUORUM_UNAVAILABLE
                    response.error.message = "no controller has a majority of the quorum"
        if hasattr(response, "hint"):
            response.hint.CopyFrom(self.hint())
        return response

    def _read_entries(self, offset: int, max_records: int) -> tuple[list[bytes], int, int, int]:
        """(serialized entries, high watermark, log start, error code) from the committed log."""
        for _ in range(5):
            state = self.raft_log.state
            high_watermark = state.next_offset
            tail = state.tail
            start = state.log_start_offset
            if offset < start:
                return [], high_watermark, start, common_pb2.SNAPSHOT_REQUIRED
            if offset > high_watermark:
                return [], high_watermark, start, common_pb2.OFFSET_OUT_OF_RANGE
            count = min(max_records, high_watermark - offset)
            entries = tail[offset - start : offset - start + count]
            if not entries or pb.MetadataLogEntry.FromString(entries[0]).offset == offset:
                return entries, high_watermark, start, common_pb2.NONE
        return [], high_watermark, start, common_pb2.SNAPSHOT_REQUIRED

    # -- broker lifecycle ----------------------------------------------------------

    def RegisterBroker(self, request: Any, context: Any) -> Any:  # noqa: N802
        return self._write("register_broker", request)

    def BrokerHeartbeat(self, request: Any, context: Any) -> Any:  # noqa: N802
        return self._write("heartbeat", request)

    def AlterPartition(self, request: Any, context: Any) -> Any:  # noqa: N802
        return self._write("alter_partition", request)

    def AllocateProducerIds(self, request: Any, context: Any) -> Any:  # noqa: N802
        return self._write("allocate_producer_ids", request)

    def CreateTopics(self, request: Any, context: Any) -> Any:  # noqa: N802
        return self._write("create_topics", request)

    def DeleteTopics(self, request: Any, context: Any) -> Any:  # noqa: N802
        return self._write("delete_topics", request)

    def CreatePartitions(self, request: Any, context: Any) -> Any:  # noqa: N802
        return self._write("create_partitions", request)

    def ElectLeaders(self, request: Any, context: Any) -> Any:  # noqa: N802
        return self._write("elect_leaders", request)

    # -- one stream for a client's requests -----------------------------------------

    def Requests(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        return serve_requests(self, self.client_streams, request_iterator, context)

    # -- following the log ---------------------------------------------------------

    def FetchMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        offset = request.offset
        max_records = min(request.max_records or 1000, MAX_FETCH_RECORDS)
        max_wait_s = (request.max_wait_ms or 500) / 1000.0
        condition = self.raft_log.commit_condition
        remaining = context.time_remaining()
        # The stream ends here, a little before the broker's deadline, so that
        # an end the server did not make is always the broker's loss.
        end_at = None if remaining is None else time.monotonic() + remaining - STREAM_END_MARGIN_S
        ended = _StreamEnd()
        if request.replica_id >= 0 and self.raft_log.is_leader():
            self._track_stream(request.replica_id, context, ended)
        while context.is_active() and not self._stopping.is_set():
            if not self.raft_log.is_leader():
                ended.by_server = True
                yield cpb.FetchMetadataResponse(
                    error=common_pb2.Error(
                        code=common_pb2.NOT_CONTROLLER, message="fetch from the leader"
                    ),
                    hint=self.hint(),
                )
                return
            entries, high_watermark, start, code = self._read_entries(offset, max_records)
            if not entries and code == common_pb2.NONE:
                wait_s = (
                    max_wait_s if end_at is None else min(max_wait_s, end_at - time.monotonic())
                )
                with condition:
                    woken = self.raft_log.state.next_offset > offset or condition.wait(
                        max(wait_s, 0.0)
                    )
                if woken and not self._stopping.is_set():
                    # The commit that woke this stream also completes the write
                    # it carries; let that answer go out first (and more records
                    # gather) instead of competing for the GIL with it.
                    time.sleep(FETCH_LINGER_S)
                entries, high_watermark, start, code = self._read_entries(offset, max_records)
            offset += len(entries)
            self._observe(request.replica_id, offset, high_watermark)
            response = cpb.FetchMetadataResponse.FromString(frame(_FETCH_ENTRIES, entries))
            response.high_watermark = high_watermark
            response.log_start_offset = start
            if code != common_pb2.NONE:
                response.error.code = code
                response.error.message = f"offset {offset} outside [{start}, {high_watermark}]"
                ended.by_server = True
                yield response
                return
            if end_at is not None and time.monotonic() >= end_at:
                ended.at_time = True
                yield response
                return
            yield response

    def _track_stream(self, broker_id: int, context: Any, ended: _StreamEnd) -> None:
        """Tell the runtime when a broker's last metadata stream drops from its side.

        The server ends every stream itself: with an answer that sends the
        broker elsewhere (nothing to report), or at its time, shortly before
        the broker's deadline, after which the broker reconnects at once. Any
        other end is a loss: the broker's process died or its connection broke.
        Ending at its time still makes the broker suspect, with two heartbeat
        intervals more to reconnect or heartbeat (it may be busy applying a large
        change), so that a kill landing between two streams is found long before
        the session timeout. Streams are counted, so a reconnect that overtakes the
        old stream's end does not leave the broker suspect.
        """
        with self._lock:
            self._streams[broker_id] = self._streams.get(broker_id, 0) + 1
            self.runtime.broker_connection(broker_id, opened=True)

        def on_done() -> None:
            with self._lock:
                left = self._streams.get(broker_id, 1) - 1
                self._streams[broker_id] = left
                if left == 0 and not ended.by_server and not self._stopping.is_set():
                    self.runtime.broker_connection(
                        broker_id, opened=False, dropped=not ended.at_time
                    )

        context.add_callback(on_done)

    def _observe(self, replica_id: int, next_offset: int, high_watermark: int) -> None:
        if replica_id < 0:
            return
        now = _now_ms()
        with self._lock:
            obs = self._observers.setdefault(replica_id, _Observer())
            obs.log_end_offset = next_offset
            obs.last_fetch_ms = now
            if next_offset >= high_watermark:
                obs.last_caught_up_ms = now

    def FetchSnapshot(self, request: Any, context: Any) -> Any:  # noqa: N802
        image = self.raft_log.state.image
        return cpb.FetchSnapshotResponse(snapshot=encode_image(image))

    def ReadMetadataLog(self, request: Any, context: Any) -> Any:  # noqa: N802
        if request.active_only and not self.runtime.active:
            return cpb.ReadMetadataLogResponse(error=self._not_active())
        max_records = min(request.max_records or 100, MAX_FETCH_RECORDS)
        entries, high_watermark, start, code = self._read_entries(
            max(request.offset, 0), max_records
        )
        response = cpb.ReadMetadataLogResponse.FromString(frame(_READ_ENTRIES, entries))
        response.high_watermark = high_watermark
        response.log_start_offset = start
        if code == common_pb2.SNAPSHOT_REQUIRED:
            response.error.code = common_pb2.OFFSET_OUT_OF_RANGE
            response.error.message = f"offset {request.offset} was trimmed; log starts at {start}"
        elif code != common_pb2.NONE:
            response.error.code = code
            response.error.message = f"offset {request.offset} is past the end ({high_watermark})"
        return response

    # -- descriptions ----------------------------------------------------------------

    def DescribeQuorum(self, request: Any, context: Any) -> Any:  # noqa: N802
        if not self.runtime.active:
            return cpb.DescribeQuorumResponse(error=self._not_active())
        state = self.raft_log.state
        high_watermark = state.next_offset
        now_ms = _now_ms()
        response = cpb.DescribeQuorumResponse(
            cluster_id=self.cluster_id,
            leader_id=self.node_id,
            leader_epoch=self.raft_log.term(),
            high_watermark=high_watermark,
            log_start_offset=state.log_start_offset,
        )
        me = self.voters[self.node_id]
        response.voters.append(
            cpb.ReplicaState(
                replica_id=self.node_id,
                log_end_offset=high_watermark,
                last_fetch_timestamp_ms=now_ms,
                last_caught_up_timestamp_ms=now_ms,
                host=me.host,
                port=me.rpc_port,
            )
        )
        for node_id, info in sorted(self.raft_log.voter_status().items()):
            voter = self.voters[node_id]
            end = self.raft_log.offset_at_raft_index(info["match_index"])
            age_s = info["last_response_age_s"]
            fetch_ms = int(now_ms - age_s * 1000) if age_s is not None else -1
            if end >= high_watermark and fetch_ms > 0:
                self._voter_caught_up_ms[node_id] = fetch_ms
            response.voters.append(
                cpb.ReplicaState(
                    replica_id=node_id,
                    log_end_offset=end,
                    last_fetch_timestamp_ms=fetch_ms,
                    last_caught_up_timestamp_ms=self._voter_caught_up_ms.get(node_id, -1),
                    host=voter.host,
                    port=voter.rpc_port,
                )
            )
        with self._lock:
            observers = sorted(self._observers.items())
        for replica_id, obs in observers:
            response.observers.append(
                cpb.ReplicaState(
                    replica_id=replica_id,
                    log_end_offset=obs.log_end_offset,
                    last_fetch_timestamp_ms=obs.last_fetch_ms,
                    last_caught_up_timestamp_ms=obs.last_caught_up_ms,
                )
            )
        return response

    def DescribeCluster(self, request: Any, context: Any) -> Any:  # noqa: N802
        image = self.raft_log.state.image
        response = cpb.DescribeClusterResponse(
            cluster_id=self.cluster_id,
            controller_id=image.controller_id,
            controller_epoch=image.controller_epoch,
            metadata_offset=image.offset,
        )
        if request.include_image_digest:
            # Of this controller's own image (not the leader's), for the chaos
            # suite's check that every image agrees; costs CPU, so only when asked.
            response.image_digest = self._digests.digest(image)
        for broker_id in sorted(image.brokers.keys()):
            b = image.brokers[broker_id]
            response.brokers.append(
                cpb.BrokerDescription(
                    broker_id=b.broker_id,
                    broker_epoch=b.broker_epoch,
                    incarnation_id=b.incarnation_id,
                    listeners=endpoints_to_pb(b.listeners),
                    rack=b.rack,
                    fenced=b.fenced,
                    in_controlled_shutdown=b.in_controlled_shutdown,
                    leader_count=image.leader_counts.get(b.broker_id, 0),
                    isr_count=len(image.isr_index.get(b.broker_id, ())),
                )
            )
        return response

    def DescribeTopics(self, request: Any, context: Any) -> Any:  # noqa: N802
        image = self.raft_log.state.image
        response = cpb.DescribeTopicsResponse(metadata_offset=image.offset)
        names = list(request.names) or sorted(image.topic_ids.keys())
        for name in names:
            response.topics.append(describe_topic(image, name))
        return response


def serve_requests(
    servicer: Any, slots: StreamSlots, request_iterator: Any, context: Any
) -> Iterator[cpb.ControllerResponse]:
    """A Requests stream: one answer per request, in order, one request at a time,
    each from ``servicer``'s unary method of the same name. The stream holds a slot
    (a server thread) while it is open."""
    if not slots.acquire():
        slots.refuse(context)
    try:
        for envelope in request_iterator:
            kind = envelope.WhichOneof("request")
            method = STREAM_METHODS.get(kind) if kind is not None else None
            if method is None:
                yield cpb.ControllerResponse(
                    error=common_pb2.Error(
                        code=common_pb2.INVALID_REQUEST,
                        message="an empty request, or one this controller does not know",
                    )
                )
                continue
            answer = getattr(servicer, method)(getattr(envelope, kind), context)
            yield cpb.ControllerResponse(**{kind: answer})
    finally:
        slots.release()


def describe_topic(image: MetadataImage, name: str) -> cpb.TopicDescription:
    topic = image.topic_by_name(name)
    if topic is None:
        return cpb.TopicDescription(
            name=name,
            error=common_pb2.Error(
                code=common_pb2.UNKNOWN_TOPIC_OR_PARTITION, message=f"unknown topic {name!r}"
            ),
        )
    out = cpb.TopicDescription(name=name, topic_id=topic.topic_id)
    for index in sorted(topic.partitions.keys()):
        p = topic.partitions[index]
        out.partitions.append(
            cpb.PartitionDescription(
                partition=index,
                leader=p.leader,
                leader_epoch=p.leader_epoch,
                partition_epoch=p.partition_epoch,
                replicas=p.replicas,
                isr=p.isr,
            )
        )
    for key, value in image.configs.get((CONFIG_TOPIC, name), {}).items():
        out.configs[key] = value
    return out


def add_to_server(server: grpc.Server, service: ControllerService) -> None:
    controller_pb2_grpc.add_ControllerServicer_to_server(service, server)
