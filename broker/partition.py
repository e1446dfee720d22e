"""One partition replica hosted by this broker: its log, its role and, as leader, its ISR.

Every method takes the partition's lock, so produce handlers, fetch handlers,
the replica fetcher and metadata changes can call in from their own threads.
The decisions themselves (high watermark, who is caught up, who may join the
ISR) are the pure functions of ``broker.replication``; this class keeps the
state they need and does the I/O.

Waiting (produce with ``acks=all``, long-poll fetch) is done by the callers
with ``Waiter`` objects registered here: every change that may let a waiter
proceed (an append, a high watermark that moves, a role change) marks this
partition in every registered waiter and wakes it, and the waiter looks again
at the partitions marked, not at every partition it waits on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from broker import replication
from broker.producer_state import (
    DUPLICATE,
    OUT_OF_ORDER,
    BatchEntry,
    ProducerStateManager,
    last_sequence_of,
)
from broker.record_batch import (
    BatchHeader,
    BatchTooLargeError,
    InvalidBatchError,
    InvalidRecordError,
    iter_batches,
    patch_batch,
    read_header,
    set_log_append_time,
    validate_batch,
)
from broker.storage.cleaner import CleanResult, compact
from broker.storage.log import OffsetOutOfRangeError, PartitionLog
from quorum.image import NO_LEADER, PartitionRegistration

log = logging.getLogger(__name__)

LEADER = "leader"
FOLLOWER = "follower"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# What moved in a partition, for the waiters that care (a bit set).
NEW_DATA = 1  # Records appended past the log end.
HIGH_WATERMARK = 2  # The high watermark advanced.
STATE = 4  # Role, leader epoch, ISR, log start, or the partition closed.
ANY_CHANGE = NEW_DATA | HIGH_WATERMARK | STATE


class Waiter:
    """An event plus the partitions that changed since the waiter last looked.

    ``wakes`` says which changes set the event, ``notes`` which ones mark the
    partition as changed (by default the same). A follower's fetch session is
    woken by new data only and notes a moved high watermark for its next answer,
    as Kafka's leader holds a follower's fetch until there is data and then tells
    the high watermark with it; a consumer's fetch and an ``acks=all`` produce
    wait for the high watermark only. So after an append the leader wakes just
    the streams that carry the batch to the followers, and after the high
    watermark moves just the producers and consumers waiting for it.
    """

    __slots__ = ("event", "changed", "_lock", "wakes", "notes")

    def __init__(self, wakes: int = ANY_CHANGE, notes: int | None = None) -> None:
        self.event = threading.Event()
        self.changed: set[Partition] = set()
        self._lock = threading.Lock()
        self.wakes = wakes
        self.notes = wakes if notes is None else notes | wakes

    def notify(self, partition: Partition, wake: bool = True) -> None:
        with self._lock:
            self.changed.add(partition)
        if wake:
            self.event.set()

    def take(self) -> set[Partition]:
        """The partitions marked since the last call (and clear the event)."""
        with self._lock:
            self.event.clear()
            changed, self.changed = self.changed, set()
        return changed

    def wait(self, timeout_s: float) -> bool:
        return self.event.wait(timeout_s)


class PartitionError(Exception):
    """A request this replica refuses; ``code`` is a ``common_pb2.ErrorCode`` name."""

    def __init__(self, code: str, message: str, leader: int = NO_LEADER, leader_epoch: int = -1):
        super().__init__(message)
        self.code = code
        self.message = message
        self.leader = leader
        self.leader_epoch = leader_epoch


@dataclass(frozen=True, slots=True)
class PartitionSettings:
    """The topic configs the data path reads, with the broker's defaults filled in."""

    min_insync_replicas: int = 1
    max_message_bytes: int = 1048588
    log_append_time: bool = False
    unclean_leader_election: bool = False

    @classmethod
    def from_configs(
        cls, configs: Mapping[str, str], defaults: PartitionSettings
    ) -> PartitionSettings:
        def number(name: str, default: int) -> int:
            value = configs.get(name)
            return default if value is None else int(value)

        timestamp_type = configs.get("message.timestamp.type")
        unclean = configs.get("unclean.leader.election.enable")
        return cls(
            min_insync_replicas=number("min.insync.replicas", defaults.min_insync_replicas),
            max_message_bytes=number("max.message.bytes", defaults.max_message_bytes),
            log_append_time=(
                defaults.log_append_time
                if timestamp_type is None
                else timestamp_type == "LogAppendTime"
            ),
            unclean_leader_election=(
                defaults.unclean_leader_election if unclean is None else unclean.lower() == "true"
            ),
        )


