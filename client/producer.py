"""Producer: batches records per partition and sends them to the partition leaders.

Theory of operation
-------------------
``send`` picks a partition (an explicit one; murmur2 of the key, as Kafka's Java client;
or, for keyless records, a *sticky* partition that is kept until its batch is closed, as
in KIP-480), encodes the record straight into that partition's open batch
(``_records.BatchBuilder``) and returns a future. It blocks only to learn a new topic's
partitions or, when ``buffer_memory`` is used up, for space (both up to ``max_block_ms``).

One sender thread drains the batches. A partition's first batch is *ready* when it is
closed (full), when ``linger_ms`` passed since it was opened, or during ``flush``/
``close``. For each leader broker the sender builds one Produce request covering every
ready partition it leads (taking all of a partition's ready batches, concatenated, up to
``max_request_size``), and sends the requests to different brokers concurrently, at most
``max_in_flight_requests_per_connection`` per broker: the first on the ProduceStream
kept open to that broker, the others (while it is busy) as unary calls (``_streams``).

Ordering, retries and delivery
------------------------------
At most one request per *partition* is in flight. A batch that fails with a retriable
error (``NOT_LEADER_OR_FOLLOWER``, ``NOT_ENOUGH_REPLICAS``, a lost connection, ...) goes
back to the front of its partition's queue, the same bytes (the broker stamps the base
offset), after a backoff of ``retry_backoff_ms`` doubling to ``retry_backoff_max_ms``;
nothing later in that partition is sent before it. So records of a partition are written
in ``send`` order even across retries and with several requests in flight per broker,
with no need for idempotence. Errors that mean the metadata is stale refresh it first.
Retries stop after ``retries`` (the futures fail with the last error) or once
``delivery_timeout_ms`` has passed since the batch opened (they fail with a
``ClientTimeoutError`` that names the last error).

Idempotence (``enable_idempotence``, on by default with ``acks="all"``, as in Kafka
3.x): the producer gets a producer id and epoch from a broker (InitProducerId), and
stamps each batch, when it is first sent, with them and the sequence number of its first
record (per partition, from 0). A retry sends the same bytes, so a broker that already
appended the batch answers with the original offsets instead of writing it again: a
retry after an ambiguous failure (a timeout, a dropped connection) never duplicates. When
a batch that was given a sequence fails for good, the sequences would have a gap, so the
producer takes the next epoch of its id and starts every partition at sequence 0 again.
Without idempotence delivery is at least once: such a retry may write the records twice.
With ``acks=0`` futures complete (offset -1) when the request is sent and errors are only
logged.

Futures and callbacks
---------------------
Futures are ``concurrent.futures.Future`` objects resolving to ``RecordMetadata``. As in
Kafka's Java client, a record's future is a view of its batch's outcome: it holds the
batch and its offset delta, shares the batch's condition variable, and builds its
``RecordMetadata`` when asked. Completing a batch sets its outcome once, whatever its
record count, and notifies only the futures someone waits on or added a callback to: the
per-record cost of the producer is its throughput limit. They cannot be cancelled.
Callbacks (``callback=`` of ``send``, and ``add_done_callback``) run on the sender thread,
in offset order within a partition; they must be quick and must not call ``flush`` or
``close``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures._base import FINISHED, PENDING
from typing import Any

import grpc
from raftka.v1 import broker_pb2, common_pb2

from broker.record_batch import RECORD_BATCH_OVERHEAD, Compression
from client._brokers import Cluster, rpc_error
from client._records import BatchBuilder, Header, RecordMetadata, record_size
from client._streams import StreamPool
from client.errors import (
    ClientTimeoutError,
    InvalidMetadataError,
    NetworkError,
    RaftkaError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnknownTopicError,
    error_for,
)
from client.partitioner import partition_for_key

__all__ = ["FutureRecordMetadata", "Producer", "RecordMetadata"]

log = logging.getLogger(__name__)

_SEQUENCE_WRAP = 1 << 31
ACKS: dict[int | str, int] = {"all": -1, "-1": -1, -1: -1, "1": 1, 1: 1, "0": 0, 0: 0}
COMPRESSION_TYPES: dict[str | None, Compression] = {
    None: Compression.NONE,
    "none": Compression.NONE,
    "gzip": Compression.GZIP,
    "snappy": Compression.SNAPPY,
    "lz4": Compression.LZ4,
    "zstd": Compression.ZSTD,
}
# The gRPC deadline of a Produce call exceeds the time the leader may wait for its
# replicas (the request's timeout_ms) by this much, so its answer has time to arrive.
_RPC_MARGIN_S = 1.0
# The longest the sender sleeps with nothing to do: a bound, not a synchronisation.
_IDLE_WAIT_S = 1.0
# A Produce request unanswered for this long makes the sender look for a new leader:
# metadata is refreshed every _STALL_S while it waits, and once another broker leads one
# of its partitions the call is cancelled and its batches are retried there (with the
# same sequence numbers: the new leader answers a batch it already has as a duplicate).
# A paused or cut-off leader would otherwise hold its partitions for request_timeout_ms.
_STALL_S = 0.5

_Callback = Callable[[RecordMetadata | None, BaseException | None], Any]
_new_tuple = tuple.__new__


class FutureRecordMetadata(Future[RecordMetadata]):
    """The future ``send`` returns: a ``concurrent.futures.Future`` of one record's
    ``RecordMetadata``, read from its batch (see the module docstring).

    ``Future``'s methods (``result``, ``done``, ``add_done_callback``, and
    ``concurrent.futures.wait``) read the attributes below, which come from the batch;
    the waiter and callback lists are made on first use, when the future registers
    with its batch to be told of the outcome.
    """

    __slots__ = ("_batch", "_index", "_lists")
    _lists: tuple[list[Any], list[Callable[[Future[RecordMetadata]], object]]]

    def __init__(self, batch: _Batch, index: int):  # Not Future.__init__: nothing per record.
        self._batch = batch
        self._index = index

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        return self._batch.condition

    @property
    def _state(self) -> str:  # type: ignore[override]
        return FINISHED if self._batch.done else PENDING

    @property
    def _result(self) -> RecordMetadata | None:  # type: ignore[override]
        batch = self._batch
        return batch.metadata(self._index) if batch.done and batch.error is None else None

    @property
    def _exception(self) -> BaseException | None:  # type: ignore[override]
        return self._batch.error

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        return self._observed()[0]

    @property
    def _done_callbacks(self) -> list[Callable[[Future[RecordMetadata]], object]]:
        return self._observed()[1]

    def _observed(self) -> tuple[list[Any], list[Callable[[Future[RecordMetadata]], object]]]:
        """This future's waiters and callbacks; the first call (always under the batch's
        condition, as ``Future`` takes it) registers the future with its batch."""
        try:
            return self._lists
        except AttributeError:
            lists: tuple[list[Any], list[Callable[[Future[RecordMetadata]], object]]] = ([], [])
            self._lists = lists
            self._batch.observed.append(self)
            return lists

    def cancel(self) -> bool:
        """A record handed to the producer cannot be taken back: always False."""
        return False


class _Batch:
    """One producer batch of one partition, its records' timestamps and callbacks, and
    (once done) its outcome: a base offset and log append time, or an error."""

    __slots__ = (
        "topic",
        "partition",
        "builder",
        "timestamps",
        "callbacks",
        "observed",
        "condition",
        "created_s",
        "reserved_bytes",
        "attempts",
        "retry_at_s",
        "alone",
        "done",
        "base_offset",
        "append_time_ms",
        "error",
        "last_error",
        "sequenced",
    )

    def __init__(self, topic: str, partition: int, builder: BatchBuilder, reserved: int):
        self.topic = topic
        self.partition = partition
        self.builder = builder
        self.timestamps: list[int] = []
        self.sequenced = False  # Given sequence numbers (idempotence) when first sent.
        self.callbacks: list[tuple[int, _Callback]] = []
        # Futures someone waits on or added a callback to (see FutureRecordMetadata).
        self.observed: list[FutureRecordMetadata] = []
        self.condition = threading.Condition()
        self.created_s = time.monotonic()
        self.reserved_bytes = reserved
        self.attempts = 0
        self.retry_at_s = 0.0
        self.alone = False  # Send without other batches of its partition (after too-large).
        self.done = False
        self.base_offset = -1  # -1 with acks=0.
        self.append_time_ms = -1  # -1 for CreateTime.
        self.error: BaseException | None = None
        self.last_error: RaftkaError | None = None

    @property
    def record_count(self) -> int:
        return len(self.timestamps)

    def metadata(self, index: int) -> RecordMetadata:
        """The ``RecordMetadata`` of the record at ``index`` (the batch is done, without
        error)."""
        base = self.base_offset
        append_time_ms = self.append_time_ms
        return _new_tuple(
            RecordMetadata,
            (
                self.topic,
                self.partition,
                base + index if base >= 0 else -1,
                append_time_ms if append_time_ms >= 0 else self.timestamps[index],
            ),
        )


class _PartitionQueue:
    __slots__ = ("topic", "partition", "batches", "open", "in_flight", "next_sequence")

    def __init__(self, topic: str, partition: int):
        self.topic = topic
        self.partition = partition
        self.batches: deque[_Batch] = deque()
        self.open: _Batch | None = None  # The last batch, while it takes records.
        self.in_flight = False
        self.next_sequence = 0  # Of the next batch sent (idempotence).


class _TopicState:
    __slots__ = ("queues", "sticky", "sticky_batch")

    def __init__(self, topic: str, partitions: int):
        self.queues = [_PartitionQueue(topic, p) for p in range(partitions)]
        self.sticky = -1
        self.sticky_batch: _Batch | None = None


class _Request:
    """One Produce request to one broker: partitions and their batches."""

    __slots__ = ("broker_id", "address", "parts", "size_bytes", "call", "sent_s")

    def __init__(self, broker_id: int, address: str):
        self.broker_id = broker_id
        self.address = address
        self.parts: list[tuple[_PartitionQueue, list[_Batch]]] = []
        self.size_bytes = 0
        self.call: Any = None
        self.sent_s = 0.0


# A partition's part of an answer: an error, or (base offset, log append time ms).
_Outcome = tuple[_PartitionQueue, list[_Batch], RaftkaError | tuple[int, int]]


class Producer:
    """A Kafka-style producer. Thread-safe: share one between threads.

    ``bootstrap_servers`` is one or more broker addresses (``"host:port,..."`` or a list);
    any one leads to the others. The options keep Kafka's names and defaults:

    * ``acks``: ``"all"``/-1 (every in-sync replica, at least min.insync.replicas), 1 (the
      leader), 0 (no answer awaited).
    * ``linger_ms``: how long a batch waits for more records before it is sent.
    * ``batch_size``: bytes per partition batch (uncompressed size, header included).
    * ``compression_type``: None, ``"gzip"``, ``"snappy"``, ``"lz4"`` or ``"zstd"``.
    * ``retries``, ``retry_backoff_ms``, ``retry_backoff_max_ms``, ``delivery_timeout_ms``:
      see the module docstring. ``request_timeout_ms`` bounds each request.
    * ``max_in_flight_requests_per_connection``: Produce requests in flight per broker
      (ordering holds at any value: one request per partition is in flight).
    * ``buffer_memory``, ``max_block_ms``: bytes of batches held before ``send`` blocks,
      and how long it may block (for space or for a new topic's metadata).
    * ``max_request_size``: the largest record (in its batch) and request.
    * ``partitioner``: ``f(key, num_partitions) -> partition`` for keyed records;
      default murmur2 as Kafka's Java client.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        acks: int | str = "all",
        linger_ms: float = 5,
        batch_size: int = 16384,
        compression_type: str | None = None,
        retries: int = 2**31 - 1,
        retry_backoff_ms: int = 100,
        retry_backoff_max_ms: int = 1000,
        delivery_timeout_ms: int = 120000,
        request_timeout_ms: int = 30000,
        max_in_flight_requests_per_connection: int = 5,
        buffer_memory: int = 32 * 1024 * 1024,
        max_block_ms: int = 60000,
        max_request_size: int = 1024 * 1024,
        metadata_max_age_ms: int = 300000,
        partitioner: Callable[[bytes, int], int] | None = None,
        enable_idempotence: bool | None = None,
    ):
        if acks not in ACKS:
            raise ValueError(f"acks must be 'all', -1, 0 or 1, not {acks!r}")
        if enable_idempotence and ACKS[acks] != -1:
            raise ValueError("enable_idempotence needs acks='all', as in Kafka")
        if compression_type not in COMPRESSION_TYPES:
            names = ", ".join(repr(c) for c in COMPRESSION_TYPES if c)
            raise ValueError(f"compression_type must be None or one of {names}")
        _check_positive(
            batch_size=batch_size,
            request_timeout_ms=request_timeout_ms,
            max_in_flight_requests_per_connection=max_in_flight_requests_per_connection,
            buffer_memory=buffer_memory,
            max_request_size=max_request_size,
        )
        if linger_ms < 0 or retries < 0 or max_block_ms < 0 or retry_backoff_ms < 0:
            raise ValueError("linger_ms, retries, max_block_ms and retry_backoff_ms must be >= 0")
        if delivery_timeout_ms < linger_ms + request_timeout_ms:
            raise ValueError(
                "delivery_timeout_ms must be at least linger_ms + request_timeout_ms "
                f"({linger_ms + request_timeout_ms}), as in Kafka"
            )
        self.acks = ACKS[acks]
        # Kafka 3.x: on by default, unless acks says otherwise.
        self.idempotent = self.acks == -1 if enable_idempotence is None else enable_idempotence
        self.producer_id = -1
        self.producer_epoch = -1
        self._new_epoch_needed = False
        self.compression = COMPRESSION_TYPES[compression_type]
        self._linger_s = linger_ms / 1000
        self._batch_size = batch_size
        self._retries = retries
        self._backoff_s = (
            retry_backoff_ms / 1000,
            max(retry_backoff_max_ms, retry_backoff_ms) / 1000,
        )
        self._delivery_timeout_s = delivery_timeout_ms / 1000
        self._request_timeout_ms = request_timeout_ms
        self._max_in_flight = max_in_flight_requests_per_connection
        self._buffer_memory = buffer_memory
        self._max_block_s = max_block_ms / 1000
        self._max_request_size = max_request_size
        self._partitioner = partitioner
        self._cluster = Cluster(
            bootstrap_servers,
            request_timeout_ms=request_timeout_ms,
            retry_backoff_ms=retry_backoff_ms,
            retry_backoff_max_ms=retry_backoff_max_ms,
            metadata_max_age_ms=metadata_max_age_ms,
        )
        # Requests go on a ProduceStream per broker when it is free (client/_streams.py).
        self._streams = StreamPool(lambda a: self._cluster.stub(a), "ProduceStream", "Produce")
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)  # The sender waits on it.
        self._space = threading.Condition(self._lock)  # send() waits for buffer space.
        self._progress = threading.Condition(self._lock)  # flush() waits for batches.
        self._topics: dict[str, _TopicState] = {}
        self._nonempty: dict[_PartitionQueue, None] = {}  # Queues holding batches, in order.
        self._incomplete: set[_Batch] = set()
        self._buffered_bytes = 0
        self._space_waiters = 0
        self._flushing = 0
        self._responses: deque[_Request] = deque()
        self._broker_in_flight: dict[int, int] = {}
        self._requests_in_flight: set[_Request] = set()
        self._stall_refresh_s = 0.0  # When stalled requests last asked for metadata.
        self._closing = False
        self._aborting = False
        self._view_seen = self._cluster.view
        self._sender = threading.Thread(target=self._run, name="raftka-producer", daemon=True)
        self._sender.start()

    # -- public API ----------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[Header] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        callback: _Callback | None = None,
    ) -> FutureRecordMetadata:
        """Queue a record for ``topic``; return a future of its ``RecordMetadata``.

        ``value`` and ``key`` are bytes (or None: a null key, or a tombstone value);
        ``headers`` a sequence of ``(str, bytes | None)``. ``callback(metadata,
        exception)`` runs on the sender thread when the record is delivered or failed.
        Raises ``TypeError``/``ValueError`` for bad arguments, ``RecordTooLargeError``
        for a record over ``max_request_size``, ``ClientTimeoutError`` when the topic's
        metadata or buffer space did not come within ``max_block_ms``, and
        ``RuntimeError`` after ``close``.
        """
        if value is not None and type(value) is not bytes:
            value = _as_bytes(value, "value")
        if key is not None and type(key) is not bytes:
            key = _as_bytes(key, "key")
        if headers:
            headers = _check_headers(headers)
        record_bytes = (len(value) if value else 0) + (len(key) if key else 0) + 21
        if headers or record_bytes + RECORD_BATCH_OVERHEAD > self._max_request_size:
            record_bytes = record_size(key, value, headers or ())
            self._check_record_size(record_bytes)
        if timestamp_ms is None:
            timestamp_ms = time.time_ns() // 1_000_000
        if partition is not None and (type(partition) is not int or partition < 0):
            raise ValueError(f"partition must be an int >= 0, not {partition!r}")
        state = self._topics.get(topic)
        if state is None:
            if self._closing:
                raise RuntimeError("cannot send: the producer is closed")
            state = self._add_topic(topic)
        if partition is None:
            if key is not None:
                partition = self._partition_for_key(key, len(state.queues))
        elif partition >= len(state.queues):
            self._check_partition(topic, state, partition)
        with self._lock:
            if self._closing:
                raise RuntimeError("cannot send: the producer is closed")
            sticky = partition is None
            if partition is None:
                partition = state.sticky
                if partition < 0 or (
                    state.sticky_batch is not None
                    and state.sticky_batch is not state.queues[partition].open
                ):
                    partition = self._next_sticky_partition(topic, state)
            queue = state.queues[partition]
            batch = queue.open
            if batch is None or batch.builder.try_append(timestamp_ms, key, value, headers) < 0:
                batch = self._append_to_new_batch(
                    queue, record_bytes, timestamp_ms, key, value, headers
                )
            if sticky and state.sticky_batch is None:
                state.sticky_batch = batch
            timestamps = batch.timestamps
            future = FutureRecordMetadata(batch, len(timestamps))
            timestamps.append(timestamp_ms)
            if callback is not None:
                batch.callbacks.append((future._index, callback))
            if batch.builder.is_full:
                queue.open = None
                self._wakeup.notify()
            return future

    def flush(self, timeout: float | None = None) -> None:
        """Send every record queued so far at once (ignoring ``linger_ms``) and wait
        until each is delivered or failed. Raises ``ClientTimeoutError`` after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            pending = set(self._incomplete)
            self._flushing += 1
            self._wakeup.notify()
            try:
                while pending:
                    pending = {b for b in pending if not b.done}
                    if not pending:
                        break
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise ClientTimeoutError(
                            common_pb2.REQUEST_TIMED_OUT,
                            f"flush: {sum(b.record_count for b in pending)} record(s) "
                            f"not delivered after {timeout} s",
                        )
                    self._progress.wait(remaining)
            finally:
                self._flushing -= 1

    def close(self, timeout: float | None = None) -> None:
        """Refuse new records, deliver the queued ones (up to ``timeout`` seconds), then
        stop. Records still undelivered at the timeout fail with ``ClientTimeoutError``.
        Idempotent."""
        with self._lock:
            self._closing = True
            self._wakeup.notify()
        self._sender.join(timeout)
        if self._sender.is_alive():
            with self._lock:
                self._aborting = True
                calls = [r.call for r in self._requests_in_flight if r.call is not None]
                self._wakeup.notify()
            for call in calls:
                call.cancel()
            # Queued batches fail at once and in-flight calls are cancelled, so this is
            # quick unless a metadata refresh is under way (bounded by its timeout).
            self._sender.join(self._request_timeout_ms / 1000 + _RPC_MARGIN_S)
        self._streams.close()
        self._cluster.close()

    def partitions_for(self, topic: str) -> list[int]:
        """The topic's partition numbers (waits up to ``max_block_ms`` for metadata)."""
        return list(range(len(self._cluster.wait_for_topic(topic, self._max_block_s))))

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- send() helpers --------------------------------------------------------

    def _partition_for_key(self, key: bytes, count: int) -> int:
        if self._partitioner is None:
            return partition_for_key(key, count)
        partition = self._partitioner(key, count)
        if type(partition) is not int or not 0 <= partition < count:
            raise ValueError(f"the partitioner chose {partition!r}, not in 0..{count - 1}")
        return partition

    def _check_record_size(self, record_bytes: int) -> None:
        if record_bytes + RECORD_BATCH_OVERHEAD > self._max_request_size:
            raise RecordTooLargeError(
                common_pb2.MESSAGE_TOO_LARGE,
                f"the record takes {record_bytes + RECORD_BATCH_OVERHEAD} bytes in its batch, "
                f"more than max_request_size ({self._max_request_size})",
            )
        if record_bytes > self._buffer_memory:
            raise RecordTooLargeError(
                common_pb2.MESSAGE_TOO_LARGE,
                f"the record takes {record_bytes} bytes, more than buffer_memory "
                f"({self._buffer_memory})",
            )

    def _add_topic(self, topic: str) -> _TopicState:
        if not isinstance(topic, str) or not topic:
            raise TypeError(f"topic must be a non-empty str, not {topic!r}")
        partitions = self._cluster.wait_for_topic(topic, self._max_block_s)
        with self._lock:
            state = self._topics.get(topic)
            if state is None:
                state = self._topics[topic] = _TopicState(topic, len(partitions))
            return state

    def _check_partition(self, topic: str, state: _TopicState, partition: int) -> None:
        """A partition beyond those known: refresh, as the topic may have grown."""
        self._cluster.request_update()
        try:
            self._cluster.update(timeout_s=self._max_block_s)
        except RaftkaError as e:
            log.debug("metadata refresh for %s failed: %s", topic, e)
        self._grow_topics()
        if partition >= len(state.queues):
            raise UnknownTopicError(
                common_pb2.UNKNOWN_TOPIC_OR_PARTITION,
                f"partition {partition} of {topic!r} does not exist: "
                f"it has {len(state.queues)} partitions",
            )

    def _next_sticky_partition(self, topic: str, state: _TopicState) -> int:
        """Kafka's sticky partitioning (KIP-480): keyless records stay on one partition
        until the batch they were filling is closed (``send`` checks that); then they
        move to another partition that has a leader, at random."""
        count = len(state.queues)
        leaders = self._cluster.view.partitions(topic) or ()
        available = [p for p, leader in enumerate(leaders[:count]) if leader.leader >= 0]
        choices = [p for p in (available or range(count)) if p != state.sticky] or [state.sticky]
        state.sticky = random.choice(choices)
        state.sticky_batch = None
        return state.sticky

    def _append_to_new_batch(
        self,
        queue: _PartitionQueue,
        record_bytes: int,
        timestamp_ms: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[Header] | None,
    ) -> _Batch:
        """Close the partition's open batch and start one with this record (under the
        lock). Waits for buffer space, releasing the lock, up to ``max_block_ms``."""
        reserve = max(self._batch_size, record_bytes + RECORD_BATCH_OVERHEAD)
        deadline = time.monotonic() + self._max_block_s
        if queue.open is not None:  # It has no room for this record: close it.
            queue.open = None
            self._wakeup.notify()
        while self._buffered_bytes + reserve > self._buffer_memory:
            remaining = deadline - time.monotonic()
            if self._closing:
                raise RuntimeError("cannot send: the producer is closed")
            if remaining <= 0:
                raise ClientTimeoutError(
                    common_pb2.REQUEST_TIMED_OUT,
                    f"no buffer space for the record within {self._max_block_s * 1000:.0f} ms "
                    f"(buffer_memory {self._buffer_memory} bytes in use)",
                )
            self._space_waiters += 1
            try:
                self._space.wait(remaining)
            finally:
                self._space_waiters -= 1
            open_batch = queue.open
            if open_batch is not None:
                # Another thread opened a batch while we waited: it may have room.
                if open_batch.builder.try_append(timestamp_ms, key, value, headers) >= 0:
                    return open_batch
                queue.open = None
        builder = BatchBuilder(self.compression, self._batch_size)
        batch = _Batch(queue.topic, queue.partition, builder, reserve)
        builder.try_append(timestamp_ms, key, value, headers)
        self._buffered_bytes += reserve
        self._incomplete.add(batch)
        queue.batches.append(batch)
        queue.open = batch
        if queue not in self._nonempty:
            self._nonempty[queue] = None
        self._wakeup.notify()
        return batch

    # -- the sender thread ------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._run_once():
                pass
        except BaseException as e:  # A bug here must not leave futures pending forever.
            log.exception("the producer's sender thread failed")
            with self._lock:
                self._closing = True
                batches = list(self._incomplete)
            failure = RaftkaError(common_pb2.UNKNOWN_SERVER_ERROR, f"producer sender failed: {e}")
            for batch in batches:
                self._finish(batch, failure)
            self._release(batches)

    def _run_once(self) -> bool:
        """One round: refresh metadata if due, handle answers, expire, send. False at
        the end of ``close``."""
        self._cluster.maybe_update()
        self._streams.sweep(time.monotonic())
        self._check_stalled(time.monotonic())
        if self.idempotent and (self.producer_id < 0 or self._new_epoch_needed):
            if self._nonempty and not self._init_producer_id():
                with self._lock:
                    self._wakeup.wait(self._backoff_s[0])
                return not (self._closing and (self._aborting or not self._incomplete))
        with self._lock:
            while True:
                if (
                    self.idempotent
                    and (self.producer_id < 0 or self._new_epoch_needed)
                    and self._nonempty
                ):
                    return True  # Get the producer id (or epoch) first, outside the lock.
                if self._cluster.view is not self._view_seen:
                    self._grow_topics_locked()
                now = time.monotonic()
                responses = list(self._responses)
                self._responses.clear()
                expired, requests, wake_at = self._collect(now)
                if responses or expired or requests:
                    break
                if self._closing and (self._aborting or not self._incomplete):
                    if not self._requests_in_flight:
                        return False
                if self._cluster.update_due():
                    return True
                if self._requests_in_flight:
                    # Back to the top to look for a new leader when a request stalls.
                    stall_at = max(
                        min(r.sent_s for r in self._requests_in_flight) + _STALL_S,
                        self._stall_refresh_s + _STALL_S,
                    )
                    if now >= stall_at:
                        return True
                    wake_at = min(wake_at, stall_at)
                self._wakeup.wait(max(0.0, min(wake_at - now, _IDLE_WAIT_S)))
        for request in responses:
            self._handle_answer(request)
        for batch, error in expired:
            self._finish(batch, error)
            self._release([batch])
        for request in requests:
            self._send(request)
        return True

    def _check_stalled(self, now: float) -> None:
        """Cancel in-flight requests whose partitions another broker now leads; while
        any request has been waiting for ``_STALL_S``, keep the metadata fresh."""
        with self._lock:
            stalled = [
                r for r in self._requests_in_flight if r.sent_s and now - r.sent_s >= _STALL_S
            ]
        if not stalled:
            return
        view = self._cluster.view
        for request in stalled:
            for queue, _ in request.parts:
                leader = view.leader(queue.topic, queue.partition)
                if leader is not None and leader.leader >= 0 and leader.leader != request.broker_id:
                    log.info(
                        "%s-%d is now led by broker %d: cancelling the request to broker %d",
                        queue.topic,
                        queue.partition,
                        leader.leader,
                        request.broker_id,
                    )
                    request.call.cancel()  # Answered as a network error: retried.
                    break
        if now - self._stall_refresh_s >= _STALL_S:
            self._stall_refresh_s = now
            oldest = min(stalled, key=lambda r: r.sent_s)
            self._cluster.request_update(avoid=oldest.address)

    def _collect(
        self, now: float
    ) -> tuple[list[tuple[_Batch, RaftkaError]], list[_Request], float]:
        """Under the lock: batches past their delivery timeout, the requests to send now,
        and when to look again."""
        expired: list[tuple[_Batch, RaftkaError]] = []
        requests: dict[int, _Request] = {}
        wake_at = now + _IDLE_WAIT_S
        view = self._cluster.view
        final = self._flushing > 0 or self._closing
        for queue in list(self._nonempty):
            if queue.in_flight:
                continue
            batches = queue.batches
            while batches and (
                self._aborting or now - batches[0].created_s >= self._delivery_timeout_s
            ):
                batch = batches.popleft()
                if batch is queue.open:
                    queue.open = None
                expired.append((batch, self._expiry_error(batch, now)))
            if not batches:
                del self._nonempty[queue]
                continue
            first = batches[0]
            if first.retry_at_s > now:
                wake_at = min(wake_at, first.retry_at_s)
                continue
            if first is queue.open and not final and now < first.created_s + self._linger_s:
                wake_at = min(wake_at, first.created_s + self._linger_s)
                continue
            leader = view.leader_address(queue.topic, queue.partition)
            if leader is None:
                first.last_error = first.last_error or error_for(
                    view.topic_errors.get(queue.topic, common_pb2.LEADER_NOT_AVAILABLE),
                    f"no leader known for {queue.topic}-{queue.partition}",
                )
                self._cluster.request_update()
                wake_at = min(wake_at, now + self._backoff_s[0])
                continue
            broker_id, address = leader
            request = requests.get(broker_id)
            if request is None:
                if self._broker_in_flight.get(broker_id, 0) >= self._max_in_flight:
                    continue  # An answer from that broker wakes us.
                request = requests[broker_id] = _Request(broker_id, address)
            if request.parts and request.size_bytes + first.builder.size_bytes > (
                self._max_request_size
            ):
                wake_at = now  # Full: another request to that broker can go next round.
                continue
            request.parts.append((queue, self._drain(queue, request, now, final)))
            queue.in_flight = True
        for request in requests.values():
            self._broker_in_flight[request.broker_id] = (
                self._broker_in_flight.get(request.broker_id, 0) + 1
            )
            self._requests_in_flight.add(request)
        return expired, list(requests.values()), wake_at

    def _drain(
        self, queue: _PartitionQueue, request: _Request, now: float, final: bool
    ) -> list[_Batch]:
        """Take the partition's ready batches from the front, within the request size."""
        taken: list[_Batch] = []
        batches = queue.batches
        while batches:
            batch = batches[0]
            size = batch.builder.size_bytes
            if taken and (
                batch.alone
                or taken[0].alone
                or batch.retry_at_s > now
                or request.size_bytes + size > self._max_request_size
                or (batch is queue.open and not final and now < batch.created_s + self._linger_s)
            ):
                break
            batches.popleft()
            if batch is queue.open:
                queue.open = None
            taken.append(batch)
            request.size_bytes += size
        if not batches:
            del self._nonempty[queue]
        return taken

    def _build(self, queue: _PartitionQueue, batch: _Batch) -> bytes:
        """The batch's bytes; the first time, stamped with the producer id, epoch and
        the partition's next sequence when idempotent (a retry resends them as is)."""
        builder = batch.builder
        if not self.idempotent or builder.is_built:
            return builder.build()
        sequence = queue.next_sequence
        queue.next_sequence = (sequence + builder.record_count) % _SEQUENCE_WRAP
        batch.sequenced = True
        return builder.build(self.producer_id, self.producer_epoch, sequence)

    def _init_producer_id(self) -> bool:
        """Get a producer id (or the next epoch of ours) from any broker; False if none
        answered, to be tried again."""
        request = broker_pb2.InitProducerIdRequest(
            producer_id=self.producer_id, producer_epoch=self.producer_epoch
        )
        for address in self._cluster.addresses():
            try:
                response = self._cluster.stub(address).InitProducerId(
                    request, timeout=self._request_timeout_ms / 1000
                )
            except grpc.RpcError as exc:
                log.debug("InitProducerId at %s failed: %s", address, exc)
                continue
            if response.error.code != common_pb2.NONE:
                log.warning("InitProducerId at %s: %s", address, response.error.message)
                continue
            with self._lock:
                new_id = response.producer_id != self.producer_id
                self.producer_id = response.producer_id
                self.producer_epoch = response.producer_epoch
                self._new_epoch_needed = False
                # A new id or epoch starts every partition's sequence again at 0.
                for state in self._topics.values():
                    for queue in state.queues:
                        queue.next_sequence = 0
            log.info(
                "producer %s %d at epoch %d",
                "id" if new_id else "bumped",
                self.producer_id,
                self.producer_epoch,
            )
            return True
        return False

    def _expiry_error(self, batch: _Batch, now: float) -> RaftkaError:
        if self._aborting:
            return ClientTimeoutError(
                common_pb2.REQUEST_TIMED_OUT, "the producer was closed before delivery"
            )
        last = f"; last error: {batch.last_error}" if batch.last_error else ""
        return ClientTimeoutError(
            common_pb2.REQUEST_TIMED_OUT,
            f"{batch.record_count} record(s) for {batch.topic}-{batch.partition} expired: "
            f"{(now - batch.created_s) * 1000:.0f} ms since the batch was created "
            f"(delivery_timeout_ms {self._delivery_timeout_s * 1000:.0f}){last}",
        )

    def _send(self, request: _Request) -> None:
        by_topic: dict[str, list[broker_pb2.PartitionProduceData]] = {}
        for queue, batches in request.parts:
            records = b"".join(self._build(queue, b) for b in batches)
            by_topic.setdefault(queue.topic, []).append(
                broker_pb2.PartitionProduceData(partition=queue.partition, records=records)
            )
        message = broker_pb2.ProduceRequest(
            acks=self.acks,
            timeout_ms=self._request_timeout_ms,
            topics=[
                broker_pb2.TopicProduceData(topic=topic, partitions=parts)
                for topic, parts in by_topic.items()
            ],
        )
        timeout_s = self._request_timeout_ms / 1000 + _RPC_MARGIN_S
        try:
            call = self._streams.call(request.address, message, timeout_s)
        except Exception as e:  # The channel is closed, or cannot be opened.
            request.call = _FailedCall(e)
            self._on_done(request)
            return
        request.sent_s = time.monotonic()
        request.call = call
        if self.acks == 0:
            for _, batches in request.parts:
                for batch in batches:
                    self._complete(batch, -1, -1)
        call.add_done_callback(lambda _call: self._on_done(request))

    def _on_done(self, request: _Request) -> None:
        """Called on a gRPC thread: hand the answer to the sender."""
        with self._lock:
            self._responses.append(request)
            self._wakeup.notify()

    def _handle_answer(self, request: _Request) -> None:
        outcomes: list[_Outcome]
        try:
            response = request.call.result()
        except grpc.RpcError as exc:
            error = rpc_error(exc, f"Produce to broker {request.broker_id} at {request.address}")
            outcomes = [(queue, batches, error) for queue, batches in request.parts]
        except (concurrent.futures.CancelledError, grpc.FutureCancelledError):
            error = NetworkError(f"Produce to broker {request.broker_id}: cancelled")
            outcomes = [(queue, batches, error) for queue, batches in request.parts]
        except Exception as exc:
            error = RaftkaError(common_pb2.UNKNOWN_SERVER_ERROR, f"Produce: {exc}")
            outcomes = [(queue, batches, error) for queue, batches in request.parts]
        else:
            outcomes = self._outcomes(request, response)
        retry: list[tuple[_PartitionQueue, list[_Batch]]] = []
        finished: list[_Batch] = []
        now = time.monotonic()
        for queue, batches, outcome in outcomes:
            if isinstance(outcome, RaftkaError):
                again = self._retry_or_fail(batches, outcome, now)
                if again:
                    retry.append((queue, again))
                finished += [b for b in batches if b.done]
            else:
                base_offset, append_time_ms = outcome
                if self.acks != 0:
                    for batch in batches:
                        self._complete(batch, base_offset, append_time_ms)
                        base_offset += batch.builder.record_count
                finished += batches
        with self._lock:
            self._requests_in_flight.discard(request)
            self._broker_in_flight[request.broker_id] -= 1
            for queue, _ in request.parts:
                queue.in_flight = False
            for queue, batches in retry:
                queue.batches.extendleft(reversed(batches))
                if queue not in self._nonempty:
                    self._nonempty[queue] = None
        self._release(finished)

    def _outcomes(self, request: _Request, response: broker_pb2.ProduceResponse) -> list[_Outcome]:
        answers = {(t.topic, p.partition): p for t in response.topics for p in t.partitions}
        outcomes: list[_Outcome] = []
        for queue, batches in request.parts:
            answer = answers.get((queue.topic, queue.partition))
            outcome: RaftkaError | tuple[int, int]
            if answer is None:
                outcome = RaftkaError(
                    common_pb2.UNKNOWN_SERVER_ERROR,
                    f"broker {request.broker_id} did not answer for "
                    f"{queue.topic}-{queue.partition}",
                )
            elif answer.error.code != common_pb2.NONE:
                outcome = error_for(
                    answer.error.code,
                    f"{queue.topic}-{queue.partition} at broker {request.broker_id}"
                    + (f": {answer.error.message}" if answer.error.message else ""),
                )
                if answer.HasField("current_leader") and answer.current_leader.leader_id >= 0:
                    self._cluster.note_leader(
                        queue.topic,
                        queue.partition,
                        answer.current_leader.leader_id,
                        answer.current_leader.leader_epoch,
                    )
            else:
                outcome = (answer.base_offset, answer.log_append_time_ms)
            outcomes.append((queue, batches, outcome))
        return outcomes

    def _retry_or_fail(self, batches: list[_Batch], error: RaftkaError, now: float) -> list[_Batch]:
        """Fail the batches that cannot be retried; return the others, scheduled."""
        if isinstance(error, InvalidMetadataError):
            self._cluster.request_update()
        too_large = isinstance(error, RecordTooLargeError | RecordListTooLargeError)
        if too_large and len(batches) > 1:
            # The broker refused the batches together: send each on its own.
            for batch in batches:
                batch.alone = True
            return batches
        again = []
        for batch in batches:
            batch.last_error = error
            backoff_s = min(self._backoff_s[0] * 2**batch.attempts, self._backoff_s[1])
            retry_at = now + backoff_s * random.uniform(0.8, 1.2)
            if self._aborting:
                self._finish(batch, self._expiry_error(batch, now))
            elif self.acks == 0:
                log.warning(
                    "acks=0 produce to %s-%s failed: %s", batch.topic, batch.partition, error
                )
                self._finish(batch, error)
            elif not error.retriable or batch.attempts >= self._retries:
                self._finish(batch, error)
            elif retry_at - batch.created_s >= self._delivery_timeout_s:
                self._finish(batch, self._expiry_error(batch, now))
            else:
                batch.attempts += 1
                batch.retry_at_s = retry_at
                again.append(batch)
        return again

    # -- completing futures -------------------------------------------------------

    def _complete(self, batch: _Batch, base_offset: int, append_time_ms: int) -> None:
        """Resolve the batch's futures with their offsets (-1 with acks=0)."""
        if batch.done:
            return
        with batch.condition:
            batch.base_offset = base_offset
            batch.append_time_ms = append_time_ms
            batch.done = True
            observed = list(batch.observed)
            for future in observed:
                for waiter in future._waiters:
                    waiter.add_result(future)
            batch.condition.notify_all()
        self._run_callbacks(batch, observed, None)

    def _finish(self, batch: _Batch, error: BaseException) -> None:
        """Fail the batch's futures with ``error`` (each gets the same exception)."""
        if batch.done:
            return
        if batch.sequenced:
            # Its sequence numbers will never be written: later batches of the
            # partition would leave a gap. Start a new epoch before sending more.
            self._new_epoch_needed = True
        with batch.condition:
            batch.error = error
            batch.done = True
            observed = list(batch.observed)
            for future in observed:
                for waiter in future._waiters:
                    waiter.add_exception(future)
            batch.condition.notify_all()
        self._run_callbacks(batch, observed, error)

    def _run_callbacks(
        self, batch: _Batch, observed: list[FutureRecordMetadata], error: BaseException | None
    ) -> None:
        for future in observed:
            for fn in future._done_callbacks:
                try:
                    fn(future)
                except Exception:
                    log.exception("a future's done callback raised")
        for index, callback in batch.callbacks:
            try:
                callback(None if error else batch.metadata(index), error)
            except Exception:
                log.exception("a send() callback raised")

    def _release(self, batches: list[_Batch]) -> None:
        """Give back the buffer space of done batches and wake whoever waits for it."""
        done = [b for b in batches if b.done]
        if not done:
            return
        with self._lock:
            for batch in done:
                if batch in self._incomplete:
                    self._incomplete.discard(batch)
                    self._buffered_bytes -= batch.reserved_bytes
                    batch.builder.discard()  # Its futures keep the batch, not its bytes.
            if self._space_waiters:
                self._space.notify_all()
            if self._flushing:
                self._progress.notify_all()

    # -- metadata -------------------------------------------------------------------

    def _grow_topics(self) -> None:
        with self._lock:
            self._grow_topics_locked()

    def _grow_topics_locked(self) -> None:
        """Add queues for partitions a topic gained since it was first seen."""
        view = self._view_seen = self._cluster.view
        for topic, state in self._topics.items():
            partitions = view.partitions(topic)
            if partitions is not None and len(partitions) > len(state.queues):
                state.queues += [
                    _PartitionQueue(topic, p) for p in range(len(state.queues), len(partitions))
                ]


class _FailedCall:
    """Stands in for a gRPC call that could not even be started."""

    def __init__(self, error: Exception):
        self._error = error

    def result(self) -> Any:
        raise self._error

    def cancel(self) -> bool:
        return False


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    hint = " (encode a str first, e.g. value.encode())" if isinstance(value, str) else ""
    raise TypeError(f"{what} must be bytes or None, not {type(value).__name__}{hint}")


def _check_headers(headers: Sequence[Header]) -> list[Header]:
    checked = []
    for item in headers:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise TypeError(f"a header must be a (str, bytes | None) pair, not {item!r}")
        name, value = item
        if not isinstance(name, str):
            raise TypeError(f"header names must be str, not {type(name).__name__}")
        if value is not None and type(value) is not bytes:
            value = _as_bytes(value, f"header {name!r}")
        checked.append((name, value))
    return checked


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, not {value!r}")
