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
and rebalance timeouts) completes. Offset commits are checked against the
member's generation (an old generation cannot commit); a commit with generation
-1 and no member id is allowed while the group has no members.

Membership is in the same topic, as in Kafka: a group's metadata (GroupMetadataKey
v2, GroupMetadataValue v3: protocol type, generation, protocol, leader, and per
member its ids, timeouts, subscription and assignment) is written when the
leader's SyncGroup completes a generation, and a tombstone when the group
becomes Empty or is deleted. The group asks for these writes
(``ClassicGroup.take_writes``) under the lock; they are queued there, so that
they reach the log in the order the group decided them, appended by whichever
thread flushes the queue first, and awaited (every in-sync replica) outside the
lock, then reported back to the group (``ClassicGroup.stored``), which answers
the SyncGroups that waited for it, or on failure sends them the error and
rebalances. A new coordinator rebuilds each stored group Stable in its
generation, every member's session starting at the load: members that go on
heartbeating (to the new coordinator) carry on without a rebalance; the others
expire after their session timeout and the group rebalances.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from raftka.v1 import broker_pb2, common_pb2, controller_pb2

from broker.group import messages as gm
from broker.group import wire
from broker.group.state import ClassicGroup, GroupConfig
from broker.partition import HIGH_WATERMARK, LEADER, STATE, Partition, PartitionError, Waiter
from broker.record_batch import Record, decode_records, encode_batch, iter_batches
from quorum.image import NO_LEADER, MetadataImage

log = logging.getLogger(__name__)

OFFSETS_TOPIC = "__consumer_offsets"
METADATA_MAX_BYTES = 4096  # Kafka's offset.metadata.max.bytes.
_MAX_NAME_BYTES = 32767  # An int16-length string in the record layout.
_KEY_VERSION = 1
_VALUE_VERSION = 3
_GROUP_KEY_VERSION = 2
_GROUP_VALUE_VERSION = 3  # Kafka's last non-flexible GroupMetadataValue (static members).
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
    if length < 0 or pos + length > len(buf):
        raise ValueError(f"a string of {length} bytes does not fit the record")
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


def _nullable_string(value: str | None) -> bytes:
    return struct.pack(">h", -1) if value is None else _string(value)


def _read_nullable_string(buf: bytes, pos: int) -> tuple[str | None, int]:
    (length,) = struct.unpack_from(">h", buf, pos)
    if length < 0:
        return None, pos + 2
    return _read_string(buf, pos)


def _bytes(value: bytes) -> bytes:
    return struct.pack(">i", len(value)) + value


def _read_bytes(buf: bytes, pos: int) -> tuple[bytes, int]:
    (length,) = struct.unpack_from(">i", buf, pos)
    pos += 4
    if length < 0:
        return b"", pos
    if pos + length > len(buf):
        raise ValueError("a byte field runs past the end of the record")
    return bytes(buf[pos : pos + length]), pos + length


def encode_group_key(group: str) -> bytes:
    """Kafka's GroupMetadataKey (version 2): the group id."""
    return struct.pack(">h", _GROUP_KEY_VERSION) + _string(group)


def decode_group_key(key: bytes) -> str | None:
    """The group id of a group metadata key, or None for any other key."""
    (version,) = struct.unpack_from(">h", key, 0)
    if version != _GROUP_KEY_VERSION:
        return None
    group, _ = _read_string(key, 2)
    return group


def encode_group_value(value: gm.StoredGroup) -> bytes:
    """Kafka's GroupMetadataValue, version 3."""
    parts = [
        struct.pack(">h", _GROUP_VALUE_VERSION),
        _string(value.protocol_type),
        struct.pack(">i", value.generation_id),
        _nullable_string(value.protocol_name),
        _nullable_string(value.leader_id),
        struct.pack(">qi", value.current_state_timestamp_ms, len(value.members)),
    ]
    for m in value.members:
        parts += [
            _string(m.member_id),
            _nullable_string(m.group_instance_id),
            _string(m.client_id),
            _string(m.client_host),
            struct.pack(">ii", m.rebalance_timeout_ms, m.session_timeout_ms),
            _bytes(m.subscription),
            _bytes(m.assignment),
        ]
    return b"".join(parts)


