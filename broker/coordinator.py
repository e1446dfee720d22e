"""Group coordinator, committed offsets part: Kafka's __consumer_offsets, served by the
leader of the group's partition.

Theory of operation. A group's committed offsets live in the compacted topic
``__consumer_offsets``, partition ``abs(java hashCode(group id)) % partitions``,
one record per (group, topic, partition) in Kafka's own binary layout
(OffsetCommitKey v1, OffsetCommitValue v3; a tombstone deletes). The broker
that leads that partition is the group's coordinator. When it becomes leader
it reads the partition back into memory (answering COORDINATOR_LOAD_IN_PROGRESS
meanwhile); when it stops leading it forgets it (NOT_COORDINATOR), and the new
leader, which replicated the same records, loads them. A commit is appended as
one batch and answered once every in-sync replica has it (acks=all), then
applied to memory, so an answered commit survives the coordinator's death and
never goes backwards. The topic is created on first use.

Group membership (JoinGroup, SyncGroup, Heartbeat, LeaveGroup) runs the pure
``broker.group.ClassicGroup`` of each group under one lock; a request that must
wait (a join until the rebalance ends, a follower's sync until the leader's
assignment) parks a ``_Pending`` that a later call or the ticker thread (session
and rebalance timeouts) completes. Membership is kept in memory only: when the
coordinator moves, members are answered NOT_COORDINATOR and rejoin at the new
one (their committed offsets are in the log). Offset commits are checked
against the member's generation (an old generation cannot commit); a commit
with generation -1 and no member id is allowed while the group has no members.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raftka.v1 import broker_pb2, common_pb2, controller_pb2

from broker.group import messages as gm
from broker.group import wire
from broker.group.state import ClassicGroup, GroupConfig
from broker.partition import LEADER, Partition, PartitionError, Waiter
from broker.record_batch import Record, decode_records, encode_batch, iter_batches
from quorum.image import NO_LEADER, MetadataImage

log = logging.getLogger(__name__)

OFFSETS_TOPIC = "__consumer_offsets"
METADATA_MAX_BYTES = 4096  # Kafka's offset.metadata.max.bytes.
_MAX_NAME_BYTES = 32767  # An int16-length string in the record layout.
_KEY_VERSION = 1
_VALUE_VERSION = 3
_COMMIT_TIMEOUT_S = 10.0


def java_string_hash(text: str) -> int:
    """Java's ``String.hashCode`` (over UTF-16 code units), as a signed 32-bit int."""
    h = 0
    data = text.encode("utf-16-be")
    for i in range(0, len(data), 2):
        h = (31 * h + ((data[i] << 8) | data[i + 1])) & 0xFFFFFFFF
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(group_id: str, partitions: int) -> int:
    """Kafka's ``Utils.abs(groupId.hashCode()) % groupMetadataTopicPartitionCount``."""
    return (java_string_hash(group_id) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True, slots=True)
class CommittedOffset:
    offset: int
    leader_epoch: int
    metadata: str
    commit_timestamp_ms: int


