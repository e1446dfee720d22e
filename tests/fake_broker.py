"""An in-memory cluster of fake brokers that serve the Broker gRPC service on loopback.

Test helper for the producer, consumer and CLI: each broker is a real gRPC server bound
to 127.0.0.1 port 0, all sharing one in-memory log per partition (replication is
perfect and instant, so the high watermark is the log end). It answers Metadata, Produce,
Fetch (long-polling on a condition variable, ``min_bytes``/``max_wait_ms``) and
ListOffsets with Kafka's semantics and error codes, stores batches as the producer sent
them (checked with ``validate_batch``, base offset and leader epoch patched), and lets a
test move leaders, inject errors and truncate the log start.

Consumer groups: one broker (``coordinator_id``) is every group's coordinator and
answers FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup, DescribeGroups,
OffsetCommit and OffsetFetch; the others answer NOT_COORDINATOR. Membership is the real
state machine, ``broker.group.ClassicGroup``: a JoinGroup or SyncGroup it parks blocks
its server thread until the group replies to it, and a ticker thread fires the group's
deadlines. Its clock is the monotonic clock plus an offset a test may advance
(``advance_clock``) to expire sessions and rebalances at once. What a group asks to
store in ``__consumer_offsets`` is stored at once (``stored_groups``, the latest per
group), and a coordinator that takes over (``move_coordinator``) loads it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from raftka.v1 import broker_pb2, broker_pb2_grpc, common_pb2

from broker.group import (
    ClassicGroup,
    GroupConfig,
    GroupDescription,
    GroupError,
    Reply,
    wire,
)
from broker.group.messages import StoredGroup
from broker.record_batch import (
    InvalidBatchError,
    decode_records,
    iter_batches,
    patch_batch,
    validate_batch,
)

MAX_BATCH_BYTES = 1024 * 1024
# Group settings of the fake coordinator: short sessions allowed, no initial join delay.
FAST_GROUPS = GroupConfig(min_session_timeout_ms=100, initial_rebalance_delay_ms=0)
_TICK_S = 0.01


def _error(code: int = common_pb2.NONE, message: str = "") -> common_pb2.Error:
    return common_pb2.Error(code=code, message=message)


@dataclass
class FakePartition:
    leader: int
    leader_epoch: int = 0
    log_start_offset: int = 0
    log_end_offset: int = 0
    # (base offset, last offset, max timestamp, batch bytes as stored)
    batches: list[tuple[int, int, int, bytes]] = field(default_factory=list)
    # Errors to answer the next produce/fetch requests with, oldest first.
    produce_errors: deque[int] = field(default_factory=deque)
    fetch_errors: deque[int] = field(default_factory=deque)


class FakeCluster:
    """``brokers`` fake brokers with ids 1..n. Use as a context manager."""

    def __init__(
        self, brokers: int = 1, *, workers: int = 8, group_config: GroupConfig = FAST_GROUPS
    ):
        self.broker_ids = list(range(1, brokers + 1))
        self.addresses: dict[int, str] = {}
        self.partitions: dict[tuple[str, int], FakePartition] = {}
        self.requests: list[tuple[int, str, Any]] = []
        self.down: set[int] = set()  # Brokers that answer UNAVAILABLE.
        # Brokers that answer nothing (as if paused) until ``released`` is set.
        self.hung: set[int] = set()
        self.released = threading.Event()
        # Produce requests wait here (bounded) before they are handled: clear it to hold
        # them in the broker, set it to let them through.
        self.produce_gate = threading.Event()
        self.produce_gate.set()
        self.next_producer_id = 999
        self.coordinator_id = self.broker_ids[0]
        self.group_config = group_config
        self.groups: dict[str, ClassicGroup] = {}
        # The group metadata a coordinator would find in __consumer_offsets.
        self.stored_groups: dict[str, StoredGroup] = {}
        # group id -> (topic, partition) -> (offset, leader epoch, metadata)
        self.committed: dict[str, dict[tuple[str, int], tuple[int, int, str]]] = {}
        self.clock_offset_ms = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopped = False
        self._servers: list[tuple[grpc.Server, futures.ThreadPoolExecutor]] = []
        self._workers = workers
        self._waiters: set[_Waiter] = set()
        self._ticker = threading.Thread(target=self._tick_loop, name="fake-groups", daemon=True)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> FakeCluster:
        for broker_id in self.broker_ids:
            executor = futures.ThreadPoolExecutor(max_workers=self._workers)
            server = grpc.server(executor)
            broker_pb2_grpc.add_BrokerServicer_to_server(_Servicer(self, broker_id), server)
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            self._servers.append((server, executor))
            self.addresses[broker_id] = f"127.0.0.1:{port}"
        self._ticker.start()
        return self

    def stop(self) -> None:
        self.produce_gate.set()
        self.released.set()
        with self._lock:
            self._stopped = True
            self._changed.notify_all()
            for waiter in self._waiters:
                waiter.event.set()  # Parked group requests answer UNAVAILABLE.
        if self._ticker.is_alive():
            self._ticker.join(5)
        for server, executor in self._servers:
            server.stop(grace=None).wait(5)
            executor.shutdown(wait=True)
        self._servers.clear()

    def __enter__(self) -> FakeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def bootstrap(self) -> str:
        return ",".join(self.addresses[b] for b in self.broker_ids)

    # -- what a test changes -----------------------------------------------

    def create_topic(self, name: str, partitions: int = 1, leaders: list[int] | None = None):
        with self._lock:
            for p in range(partitions):
                leader = leaders[p] if leaders else self.broker_ids[p % len(self.broker_ids)]
                self.partitions[(name, p)] = FakePartition(leader=leader)

    def move_leader(self, topic: str, partition: int, leader: int) -> None:
        with self._lock:
            state = self.partitions[(topic, partition)]
            state.leader = leader
            state.leader_epoch += 1
            self._changed.notify_all()

    def fail_produce(self, topic: str, partition: int, *codes: int) -> None:
        with self._lock:
            self.partitions[(topic, partition)].produce_errors.extend(codes)

    def fail_fetch(self, topic: str, partition: int, *codes: int) -> None:
        with self._lock:
            self.partitions[(topic, partition)].fetch_errors.extend(codes)

    def delete_records(self, topic: str, partition: int, before_offset: int) -> None:
        """Advance the log start, dropping whole batches below it (like retention)."""
        with self._lock:
            state = self.partitions[(topic, partition)]
            state.batches = [b for b in state.batches if b[1] >= before_offset]
            state.log_start_offset = before_offset

    def append(self, topic: str, partition: int, batch: bytes) -> int:
        """Append a batch directly, as the leader would; returns its base offset."""
        with self._lock:
            return self._append(self.partitions[(topic, partition)], batch)

    def advance_clock(self, ms: int) -> None:
        """Move the groups' clock ``ms`` ahead and fire every deadline that passed."""
        with self._lock:
            self.clock_offset_ms += ms
            self._tick_groups()

    def move_coordinator(self, broker_id: int, *, keep_membership: bool = True) -> None:
        """Make ``broker_id`` the coordinator of every group. The old one unloads them
        (parked requests get NOT_COORDINATOR) and the new one loads what they stored, as
        the real coordinator does; with ``keep_membership`` False it starts them empty,
        as if the group metadata were lost. Committed offsets stay."""
        with self._lock:
            self.coordinator_id = broker_id
            for group in self.groups.values():
                self._deliver(group.unload())
            self.groups.clear()
            if not keep_membership:
                self.stored_groups.clear()
            now = self._now_ms()
            for group_id, stored in self.stored_groups.items():
                self.groups[group_id] = ClassicGroup.loaded(
                    group_id, stored, now, self.group_config
                )

    # -- what a test reads -------------------------------------------------

    def describe_group(self, group_id: str) -> GroupDescription:
        with self._lock:
            return self._group(group_id).describe()

    def records(self, topic: str, partition: int) -> list[tuple[int, Any]]:
        """``(offset, Record)`` for every record in the partition's log."""
        with self._lock:
            batches = list(self.partitions[(topic, partition)].batches)
        out = []
        for base, _, _, data in batches:
            out += [(base + r.offset_delta, r) for r in decode_records(data)]
        return out

    def calls(self, method: str) -> list[tuple[int, Any]]:
        with self._lock:
            return [(b, r) for b, m, r in self.requests if m == method]

    def wait_for_calls(self, method: str, count: int, timeout_s: float = 5.0) -> None:
        """Block until the brokers received ``count`` calls of ``method``."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while sum(1 for _, m, _ in self.requests if m == method) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"fewer than {count} {method} calls in {timeout_s} s")
                self._changed.wait(remaining)

    # -- the service, under the lock -----------------------------------------

    def _now_ms(self) -> int:
        return int(time.monotonic() * 1000) + self.clock_offset_ms

    def _group(self, group_id: str) -> ClassicGroup:
        group = self.groups.get(group_id)
        if group is None:
            group = self.groups[group_id] = ClassicGroup(group_id, self.group_config)
        return group

    def _deliver(self, replies: list[Reply]) -> None:
        for reply in replies:
            waiter = reply.reply_to
            assert isinstance(waiter, _Waiter)
            waiter.response = reply.response
            waiter.event.set()

    def _settle(self, group: ClassicGroup, replies: list[Reply]) -> None:
        """Deliver the replies and store what the group asked to (at once, always OK)."""
        self._deliver(replies)
        for write in group.take_writes():
            if write.group is None:
                self.stored_groups.pop(group.group_id, None)
            else:
                self.stored_groups[group.group_id] = write.group
            self._settle(group, group.stored(write.write_id, GroupError.NONE, self._now_ms()))

    def _tick_groups(self) -> None:
        now = self._now_ms()
        for group in self.groups.values():
            deadline = group.next_deadline_ms()
            if deadline is not None and deadline <= now:
                self._settle(group, group.tick(now))

    def _tick_loop(self) -> None:
        with self._lock:
            while not self._stopped:
                self._tick_groups()
                self._changed.wait(_TICK_S)

    def _append(self, state: FakePartition, batch: bytes) -> int:
        header = validate_batch(batch, max_batch_bytes=MAX_BATCH_BYTES)
        base = state.log_end_offset
        stored = patch_batch(batch, base, state.leader_epoch)
        state.batches.append((base, base + header.last_offset_delta, header.max_timestamp, stored))
        state.log_end_offset = base + header.last_offset_delta + 1
        self._changed.notify_all()
        return base


class _Waiter:
    """The reply_to token of a parked group request: its response, once the group gives it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.response: Any = None