def decode_group_value(value: bytes) -> gm.StoredGroup:
    """A GroupMetadataValue of version 0 to 3 (what Kafka wrote before flexible
    versions); ValueError for any other, or for one cut short."""
    try:
        return _decode_group_value(value)
    except struct.error as e:
        raise ValueError(f"a group metadata value cut short: {e}") from e


def _decode_group_value(value: bytes) -> gm.StoredGroup:
    (version,) = struct.unpack_from(">h", value, 0)
    if not 0 <= version <= _GROUP_VALUE_VERSION:
        raise ValueError(f"group metadata value version {version} is not supported")
    protocol_type, pos = _read_string(value, 2)
    (generation,) = struct.unpack_from(">i", value, pos)
    protocol, pos = _read_nullable_string(value, pos + 4)
    leader, pos = _read_nullable_string(value, pos)
    stamp = -1
    if version >= 2:
        (stamp,) = struct.unpack_from(">q", value, pos)
        pos += 8
    (count,) = struct.unpack_from(">i", value, pos)
    pos += 4
    members = []
    for _ in range(max(count, 0)):
        member_id, pos = _read_string(value, pos)
        instance_id = None
        if version >= 3:
            instance_id, pos = _read_nullable_string(value, pos)
        client_id, pos = _read_string(value, pos)
        client_host, pos = _read_string(value, pos)
        rebalance_timeout = -1
        if version >= 1:
            (rebalance_timeout,) = struct.unpack_from(">i", value, pos)
            pos += 4
        (session_timeout,) = struct.unpack_from(">i", value, pos)
        subscription, pos = _read_bytes(value, pos + 4)
        assignment, pos = _read_bytes(value, pos)
        members.append(
            gm.StoredMember(
                member_id=member_id,
                group_instance_id=instance_id,
                client_id=client_id,
                client_host=client_host,
                # Version 0 had none: Kafka reads the session timeout for it.
                rebalance_timeout_ms=session_timeout if version == 0 else rebalance_timeout,
                session_timeout_ms=session_timeout,
                subscription=subscription,
                assignment=assignment,
            )
        )
    return gm.StoredGroup(protocol_type, generation, protocol, leader, tuple(members), stamp)


def _error(code: int, message: str = "") -> common_pb2.Error:
    return common_pb2.Error(code=code, message=message)


GroupOffsets = dict[tuple[str, int], CommittedOffset]


def replay(
    offsets: dict[str, GroupOffsets], groups: dict[str, gm.StoredGroup], record: Record
) -> None:
    """Apply one record of ``__consumer_offsets`` (in log order) to the committed
    offsets and the stored group metadata; a tombstone deletes. Records of other
    key versions are ignored; a value that does not decode raises ValueError (or
    struct.error), after forgetting what its key held: the log's latest word on it
    is not understood."""
    if record.key is None:
        return
    group_id = decode_group_key(record.key)
    if group_id is not None:
        if record.value is None:
            groups.pop(group_id, None)
            return
        try:
            groups[group_id] = decode_group_value(record.value)
        except (ValueError, struct.error, UnicodeDecodeError):
            groups.pop(group_id, None)
            raise
        return
    key = decode_offset_key(record.key)
    if key is None:
        return
    group, topic, index = key
    if record.value is None:
        committed = offsets.get(group)
        if committed is not None:
            committed.pop((topic, index), None)
            if not committed:
                del offsets[group]
        return
    offsets.setdefault(group, {})[(topic, index)] = decode_offset_value(record.value)


