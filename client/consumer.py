"""Consumer: reads assigned partitions from their leaders, with seek and offset lookups.

Theory of operation
-------------------
The consumer is driven by ``poll`` on the caller's thread, like Kafka's. Each partition
has a *position* (the offset of the next record ``poll`` returns) and a *fetch offset*
(where its next Fetch starts); they differ while fetched records wait in the buffer.

``poll`` keeps one Fetch in flight per leader broker (on a FetchStream to it,
``_streams``), covering every partition of that broker that may be fetched: it has a
position, its leader is known, no fetch for it is under way, and at most one fetched
answer of it waits in the buffer. When an answer arrives the partition's fetch offset
moves past its last whole batch (a header walk, ``_records.scan_next_offset``) and the
next Fetch goes out at once, so the network works while ``poll`` decodes the answer
before it, and while the application processes records. Records are decoded a batch at
a time as ``poll`` takes them (``_records.FetchedRecords``), at most ``max_poll_records``
per call.

Errors, per partition: NOT_LEADER_OR_FOLLOWER, FENCED_LEADER_EPOCH, UNKNOWN_LEADER_EPOCH,
LEADER_NOT_AVAILABLE, UNKNOWN_TOPIC_OR_PARTITION, KAFKA_STORAGE_ERROR and lost
connections refresh the metadata and retry after a backoff, at the new leader.
OFFSET_OUT_OF_RANGE (the position fell outside [log start, high watermark], e.g. after
retention) resets the position by ``auto_offset_reset`` ("earliest", "latest"), or
raises ``OffsetOutOfRangeError`` from ``poll`` with "none". Answers to fetches made
before a ``seek`` are dropped (each partition counts its seeks).

Consumer groups. With a ``group_id``, partitions come either from ``assign`` (the
consumer picks them; commits carry no generation, as Kafka's) or from ``subscribe``: the
group's members share the partitions of the subscribed topics, and ``poll`` takes part
in the group's rebalances (``_membership``: join, sync, heartbeats from a background
thread, rebalance listener callbacks). Either way newly assigned partitions start at the
group's committed offset, else by ``auto_offset_reset``, and ``commit`` (or auto commit,
every ``auto_commit_interval_ms`` from ``poll``, before partitions are given up, and on
``close``) stores positions; a member's commits carry its member id and generation.
``assign`` and ``subscribe`` are mutually exclusive until ``unsubscribe``.

Not thread-safe, as in Kafka: use a consumer from one thread at a time.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import grpc
from raftka.v1 import broker_pb2, common_pb2

from broker.group.assignors import ASSIGNORS
from client._brokers import Cluster, TopicPartition, rpc_error
from client._membership import (
    Callback,
    ConsumerGroupMetadata,
    ConsumerHooks,
    ConsumerRebalanceListener,
    GroupMembership,
    MembershipConfig,
    make_listener,
)
from client._records import ConsumerRecord, FetchedRecords, scan_next_offset
from client._streams import StreamPool
from client.errors import (
    ClientTimeoutError,
    InvalidMetadataError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    RaftkaError,
    error_for,
)
from client.groups import GroupClient

__all__ = [
    "Consumer",
    "ConsumerGroupMetadata",
    "ConsumerRebalanceListener",
    "ConsumerRecord",
    "OffsetAndTimestamp",
    "TopicPartition",
]

log = logging.getLogger(__name__)

EARLIEST = -2  # ListOffsets timestamps with a meaning of their own.
LATEST = -1
_RESETS = {"earliest": EARLIEST, "latest": LATEST, "none": None}
# The gRPC deadline of a Fetch is its long-poll wait plus this allowance for the answer.
_FETCH_MARGIN_S = 5.0
# The least time poll() gives a pending position reset (a ListOffsets round trip).
_RESET_MIN_S = 0.5
_generations = itertools.count()
_client_ids = itertools.count(1)


class OffsetAndTimestamp(NamedTuple):
    offset: int
    timestamp: int


class _PartitionState:
    """What the consumer knows of one assigned partition."""

    __slots__ = (
        "position",
        "reset",
        "fetch_offset",
        "chunks",
        "in_flight",
        "generation",
        "retry_at_s",
        "high_watermark",
        "drain_first",
        "checked",
    )

    def __init__(self, reset: int | None):
        self.position: int | None = None
        self.reset = reset  # EARLIEST or LATEST while a lookup is pending, else None.
        self.fetch_offset = -1
        self.chunks: deque[FetchedRecords] = deque()
        self.in_flight = False
        # Changed by every seek, unique across states: older fetch answers are dropped,
        # even those for an earlier assignment of the same partition.
        self.generation = next(_generations)
        self.retry_at_s = 0.0
        self.high_watermark = -1
        self.drain_first = False  # Out of range ahead of the buffer: drain it first.
        self.checked = False  # The group's committed offset was looked up.

    def seek(self, position: int | None, reset: int | None) -> None:
        self.position = position
        self.reset = reset
        self.fetch_offset = -1 if position is None else position
        self.chunks.clear()
        self.generation = next(_generations)
        self.retry_at_s = 0.0
        self.drain_first = False


class _Fetch:
    """A Fetch in flight to one broker: which partitions, from where, at which seek."""

    __slots__ = ("broker_id", "address", "parts", "call")

    def __init__(self, broker_id: int, address: str):
        self.broker_id = broker_id
        self.address = address
        self.parts: dict[TopicPartition, tuple[int, int]] = {}  # -> (fetch offset, generation)
        self.call: Any = None


# Put in the answer queue to end poll's wait: a group answer came, or a rebalance is due.
_WAKE = _Fetch(-1, "")


class Consumer:
    """A Kafka-style consumer: of assigned partitions, or of a group's share of topics.

    ``bootstrap_servers`` is one or more broker addresses. Options keep Kafka's names
    and defaults: ``fetch_max_wait_ms`` and ``fetch_min_bytes`` (the long poll),
    ``fetch_max_bytes`` (per answer), ``max_partition_fetch_bytes`` (per partition; a
    batch larger than it still comes whole), ``auto_offset_reset`` ("latest",
    "earliest" or "none": where a partition without a position starts, and what an
    out-of-range position does), ``max_poll_records``, ``check_crcs`` (verify each
    batch's CRC-32C), ``consumer_timeout_ms`` (iteration stops after that long without
    records; None: never).

    Groups: ``group_id``; ``enable_auto_commit`` and ``auto_commit_interval_ms``;
    ``group_instance_id`` (static membership: a restart within the session keeps the
    member's partitions, and closing does not leave the group); ``session_timeout_ms``
    (the coordinator removes a member it has not heard from for that long);
    ``heartbeat_interval_ms``; ``max_poll_interval_ms`` (the longest time between two
    ``poll`` calls before the member leaves the group, and how long a rebalance waits
    for members to rejoin); ``partition_assignment_strategy`` (assignor names in order
    of preference: "range", "roundrobin", "sticky", "cooperative-sticky"; the group uses
    the one most members prefer among those all support); ``client_id``.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        group_id: str | None = None,
        fetch_max_wait_ms: int = 500,
        fetch_min_bytes: int = 1,
        fetch_max_bytes: int = 50 * 1024 * 1024,
        max_partition_fetch_bytes: int = 1024 * 1024,
        auto_offset_reset: str = "latest",
        max_poll_records: int = 500,
        request_timeout_ms: int = 30000,
        retry_backoff_ms: int = 100,
        retry_backoff_max_ms: int = 1000,
        metadata_max_age_ms: int = 300000,
        check_crcs: bool = True,
        consumer_timeout_ms: int | None = None,
        enable_auto_commit: bool = True,
        auto_commit_interval_ms: int = 5000,
        group_instance_id: str | None = None,
        session_timeout_ms: int = 45000,
        heartbeat_interval_ms: int = 3000,
        max_poll_interval_ms: int = 300000,
        partition_assignment_strategy: str | Sequence[str] = ("range", "cooperative-sticky"),
        client_id: str | None = None,
    ):
        if group_id is not None and (not isinstance(group_id, str) or not group_id):
            raise ValueError(f"group_id must be a non-empty string, not {group_id!r}")
        if group_instance_id is not None and (
            group_id is None or not isinstance(group_instance_id, str) or not group_instance_id
        ):
            raise ValueError("group_instance_id must be a non-empty string, with a group_id")
        strategies = (
            (partition_assignment_strategy,)
            if isinstance(partition_assignment_strategy, str)
            else tuple(partition_assignment_strategy)
        )
        unknown = [name for name in strategies if name not in ASSIGNORS]
        if not strategies or unknown:
            raise ValueError(
                f"partition_assignment_strategy must name assignors among {sorted(ASSIGNORS)}, "
                f"not {partition_assignment_strategy!r}"
            )
        if not 0 < heartbeat_interval_ms < session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be positive and below session_timeout_ms")
        if max_poll_interval_ms <= 0:
            raise ValueError(f"max_poll_interval_ms must be positive, not {max_poll_interval_ms}")
        if auto_offset_reset not in _RESETS:
            raise ValueError(
                f"auto_offset_reset must be 'earliest', 'latest' or 'none', "
                f"not {auto_offset_reset!r}"
            )
        for name, value in {
            "fetch_max_bytes": fetch_max_bytes,
            "max_partition_fetch_bytes": max_partition_fetch_bytes,
            "max_poll_records": max_poll_records,
            "request_timeout_ms": request_timeout_ms,
        }.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        if fetch_max_wait_ms < 0 or fetch_min_bytes < 0:
            raise ValueError("fetch_max_wait_ms and fetch_min_bytes must be >= 0")
        self._cluster = Cluster(
            bootstrap_servers,
            request_timeout_ms=request_timeout_ms,
            retry_backoff_ms=retry_backoff_ms,
            retry_backoff_max_ms=retry_backoff_max_ms,
            metadata_max_age_ms=metadata_max_age_ms,
        )
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._fetch_min_bytes = fetch_min_bytes
        self._fetch_max_bytes = fetch_max_bytes
        self._partition_max_bytes = max_partition_fetch_bytes
        self._default_reset = _RESETS[auto_offset_reset]
        self._max_poll_records = max_poll_records
        self._request_timeout_s = request_timeout_ms / 1000
        self._backoff_s = retry_backoff_ms / 1000
        self._check_crcs = check_crcs
        self._consumer_timeout_s = (
            None if consumer_timeout_ms is None else consumer_timeout_ms / 1000
        )
        self._assignment: dict[TopicPartition, _PartitionState] = {}
        self._paused: set[TopicPartition] = set()
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        # With a group id, positions start from the group's committed offsets and
        # commit() (or auto commit) stores them; membership is not served yet, so
        # partitions are assign()ed, as a Kafka consumer does with assign().
        self.group_id = group_id
        self._group = (
            None
            if group_id is None
            else GroupClient(self._cluster, group_id, timeout_s=request_timeout_ms / 1000)
        )
        self._auto_commit_s = auto_commit_interval_ms / 1000 if enable_auto_commit else None
        self._next_auto_commit = time.monotonic() + (self._auto_commit_s or 0)
        self._membership = (
            None
            if self._group is None or group_id is None
            else GroupMembership(
                self._cluster,
                self._group,
                MembershipConfig(
                    group_id=group_id,
                    client_id=client_id or f"consumer-{group_id}-{next(_client_ids)}",
                    group_instance_id=group_instance_id,
                    session_timeout_ms=session_timeout_ms,
                    heartbeat_interval_ms=heartbeat_interval_ms,
                    max_poll_interval_ms=max_poll_interval_ms,
                    strategies=strategies,
                    request_timeout_ms=request_timeout_ms,
                    retry_backoff_ms=retry_backoff_ms,
                    metadata_max_age_ms=metadata_max_age_ms,
                ),
                ConsumerHooks(
                    owned=self.assignment,
                    assign=self._set_assignment,
                    commit=self._commit_before_revoke,
                    wake=lambda: self._answers.put(_WAKE),
                ),
            )
        )
        self._fetches: dict[int, _Fetch] = {}  # Broker id -> its fetch in flight.
        # Fetches go on a FetchStream per broker (client/_streams.py).
        # Swept from poll, and by its own thread for a consumer that stops polling.
        self._streams = StreamPool(
            lambda a: self._cluster.stub(a), "FetchStream", "Fetch", sweep_every_s=1.0
        )
        self._answers: queue.SimpleQueue[_Fetch] = queue.SimpleQueue()
        self._errors: list[RaftkaError] = []
        self._next_partition = 0  # Round-robin start of the next poll's records.
        self._closed = False

    # -- assignment --------------------------------------------------------

    def assign(self, partitions: Iterable[TopicPartition | tuple[str, int]]) -> None:
        """Read exactly these partitions from now on. Partitions kept from the previous
        assignment keep their positions; new ones start at the group's committed offset
        (with a ``group_id``), else by ``auto_offset_reset``, unless you ``seek``.
        Not while subscribed: ``unsubscribe`` first."""
        self._check_open()
        if self._membership is not None and self._membership.subscribed:
            raise RuntimeError(
                "assign() and subscribe() are mutually exclusive: call unsubscribe() first"
            )
        self._set_assignment(_topic_partition(tp) for tp in partitions)

    def assignment(self) -> set[TopicPartition]:
        """The partitions assigned now (by ``assign``, or by the group)."""
        return set(self._assignment)

    def subscribe(
        self,
        topics: Iterable[str] | None = None,
        *,
        pattern: str | re.Pattern[str] | None = None,
        listener: object | None = None,
        on_partitions_revoked: Callback | None = None,
        on_partitions_assigned: Callback | None = None,
        on_partitions_lost: Callback | None = None,
    ) -> None:
        """Consume the group's share of ``topics``, or of every topic whose whole name
        matches ``pattern`` (checked every ``metadata_max_age_ms``). ``poll`` joins the
        group and takes part in its rebalances. Subscribing again replaces the topics
        (and the listener); an empty list is ``unsubscribe``.

        ``listener`` is a ``ConsumerRebalanceListener`` or any object with some of its
        methods; the ``on_partitions_*`` callables override them. They get a set of
        ``TopicPartition`` and run on the thread that calls ``poll``.
        """
        self._check_open()
        if self._membership is None:
            raise ValueError("subscribe() needs a group_id")
        if (topics is None) == (pattern is None):
            raise ValueError("subscribe() takes topics or a pattern, one of the two")
        if self._assignment and not self._membership.subscribed:
            raise RuntimeError(
                "assign() and subscribe() are mutually exclusive: call unsubscribe() first"
            )
        names: list[str] | None = None
        if topics is not None:
            names = [topics] if isinstance(topics, str) else list(topics)
            if any(not isinstance(t, str) or not t for t in names):
                raise ValueError(f"topic names must be non-empty strings, not {names!r}")
            if not names:
                self.unsubscribe()
                return
        compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
        self._membership.subscribe(
            names,
            compiled,
            make_listener(
                listener,
                on_partitions_revoked=on_partitions_revoked,
                on_partitions_assigned=on_partitions_assigned,
                on_partitions_lost=on_partitions_lost,
            ),
        )
        self._cluster.request_update()

    def subscription(self) -> set[str]:
        """The subscribed topics (for a pattern: the topics it matched last)."""
        return set() if self._membership is None else self._membership.subscription()

    def unsubscribe(self) -> None:
        """Drop the assignment; when subscribed, commit (auto commit), revoke the
        partitions (the listener's ``on_partitions_revoked``) and leave the group."""
        self._check_open()
        if self._membership is not None and self._membership.subscribed:
            self._membership.unsubscribe()
        self._set_assignment(())

    def group_metadata(self) -> ConsumerGroupMetadata:
        """The group id, generation, member id and instance id of this consumer now."""
        if self._membership is None:
            raise ValueError("group_metadata() needs a group_id")
        return self._membership.group_metadata()

    def _set_assignment(self, partitions: Iterable[TopicPartition]) -> None:
        assignment = {}
        for tp in partitions:
            assignment[tp] = self._assignment.get(tp) or _PartitionState(self._default_reset)
        self._assignment = assignment
        self._cluster.add_topics({tp.topic for tp in assignment})

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        """The topic's partitions, from fresh metadata; None when it does not exist."""
        self._check_open()
        self._cluster.add_topics([topic])
        partitions = self._cluster.view.partitions(topic)
        if partitions is None:
            self._cluster.update()
            partitions = self._cluster.view.partitions(topic)
        return None if partitions is None else set(range(len(partitions)))

    # -- positions -----------------------------------------------------------

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Make ``offset`` the next one ``poll`` returns for ``partition``."""
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an int >= 0, not {offset!r}")
        self._state(partition).seek(offset, None)

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        """Start these partitions (all assigned ones when none are named) at their log
        start. Evaluated lazily, at the next ``poll`` or ``position``."""
        for tp in partitions or tuple(self._assignment):
            self._state(tp).seek(None, EARLIEST)

    def seek_to_end(self, *partitions: TopicPartition) -> None:
        """Start these partitions (all assigned ones when none are named) at their high
        watermark: only records produced from now on. Evaluated lazily."""
        for tp in partitions or tuple(self._assignment):
            self._state(tp).seek(None, LATEST)

    def position(self, partition: TopicPartition) -> int:
        """The offset of the next record ``poll`` returns for ``partition`` (looked up
        now if a reset is pending)."""
        state = self._state(partition)
        if state.position is None:
            self._resolve_positions([_topic_partition(partition)])
        assert state.position is not None
        return state.position

    def highwater(self, partition: TopicPartition) -> int | None:
        """The high watermark the last fetch answer for ``partition`` gave, if any."""
        hw = self._state(partition).high_watermark
        return None if hw < 0 else hw

    def beginning_offsets(
        self, partitions: Iterable[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        """Each partition's log start offset."""
        found = self._list_offsets({tp: EARLIEST for tp in partitions}, timeout_ms)
        return {tp: offset for tp, (offset, _) in found.items()}

    def end_offsets(
        self, partitions: Iterable[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        """Each partition's high watermark: the offset the next record will take."""
        found = self._list_offsets({tp: LATEST for tp in partitions}, timeout_ms)
        return {tp: offset for tp, (offset, _) in found.items()}

    def offsets_for_times(
        self, timestamps: Mapping[TopicPartition, int], timeout_ms: int | None = None
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        """For each partition, the first record with a timestamp at or after the given one
        (ms), or None when there is none."""
        for tp, ts in timestamps.items():
            if not isinstance(ts, int) or ts < 0:
                raise ValueError(f"{tp}: a timestamp must be an int >= 0, not {ts!r}")
        found = self._list_offsets(dict(timestamps), timeout_ms)
        return {
            tp: None if offset < 0 else OffsetAndTimestamp(offset, ts)
            for tp, (offset, ts) in found.items()
        }

    # -- polling -------------------------------------------------------------

    def poll(
        self, timeout_ms: float = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        """Records fetched for the assigned partitions, up to ``max_records`` (default
        ``max_poll_records``); waits up to ``timeout_ms`` for some to arrive.

        Raises ``OffsetOutOfRangeError`` (with ``auto_offset_reset="none"``),
        ``NoOffsetForPartitionError``, ``CorruptRecordError`` and errors the brokers
        answered that retrying will not cure.
        """
        self._check_open()
        limit = self._max_poll_records if max_records is None else max_records
        if limit <= 0:
            raise ValueError(f"max_records must be positive, not {limit}")
        deadline = time.monotonic() + max(timeout_ms, 0) / 1000
        while True:
            self._handle_answers(block_s=0)
            self._streams.sweep(time.monotonic())
            self._raise_errors()
            if self._membership is not None:
                self._membership.poll(deadline)
            self._cluster.maybe_update()
            self._reset_positions(deadline)
            self._send_fetches()
            records = self._take(limit)
            self._maybe_auto_commit()
            if records:
                self._send_fetches()  # Drained partitions may be fetched again at once.
                return records
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {}
            self._handle_answers(block_s=min(remaining, self._wait_bound_s()))

    def _reset_positions(self, deadline: float) -> None:
        """Resolve pending resets within the poll's time (at least ``_RESET_MIN_S``, so
        that ``poll(0)`` can make progress); a timeout is retried by the next poll."""
        resets = [tp for tp, s in self._assignment.items() if s.position is None]
        if not resets:
            return
        if self._group is not None:
            self._seek_to_committed([tp for tp in resets if not self._assignment[tp].checked])
            resets = [tp for tp, s in self._assignment.items() if s.position is None]
            if not resets:
                return
        budget_s = max(deadline - time.monotonic(), _RESET_MIN_S)
        try:
            self._resolve_positions(resets, min(budget_s, self._request_timeout_s) * 1000)
        except ClientTimeoutError as e:
            log.debug("resetting positions: %s", e)

    def _seek_to_committed(self, partitions: list[TopicPartition]) -> None:
        """Start partitions without a position at the group's committed offset; the
        others fall back to ``auto_offset_reset``."""
        if not partitions or self._group is None:
            return
        committed = self._group.fetch(partitions)
        for tp in partitions:
            state = self._assignment.get(tp)
            if state is None:
                continue
            state.checked = True
            found = committed.get(tp)
            if found is not None and state.position is None:
                state.seek(found.offset, None)

    # -- committed offsets -------------------------------------------------

    def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        """Commit ``offsets`` (default: the position of every assigned partition, i.e.
        what ``poll`` has returned) for the group; waits until the coordinator has
        them on every in-sync replica.

        Nothing to commit (no partition assigned yet) is a no-op. When subscribed, the
        commit carries the member id and generation: it raises
        ``RebalanceInProgressError`` during a rebalance (``poll``, then commit again) and
        ``CommitFailedError`` when the group moved on without this consumer.
        """
        if self._group is None:
            raise ValueError("commit() needs a group_id")
        if offsets is None:
            offsets = {
                tp: state.position
                for tp, state in self._assignment.items()
                if state.position is not None
            }
        offsets = {TopicPartition(*tp): off for tp, off in offsets.items()}
        if not offsets:
            return  # Nothing to commit (no partition yet), as Kafka's commitSync.
        if self._membership is not None and self._membership.subscribed:
            self._membership.commit(offsets)
        else:
            self._group.commit(offsets)

    def commit_async(
        self,
        offsets: dict[TopicPartition, int] | None = None,
        callback: Callable[[dict[TopicPartition, int], BaseException | None], None] | None = None,
    ) -> concurrent.futures.Future[None]:
        """Commit in the background, in call order; ``callback(offsets, exception)``
        runs when the commit is done. The offsets are taken now (the positions of now)."""
        if self._group is None:
            raise ValueError("commit_async() needs a group_id")
        if offsets is None:
            offsets = {
                tp: state.position
                for tp, state in self._assignment.items()
                if state.position is not None
            }
        taken = dict(offsets)
        if self._committer is None:
            self._committer = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="raftka-commit"
            )

        def run() -> None:
            error: BaseException | None = None
            try:
                self.commit(taken)
            except BaseException as e:  # Handed to the callback and the future.
                error = e
            if callback is not None:
                try:
                    callback(taken, error)
                except Exception:
                    log.exception("a commit_async callback raised")
            if error is not None:
                raise error

        return self._committer.submit(run)

    # -- flow control --------------------------------------------------------

    def pause(self, *partitions: TopicPartition) -> None:
        """Stop returning (and fetching) records of these assigned partitions."""
        for tp in partitions:
            tp = TopicPartition(*tp)
            if tp not in self._assignment:
                raise ValueError(f"{tp.topic}-{tp.partition} is not assigned")
            self._paused.add(tp)

    def resume(self, *partitions: TopicPartition) -> None:
        for tp in partitions:
            self._paused.discard(TopicPartition(*tp))

    def paused(self) -> set[TopicPartition]:
        return {tp for tp in self._paused if tp in self._assignment}

    def committed(self, partition: TopicPartition) -> int | None:
        """The group's committed offset of ``partition``, None when it has none."""
        if self._group is None:
            raise ValueError("committed() needs a group_id")
        found = self._group.fetch([TopicPartition(*partition)])
        committed = found.get(TopicPartition(*partition))
        return None if committed is None else committed.offset

    def _maybe_auto_commit(self) -> None:
        if self._group is None or self._auto_commit_s is None:
            return
        membership = self._membership
        if membership is not None and membership.subscribed:
            if membership.generation_if_stable() is None:
                return  # Rebalancing: the commit before revoking covers it.
        now = time.monotonic()
        if now < self._next_auto_commit:
            return
        self._next_auto_commit = now + self._auto_commit_s
        try:
            self.commit()
        except RaftkaError as e:  # Kafka logs a failed auto commit and carries on.
            log.warning("auto commit of group %s failed: %s", self.group_id, e)

    def _commit_before_revoke(self, partitions: set[TopicPartition]) -> None:
        """Auto commit the positions of partitions the group is about to take away."""
        if self._auto_commit_s is None or self._membership is None:
            return
        offsets = {
            tp: state.position
            for tp in partitions
            if (state := self._assignment.get(tp)) is not None and state.position is not None
        }
        if not offsets:
            return
        try:
            self._membership.commit(offsets)
        except RaftkaError as e:
            log.warning("commit of group %s before a rebalance failed: %s", self.group_id, e)

    def __iter__(self) -> Iterator[ConsumerRecord]:
        """Records as they arrive, until ``close`` or ``consumer_timeout_ms`` idle."""
        idle_since = time.monotonic()
        while not self._closed:
            wait_ms = 1000.0
            if self._consumer_timeout_s is not None:
                left_s = idle_since + self._consumer_timeout_s - time.monotonic()
                if left_s <= 0:
                    return
                wait_ms = min(wait_ms, left_s * 1000)
            fetched = self.poll(timeout_ms=wait_ms)
            if fetched:
                idle_since = time.monotonic()
            for records in fetched.values():
                yield from records

    def close(self) -> None:
        """Stop fetching and close the connections. Idempotent."""
        if self._closed:
            return
        if self._membership is not None:
            # Commits (auto commit) and revokes when subscribed; stops the heartbeats.
            self._membership.close()
        if self._group is not None and self._auto_commit_s is not None and self._assignment:
            try:
                self.commit()
            except RaftkaError as e:
                log.warning("final auto commit of group %s failed: %s", self.group_id, e)
        self._closed = True
        if self._committer is not None:
            self._committer.shutdown(wait=True)
        for fetch in self._fetches.values():
            fetch.call.cancel()
        self._streams.close()
        self._fetches.clear()
        # Answers still queued hold their calls: let the calls go now, while gRPC's
        # threads run (a call finalised at interpreter exit can hang it).
        while True:
            try:
                self._answers.get_nowait().call = None
            except queue.Empty:
                break
        self._cluster.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals: fetching ---------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the consumer is closed")

    def _state(self, partition: TopicPartition | tuple[str, int]) -> _PartitionState:
        state = self._assignment.get(_topic_partition(partition))
        if state is None:
            raise ValueError(f"{partition} is not assigned to this consumer")
        return state

    def _wait_bound_s(self) -> float:
        """How long to wait for an answer before looking at retries and resets again."""
        now = time.monotonic()
        pending = [s.retry_at_s for s in self._assignment.values() if s.retry_at_s > now]
        if not pending and self._fetches:
            return 1.0
        soonest = min(pending, default=now + self._backoff_s)
        return max(0.001, min(soonest - now, 1.0))

    def _send_fetches(self) -> None:
        view = self._cluster.view
        now = time.monotonic()
        fetches: dict[int, _Fetch] = {}
        for tp, state in self._assignment.items():
            if (
                state.position is None
                or tp in self._paused
                or state.in_flight
                or len(state.chunks) > 1
                or (state.drain_first and state.chunks)
                or state.retry_at_s > now
            ):
                continue
            leader = view.leader_address(tp.topic, tp.partition)
            if leader is None:
                self._cluster.request_update()
                state.retry_at_s = now + self._backoff_s
                continue
            broker_id, address = leader
            if broker_id in self._fetches:
                continue  # One fetch per broker; its answer brings this partition's turn.
            fetch = fetches.get(broker_id)
            if fetch is None:
                fetch = fetches[broker_id] = _Fetch(broker_id, address)
            fetch.parts[tp] = (state.fetch_offset, state.generation)
            state.in_flight = True
        for fetch in fetches.values():
            self._start_fetch(fetch, view)

    def _start_fetch(self, fetch: _Fetch, view: Any) -> None:
        by_topic: dict[str, list[broker_pb2.FetchPartition]] = {}
        for tp, (offset, _) in fetch.parts.items():
            leader = view.leader(tp.topic, tp.partition)
            by_topic.setdefault(tp.topic, []).append(
                broker_pb2.FetchPartition(
                    partition=tp.partition,
                    current_leader_epoch=leader.leader_epoch if leader else -1,
                    fetch_offset=offset,
                    last_fetched_epoch=-1,
                    log_start_offset=-1,
                    partition_max_bytes=self._partition_max_bytes,
                )
            )
        request = broker_pb2.FetchRequest(
            replica_id=-1,
            replica_epoch=-1,
            max_wait_ms=self._fetch_max_wait_ms,
            min_bytes=self._fetch_min_bytes,
            max_bytes=self._fetch_max_bytes,
            topics=[
                broker_pb2.FetchTopic(topic=topic, partitions=parts)
                for topic, parts in by_topic.items()
            ],
        )
        timeout_s = self._fetch_max_wait_ms / 1000 + max(self._request_timeout_s, _FETCH_MARGIN_S)
        self._fetches[fetch.broker_id] = fetch
        try:
            fetch.call = self._streams.call(fetch.address, request, timeout_s)
        except Exception as exc:  # The channel could not be opened.
            fetch.call = _FailedCall(exc)
            self._answers.put(fetch)
            return
        fetch.call.add_done_callback(lambda _call: self._answers.put(fetch))

    def _handle_answers(self, block_s: float) -> None:
        """Take in every fetch answer that has arrived, waiting up to ``block_s`` for one."""
        try:
            fetch = (
                self._answers.get(timeout=block_s) if block_s > 0 else self._answers.get_nowait()
            )
        except queue.Empty:
            return
        while True:
            if fetch is not _WAKE:
                self._handle_answer(fetch)
            try:
                fetch = self._answers.get_nowait()
            except queue.Empty:
                return

    def _handle_answer(self, fetch: _Fetch) -> None:
        if self._fetches.get(fetch.broker_id) is fetch:
            del self._fetches[fetch.broker_id]
        try:
            response = fetch.call.result()
        except grpc.RpcError as exc:
            error: RaftkaError = rpc_error(exc, f"Fetch from broker {fetch.broker_id}")
            response = None
        except Exception as exc:
            error = RaftkaError(common_pb2.UNKNOWN_SERVER_ERROR, f"Fetch: {exc}")
            response = None
        answers: dict[TopicPartition, broker_pb2.FetchPartitionResponse] = {}
        if response is not None:
            if response.error.code != common_pb2.NONE:
                error = error_for(response.error.code, response.error.message)
                response = None
            else:
                for t in response.topics:
                    for p in t.partitions:
                        answers[TopicPartition(t.topic, p.partition)] = p
        for tp, (offset, generation) in fetch.parts.items():
            state = self._assignment.get(tp)
            if state is None:
                continue  # Unassigned since.
            state.in_flight = False
            if state.generation != generation:
                continue  # Sought since: the answer is stale.
            answer = answers.get(tp)
            if response is None or answer is None:
                self._partition_error(tp, state, error if response is None else None, offset)
            elif answer.error.code != common_pb2.NONE:
                code_error = error_for(answer.error.code, f"{tp.topic}-{tp.partition}")
                if answer.HasField("current_leader") and answer.current_leader.leader_id >= 0:
                    self._cluster.note_leader(
                        tp.topic,
                        tp.partition,
                        answer.current_leader.leader_id,
                        answer.current_leader.leader_epoch,
                    )
                self._partition_error(tp, state, code_error, offset)
            else:
                state.high_watermark = answer.high_watermark
                if answer.records:
                    state.chunks.append(
                        FetchedRecords(
                            answer.records,
                            tp.topic,
                            tp.partition,
                            offset,
                            verify_crc=self._check_crcs,
                        )
                    )
                    state.fetch_offset = scan_next_offset(answer.records, offset)

    def _partition_error(
        self, tp: TopicPartition, state: _PartitionState, error: RaftkaError | None, offset: int
    ) -> None:
        if error is None:
            error = RaftkaError(
                common_pb2.UNKNOWN_SERVER_ERROR,
                f"the fetch answer left out {tp.topic}-{tp.partition}",
            )
        if isinstance(error, OffsetOutOfRangeError):
            if state.chunks:
                state.drain_first = True  # The buffered records come first.
            elif self._default_reset is None:
                self._errors.append(
                    OffsetOutOfRangeError(
                        error.code,
                        f"{tp.topic}-{tp.partition}: offset {offset} is out of range and "
                        "auto_offset_reset is 'none'",
                        {tp: offset},
                    )
                )
                state.retry_at_s = time.monotonic() + self._backoff_s
            else:
                log.info("%s-%s: offset %s out of range, resetting", tp.topic, tp.partition, offset)
                state.seek(None, self._default_reset)
            return
        state.retry_at_s = time.monotonic() + self._backoff_s
        if isinstance(error, InvalidMetadataError):
            self._cluster.request_update()
        elif not error.retriable:
            self._errors.append(error)

    def _raise_errors(self) -> None:
        if self._errors:
            error = self._errors[0]
            self._errors.clear()
            raise error

    def _take(self, limit: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        """Up to ``limit`` buffered records, a partition at a time, starting after the
        partition the previous poll started with (so every partition gets its turn)."""
        taken: dict[TopicPartition, list[ConsumerRecord]] = {}
        items = list(self._assignment.items())
        if not items:
            return taken
        start = self._next_partition % len(items)
        self._next_partition = start + 1
        for tp, state in items[start:] + items[:start]:
            if tp in self._paused:
                continue  # Its buffered records wait for resume().
            while state.chunks and limit > 0:
                chunk = state.chunks[0]
                try:
                    records = chunk.take(limit)
                except RaftkaError:
                    state.seek(state.position, None)  # Drop the buffer; refetch from here.
                    raise
                state.position = chunk.position
                if records:
                    taken.setdefault(tp, []).extend(records)
                    limit -= len(records)
                if chunk.exhausted:
                    state.chunks.popleft()
            if limit <= 0:
                break
        return taken

    # -- internals: offsets ------------------------------------------------------

    def _resolve_positions(
        self, partitions: list[TopicPartition], timeout_ms: float | None = None
    ) -> None:
        """Look up the positions of partitions with a reset pending (their log start or
        high watermark)."""
        if not partitions:
            return
        wanted: dict[TopicPartition, int] = {}
        for tp in partitions:
            state = self._assignment[tp]
            if state.reset is None:
                raise NoOffsetForPartitionError(
                    f"{tp.topic}-{tp.partition} has no position and auto_offset_reset is "
                    "'none': seek() first"
                )
            wanted[tp] = state.reset
        found = self._list_offsets(wanted, timeout_ms)
        for tp, (offset, _) in found.items():
            state = self._assignment[tp]
            if state.position is None and state.reset == wanted[tp]:
                state.seek(offset, None)

    def _list_offsets(
        self, timestamps: dict[TopicPartition, int], timeout_ms: float | None
    ) -> dict[TopicPartition, tuple[int, int]]:
        """ListOffsets at each partition's leader; retries retriable errors (refreshing
        metadata) until ``timeout_ms`` (default ``request_timeout_ms``)."""
        self._check_open()
        pending = {_topic_partition(tp): ts for tp, ts in timestamps.items()}
        timeout_s = self._request_timeout_s if timeout_ms is None else timeout_ms / 1000
        deadline = time.monotonic() + timeout_s
        self._cluster.add_topics({tp.topic for tp in pending})
        found: dict[TopicPartition, tuple[int, int]] = {}
        last_error: RaftkaError | None = None
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientTimeoutError(
                    common_pb2.REQUEST_TIMED_OUT,
                    f"offsets of {len(pending)} partition(s) not found in {timeout_s:.1f} s"
                    + (f": {last_error}" if last_error else ""),
                )
            if self._cluster.update_due() or not all(
                self._cluster.view.leader_address(tp.topic, tp.partition) for tp in pending
            ):
                try:
                    self._cluster.update(timeout_s=remaining)
                except RaftkaError as e:
                    last_error = e
            errors = self._list_offsets_once(pending, found, remaining)
            if errors:
                last_error = errors[0]
                fatal = [e for e in errors if not e.retriable]
                if fatal:
                    raise fatal[0]
                # A backoff before asking again, not a wait for another thread.
                time.sleep(min(self._backoff_s, max(deadline - time.monotonic(), 0)))
        return found

    def _list_offsets_once(
        self,
        pending: dict[TopicPartition, int],
        found: dict[TopicPartition, tuple[int, int]],
        timeout_s: float,
    ) -> list[RaftkaError]:
        """One round of ListOffsets to every leader; moves answered partitions from
        ``pending`` to ``found`` and returns the errors of the others."""
        view = self._cluster.view
        errors: list[RaftkaError] = []
        by_broker: dict[tuple[int, str], dict[str, list[broker_pb2.ListOffsetsPartition]]] = {}
        for tp, ts in pending.items():
            leader = view.leader_address(tp.topic, tp.partition)
            if leader is None:
                code = view.topic_errors.get(tp.topic, common_pb2.LEADER_NOT_AVAILABLE)
                errors.append(error_for(code, f"no leader known for {tp.topic}-{tp.partition}"))
                continue
            state = view.leader(tp.topic, tp.partition)
            by_broker.setdefault(leader, {}).setdefault(tp.topic, []).append(
                broker_pb2.ListOffsetsPartition(
                    partition=tp.partition,
                    current_leader_epoch=state.leader_epoch if state else -1,
                    timestamp=ts,
                )
            )
        calls = []
        for (broker_id, address), topics in by_broker.items():
            request = broker_pb2.ListOffsetsRequest(
                replica_id=-1,
                topics=[
                    broker_pb2.ListOffsetsTopic(topic=t, partitions=p) for t, p in topics.items()
                ],
            )
            call = self._cluster.stub(address).ListOffsets.future(request, timeout=timeout_s)
            calls.append((broker_id, call))
        for broker_id, call in calls:
            try:
                response = call.result()
            except grpc.RpcError as exc:
                errors.append(rpc_error(exc, f"ListOffsets at broker {broker_id}"))
                self._cluster.request_update()
                continue
            for t in response.topics:
                for p in t.partitions:
                    tp = TopicPartition(t.topic, p.partition)
                    if tp not in pending:
                        continue
                    if p.error.code == common_pb2.NONE:
                        found[tp] = (p.offset, p.timestamp)
                        del pending[tp]
                        continue
                    error = error_for(p.error.code, f"ListOffsets {tp.topic}-{tp.partition}")
                    if isinstance(error, InvalidMetadataError):
                        self._cluster.request_update()
                    errors.append(error)
        return errors


class _FailedCall:
    """Stands in for a gRPC call that could not even be started."""

    def __init__(self, error: Exception):
        self._error = error

    def result(self) -> Any:
        raise self._error

    def cancel(self) -> bool:
        return False


def _topic_partition(tp: TopicPartition | tuple[str, int]) -> TopicPartition:
    if isinstance(tp, TopicPartition):
        return tp
    if isinstance(tp, tuple) and len(tp) == 2 and isinstance(tp[0], str) and isinstance(tp[1], int):
        return TopicPartition(tp[0], tp[1])
    raise TypeError(f"expected a TopicPartition (topic, partition), not {tp!r}")