def _string(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack(">h", len(data)) + data


def _read_string(buf: bytes, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from(">h", buf, pos)
    pos += 2
    return buf[pos : pos + length].decode("utf-8"), pos + length


def encode_offset_key(group: str, topic: str, partition: int) -> bytes:
    return (
        struct.pack(">h", _KEY_VERSION)
        + _string(group)
        + _string(topic)
        + struct.pack(">i", partition)
    )


def decode_offset_key(key: bytes) -> tuple[str, str, int] | None:
    """(group, topic, partition), or None for a key that is not an offset commit."""
    (version,) = struct.unpack_from(">h", key, 0)
    if version not in (0, 1):
        return None  # Group metadata (version 2) and anything newer.
    group, pos = _read_string(key, 2)
    topic, pos = _read_string(key, pos)
    (partition,) = struct.unpack_from(">i", key, pos)
    return group, topic, partition


def encode_offset_value(value: CommittedOffset) -> bytes:
    return (
        struct.pack(">hqi", _VALUE_VERSION, value.offset, value.leader_epoch)
        + _string(value.metadata)
        + struct.pack(">q", value.commit_timestamp_ms)
    )


def decode_offset_value(value: bytes) -> CommittedOffset:
    version, offset, leader_epoch = struct.unpack_from(">hqi", value, 0)
    if version != _VALUE_VERSION:
        raise ValueError(f"offset commit value version {version} is not supported")
    metadata, pos = _read_string(value, 14)
    (stamp,) = struct.unpack_from(">q", value, pos)
    return CommittedOffset(offset, leader_epoch, metadata, stamp)


def _error(code: int, message: str = "") -> common_pb2.Error:
    return common_pb2.Error(code=code, message=message)


GroupOffsets = dict[tuple[str, int], CommittedOffset]


class GroupCoordinator:
    def __init__(
        self,
        broker_id: int,
        *,
        partition_of: Callable[[str, int], Partition | None],
        image: Callable[[], MetadataImage],
        create_topic: Callable[
            [controller_pb2.CreateTopicsRequest], controller_pb2.CreateTopicsResponse
        ],
        num_partitions: int = 50,
        replication_factor: int = 3,
        segment_bytes: int = 104857600,
        group_config: GroupConfig | None = None,
        offsets_retention_ms: int = 7 * 24 * 3600 * 1000,
        offsets_retention_check_interval_ms: int = 600_000,
    ):
        self.broker_id = broker_id
        self._partition_of = partition_of
        self._image = image
        self._create_topic = create_topic
        self.num_partitions = num_partitions
        self.replication_factor = replication_factor
        self.segment_bytes = segment_bytes
        # Reentrant: membership calls check coordination (which takes it) under it.
        self._lock = threading.RLock()
        # Offsets partition -> group -> committed offsets, for partitions loaded here.
        self._loaded: dict[int, dict[str, GroupOffsets]] = {}
        # Offsets partitions being loaded, each with the token of its current load: a
        # load that leadership overtook (lost and won again) must not install itself.
        self._loading: dict[int, object] = {}
        self._creating = False
        # Log offset of the commit each (group, topic, partition) holds in memory.
        self._applied_at: dict[tuple[str, str, int], int] = {}
        # Group membership, for groups whose offsets partition is loaded here.
        self._groups: dict[str, ClassicGroup] = {}
        self._group_config = group_config or GroupConfig()
        self.offsets_retention_ms = offsets_retention_ms
        self._retention_interval_s = offsets_retention_check_interval_ms / 1000
        self._next_retention_check = time.monotonic() + self._retention_interval_s
        self._stopped = threading.Event()
        self._ticker = threading.Thread(
            target=self._tick_loop, name=f"broker-{broker_id}-groups", daemon=True
        )
        self._ticker.start()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            replies = [r for group in self._groups.values() for r in group.unload()]
            self._groups.clear()
        _deliver(replies)
        self._ticker.join(timeout=5)

    # ------------------------------------------------------------------ leadership

    def on_role(self, index: int, role: str) -> None:
        """The broker became leader or follower of ``__consumer_offsets``-``index``."""
        with self._lock:
            if role != LEADER:
                if self._loaded.pop(index, None) is not None:
                    log.info("no longer coordinator for offsets partition %d", index)
                self._loading.pop(index, None)
                replies = []
                for group_id in [g for g in self._groups if self._index_of(g) == index]:
                    replies += self._groups.pop(group_id).unload()
                _deliver(replies)
                return
            if index in self._loaded or index in self._loading:
                return
            token = object()
            self._loading[index] = token
        threading.Thread(
            target=self._load, args=(index, token), name=f"offsets-load-{index}", daemon=True
        ).start()

    def _load(self, index: int, token: object) -> None:
        partition = self._partition_of(OFFSETS_TOPIC, index)
        groups: dict[str, GroupOffsets] = {}
        started = time.monotonic()
        skipped = 0
        try:
            if partition is None:
                raise PartitionError("KAFKA_STORAGE_ERROR", "its log could not be opened")
            for record in self._read_all(partition):
                try:
                    self._replay(groups, record)
                except (ValueError, struct.error, UnicodeDecodeError):
                    skipped += 1  # Not an offset commit this version writes: keep going.
        except Exception as e:  # Never leave the partition "loading" forever.
            log.warning("loading offsets partition %d failed: %s", index, e)
            with self._lock:
                if self._loading.get(index) is token:
                    del self._loading[index]
            return
        with self._lock:
            if self._loading.get(index) is not token:
                return  # Leadership moved on (and maybe came back) while loading.
            del self._loading[index]
            self._loaded[index] = groups
        log.info(
            "coordinator for offsets partition %d: %d groups loaded in %.0f ms%s",
            index,
            len(groups),
            (time.monotonic() - started) * 1000,
            f" ({skipped} records not understood, skipped)" if skipped else "",
        )

    @staticmethod
    def _read_all(partition: Partition) -> list[Record]:
        records: list[Record] = []
        offset = partition.log.log_start_offset
        while True:
            data = partition.read_local(offset, 1 << 20)
            if not data:
                return records
            before = offset
            for position, header in iter_batches(data):
                records.extend(decode_records(data[position : position + header.size_bytes]))
                offset = header.next_offset
            if offset == before:
                raise ValueError(f"no whole batch at offset {offset}")

    @staticmethod
    def _replay(groups: dict[str, GroupOffsets], record: Record) -> None:
        if record.key is None:
            return
        key = decode_offset_key(record.key)
        if key is None:
            return
        group, topic, index = key
        if record.value is None:
            offsets = groups.get(group)
            if offsets is not None:
                offsets.pop((topic, index), None)
                if not offsets:
                    del groups[group]
            return
        groups.setdefault(group, {})[(topic, index)] = decode_offset_value(record.value)

    # ------------------------------------------------------------------ find

    def find_coordinator(self, group_id: str) -> broker_pb2.FindCoordinatorResponse:
        if not group_id:
            return broker_pb2.FindCoordinatorResponse(
                error=_error(common_pb2.INVALID_GROUP_ID, "a group id is required")
            )
        image = self._image()
        topic = image.topic_by_name(OFFSETS_TOPIC)
        if topic is None:
            self._ensure_topic()
            return broker_pb2.FindCoordinatorResponse(
                error=_error(
                    common_pb2.COORDINATOR_NOT_AVAILABLE,
                    f"creating {OFFSETS_TOPIC}; try again",
                )
            )
        index = partition_for(group_id, len(topic.partitions))
        reg = topic.partitions.get(index)
        broker = None if reg is None or reg.leader == NO_LEADER else image.brokers.get(reg.leader)
        endpoint = None if broker is None else broker.endpoint()
        if reg is None or endpoint is None:
            return broker_pb2.FindCoordinatorResponse(
                error=_error(
                    common_pb2.COORDINATOR_NOT_AVAILABLE,
                    f"{OFFSETS_TOPIC}-{index} has no leader",
                )
            )
        return broker_pb2.FindCoordinatorResponse(
            node_id=reg.leader, host=endpoint.host, port=endpoint.port
        )

    def _ensure_topic(self) -> None:
        with self._lock:
            if self._creating:
                return
            self._creating = True
        try:
            live = [b for b in self._image().brokers.values() if not b.fenced]
            request = controller_pb2.CreateTopicsRequest(
                topics=[
                    controller_pb2.CreatableTopic(
                        name=OFFSETS_TOPIC,
                        num_partitions=self.num_partitions,
                        replication_factor=max(1, min(self.replication_factor, len(live))),
                        configs={
                            "cleanup.policy": "compact",
                            "segment.bytes": str(self.segment_bytes),
                            "min.insync.replicas": "1",
                        },
                    )
                ]
            )
            response = self._create_topic(request)
            result = response.results[0] if response.results else None
            code = result.error.code if result is not None else response.error.code
            if code not in (common_pb2.NONE, common_pb2.TOPIC_ALREADY_EXISTS):
                log.warning("cannot create %s: %s", OFFSETS_TOPIC, result or response.error)
        except Exception as e:  # The controller may be moving: the client asks again.
            log.warning("cannot create %s: %s", OFFSETS_TOPIC, e)
        finally:
            with self._lock:
                self._creating = False

    # ------------------------------------------------------------------ commit and fetch

    def _coordinating(self, group_id: str) -> tuple[int, common_pb2.Error | None]:
        """(offsets partition, error if this broker cannot answer for the group now)."""
        if not group_id or len(group_id.encode("utf-8")) > _MAX_NAME_BYTES:
            return -1, _error(
                common_pb2.INVALID_GROUP_ID, "a group id of 1 to 32767 bytes is required"
            )
        topic = self._image().topic_by_name(OFFSETS_TOPIC)
        if topic is None:
            return -1, _error(common_pb2.COORDINATOR_NOT_AVAILABLE, f"no {OFFSETS_TOPIC} yet")
        index = partition_for(group_id, len(topic.partitions))
        with self._lock:
            if index in self._loading:
                return index, _error(
                    common_pb2.COORDINATOR_LOAD_IN_PROGRESS,
                    f"loading {OFFSETS_TOPIC}-{index}",
                )
            if index not in self._loaded:
                return index, _error(
                    common_pb2.NOT_COORDINATOR,
                    f"broker {self.broker_id} is not the coordinator of {group_id!r}",
                )
        return index, None

    def commit(self, request: broker_pb2.OffsetCommitRequest) -> broker_pb2.OffsetCommitResponse:
        index, refusal = self._coordinating(request.group_id)
        if refusal is None:
            refusal = self._commit_refusal(request)
        response = broker_pb2.OffsetCommitResponse()
        if refusal is not None:
            response.error.CopyFrom(refusal)
            _per_partition(response, request, refusal)
            return response
        now = int(time.time() * 1000)
        values: dict[tuple[str, int], CommittedOffset] = {}
        records = []
        for topic in request.topics:
            for part in topic.partitions:
                if len(part.metadata.encode("utf-8")) > METADATA_MAX_BYTES:
                    continue
                if not topic.topic or len(topic.topic.encode("utf-8")) > _MAX_NAME_BYTES:
                    continue
                value = CommittedOffset(
                    part.committed_offset, part.committed_leader_epoch, part.metadata, now
                )
                values[(topic.topic, part.partition)] = value
                records.append(
                    Record(
                        encode_offset_key(request.group_id, topic.topic, part.partition),
                        encode_offset_value(value),
                        (),
                        now,
                    )
                )
        error, at = self._append(index, records) if records else (None, -1)
        if error is None:
            with self._lock:
                loaded = self._loaded.get(index)
                if loaded is None:
                    error = _error(common_pb2.NOT_COORDINATOR, "leadership moved meanwhile")
                else:
                    # Two commits in flight land in log order; memory keeps the later.
                    group_offsets = loaded.setdefault(request.group_id, {})
                    for key, value in values.items():
                        if self._applied_at.get((request.group_id, *key), -1) < at:
                            group_offsets[key] = value
                            self._applied_at[(request.group_id, *key)] = at
        for topic in request.topics:
            answer = response.topics.add(topic=topic.topic)
            for part in topic.partitions:
                item = answer.partitions.add(partition=part.partition)
                if (topic.topic, part.partition) not in values:
                    too_long = len(part.metadata.encode("utf-8")) > METADATA_MAX_BYTES
                    item.error.CopyFrom(
                        _error(
                            common_pb2.OFFSET_METADATA_TOO_LARGE
                            if too_long
                            else common_pb2.INVALID_TOPIC_EXCEPTION,
                            f"metadata over {METADATA_MAX_BYTES} bytes"
                            if too_long
                            else "invalid topic name",
                        )
                    )
                elif error is not None:
                    item.error.CopyFrom(error)
        return response

    def _commit_refusal(self, request: broker_pb2.OffsetCommitRequest) -> common_pb2.Error | None:
        with self._lock:
            group = self._groups.get(request.group_id)
            if group is None:
                if request.generation_id < 0 and not request.member_id:
                    return None  # Outside membership (assign()), and nobody manages it.
                return _error(
                    common_pb2.UNKNOWN_MEMBER_ID,
                    f"member {request.member_id!r} is not in group {request.group_id!r}",
                )
            error = group.commit_allowed(
                request.member_id,
                request.generation_id,
                _now_ms(),
                request.group_instance_id or None,
            )
        if error is None:
            return None
        return wire.group_error(error, f"group {request.group_id!r}")

    def _append(self, index: int, records: list[Record]) -> tuple[common_pb2.Error | None, int]:
        """Append the records to the offsets partition and wait for every in-sync
        replica; (error or None, the offset of the last record)."""
        partition = self._partition_of(OFFSETS_TOPIC, index)
        if partition is None:
            return _error(common_pb2.NOT_COORDINATOR, f"{OFFSETS_TOPIC}-{index} is not here"), -1
        try:
            result = partition.append_as_leader(encode_batch(records), acks=-1, internal=True)
        except PartitionError as e:
            code = common_pb2.ErrorCode.Value(e.code)
            if code == common_pb2.NOT_LEADER_OR_FOLLOWER:
                code = common_pb2.NOT_COORDINATOR
            return _error(code, e.message), -1
        return self._await(partition, result), result.last_offset

    @staticmethod
    def _await(partition: Partition, result: Any) -> common_pb2.Error | None:
        waiter = Waiter()
        partition.add_waiter(waiter)
        deadline = time.monotonic() + _COMMIT_TIMEOUT_S
        try:
            while True:
                waiter.take()
                outcome = partition.acks_reached(result.last_offset, result.leader_epoch)
                if outcome == "NONE":
                    return None
                if outcome is not None:
                    code = common_pb2.ErrorCode.Value(outcome)
                    if code == common_pb2.NOT_LEADER_OR_FOLLOWER:
                        code = common_pb2.NOT_COORDINATOR
                    return _error(code, "the commit did not reach every in-sync replica")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return _error(common_pb2.REQUEST_TIMED_OUT, "the commit was not replicated")
                waiter.wait(remaining)
        finally:
            partition.remove_waiter(waiter)

    def fetch(self, request: broker_pb2.OffsetFetchRequest) -> broker_pb2.OffsetFetchResponse:
        index, refusal = self._coordinating(request.group_id)
        if refusal is not None:
            return broker_pb2.OffsetFetchResponse(error=refusal)
        with self._lock:
            offsets = dict(self._loaded.get(index, {}).get(request.group_id, {}))
        wanted: dict[str, list[int]] = {}
        if request.topics:
            for topic in request.topics:
                wanted[topic.topic] = list(topic.partitions)
        else:
            for topic_name, part in sorted(offsets):
                wanted.setdefault(topic_name, []).append(part)
        response = broker_pb2.OffsetFetchResponse()
        for topic_name, parts in wanted.items():
            answer = response.topics.add(topic=topic_name)
            for part in parts:
                committed = offsets.get((topic_name, part))
                if committed is None:
                    answer.partitions.add(partition=part, committed_offset=-1)
                else:
                    answer.partitions.add(
                        partition=part,
                        committed_offset=committed.offset,
                        committed_leader_epoch=committed.leader_epoch,
                        metadata=committed.metadata,
                        commit_timestamp_ms=committed.commit_timestamp_ms,
                    )
        return response

    # ------------------------------------------------------------------ membership

    def _index_of(self, group_id: str) -> int:
        topic = self._image().topic_by_name(OFFSETS_TOPIC)
        return -1 if topic is None else partition_for(group_id, len(topic.partitions))

    def _group_for(self, group_id: str, create: bool) -> tuple[ClassicGroup | None, Any]:
        """The group's state machine here, or the error to answer (not coordinator)."""
        _, refusal = self._coordinating(group_id)
        if refusal is not None:
            return None, refusal
        group = self._groups.get(group_id)
        if group is None or group.state is gm.GroupState.DEAD:
            if not create:
                return None, _error(
                    common_pb2.UNKNOWN_MEMBER_ID, f"group {group_id!r} has no members"
                )
            group = ClassicGroup(group_id, self._group_config)
            self._groups[group_id] = group
        return group, None

    def _park(
        self,
        call: Callable[[ClassicGroup, _Pending], list[gm.Reply]],
        group_id: str,
        create: bool,
        timeout_s: float,
    ) -> tuple[gm.GroupResponse | None, Any]:
        pending = _Pending()
        with self._lock:
            group, refusal = self._group_for(group_id, create)
            if group is None:
                return None, refusal
            replies = call(group, pending)
        _deliver(replies)
        response = pending.wait(timeout_s)
        if response is None:
            return None, _error(common_pb2.REQUEST_TIMED_OUT, "the group did not answer in time")
        return response, None

    def join(self, request: broker_pb2.JoinGroupRequest) -> broker_pb2.JoinGroupResponse:
        join = wire.join_request(request)
        timeout_s = max(request.rebalance_timeout_ms, request.session_timeout_ms) / 1000 + 30
        response, refusal = self._park(
            lambda group, pending: group.join(join, _now_ms(), pending),
            request.group_id,
            True,
            timeout_s,
        )
        if response is None:
            return broker_pb2.JoinGroupResponse(error=refusal, generation_id=-1)
        assert isinstance(response, gm.JoinGroupResponse)
        return wire.join_response(response)

    def sync(self, request: broker_pb2.SyncGroupRequest) -> broker_pb2.SyncGroupResponse:
        sync = wire.sync_request(request)
        response, refusal = self._park(
            lambda group, pending: group.sync(sync, _now_ms(), pending),
            request.group_id,
            False,
            330.0,
        )
        if response is None:
            return broker_pb2.SyncGroupResponse(error=refusal)
        assert isinstance(response, gm.SyncGroupResponse)
        return wire.sync_response(response)

    def heartbeat(self, request: broker_pb2.HeartbeatRequest) -> broker_pb2.HeartbeatResponse:
        with self._lock:
            group, refusal = self._group_for(request.group_id, False)
            if group is None:
                return broker_pb2.HeartbeatResponse(error=refusal)
            response = group.heartbeat(wire.heartbeat_request(request), _now_ms())
        return broker_pb2.HeartbeatResponse(error=wire.group_error(response.error))

    def leave(self, request: broker_pb2.LeaveGroupRequest) -> broker_pb2.LeaveGroupResponse:
        leave = wire.leave_request(request)
        response, refusal = self._park(
            lambda group, pending: group.leave(leave, _now_ms(), pending),
            request.group_id,
            False,
            30.0,
        )
        if response is None:
            return broker_pb2.LeaveGroupResponse(error=refusal)
        assert isinstance(response, gm.LeaveGroupResponse)
        return wire.leave_response(response)

    def describe_groups(
        self, request: broker_pb2.DescribeGroupsRequest
    ) -> broker_pb2.DescribeGroupsResponse:
        response = broker_pb2.DescribeGroupsResponse()
        for group_id in request.group_ids:
            out = response.groups.add(group_id=group_id)
            index, refusal = self._coordinating(group_id)
            if refusal is not None:
                out.error.CopyFrom(refusal)
                continue
            with self._lock:
                group = self._groups.get(group_id)
                description = None if group is None else group.describe()
                has_offsets = group_id in self._loaded.get(index, {})
            if description is None:
                out.state = "Empty" if has_offsets else "Dead"
                continue
            out.CopyFrom(wire.described_group(group_id, description))
        return response

    def expire_offsets(self, now_wall_ms: int) -> list[str]:
        """Delete the offsets of groups without members whose last commit is older than
        ``offsets.retention.minutes`` (Kafka's rule for empty groups). Returns them."""
        expired = []
        with self._lock:
            for index, groups in self._loaded.items():
                for group_id, offsets in groups.items():
                    group = self._groups.get(group_id)
                    if group is not None and group.state is not gm.GroupState.EMPTY:
                        continue
                    newest = max((o.commit_timestamp_ms for o in offsets.values()), default=0)
                    if offsets and now_wall_ms - newest > self.offsets_retention_ms:
                        expired.append((index, group_id, list(offsets)))
        for index, group_id, keys in expired:
            tombstones = [
                Record(encode_offset_key(group_id, topic, part), None, (), now_wall_ms)
                for topic, part in keys
            ]
            error, _ = self._append(index, tombstones)
            if error is not None:
                log.warning("expiring the offsets of %s failed: %s", group_id, error.message)
                continue
            with self._lock:
                self._loaded.get(index, {}).pop(group_id, None)
            log.info("offsets of group %s expired (offsets.retention.minutes)", group_id)
        return [group_id for _, group_id, _ in expired]

    def _tick_loop(self) -> None:
        while not self._stopped.wait(0.1):
            try:
                self._tick()
            except Exception:  # Timeouts must keep running whatever one group does.
                log.exception("group coordinator tick failed")

    def _tick(self) -> None:
        if time.monotonic() >= self._next_retention_check:
            self._next_retention_check = time.monotonic() + self._retention_interval_s
            self.expire_offsets(int(time.time() * 1000))
        now = _now_ms()
        with self._lock:
            replies = [r for group in self._groups.values() for r in group.tick(now)]
            dead = [g for g, group in self._groups.items() if group.state is gm.GroupState.DEAD]
            for group_id in dead:
                del self._groups[group_id]
        _deliver(replies)

    def list_groups(self) -> broker_pb2.ListGroupsResponse:
        with self._lock:
            states = {g: "Empty" for groups in self._loaded.values() for g in groups}
            for group_id, group in self._groups.items():
                if group.state is not gm.GroupState.DEAD:
                    states[group_id] = str(group.state)
        return broker_pb2.ListGroupsResponse(
            groups=[
                broker_pb2.ListedGroup(group_id=g, state=state, protocol_type="consumer")
                for g, state in sorted(states.items())
            ]
        )

    def delete_groups(
        self, request: broker_pb2.DeleteGroupsRequest
    ) -> broker_pb2.DeleteGroupsResponse:
        """Delete groups' committed offsets (tombstones); a group without members only,
        which every group is until membership is served."""
        response = broker_pb2.DeleteGroupsResponse()
        for group_id in request.group_ids:
            result = response.results.add(group_id=group_id)
            index, refusal = self._coordinating(group_id)
            if refusal is not None:
                result.error.CopyFrom(refusal)
                continue
            with self._lock:
                group = self._groups.get(group_id)
                deleted = group.delete() if group is not None else gm.GroupError.NONE
                if deleted is gm.GroupError.NONE and group is not None:
                    del self._groups[group_id]
            if deleted is gm.GroupError.NON_EMPTY_GROUP:
                result.error.CopyFrom(
                    _error(common_pb2.NON_EMPTY_GROUP, f"group {group_id!r} has members")
                )
                continue
            with self._lock:
                offsets = list(self._loaded.get(index, {}).get(group_id, {}))
            if not offsets:
                if group is None:
                    result.error.CopyFrom(
                        _error(common_pb2.GROUP_ID_NOT_FOUND, f"group {group_id!r} does not exist")
                    )
                continue
            now = int(time.time() * 1000)
            tombstones = [
                Record(encode_offset_key(group_id, topic, part), None, (), now)
                for topic, part in offsets
            ]
            error, _ = self._append(index, tombstones)
            if error is not None:
                result.error.CopyFrom(error)
                continue
            with self._lock:
                self._loaded.get(index, {}).pop(group_id, None)
        return response


class _Pending:
    """A parked JoinGroup/SyncGroup/LeaveGroup; the reply token handed to the group."""

    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.response: gm.GroupResponse | None = None

    def wait(self, timeout_s: float) -> gm.GroupResponse | None:
        self.event.wait(timeout_s)
        return self.response


def _deliver(replies: list[gm.Reply]) -> None:
    for reply in replies:
        pending = reply.reply_to
        assert isinstance(pending, _Pending)
        pending.response = reply.response
        pending.event.set()


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


def _per_partition(
    response: broker_pb2.OffsetCommitResponse,
    request: broker_pb2.OffsetCommitRequest,
    error: common_pb2.Error,
) -> None:
    for topic in request.topics:
        answer = response.topics.add(topic=topic.topic)
        for part in topic.partitions:
            answer.partitions.add(partition=part.partition, error=error)