def store_error(error: common_pb2.Error | None) -> gm.GroupError:
    """What a failed group metadata append tells the members (Kafka's storeGroup)."""
    if error is None:
        return gm.GroupError.NONE
    if error.code in (
        common_pb2.UNKNOWN_TOPIC_OR_PARTITION,
        common_pb2.NOT_ENOUGH_REPLICAS,
        common_pb2.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    ):
        return gm.GroupError.COORDINATOR_NOT_AVAILABLE
    if error.code in (
        common_pb2.NOT_COORDINATOR,
        common_pb2.NOT_LEADER_OR_FOLLOWER,
        common_pb2.KAFKA_STORAGE_ERROR,
    ):
        return gm.GroupError.NOT_COORDINATOR
    if error.code == common_pb2.REQUEST_TIMED_OUT:
        return gm.GroupError.REBALANCE_IN_PROGRESS
    return gm.GroupError.UNKNOWN_SERVER_ERROR


@dataclass(slots=True)
class _Write:
    """Records queued for the offsets partition, in the order they were decided; the
    append's outcome once a thread flushed the queue."""

    index: int
    records: list[Record]
    # The group that asked for the write and its id there; None for other writers.
    group: ClassicGroup | None = None
    write_id: int = 0
    appended: threading.Event = field(default_factory=threading.Event)
    partition: Partition | None = None
    result: Any = None
    error: common_pb2.Error | None = None


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
        # Group metadata writes in the order the groups asked for them (queued under
        # the lock), appended in that order by whichever thread takes _append_lock.
        self._append_queue: deque[_Write] = deque()
        self._append_lock = threading.Lock()
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
        stored: dict[str, gm.StoredGroup] = {}
        started = time.monotonic()
        skipped = 0
        try:
            if partition is None:
                raise PartitionError("KAFKA_STORAGE_ERROR", "its log could not be opened")
            for record in self._read_all(partition):
                try:
                    replay(groups, stored, record)
                except (ValueError, struct.error, UnicodeDecodeError):
                    skipped += 1  # Not a record this version writes: keep going.
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
            now = _now_ms()
            for group_id, value in stored.items():
                if group_id not in self._groups:
                    self._groups[group_id] = ClassicGroup.loaded(
                        group_id, value, now, self._group_config
                    )
        log.info(
            "coordinator for offsets partition %d: %d groups (%d with members) loaded in %.0f ms%s",
            index,
            len(set(groups) | set(stored)),
            sum(bool(v.members) for v in stored.values()),
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
        write = _Write(index, records)
        self._append_now(write)
        error = self._await_write(write)
        return error, -1 if write.result is None else write.result.last_offset

    def _append_now(self, write: _Write) -> None:
        """Append, without waiting for replication; the outcome goes into ``write``."""
        try:
            partition = self._partition_of(OFFSETS_TOPIC, write.index)
            if partition is None:
                write.error = _error(
                    common_pb2.NOT_COORDINATOR, f"{OFFSETS_TOPIC}-{write.index} is not here"
                )
                return
            write.partition = partition
            write.result = partition.append_as_leader(
                encode_batch(write.records), acks=-1, internal=True
            )
        except PartitionError as e:
            code = common_pb2.ErrorCode.Value(e.code)
            if code == common_pb2.NOT_LEADER_OR_FOLLOWER:
                code = common_pb2.NOT_COORDINATOR
            write.error = _error(code, e.message)
        except Exception as e:  # Whatever it is, the writer is answered.
            log.exception("appending to %s-%d failed", OFFSETS_TOPIC, write.index)
            write.error = _error(common_pb2.UNKNOWN_SERVER_ERROR, str(e))
        finally:
            write.appended.set()

    def _await_write(self, write: _Write) -> common_pb2.Error | None:
        """Wait for a queued or appended write to reach every in-sync replica."""
        write.appended.wait()
        if write.error is not None or write.partition is None:
            return write.error
        return self._await(write.partition, write.result)

    # ------------------------------------------------------------------ group metadata writes

    def _enqueue(self, write: _Write) -> _Write:
        """Queue a write (under the lock: the queue's order is the order of decisions)."""
        self._append_queue.append(write)
        return write

    def _queue_writes(self, group_id: str, group: ClassicGroup) -> list[_Write]:
        """Queue what the group asked to write, under the lock, right after the call
        that asked for it."""
        writes = group.take_writes()
        if not writes:
            return []
        index = self._index_of(group_id)
        now = int(time.time() * 1000)
        queued = []
        for write in writes:
            value = None
            if write.group is not None:
                stored = replace(write.group, current_state_timestamp_ms=now)
                value = encode_group_value(stored)
            record = Record(encode_group_key(group_id), value, (), now)
            queued.append(self._enqueue(_Write(index, [record], group, write.write_id)))
        return queued

    def _flush_appends(self) -> None:
        """Append every queued write, in queue order. A write queued before this call
        is appended when it returns (by this thread or by one that flushed first)."""
        with self._append_lock:
            while self._append_queue:
                self._append_now(self._append_queue.popleft())

    def _start_writes(self, writes: list[_Write]) -> None:
        """Append the queued writes and report their outcome to their groups, on a
        thread of their own (a write waits for every in-sync replica)."""
        if writes:
            threading.Thread(
                target=self._complete_writes, args=(writes,), name="group-store", daemon=True
            ).start()

    def _complete_writes(self, writes: list[_Write]) -> None:
        self._flush_appends()
        for write in writes:
            error = self._await_write(write)
            group_id = write.group.group_id if write.group is not None else "?"
            if error is not None:
                log.warning("storing the metadata of group %s failed: %s", group_id, error.message)
            with self._lock:
                group = self._groups.get(group_id)
                if group is None or group is not write.group:
                    continue  # Unloaded (or deleted) meanwhile: nobody waits for it here.
                replies = group.stored(write.write_id, store_error(error), _now_ms())
                more = self._queue_writes(group_id, group)
            _deliver(replies)
            self._start_writes(more)

    @staticmethod
    def _await(partition: Partition, result: Any) -> common_pb2.Error | None:
        waiter = Waiter(HIGH_WATERMARK | STATE)
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
            writes = self._queue_writes(group_id, group)
        _deliver(replies)
        self._start_writes(writes)
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
        writes: list[_Write] = []
        with self._lock:
            replies = []
            for group_id, group in self._groups.items():
                replies += group.tick(now)
                writes += self._queue_writes(group_id, group)
            dead = [g for g, group in self._groups.items() if group.state is gm.GroupState.DEAD]
            for group_id in dead:
                del self._groups[group_id]
        _deliver(replies)
        self._start_writes(writes)

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
        """Delete groups without members: their committed offsets and their metadata
        (tombstones, Kafka's DeleteGroups)."""
        response = broker_pb2.DeleteGroupsResponse()
        for group_id in request.group_ids:
            result = response.results.add(group_id=group_id)
            index, refusal = self._coordinating(group_id)
            if refusal is not None:
                result.error.CopyFrom(refusal)
                continue
            now = int(time.time() * 1000)
            write = None
            with self._lock:
                group = self._groups.get(group_id)
                deleted = group.delete() if group is not None else gm.GroupError.NONE
                if deleted is gm.GroupError.NONE and group is not None:
                    del self._groups[group_id]
                offsets = list(self._loaded.get(index, {}).get(group_id, {}))
                if deleted is not gm.GroupError.NON_EMPTY_GROUP:
                    tombstones = [
                        Record(encode_offset_key(group_id, topic, part), None, (), now)
                        for topic, part in offsets
                    ]
                    if group is not None:  # Its metadata too, queued after what it wrote.
                        tombstones.append(Record(encode_group_key(group_id), None, (), now))
                    if tombstones:
                        write = self._enqueue(_Write(index, tombstones))
            if deleted is gm.GroupError.NON_EMPTY_GROUP:
                result.error.CopyFrom(
                    _error(common_pb2.NON_EMPTY_GROUP, f"group {group_id!r} has members")
                )
                continue
            if write is None:
                if group is None:
                    result.error.CopyFrom(
                        _error(common_pb2.GROUP_ID_NOT_FOUND, f"group {group_id!r} does not exist")
                    )
                continue
            self._flush_appends()
            error = self._await_write(write)
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