class _Servicer(broker_pb2_grpc.BrokerServicer):
    def __init__(self, cluster: FakeCluster, broker_id: int):
        self.cluster = cluster
        self.broker_id = broker_id

    def _enter(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        cluster = self.cluster
        with cluster._lock:
            cluster.requests.append((self.broker_id, method, request))
            cluster._changed.notify_all()
            down = self.broker_id in cluster.down
            hung = self.broker_id in cluster.hung
        if hung:
            cluster.released.wait(10)
        if down:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"broker {self.broker_id} is down")

    def DescribeBroker(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return broker_pb2.DescribeBrokerResponse(broker_id=self.broker_id, state="running")

    def Metadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("Metadata", request, context)
        cluster = self.cluster
        with cluster._lock:
            brokers = [
                broker_pb2.BrokerEndpoint(
                    broker_id=b, host=a.rsplit(":", 1)[0], port=int(a.rsplit(":", 1)[1])
                )
                for b, a in cluster.addresses.items()
            ]
            names = list(request.topics) or sorted({t for t, _ in cluster.partitions})
            topics = []
            for name in names:
                parts = sorted((p, s) for (t, p), s in cluster.partitions.items() if t == name)
                if not parts:
                    topics.append(
                        broker_pb2.TopicMetadata(
                            name=name, error=_error(common_pb2.UNKNOWN_TOPIC_OR_PARTITION)
                        )
                    )
                    continue
                topics.append(
                    broker_pb2.TopicMetadata(
                        name=name,
                        topic_id=f"id-{name}",
                        partitions=[
                            broker_pb2.PartitionMetadata(
                                partition=p,
                                leader=s.leader,
                                leader_epoch=s.leader_epoch,
                                replicas=cluster.broker_ids,
                                isr=cluster.broker_ids,
                                error=_error(
                                    common_pb2.NONE
                                    if s.leader >= 0
                                    else common_pb2.LEADER_NOT_AVAILABLE
                                ),
                            )
                            for p, s in parts
                        ],
                    )
                )
        return broker_pb2.MetadataResponse(
            brokers=brokers, topics=topics, cluster_id="fake", controller_id=-1
        )

    def _leader_error(self, state: FakePartition | None, epoch: int = -1) -> int:
        if state is None:
            return common_pb2.UNKNOWN_TOPIC_OR_PARTITION
        if state.leader != self.broker_id:
            return common_pb2.NOT_LEADER_OR_FOLLOWER
        if epoch >= 0 and epoch < state.leader_epoch:
            return common_pb2.FENCED_LEADER_EPOCH
        if epoch > state.leader_epoch:
            return common_pb2.UNKNOWN_LEADER_EPOCH
        return common_pb2.NONE

    def InitProducerId(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("InitProducerId", request, context)
        cluster = self.cluster
        with cluster._lock:
            if request.producer_id >= 0:
                return broker_pb2.InitProducerIdResponse(
                    producer_id=request.producer_id, producer_epoch=request.producer_epoch + 1
                )
            cluster.next_producer_id += 1
            return broker_pb2.InitProducerIdResponse(
                producer_id=cluster.next_producer_id, producer_epoch=0
            )

    def Produce(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("Produce", request, context)
        cluster = self.cluster
        cluster.produce_gate.wait(10)
        topics = []
        with cluster._lock:
            for topic in request.topics:
                answers = []
                for part in topic.partitions:
                    state = cluster.partitions.get((topic.topic, part.partition))
                    answers.append(self._produce_one(request.acks, topic.topic, part, state))
                topics.append(
                    broker_pb2.TopicProduceResponse(topic=topic.topic, partitions=answers)
                )
        return broker_pb2.ProduceResponse(topics=topics)

    def _produce_one(
        self, acks: int, topic: str, part: Any, state: FakePartition | None
    ) -> broker_pb2.PartitionProduceResponse:
        answer = broker_pb2.PartitionProduceResponse(partition=part.partition, base_offset=-1)
        code = self._leader_error(state)
        if acks not in (-1, 0, 1):
            code = common_pb2.INVALID_REQUIRED_ACKS
        elif code == common_pb2.NONE and state is not None and state.produce_errors:
            code = state.produce_errors.popleft()
        if code != common_pb2.NONE:
            answer.error.CopyFrom(_error(code, f"fake broker {self.broker_id}"))
            if state is not None and code == common_pb2.NOT_LEADER_OR_FOLLOWER:
                answer.current_leader.CopyFrom(
                    broker_pb2.LeaderIdAndEpoch(
                        leader_id=state.leader, leader_epoch=state.leader_epoch
                    )
                )
            return answer
        assert state is not None
        batches = iter_batches(part.records)
        whole = [bytes(part.records[pos : pos + h.size_bytes]) for pos, h in batches]
        if batches.error is not None or not whole:
            answer.error.CopyFrom(_error(common_pb2.CORRUPT_MESSAGE, str(batches.error)))
            return answer
        try:
            for batch in whole:
                validate_batch(batch, max_batch_bytes=MAX_BATCH_BYTES)
        except InvalidBatchError as e:
            answer.error.CopyFrom(_error(common_pb2.CORRUPT_MESSAGE, str(e)))
            return answer
        answer.base_offset = state.log_end_offset
        for batch in whole:
            self.cluster._append(state, batch)
        answer.log_append_time_ms = -1
        answer.log_start_offset = state.log_start_offset
        return answer

    def Fetch(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("Fetch", request, context)
        cluster = self.cluster
        deadline = time.monotonic() + request.max_wait_ms / 1000
        with cluster._lock:
            while True:
                response, size, errors = self._fetch_once(request)
                remaining = deadline - time.monotonic()
                if errors or size >= request.min_bytes or remaining <= 0 or cluster._stopped:
                    return response
                cluster._changed.wait(remaining)

    def _fetch_once(self, request: Any) -> tuple[Any, int, bool]:
        cluster = self.cluster
        size = 0
        errors = False
        topics = []
        for topic in request.topics:
            answers = []
            for part in topic.partitions:
                state = cluster.partitions.get((topic.topic, part.partition))
                answer = broker_pb2.FetchPartitionResponse(partition=part.partition)
                code = self._leader_error(state, part.current_leader_epoch)
                if code == common_pb2.NONE and state is not None and state.fetch_errors:
                    code = state.fetch_errors.popleft()
                if (
                    code == common_pb2.NONE
                    and state is not None
                    and not (state.log_start_offset <= part.fetch_offset <= state.log_end_offset)
                ):
                    code = common_pb2.OFFSET_OUT_OF_RANGE
                if code != common_pb2.NONE:
                    errors = True
                    answer.error.CopyFrom(_error(code))
                    answers.append(answer)
                    continue
                assert state is not None
                data = bytearray()
                for _base, last, _ts, batch in state.batches:
                    if last < part.fetch_offset:
                        continue
                    if data and len(data) + len(batch) > part.partition_max_bytes:
                        break
                    if size + len(data) + len(batch) > request.max_bytes and (data or size):
                        break
                    data += batch
                size += len(data)
                answer.high_watermark = state.log_end_offset
                answer.log_start_offset = state.log_start_offset
                answer.log_end_offset = state.log_end_offset
                answer.records = bytes(data)
                answers.append(answer)
            topics.append(broker_pb2.FetchTopicResponse(topic=topic.topic, partitions=answers))
        return broker_pb2.FetchResponse(topics=topics), size, errors

    def ListOffsets(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("ListOffsets", request, context)
        cluster = self.cluster
        topics = []
        with cluster._lock:
            for topic in request.topics:
                answers = []
                for part in topic.partitions:
                    state = cluster.partitions.get((topic.topic, part.partition))
                    answer = broker_pb2.ListOffsetsPartitionResponse(
                        partition=part.partition, timestamp=-1, offset=-1
                    )
                    code = self._leader_error(state, part.current_leader_epoch)
                    if code != common_pb2.NONE:
                        answer.error.CopyFrom(_error(code))
                    else:
                        assert state is not None
                        answer.offset, answer.timestamp = _list_offset(state, part.timestamp)
                        answer.leader_epoch = state.leader_epoch
                    answers.append(answer)
                topics.append(
                    broker_pb2.ListOffsetsTopicResponse(topic=topic.topic, partitions=answers)
                )
        return broker_pb2.ListOffsetsResponse(topics=topics)

    # -- groups -------------------------------------------------------------

    def FindCoordinator(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("FindCoordinator", request, context)
        with self.cluster._lock:
            broker_id = self.cluster.coordinator_id
            host, port = self.cluster.addresses[broker_id].rsplit(":", 1)
        return broker_pb2.FindCoordinatorResponse(node_id=broker_id, host=host, port=int(port))

    def _not_coordinator(self) -> common_pb2.Error | None:
        if self.broker_id != self.cluster.coordinator_id:
            return _error(common_pb2.NOT_COORDINATOR, f"broker {self.broker_id}")
        return None

    def _park(self, group_id: str, operation: Any, context: grpc.ServicerContext) -> Any:
        """Run a join, sync or leave on the group and wait for its reply to this request."""
        cluster = self.cluster
        waiter = _Waiter()
        with cluster._lock:
            if cluster._stopped:
                context.abort(grpc.StatusCode.UNAVAILABLE, "stopping")
            cluster._waiters.add(waiter)
            group = cluster._group(group_id)
            cluster._settle(group, operation(group, cluster._now_ms(), waiter))
        context.add_callback(waiter.event.set)  # The client gave up: stop waiting.
        waiter.event.wait(context.time_remaining() or 60)
        with cluster._lock:
            cluster._waiters.discard(waiter)
        if waiter.response is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no answer from the group")
        return waiter.response

    def JoinGroup(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("JoinGroup", request, context)
        refusal = self._not_coordinator()
        if refusal is not None:
            return broker_pb2.JoinGroupResponse(error=refusal, member_id=request.member_id)
        join = wire.join_request(request)
        answer = self._park(request.group_id, lambda g, now, w: g.join(join, now, w), context)
        return wire.join_response(answer)

    def SyncGroup(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("SyncGroup", request, context)
        refusal = self._not_coordinator()
        if refusal is not None:
            return broker_pb2.SyncGroupResponse(error=refusal)
        sync = wire.sync_request(request)
        answer = self._park(request.group_id, lambda g, now, w: g.sync(sync, now, w), context)
        return wire.sync_response(answer)

    def Heartbeat(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("Heartbeat", request, context)
        refusal = self._not_coordinator()
        if refusal is not None:
            return broker_pb2.HeartbeatResponse(error=refusal)
        heartbeat = wire.heartbeat_request(request)
        with self.cluster._lock:
            group = self.cluster._group(request.group_id)
            answer = group.heartbeat(heartbeat, self.cluster._now_ms())
        return broker_pb2.HeartbeatResponse(error=wire.group_error(answer.error))

    def LeaveGroup(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("LeaveGroup", request, context)
        refusal = self._not_coordinator()
        if refusal is not None:
            return broker_pb2.LeaveGroupResponse(error=refusal)
        leave = wire.leave_request(request)
        answer = self._park(request.group_id, lambda g, now, w: g.leave(leave, now, w), context)
        return wire.leave_response(answer)

    def DescribeGroups(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("DescribeGroups", request, context)
        groups = []
        with self.cluster._lock:
            for group_id in request.group_ids:
                refusal = self._not_coordinator()
                if refusal is not None:
                    groups.append(broker_pb2.DescribedGroup(group_id=group_id, error=refusal))
                    continue
                d = self.cluster._group(group_id).describe()
                groups.append(wire.described_group(group_id, d))
        return broker_pb2.DescribeGroupsResponse(groups=groups)

    def OffsetCommit(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("OffsetCommit", request, context)
        cluster = self.cluster
        with cluster._lock:
            refusal = self._not_coordinator()
            if refusal is None:
                group = cluster._group(request.group_id)
                allowed = group.commit_allowed(
                    request.member_id,
                    request.generation_id,
                    cluster._now_ms(),
                    request.group_instance_id or None,
                )
                refusal = None if allowed is None else wire.group_error(allowed)
            if refusal is None:
                stored = cluster.committed.setdefault(request.group_id, {})
                for topic in request.topics:
                    for p in topic.partitions:
                        stored[(topic.topic, p.partition)] = (
                            p.committed_offset,
                            p.committed_leader_epoch,
                            p.metadata,
                        )
        return broker_pb2.OffsetCommitResponse(
            topics=[
                broker_pb2.OffsetCommitTopicResponse(
                    topic=topic.topic,
                    partitions=[
                        broker_pb2.OffsetCommitPartitionResponse(
                            partition=p.partition, error=refusal or _error()
                        )
                        for p in topic.partitions
                    ],
                )
                for topic in request.topics
            ]
        )

    def OffsetFetch(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._enter("OffsetFetch", request, context)
        refusal = self._not_coordinator()
        if refusal is not None:
            return broker_pb2.OffsetFetchResponse(error=refusal)
        with self.cluster._lock:
            stored = dict(self.cluster.committed.get(request.group_id, {}))
        wanted = [(t.topic, p) for t in request.topics for p in t.partitions] or sorted(stored)
        by_topic: dict[str, list[broker_pb2.OffsetFetchPartitionResponse]] = {}
        for topic, partition in wanted:
            offset, epoch, metadata = stored.get((topic, partition), (-1, -1, ""))
            by_topic.setdefault(topic, []).append(
                broker_pb2.OffsetFetchPartitionResponse(
                    partition=partition,
                    committed_offset=offset,
                    committed_leader_epoch=epoch,
                    metadata=metadata,
                    commit_timestamp_ms=-1,
                )
            )
        return broker_pb2.OffsetFetchResponse(
            topics=[
                broker_pb2.OffsetFetchTopicResponse(topic=t, partitions=p)
                for t, p in by_topic.items()
            ]
        )


def _list_offset(state: FakePartition, timestamp: int) -> tuple[int, int]:
    if timestamp == -1:
        return state.log_end_offset, -1
    if timestamp == -2:
        return state.log_start_offset, -1
    found: tuple[int, int] | None = None
    for base, _, max_ts, data in state.batches:
        for record in decode_records(data):
            offset, ts = base + record.offset_delta, record.timestamp_ms
            if timestamp == -3:
                if found is None or ts > found[1]:
                    found = (offset, ts)
            elif ts >= timestamp and max_ts >= timestamp:
                return offset, ts
    return found if found is not None else (-1, -1)