@dataclass(frozen=True, slots=True)
class AppendResult:
    base_offset: int
    last_offset: int
    log_append_time_ms: int
    # The leader epoch under which the batches were appended.
    leader_epoch: int


@dataclass(frozen=True, slots=True)
class FollowerRead:
    """What a follower's fetch gets: data from its offset, or where it diverged."""

    records: bytes
    high_watermark: int
    log_start_offset: int
    log_end_offset: int
    # (epoch, end offset) when the follower's log diverges from this leader's.
    diverging: tuple[int, int] | None = None
    # The follower is outside the ISR and has caught up: time to ask for it.
    may_join_isr: bool = False


@dataclass(frozen=True, slots=True)
class IsrChange:
    """An ISR change the leader wants the controller to commit."""

    topic: str
    partition: int
    topic_id: str
    leader_epoch: int
    partition_epoch: int
    new_isr: tuple[int, ...]


class Partition:
    def __init__(
        self,
        topic: str,
        index: int,
        topic_id: str,
        partition_log: PartitionLog,
        broker_id: int,
        settings: PartitionSettings,
        *,
        replica_lag_time_max_ms: int = 30000,
    ):
        self.topic = topic
        self.index = index
        self.topic_id = topic_id
        self.log = partition_log
        self.broker_id = broker_id
        self.settings = settings
        self.replica_lag_time_max_ms = replica_lag_time_max_ms
        self.role = FOLLOWER
        self.leader = NO_LEADER
        self.leader_epoch = -1
        self.partition_epoch = -1
        self.replicas: tuple[int, ...] = ()
        self.isr: tuple[int, ...] = ()
        # An ISR change sent to the controller and not yet answered.
        self.pending_isr: tuple[int, ...] | None = None
        self.followers: dict[int, replication.FollowerState] = {}
        self.high_watermark = 0
        # Idempotent producers' last batches, rebuilt from the log's batch headers.
        self.producers = ProducerStateManager()
        self._rebuild_producers()
        self._lock = threading.RLock()
        self._waiters: set[Waiter] = set()
        self.closed = False

    def _rebuild_producers(self) -> None:
        self.producers.rebuild(
            header for segment in self.log.segments for _, header in segment.batches()
        )

    def __repr__(self) -> str:
        return f"Partition({self.topic}-{self.index}, {self.role}, epoch {self.leader_epoch})"

    # ------------------------------------------------------------------ waiting

    def add_waiter(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.add(waiter)

    def remove_waiter(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.discard(waiter)

    def _wake(self, what: int = ANY_CHANGE) -> None:
        for waiter in self._waiters:
            if waiter.notes & what:
                waiter.notify(self, bool(waiter.wakes & what))

    # ------------------------------------------------------------------ roles

    def become_leader(self, reg: PartitionRegistration, settings: PartitionSettings) -> bool:
        """Apply a registration that names this broker leader; True for a new leadership."""
        with self._lock:
            self.settings = settings
            new = self.role != LEADER or reg.leader_epoch > self.leader_epoch
            if not new and reg.partition_epoch <= self.partition_epoch:
                return False  # Stale or already applied (an AlterPartition answer came first).
            self.replicas = reg.replicas
            self.isr = reg.isr
            self.partition_epoch = reg.partition_epoch
            self.pending_isr = None
            if new:
                self.role = LEADER
                self.leader = self.broker_id
                self.leader_epoch = reg.leader_epoch
                # The epoch starts at the current log end (Kafka's maybeAssignEpochStartOffset).
                # Its entry is written with the first batch after it: until then a crash
                # would drop it on load anyway, and a broker made leader of thousands of
                # new partitions wrote a file for each.
                self.log.leader_epoch_cache.assign(
                    reg.leader_epoch, self.log.log_end_offset, write=False
                )
                now = now_ms()
                self.followers = {
                    b: replication.FollowerState(b) for b in reg.replicas if b != self.broker_id
                }
                for state in self.followers.values():
                    state.reset(now, state.broker_id in reg.isr)
                # A leader's high watermark may trail its followers' (it was one);
                # it moves once the ISR has fetched under this epoch.
                self.high_watermark = min(self.high_watermark, self.log.log_end_offset)
            else:
                for b in reg.replicas:
                    if b != self.broker_id and b not in self.followers:
                        self.followers[b] = replication.FollowerState(b)
                for b in list(self.followers):
                    if b not in reg.replicas:
                        del self.followers[b]
            self._maybe_advance_hw()
            self._wake()
            return new

    def become_follower(self, reg: PartitionRegistration, settings: PartitionSettings) -> bool:
        """Apply a registration where another broker (or nobody) leads; True if the
        leader or its epoch changed, so the fetcher must (re)start."""
        with self._lock:
            self.settings = settings
            changed = (
                self.role != FOLLOWER
                or reg.leader != self.leader
                or reg.leader_epoch != self.leader_epoch
            )
            self.role = FOLLOWER
            self.leader = reg.leader
            self.leader_epoch = reg.leader_epoch
            self.partition_epoch = reg.partition_epoch
            self.replicas = reg.replicas
            self.isr = reg.isr
            self.pending_isr = None
            self.followers = {}
            self.high_watermark = min(self.high_watermark, self.log.log_end_offset)
            self._wake()
            return changed

    def close(self, *, flush: bool = True) -> None:
        """Stop serving; ``flush=False`` when the log is about to be deleted."""
        with self._lock:
            self.closed = True
            self.role = FOLLOWER
            self.leader = NO_LEADER
            self._wake()
            self.log.close(flush=flush)

    # ------------------------------------------------------------------ leader: produce

    def _check_leader(self, current_leader_epoch: int = -1) -> None:
        if self.closed:
            raise PartitionError(
                "NOT_LEADER_OR_FOLLOWER", f"{self.topic}-{self.index} is no longer hosted here"
            )
        if self.role != LEADER:
            raise PartitionError(
                "NOT_LEADER_OR_FOLLOWER",
                f"broker {self.broker_id} is not the leader of {self.topic}-{self.index}"
                f" (leader {self.leader}, epoch {self.leader_epoch})",
                self.leader,
                self.leader_epoch,
            )
        if current_leader_epoch >= 0:
            if current_leader_epoch < self.leader_epoch:
                raise PartitionError(
                    "FENCED_LEADER_EPOCH",
                    f"leader epoch {current_leader_epoch} is older than {self.leader_epoch}",
                    self.leader,
                    self.leader_epoch,
                )
            if current_leader_epoch > self.leader_epoch:
                raise PartitionError(
                    "UNKNOWN_LEADER_EPOCH",
                    f"leader epoch {current_leader_epoch} is newer than {self.leader_epoch}",
                    self.leader,
                    self.leader_epoch,
                )

    def append_as_leader(
        self, records: bytes, acks: int, *, internal: bool = False
    ) -> AppendResult:
        """Validate and append a producer's batches; nothing is appended if one is bad.

        Topics whose name starts with ``__`` are written by the brokers only
        (``internal``), as Kafka refuses clients' produce to ``__consumer_offsets``.
        """
        if self.topic.startswith("__") and not internal:
            raise PartitionError(
                "INVALID_TOPIC_EXCEPTION", f"{self.topic} is internal: only brokers write it"
            )
        batches = _split_and_validate(records, self.settings.max_message_bytes)
        with self._lock:
            self._check_leader()
            if acks == -1:
                isr_size = len(self.isr)
                if not replication.enough_replicas(isr_size, self.settings.min_insync_replicas):
                    raise PartitionError(
                        "NOT_ENOUGH_REPLICAS",
                        f"{self.topic}-{self.index} has {isr_size} in-sync replicas "
                        f"({list(self.isr)}), fewer than min.insync.replicas="
                        f"{self.settings.min_insync_replicas}",
                    )
            segment_bytes = self.log.config.segment_bytes
            for _, header in batches:
                if header.size_bytes > segment_bytes:
                    raise PartitionError(
                        "MESSAGE_TOO_LARGE",
                        f"a batch of {header.size_bytes} bytes is larger than segment.bytes "
                        f"{segment_bytes} of {self.topic}",
                    )
            to_append, duplicates = self._judge_producers(batches)
            append_time = now_ms()
            base = duplicates[0].first_offset if duplicates else self.log.log_end_offset
            offset = self.log.log_end_offset
            last = duplicates[-1].last_offset if duplicates else offset - 1
            epoch = self.leader_epoch
            for batch, header in to_append:
                stamped = patch_batch(batch, offset, epoch)
                if self.settings.log_append_time:
                    stamped = set_log_append_time(stamped, append_time)
                try:
                    self.log.append(stamped, append_time)
                except OSError as e:
                    raise PartitionError(
                        "KAFKA_STORAGE_ERROR", f"cannot append to {self.topic}-{self.index}: {e}"
                    ) from e
                except ValueError as e:  # Larger than segment.bytes, and the like.
                    raise PartitionError(
                        "MESSAGE_TOO_LARGE", f"{self.topic}-{self.index}: {e}"
                    ) from e
                self.producers.on_append(replace(header, base_offset=offset))
                offset += header.records_count
                last = offset - 1
            if to_append:
                self._wake(NEW_DATA | (HIGH_WATERMARK if self._maybe_advance_hw() else 0))
            return AppendResult(
                base, last, append_time if self.settings.log_append_time else -1, epoch
            )

    def _judge_producers(
        self, batches: list[tuple[bytes, BatchHeader]]
    ) -> tuple[list[tuple[bytes, BatchHeader]], list[BatchEntry]]:
        """Split a request's batches into the leading duplicates (already in the log:
        answered with their original offsets) and the batches to append; raise for a
        batch out of sequence or from a fenced producer epoch (nothing is appended)."""
        duplicates: list[BatchEntry] = []
        to_append: list[tuple[bytes, BatchHeader]] = []
        previous: BatchHeader | None = None
        for batch, header in batches:
            if (
                to_append
                and previous is not None
                and header.producer_id >= 0
                and header.producer_id == previous.producer_id
            ):
                # Continues a batch of this request that is being appended.
                expected = (last_sequence_of(previous) + 1) % (1 << 31)
                if header.producer_epoch != previous.producer_epoch or (
                    header.base_sequence != expected
                ):
                    raise PartitionError(
                        "OUT_OF_ORDER_SEQUENCE_NUMBER",
                        f"producer {header.producer_id} sent sequence {header.base_sequence} "
                        f"after {last_sequence_of(previous)} in one request",
                    )
            else:
                verdict = self.producers.check(header)
                if verdict.outcome == DUPLICATE and not to_append:
                    assert verdict.duplicate_of is not None
                    duplicates.append(verdict.duplicate_of)
                    previous = header
                    continue
                if verdict.outcome is not None:
                    code = OUT_OF_ORDER if verdict.outcome == DUPLICATE else verdict.outcome
                    raise PartitionError(
                        code, verdict.message or "a duplicate batch after a new one"
                    )
            to_append.append((batch, header))
            previous = header
        return to_append, duplicates

    def acks_reached(self, last_offset: int, leader_epoch: int) -> str | None:
        """For an ``acks=all`` waiter: None to keep waiting, "NONE" once every in-sync
        replica has the offset, or the error code that ends the wait."""
        with self._lock:
            if self.closed or self.role != LEADER or self.leader_epoch != leader_epoch:
                return "NOT_LEADER_OR_FOLLOWER"
            if self.high_watermark <= last_offset:
                return None
            if len(self.isr) < self.settings.min_insync_replicas:
                return "NOT_ENOUGH_REPLICAS_AFTER_APPEND"
            return "NONE"

    def _maybe_advance_hw(self) -> bool:
        if self.role != LEADER:
            return False
        maximal = self.isr if self.pending_isr is None else set(self.isr) | set(self.pending_isr)
        hw = replication.high_watermark(
            self.log.log_end_offset, maximal, self.broker_id, self.followers
        )
        if hw > self.high_watermark:
            self.high_watermark = hw
            return True
        return False

    # ------------------------------------------------------------------ leader: fetch

    def read_for_follower(
        self,
        replica_id: int,
        fetch_offset: int,
        last_fetched_epoch: int,
        current_leader_epoch: int,
        follower_log_start: int,
        max_bytes: int,
        *,
        update_state: bool,
    ) -> FollowerRead:
        with self._lock:
            self._check_leader(current_leader_epoch)
            state = self.followers.get(replica_id)
            if state is None:
                raise PartitionError(
                    "NOT_LEADER_OR_FOLLOWER",
                    f"broker {replica_id} is not a replica of {self.topic}-{self.index}",
                )
            log_ = self.log
            leo = log_.log_end_offset
            if last_fetched_epoch >= 0:
                epoch, end = log_.leader_epoch_cache.end_offset_for(last_fetched_epoch, leo)
                if epoch < last_fetched_epoch or end < fetch_offset:
                    return FollowerRead(
                        b"", self.high_watermark, log_.log_start_offset, leo, (epoch, end)
                    )
            if fetch_offset < log_.log_start_offset or fetch_offset > leo:
                raise PartitionError(
                    "OFFSET_OUT_OF_RANGE",
                    f"offset {fetch_offset} is outside [{log_.log_start_offset}, {leo}] "
                    f"of {self.topic}-{self.index}",
                )
            may_join = False
            if update_state:
                state.on_fetch(fetch_offset, follower_log_start, leo, now_ms())
                if self._maybe_advance_hw():
                    self._wake(HIGH_WATERMARK)
                may_join = (
                    replica_id not in self.isr
                    and self.pending_isr is None
                    and fetch_offset >= self.high_watermark
                )
            data = log_.read(fetch_offset, max_bytes) if fetch_offset < leo else b""
            return FollowerRead(
                data, self.high_watermark, log_.log_start_offset, leo, may_join_isr=may_join
            )

    def read_for_consumer(
        self, fetch_offset: int, current_leader_epoch: int, max_bytes: int
    ) -> tuple[bytes, int, int, int]:
        """(records up to the high watermark, high watermark, log start, log end)."""
        with self._lock:
            self._check_leader(current_leader_epoch)
            log_ = self.log
            try:
                data = log_.read(fetch_offset, max_bytes, max_offset=self.high_watermark)
            except OffsetOutOfRangeError as e:
                raise PartitionError(
                    "OFFSET_OUT_OF_RANGE", f"{self.topic}-{self.index}: {e}"
                ) from e
            return data, self.high_watermark, log_.log_start_offset, log_.log_end_offset

    def read_local(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches of this replica's own log from ``offset`` up to its end, in any
        role (the group coordinator loading the offsets it leads)."""
        with self._lock:
            if self.closed:
                raise PartitionError("NOT_LEADER_OR_FOLLOWER", f"{self.topic}-{self.index} closed")
            try:
                return self.log.read(offset, max_bytes)
            except OffsetOutOfRangeError as e:
                raise PartitionError("OFFSET_OUT_OF_RANGE", str(e)) from e

    def list_offset(
        self, timestamp: int, current_leader_epoch: int, for_replica: bool
    ) -> tuple[int, int, int]:
        """(timestamp, offset, leader epoch) for ListOffsets; offset -1 when none matches."""
        with self._lock:
            self._check_leader(current_leader_epoch)
            log_ = self.log
            upper = log_.log_end_offset if for_replica else self.high_watermark
            if timestamp == -1:
                return -1, upper, self.leader_epoch
            if timestamp == -2:
                return -1, log_.log_start_offset, self.leader_epoch
            if timestamp == -3:
                found = log_.max_timestamp_offset()
            elif timestamp < 0:
                raise PartitionError("INVALID_REQUEST", f"unknown offset spec {timestamp}")
            else:
                found = log_.offset_for_timestamp(timestamp)
            if found is None or found[0] >= upper:
                return -1, -1, self.leader_epoch
            offset, stamp = found
            return stamp, offset, _epoch_for(log_, offset)

    # ------------------------------------------------------------------ leader: ISR

    def isr_change_due(self, now: int, eligible: Iterable[int]) -> IsrChange | None:
        """The ISR change this leader should ask for now, if any (one at a time)."""
        with self._lock:
            if self.role != LEADER or self.pending_isr is not None or self.closed:
                return None
            leo = self.log.log_end_offset
            lagging = replication.out_of_sync(
                self.isr, self.broker_id, self.followers, leo, now, self.replica_lag_time_max_ms
            )
            if lagging:
                new_isr = tuple(b for b in self.isr if b not in lagging)
                return self._propose(new_isr)
            eligible_set = set(eligible)
            epoch_start = self._epoch_start_offset()
            joining = [
                b
                for b, state in sorted(self.followers.items())
                if b not in self.isr
                and replication.may_join_isr(
                    state, self.high_watermark, epoch_start, b in eligible_set
                )
            ]
            if joining:
                return self._propose(tuple(self.isr) + tuple(joining))
            return None

    def _propose(self, new_isr: tuple[int, ...]) -> IsrChange:
        self.pending_isr = new_isr
        return IsrChange(
            self.topic, self.index, self.topic_id, self.leader_epoch, self.partition_epoch, new_isr
        )

    def _epoch_start_offset(self) -> int:
        for epoch, start in reversed(self.log.leader_epoch_cache.entries()):
            if epoch == self.leader_epoch:
                return start
        return self.log.log_end_offset

    def isr_change_done(
        self, change: IsrChange, isr: tuple[int, ...] | None, partition_epoch: int
    ) -> None:
        """The controller's answer: the committed ISR, or None when it refused."""
        with self._lock:
            if self.pending_isr != change.new_isr or self.leader_epoch != change.leader_epoch:
                return  # A newer leadership or change took over meanwhile.
            self.pending_isr = None
            if isr is not None and partition_epoch > self.partition_epoch:
                self.isr = isr
                self.partition_epoch = partition_epoch
                log.info(
                    "%s-%d: ISR now %s (partition epoch %d)",
                    self.topic,
                    self.index,
                    list(isr),
                    partition_epoch,
                )
            self._maybe_advance_hw()
            self._wake()

    # ------------------------------------------------------------------ follower

    def fetch_position(self) -> tuple[int, int, int]:
        """(fetch offset, last fetched epoch, log start) for the replica fetcher."""
        with self._lock:
            return (
                self.log.log_end_offset,
                self.log.latest_epoch,
                self.log.log_start_offset,
            )

    def append_as_follower(
        self, records: bytes, leader_epoch: int, leader_hw: int, leader_log_start: int
    ) -> int:
        """Append what the leader sent; returns the new log end offset."""
        with self._lock:
            if self.role != FOLLOWER or self.leader_epoch != leader_epoch or self.closed:
                raise PartitionError(
                    "FENCED_LEADER_EPOCH", f"{self.topic}-{self.index} moved on meanwhile"
                )
            log_ = self.log
            if records:
                log_.append_batches(records)
                for _, header in iter_batches(records, verify_crc=False):
                    self.producers.on_append(header)
            if leader_log_start > log_.log_start_offset:
                log_.delete_before(min(leader_log_start, log_.log_end_offset))
            hw = min(leader_hw, log_.log_end_offset)
            if hw > self.high_watermark:
                self.high_watermark = hw
            self._wake()
            return log_.log_end_offset

    def truncate_for_divergence(self, leader_epoch: int, epoch: int, end_offset: int) -> int:
        """Cut the divergent tail the leader reported (Kafka's KIP-320 follower side)."""
        with self._lock:
            if self.role != FOLLOWER or self.leader_epoch != leader_epoch or self.closed:
                return self.log.log_end_offset
            log_ = self.log
            leo = log_.log_end_offset
            if epoch < 0 or end_offset < 0:
                # The leader no longer knows our epoch: fall back to the high watermark.
                target = min(self.high_watermark, leo)
            else:
                own_epoch, own_end = log_.leader_epoch_cache.end_offset_for(epoch, leo)
                if own_epoch < 0 or own_end < 0:
                    target = min(end_offset, leo)
                elif own_epoch != epoch:
                    # We never had that epoch: cut to where our version of it ends,
                    # and the next fetch compares again from there.
                    target = min(own_end, leo)
                else:
                    target = min(end_offset, own_end)
            target = max(target, log_.log_start_offset)
            if target < log_.log_end_offset:
                log.info(
                    "%s-%d: truncating %d..%d (diverged from the leader at epoch %d)",
                    self.topic,
                    self.index,
                    target,
                    log_.log_end_offset,
                    epoch,
                )
            # Even at the log end: the cut also drops an epoch entry that starts there
            # with no batch in it (a leadership that wrote nothing), without which the
            # leader would report the same divergence forever (KAFKA-10706).
            log_.truncate_to(target)
            self._rebuild_producers()
            self.high_watermark = min(self.high_watermark, log_.log_end_offset)
            return log_.log_end_offset

    def reset_to_leader_range(
        self, leader_epoch: int, leader_log_start: int, leader_leo: int
    ) -> int:
        """After OFFSET_OUT_OF_RANGE: start over at the leader's log start, or cut to its end."""
        with self._lock:
            if self.role != FOLLOWER or self.leader_epoch != leader_epoch or self.closed:
                return self.log.log_end_offset
            log_ = self.log
            if log_.log_end_offset > leader_leo >= 0:
                log_.truncate_to(max(leader_leo, log_.log_start_offset))
            elif log_.log_end_offset < leader_log_start:
                log.info(
                    "%s-%d: restarting the log at the leader's start offset %d",
                    self.topic,
                    self.index,
                    leader_log_start,
                )
                log_.truncate_fully_and_start_at(leader_log_start)
            self._rebuild_producers()
            self.high_watermark = min(self.high_watermark, log_.log_end_offset)
            return log_.log_end_offset

    # ------------------------------------------------------------------ maintenance

    def apply_retention(
        self, now: int, retention_ms: int | None, retention_bytes: int | None
    ) -> int:
        """Delete whole old segments by time and size, never at or above the high
        watermark nor the active segment (Kafka's rule). Returns segments deleted."""
        with self._lock:
            if self.closed:
                return 0
            log_ = self.log
            size = log_.size_bytes
            cut = None
            count = 0
            for segment in log_.segments[:-1]:
                if segment.next_offset > self.high_watermark:
                    break
                stamp = segment.max_timestamp_ms
                if stamp < 0:
                    stamp = int(segment.log_path.stat().st_mtime * 1000)
                expired = (
                    retention_ms is not None and retention_ms >= 0 and now - stamp > retention_ms
                )
                over = (
                    retention_bytes is not None
                    and retention_bytes >= 0
                    and size - segment.size_bytes >= retention_bytes
                )
                if not (expired or over):
                    break
                size -= segment.size_bytes
                cut = segment.next_offset
                count += 1
            if cut is not None:
                log.info("%s-%d: retention moves the log start to %d", self.topic, self.index, cut)
                log_.delete_before(cut)
                self._wake(STATE)
            return count

    def compact(self, now: int, delete_retention_ms: int) -> CleanResult | None:
        """One compaction pass (``cleanup.policy=compact``) below the high watermark.

        Holds the partition's lock for the pass: produce and fetch on this
        partition wait meanwhile (a pass over closed segments of a topic that
        rolls at the default 1 GiB is rare; Kafka's cleaner threads avoid the
        wait by swapping under a short lock, which is the next step here).
        """
        with self._lock:
            if self.closed:
                return None
            result = compact(
                self.log,
                clean_upto_offset=self.high_watermark,
                delete_retention_ms=delete_retention_ms,
                now_ms=now,
            )
            if result.records_removed:
                log.info(
                    "%s-%d: compaction removed %d records (%d tombstones), %d -> %d bytes",
                    self.topic,
                    self.index,
                    result.records_removed,
                    result.tombstones_removed,
                    result.bytes_before,
                    result.bytes_after,
                )
            return result

    # ------------------------------------------------------------------ describe

    def snapshot(self) -> PartitionSnapshot:
        with self._lock:
            log_ = self.log
            return PartitionSnapshot(
                role=self.role,
                leader=self.leader,
                leader_epoch=self.leader_epoch,
                isr=self.isr,
                log_start_offset=log_.log_start_offset,
                log_end_offset=log_.log_end_offset,
                high_watermark=self.high_watermark,
                size_bytes=log_.size_bytes,
            )


@dataclass(frozen=True, slots=True)
class PartitionSnapshot:
    role: str
    leader: int
    leader_epoch: int
    isr: tuple[int, ...]
    log_start_offset: int
    log_end_offset: int
    high_watermark: int
    size_bytes: int


def _epoch_for(partition_log: PartitionLog, offset: int) -> int:
    epoch = -1
    for entry_epoch, start in partition_log.leader_epoch_cache.entries():
        if start > offset:
            break
        epoch = entry_epoch
    return epoch


def _split_and_validate(records: bytes, max_batch_bytes: int) -> list[tuple[bytes, BatchHeader]]:
    """Split concatenated batches and validate each (header and CRC only)."""
    if not records:
        raise PartitionError("CORRUPT_MESSAGE", "no record batch in the request")
    out = []
    position = 0
    view = memoryview(records)
    while position < len(records):
        try:
            header = read_header(records, position)
            end = position + header.size_bytes
            if header.batch_length < 0 or end > len(records):
                raise PartitionError(
                    "CORRUPT_MESSAGE",
                    f"batch at byte {position} declares {header.size_bytes} bytes, "
                    f"{len(records) - position} remain",
                )
            batch = bytes(view[position:end])
            checked = validate_batch(batch, max_batch_bytes=max_batch_bytes)
        except BatchTooLargeError as e:
            raise PartitionError("MESSAGE_TOO_LARGE", f"batch at byte {position}: {e}") from e
        except InvalidRecordError as e:
            raise PartitionError("INVALID_RECORD", f"batch at byte {position}: {e}") from e
        except InvalidBatchError as e:
            raise PartitionError("CORRUPT_MESSAGE", f"batch at byte {position}: {e}") from e
        out.append((batch, checked))
        position = end
    return out
