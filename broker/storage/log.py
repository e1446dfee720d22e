"""A partition's log: an ordered run of ``LogSegment`` files in one directory.

Durability and recovery
-----------------------
Appends go to the active (last) segment through the OS page cache. ``flush`` fsyncs every
dirty segment and then records the log end offset as the *recovery point* in
``recovery-point-offset-checkpoint``: everything below it is known to be on disk. Flush
policy (``LogConfig``): ``flush_messages=None, flush_ms=None`` (the default, Kafka's) never
fsyncs on append and relies on replication for durability, so a power loss can drop the
unflushed tail of this replica; ``flush_messages=1`` fsyncs every batch (safe alone, costs
one fsync per produce); a larger count or ``flush_ms`` bounds the loss window. A segment is
always flushed when it is rolled, as in Kafka, so the recovery point never trails by more
than the active segment.

On open, segments wholly below the recovery point are trusted (indexes read, only the
tail after the last index entry scanned); the others, and always the last one, are
recovered: scanned with CRC checks, cut at the first torn or corrupt batch, indexes
rebuilt. If a segment before the last is cut, later segments follow a hole and are deleted.

``log_start_offset`` (first offset a reader may fetch) is persisted in
``log-start-offset-checkpoint`` when retention or ``delete_before`` moves it.

Leader epochs
-------------
``leader_epoch_cache`` (``broker.storage.leader_epoch``) records where each leader epoch
starts. As in Kafka's ``UnifiedLog``, every append (leader or follower) whose batch epoch
is above the latest cached one adds an entry at the batch's base offset; truncating the
tail truncates the cache from the end, moving the log start truncates it from the start.
On open the checkpoint is read and the batches of every recovered segment are replayed
into it (a crash may have hit between an append and its checkpoint write); without a
readable checkpoint the cache is rebuilt from all batch headers. It is then truncated at
the log start and the log end, as Kafka's ``LogLoader`` does.

Segment swaps (compaction)
--------------------------
``replace_segments`` swaps a run of segments for one cleaned file, with Kafka's
crash-safe renames: the cleaner writes ``<base>.log.cleaned``; renaming it to
``<base>.log.swap`` is the commit point; then the old segments are deleted and the swap
file is renamed to ``<base>.log``. On open, ``.cleaned`` files (an unfinished clean) are
deleted and ``.swap`` files (a committed swap) are completed: the segments they cover are
deleted and the file is renamed into place.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from broker.record_batch import (
    BatchHeader,
    BatchTooLargeError,
    CorruptBatchError,
    iter_batches,
    read_header,
)
from broker.storage.checkpoint import (
    CorruptCheckpointError,
    fsync_dir,
    read_offset_checkpoint,
    write_offset_checkpoint,
)
from broker.storage.leader_epoch import (
    LEADER_EPOCH_CHECKPOINT,
    UNDEFINED_EPOCH,
    EpochEntry,
    LeaderEpochCache,
)
from broker.storage.segment import LogSegment, scan_batch_file, segment_file_name

__all__ = [
    "CLEANED_SUFFIX",
    "LOG_START_CHECKPOINT",
    "RECOVERY_POINT_CHECKPOINT",
    "SWAP_SUFFIX",
    "LogConfig",
    "OffsetOutOfRangeError",
    "PartitionLog",
]

logger = logging.getLogger(__name__)

RECOVERY_POINT_CHECKPOINT = "recovery-point-offset-checkpoint"
LOG_START_CHECKPOINT = "log-start-offset-checkpoint"
CLEANED_SUFFIX = ".cleaned"
"""Suffix of a cleaned segment being written: ``<base>.log.cleaned`` (not yet committed)."""
SWAP_SUFFIX = ".swap"
"""Suffix of a committed cleaned segment whose swap into the log may be unfinished."""
_SEGMENT_LOG = re.compile(r"^(\d{20})\.log$")
_SWAP_LOG = re.compile(r"^(\d{20})\.log\.swap$")
_INDEX_SUFFIXES = (".index", ".timeindex")
_INT32_MAX = (1 << 31) - 1
_UINT32_MAX = (1 << 32) - 1

_SegmentPredicate = Callable[[LogSegment], bool]


class OffsetOutOfRangeError(Exception):
    """A fetch offset below ``log_start_offset`` or above ``log_end_offset``."""

    def __init__(self, offset: int, log_start_offset: int, log_end_offset: int) -> None:
        super().__init__(f"offset {offset} is outside [{log_start_offset}, {log_end_offset}]")
        self.offset = offset
        self.log_start_offset = log_start_offset
        self.log_end_offset = log_end_offset


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Per-partition storage settings; names and meanings follow Kafka's topic configs."""

    segment_bytes: int = 1 << 30
    """``segment.bytes``: roll before the active segment would exceed this size."""
    segment_ms: int = 7 * 24 * 3600 * 1000
    """``segment.ms``: roll once this long has passed since the segment's first append."""
    index_interval_bytes: int = 4096
    """``index.interval.bytes``: log bytes between offset index entries."""
    flush_messages: int | None = None
    """``flush.messages``: fsync after this many records; None never fsyncs on append."""
    flush_ms: int | None = None
    """``flush.ms``: fsync when this long has passed since the last flush (checked on
    append); None disables it."""

    def __post_init__(self) -> None:
        if not 0 < self.segment_bytes <= _INT32_MAX:
            raise ValueError(f"segment_bytes {self.segment_bytes} out of (0, 2^31)")
        if self.segment_ms <= 0:
            raise ValueError(f"segment_ms {self.segment_ms} must be positive")
        if self.index_interval_bytes < 0:
            raise ValueError(f"index_interval_bytes {self.index_interval_bytes} < 0")
        if self.flush_messages is not None and self.flush_messages < 1:
            raise ValueError(f"flush_messages {self.flush_messages} must be >= 1 or None")
        if self.flush_ms is not None and self.flush_ms < 0:
            raise ValueError(f"flush_ms {self.flush_ms} must be >= 0 or None")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_cleaned_file(path: Path, base_offset: int, next_offset: int) -> None:
    """A cleaned segment must be whole and cover exactly [base_offset, next_offset)."""
    expected = base_offset
    size = 0
    for _, header, batch in scan_batch_file(path):
        if header.base_offset != expected:
            raise ValueError(
                f"{path}: batch at offset {header.base_offset} where {expected} was expected"
            )
        expected = header.next_offset
        size += len(batch)
        if header.last_offset - base_offset > _UINT32_MAX or size > _UINT32_MAX:
            raise ValueError(f"{path}: offsets or size exceed one segment's range")
    if expected != next_offset:
        raise ValueError(f"{path}: ends at offset {expected}, the segments at {next_offset}")


def _delete_segment_files(directory: Path, base_offset: int) -> None:
    """Remove a closed segment's files, the ``.log`` first: it defines the segment."""
    for suffix in (".log", *_INDEX_SUFFIXES):
        (directory / segment_file_name(base_offset, suffix)).unlink(missing_ok=True)


class PartitionLog:
    """The log of one partition replica in ``directory``; see the module docstring.

    Not thread-safe: the caller serialises access (one writer, reads in between).
    """

    def __init__(
        self,
        directory: Path | str,
        config: LogConfig | None = None,
        *,
        new: bool = False,
        before_first_write: Callable[[], None] | None = None,
    ) -> None:
        """Open the log in ``directory`` (made if missing). ``new``: the caller has just
        made the directory for it, so there is nothing to list, read or recover.
        ``before_first_write`` runs once (until it succeeds) before the log first puts
        on disk what a restart would read as its content: a batch, a log start offset
        or a recovery point. What must be there before those, and need not be before."""
        self.directory = Path(directory)
        self.config = config or LogConfig()
        self._before_first_write = before_first_write
        if not new:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._segments: list[LogSegment] = []
        self._bases: list[int] = []
        self._closed = False
        self._unflushed_messages = 0
        self._last_flush_ms = _now_ms()
        self._recovery_point = 0
        self._checkpointed_recovery_point: int | None = None  # What the file holds.
        self._log_start_offset = 0
        self.leader_epoch_cache = LeaderEpochCache(self.directory / LEADER_EPOCH_CHECKPOINT)
        """Where each leader epoch starts in this log; see the module docstring."""
        try:
            if new:
                self._create()
            else:
                self._load()
        except BaseException:
            for segment in self._segments:
                segment.close()
            raise

    # ------------------------------------------------------------------ open

    def _create(self) -> None:
        """A log in a directory just made for it: one empty segment at offset 0, as
        ``_load`` opens for an empty directory, without listing or reading anything
        (a broker creating thousands of partitions spent most of its time there). The
        segment's file is made by its first append."""
        self._add_segment(
            LogSegment.create(
                self.directory, 0, index_interval_bytes=self.config.index_interval_bytes
            )
        )

    def _load(self) -> None:
        self._finish_interrupted_swaps()
        bases: list[int] = []
        for entry in os.listdir(self.directory):
            path = self.directory / entry
            if entry.endswith(".tmp"):
                path.unlink(missing_ok=True)  # A checkpoint write that did not finish.
                continue
            match = _SEGMENT_LOG.match(entry)
            if match:
                bases.append(int(match.group(1)))
        bases.sort()
        # Index files whose .log is gone: a segment deletion that did not finish.
        known = {f"{base:020d}" for base in bases}
        for entry in os.listdir(self.directory):
            stem, dot, suffix = entry.partition(".")
            if dot and "." + suffix in _INDEX_SUFFIXES and stem not in known:
                (self.directory / entry).unlink(missing_ok=True)

        checkpoint = read_offset_checkpoint(self.directory / RECOVERY_POINT_CHECKPOINT)
        self._checkpointed_recovery_point = checkpoint
        recovery_point = checkpoint if checkpoint is not None else 0
        start_checkpoint = read_offset_checkpoint(self.directory / LOG_START_CHECKPOINT)
        first_recovered: int | None = None
        for i, base in enumerate(bases):
            is_last = i == len(bases) - 1
            needs_recovery = is_last or bases[i + 1] > recovery_point
            segment = LogSegment.open(
                self.directory,
                base,
                index_interval_bytes=self.config.index_interval_bytes,
                recover=needs_recovery,
            )
            self._add_segment(segment)
            if needs_recovery and first_recovered is None:
                first_recovered = i
            if segment.truncated_on_recovery and not is_last:
                logger.warning(
                    "%s: segment %d had a corrupt tail; deleting %d later segments",
                    self.directory,
                    base,
                    len(bases) - i - 1,
                )
                for later in bases[i + 1 :]:
                    LogSegment(self.directory, later, self.config.index_interval_bytes).delete()
                break
        if not self._segments:
            # A log that never received a batch: as ``_create`` makes it, a segment
            # whose file the first append makes. Opening (creating) its file here held
            # a descriptor per idle partition: a broker restarted with 100,000 idle
            # replicas ran out of descriptors and never rejoined.
            start = start_checkpoint if start_checkpoint is not None else 0
            self._add_segment(
                LogSegment.create(
                    self.directory, start, index_interval_bytes=self.config.index_interval_bytes
                )
            )
        first_base = self._segments[0].base_offset
        self._log_start_offset = min(max(start_checkpoint or 0, first_base), self.log_end_offset)
        self._load_leader_epoch_cache(first_recovered if first_recovered is not None else 0)
        if bases:
            # Recovered bytes may exist only in the page cache: make them durable now.
            self.flush()

    def _load_leader_epoch_cache(self, first_recovered: int) -> None:
        """Read the checkpoint, replay recovered segments into it, cut it to the log.

        ``first_recovered`` is the slot of the first segment opened by a full scan; the
        checkpoint may lack the epochs of its batches. A missing or unreadable checkpoint
        is rebuilt from every segment (the batch headers carry all it records).
        """
        path = self.directory / LEADER_EPOCH_CHECKPOINT
        loaded: list[EpochEntry] | None = None
        try:
            if path.exists():
                loaded = LeaderEpochCache.load(path).entries()
        except CorruptCheckpointError as e:
            logger.warning("%s; rebuilding it from the log", e)
        entries = list(loaded) if loaded is not None else []
        latest = entries[-1].epoch if entries else UNDEFINED_EPOCH
        for segment in self._segments[first_recovered if loaded is not None else 0 :]:
            for _, header in segment.batches():
                if header.partition_leader_epoch > latest:
                    latest = header.partition_leader_epoch
                    entries.append(EpochEntry(latest, header.base_offset))
        cache = LeaderEpochCache(path, entries)
        # As Kafka's LogLoader: entries before the start or past the recovered end are
        # stale. The end goes last so that no entry starts at or past it, even when the log
        # is empty (start == end), which makes the result what the batches alone give.
        cache.truncate_from_start(self._log_start_offset)
        cache.truncate_from_end(self.log_end_offset)
        # No file and no entries mean the same (an empty cache): a new log writes none.
        if cache.entries() != (loaded if loaded is not None else []):
            cache.flush()
        self.leader_epoch_cache = cache

    def _finish_interrupted_swaps(self) -> None:
        """Discard uncommitted cleaned files and complete committed swaps (see the module
        docstring). A ``.swap`` file that is not whole raises ``CorruptBatchError``: it was
        fsynced before its commit rename, so this is disk corruption, not a crash."""
        changed = False
        swaps: list[tuple[int, Path]] = []
        for entry in sorted(os.listdir(self.directory)):
            path = self.directory / entry
            if entry.endswith(CLEANED_SUFFIX):
                logger.info("%s: deleting %s of an unfinished clean", self.directory, entry)
                path.unlink(missing_ok=True)
                changed = True
            match = _SWAP_LOG.match(entry)
            if match:
                swaps.append((int(match.group(1)), path))
        for base, swap in swaps:
            end = base
            for _, header, _ in scan_batch_file(swap):
                end = header.next_offset
            logger.info("%s: completing the swap of %s (to offset %d)", self.directory, swap, end)
            for entry in os.listdir(self.directory):
                match = _SEGMENT_LOG.match(entry)
                # The segment at the swap's base and every one it covers were replaced.
                if match and (base <= int(match.group(1)) < max(end, base + 1)):
                    _delete_segment_files(self.directory, int(match.group(1)))
            for suffix in _INDEX_SUFFIXES:  # Indexes of the replaced segment at ``base``.
                (self.directory / segment_file_name(base, suffix)).unlink(missing_ok=True)
            os.replace(swap, self.directory / segment_file_name(base, ".log"))
            changed = True
        if changed:
            fsync_dir(self.directory)

    def _add_segment(self, segment: LogSegment) -> None:
        self._segments.append(segment)
        self._bases.append(segment.base_offset)

    # ------------------------------------------------------------------ properties

    @property
    def log_start_offset(self) -> int:
        return self._log_start_offset

    @property
    def log_end_offset(self) -> int:
        return self._segments[-1].next_offset

    @property
    def recovery_point(self) -> int:
        """Every offset below this is fsynced."""
        return self._recovery_point

    @property
    def size_bytes(self) -> int:
        return sum(segment.size_bytes for segment in self._segments)

    @property
    def segments(self) -> list[LogSegment]:
        """The segments, oldest first (a copy of the list; do not mutate them)."""
        return list(self._segments)

    @property
    def active_segment(self) -> LogSegment:
        return self._segments[-1]

    @property
    def latest_epoch(self) -> int:
        """The newest leader epoch in the epoch cache; -1 when it is empty."""
        return self.leader_epoch_cache.latest_epoch

    # ------------------------------------------------------------------ append

    def append(self, batch: bytes, now_ms: int | None = None) -> BatchHeader:
        """Append one whole batch whose base offset is already ``log_end_offset``.

        Rolls first when the batch would push the active segment past ``segment_bytes``
        or ``segment_ms`` has passed since its first append. ``now_ms`` defaults to the
        wall clock. A batch epoch above the latest cached one starts a new epoch-cache
        entry. Returns the batch header.
        """
        self._check_open()
        header = read_header(batch)
        if header.base_offset != self.log_end_offset:
            raise ValueError(
                f"batch base offset {header.base_offset} != log end offset {self.log_end_offset}"
            )
        self._check_batch_size(header)
        self._append_checked(batch, header, _now_ms() if now_ms is None else now_ms)
        return header

    def append_batches(self, data: bytes, now_ms: int | None = None) -> int:
        """Append batches that already carry their offsets (a follower copying its leader).

        ``data`` is whole batches back to back, as a leader's fetch response holds them.
        Every batch is checked before anything is written: magic 2, CRC-32C, size, and
        offsets contiguous with this log (the first base offset is ``log_end_offset``, each
        next one follows the previous batch's last offset). Any failure raises
        (``CorruptBatchError``, ``BatchTooLargeError`` or ``ValueError``) and appends
        nothing. Batches are stored as they are (header-level only; records are never
        decoded), rolling segments as ``append`` does. If a write fails part way, the
        batches already written are truncated away again. Returns the new log end offset.
        """
        self._check_open()
        checked = self._check_replica_batches(data)
        now = _now_ms() if now_ms is None else now_ms
        end_before = self.log_end_offset
        try:
            for position, header in checked:
                self._append_checked(data[position : position + header.size_bytes], header, now)
        except BaseException:
            self._undo_appends(end_before)
            raise
        return self.log_end_offset

    def _check_replica_batches(self, data: bytes) -> list[tuple[int, BatchHeader]]:
        batches = iter_batches(data)
        found = list(batches)
        if batches.error is not None:
            raise CorruptBatchError(f"batch {len(found)} of the data: {batches.error}")
        expected = self.log_end_offset
        for index, (_, header) in enumerate(found):
            if header.base_offset != expected:
                raise ValueError(
                    f"batch {index} starts at offset {header.base_offset}, expected {expected} "
                    f"(log end offset {self.log_end_offset}): not contiguous"
                )
            if header.last_offset_delta < 0:
                raise CorruptBatchError(
                    f"batch {index} has lastOffsetDelta {header.last_offset_delta}"
                )
            self._check_batch_size(header)
            expected = header.next_offset
        return found

    def _check_batch_size(self, header: BatchHeader) -> None:
        if header.size_bytes > self.config.segment_bytes:
            raise BatchTooLargeError(
                f"batch of {header.size_bytes} bytes exceeds segment_bytes "
                f"{self.config.segment_bytes}"
            )

    def _append_checked(self, batch: bytes, header: BatchHeader, now_ms: int) -> None:
        """Roll if due, write, update the epoch cache, flush per the policy."""
        if self._should_roll(header, now_ms):
            self.roll()
        self._first_write()
        # A new leader's epoch entry goes to disk before the first batch under it.
        self.leader_epoch_cache.write_pending()
        self.active_segment.append(batch, now_ms)
        epoch = header.partition_leader_epoch
        # As Kafka, leader and follower appends alike; only a newer epoch is assigned (the
        # rule of Kafka's LogSegment.recover), so a stray older one never rewrites the cache.
        if epoch > self.leader_epoch_cache.latest_epoch:
            self.leader_epoch_cache.assign(epoch, header.base_offset)
        self._unflushed_messages += header.records_count
        config = self.config
        if (
            config.flush_messages is not None and self._unflushed_messages >= config.flush_messages
        ) or (config.flush_ms is not None and now_ms - self._last_flush_ms >= config.flush_ms):
            self.flush(now_ms)

    def _undo_appends(self, log_end_offset: int) -> None:
        """Best effort after a failed write: cut back to ``log_end_offset``."""
        if self._closed or self.log_end_offset <= log_end_offset:
            return
        try:
            self.truncate_to(log_end_offset)
        except Exception:
            logger.exception("%s: cannot undo a partial append", self.directory)

    def _should_roll(self, header: BatchHeader, now_ms: int) -> bool:
        active = self.active_segment
        if active.is_empty:
            return False
        if active.size_bytes + header.size_bytes > self.config.segment_bytes:
            return True
        if not active.fits(header):
            return True
        rolling_base = active.rolling_base_ms
        return rolling_base is not None and now_ms - rolling_base >= self.config.segment_ms

    def roll(self) -> LogSegment:
        """Flush the active segment and start a new one at ``log_end_offset``.

        A no-op returning the active segment when it is empty.
        """
        self._check_open()
        if self.active_segment.is_empty:
            return self.active_segment
        self.flush()
        # Its file comes with the append that follows; until then the segment before
        # it is the last one on disk, which a restart opens as the active one.
        segment = LogSegment.create(
            self.directory,
            self.log_end_offset,
            index_interval_bytes=self.config.index_interval_bytes,
        )
        self._add_segment(segment)
        return segment

    # ------------------------------------------------------------------ read

    def read(self, offset: int, max_bytes: int, max_offset: int | None = None) -> bytes:
        """Whole batches from the one containing ``offset``, from a single segment.

        At most ``max_bytes``, except that the first batch is always whole (KIP-74).
        ``max_offset`` (a consumer's bound, the high watermark) limits the result to
        batches whose last offset is below it; a batch straddling it is not returned.
        Empty when nothing qualifies, e.g. at ``log_end_offset``;
        ``OffsetOutOfRangeError`` outside ``[log_start_offset, log_end_offset]``.
        """
        self._check_open()
        if offset < self._log_start_offset or offset > self.log_end_offset:
            raise OffsetOutOfRangeError(offset, self._log_start_offset, self.log_end_offset)
        if max_offset is not None and offset >= max_offset:
            return b""
        slot = max(bisect.bisect_right(self._bases, offset) - 1, 0)
        for segment in self._segments[slot:]:
            data = segment.read(offset, max_bytes, max_offset)
            if data or segment.next_offset > offset:
                return data
        return b""

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None:
        """``(offset, timestamp)`` of the first record with timestamp ``>= timestamp_ms``.

        ListOffsets by time, as Kafka's ``fetchOffsetByTimestamp``: the first segment whose
        largest timestamp reaches the target, its time index, then batch headers; only the
        one batch found is decoded to return the exact record. Records below
        ``log_start_offset`` are skipped. None when no record qualifies.
        """
        self._check_open()
        for segment in self._segments:
            if segment.max_timestamp_ms >= timestamp_ms:
                found = segment.find_offset_by_timestamp(timestamp_ms, self._log_start_offset)
                if found is not None:
                    return found
        return None

    def max_timestamp_offset(self) -> tuple[int, int] | None:
        """``(offset, timestamp)`` of the record with the largest timestamp (ListOffsets
        spec -3, ``MAX_TIMESTAMP``); the first such record on ties. None when empty."""
        self._check_open()
        best: LogSegment | None = None
        for segment in self._segments:
            if not segment.is_empty and (
                best is None or segment.max_timestamp_ms > best.max_timestamp_ms
            ):
                best = segment
        return best.max_timestamp_offset() if best is not None else None

    # ------------------------------------------------------------------ truncate

    def truncate_to(self, offset: int) -> int:
        """Drop everything at and after ``offset`` (a follower matching its leader).

        As Kafka's ``truncateTo``, an ``offset`` inside a batch cuts at the start of that
        batch, so ``log_end_offset`` may end below ``offset``; callers read it afterwards.
        ``offset`` must not be below ``log_start_offset`` (``ValueError``, nothing
        changes); if the cut lands below it, the log start follows the log end. Whole
        segments are deleted and one is cut. The epoch cache is truncated at the new log
        end, and so is it when ``offset`` is at or past the log end (KAFKA-10706: a leader
        that wrote nothing leaves an entry at the log end that may conflict with the new
        leader's). Returns the bytes removed.
        """
        self._check_open()
        if offset >= self.log_end_offset:
            self.leader_epoch_cache.truncate_from_end(self.log_end_offset)
            return 0
        if offset < self._log_start_offset:
            raise ValueError(
                f"offset {offset} is below log start offset {self._log_start_offset}; "
                "use truncate_fully_and_start_at"
            )
        slot = max(bisect.bisect_right(self._bases, offset) - 1, 0)
        target = self._segments[slot]
        removed = 0
        # Keep the segment the offset falls in, even when it becomes empty, so the log
        # always has an active segment whose base is at or below the log end offset.
        for segment in self._segments[slot + 1 :]:
            removed += segment.size_bytes
            segment.delete()
        del self._segments[slot + 1 :]
        del self._bases[slot + 1 :]
        removed += target.truncate_to(offset)
        fsync_dir(self.directory)
        log_end = self.log_end_offset
        self.leader_epoch_cache.truncate_from_end(log_end)
        if log_end < self._log_start_offset:
            self._set_log_start_offset(log_end)
        self._recovery_point = min(self._recovery_point, log_end)
        self.flush()
        return removed

    def truncate_fully_and_start_at(self, offset: int) -> None:
        """Delete every segment and restart empty at ``offset`` (start and end).

        The epoch cache is cleared.
        """
        self._check_open()
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        for segment in self._segments:
            segment.delete()
        self._segments.clear()
        self._bases.clear()
        self.leader_epoch_cache.clear()
        segment = LogSegment.create(
            self.directory, offset, index_interval_bytes=self.config.index_interval_bytes
        )
        # An empty file at ``offset`` says where the log restarts, should the process
        # die before the log start checkpoint below is written.
        segment.make_file()
        self._add_segment(segment)
        self._set_log_start_offset(offset)
        self._recovery_point = offset
        self.flush()

    # ------------------------------------------------------------------ retention

    def delete_before(self, offset: int) -> list[int]:
        """Advance ``log_start_offset`` to ``offset`` and delete segments wholly below it.

        Never deletes the active segment. The epoch cache is truncated from the start (the
        entry covering ``offset`` now starts there). Returns the base offsets of deleted
        segments.
        """
        self._check_open()
        if offset > self.log_end_offset:
            raise OffsetOutOfRangeError(offset, self._log_start_offset, self.log_end_offset)
        deleted = self._delete_oldest(lambda segment: segment.next_offset <= offset)
        if offset > self._log_start_offset:
            self._set_log_start_offset(offset)
        return deleted

    def apply_retention(
        self, now_ms: int, retention_ms: int | None, retention_bytes: int | None
    ) -> list[int]:
        """Delete old whole segments by ``retention.ms`` and ``retention.bytes``.

        By time, a segment goes once its largest timestamp (the file's mtime when it has
        none) is more than ``retention_ms`` old; by bytes, the oldest segments go while the
        log stays at or above ``retention_bytes`` without them. None or a negative value
        disables a limit. Deletion stops at the first segment that must stay, and the active
        segment always stays. Returns the base offsets of the deleted segments.
        """
        self._check_open()
        deleted: list[int] = []
        if retention_ms is not None and retention_ms >= 0:

            def expired(segment: LogSegment) -> bool:
                stamp = segment.max_timestamp_ms
                if stamp < 0:
                    stamp = int(segment.log_path.stat().st_mtime * 1000)
                return now_ms - stamp > retention_ms

            deleted += self._delete_oldest(expired)
        if retention_bytes is not None and retention_bytes >= 0:
            excess = self.size_bytes - retention_bytes

            def over(segment: LogSegment) -> bool:
                nonlocal excess
                if excess - segment.size_bytes < 0:
                    return False
                excess -= segment.size_bytes
                return True

            deleted += self._delete_oldest(over)
        return deleted

    def _delete_oldest(self, predicate: _SegmentPredicate) -> list[int]:
        deleted: list[int] = []
        while len(self._segments) > 1 and predicate(self._segments[0]):
            segment = self._segments.pop(0)
            self._bases.pop(0)
            deleted.append(segment.base_offset)
            if self._segments[0].base_offset > self._log_start_offset:
                # Persist the new start before the files go, so a crash in between
                # never exposes a start offset whose data is missing.
                self._set_log_start_offset(self._segments[0].base_offset)
            segment.delete()
        if deleted:
            fsync_dir(self.directory)
        return deleted

    def _first_write(self) -> None:
        if self._before_first_write is not None:
            self._before_first_write()
            self._before_first_write = None

    def _set_log_start_offset(self, offset: int) -> None:
        """Move and persist the log start; the epoch cache forgets what lies below it."""
        self._log_start_offset = offset
        self._first_write()
        write_offset_checkpoint(self.directory / LOG_START_CHECKPOINT, offset)
        self.leader_epoch_cache.truncate_from_start(offset)

    # ------------------------------------------------------------------ compaction

    def cleaned_path(self, base_offset: int) -> Path:
        """Where a cleaner writes the segment that will replace those from ``base_offset``."""
        return self.directory / (segment_file_name(base_offset, ".log") + CLEANED_SUFFIX)

    def replace_segments(self, old: Sequence[LogSegment], cleaned: Path) -> LogSegment:
        """Swap the consecutive, non-active segments ``old`` for the file ``cleaned``.

        ``cleaned`` must be ``cleaned_path(old[0].base_offset)``, holding whole batches
        that cover exactly the offsets of ``old`` (contiguous from the first base offset to
        the last segment's next offset): compaction rewrites batches but never moves or
        drops offsets. It is checked (CRC, contiguity) and fsynced; a bad file is deleted
        and raises ``ValueError`` or ``CorruptBatchError`` with the log unchanged.

        Then, crash-safe as Kafka's ``replaceSegments``: rename to ``.swap`` (the commit
        point; an open completes the swap from there), delete the old segments, rename the
        swap file to ``<base>.log``, rebuild its indexes. A failure after the commit point
        closes this log and re-raises: reopening it finishes the swap. Returns the new
        segment, which takes the place of ``old``.
        """
        self._check_open()
        slot = self._check_replaceable(old)
        base, end = old[0].base_offset, old[-1].next_offset
        try:
            if cleaned != self.cleaned_path(base):
                raise ValueError(f"{cleaned} is not {self.cleaned_path(base)}")
            _check_cleaned_file(cleaned, base, end)
            fd = os.open(cleaned, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            cleaned.unlink(missing_ok=True)
            raise
        swap = cleaned.with_name(segment_file_name(base, ".log") + SWAP_SUFFIX)
        os.replace(cleaned, swap)
        fsync_dir(self.directory)  # Committed: an open from here on completes the swap.
        try:
            for segment in old:
                segment.delete()
            os.replace(swap, self.directory / segment_file_name(base, ".log"))
            fsync_dir(self.directory)
            segment = LogSegment.open(
                self.directory, base, index_interval_bytes=self.config.index_interval_bytes
            )
            segment.flush()
        except BaseException:
            logger.exception("%s: segment swap failed; closing the log", self.directory)
            self._close_segments()
            raise
        self._segments[slot : slot + len(old)] = [segment]
        self._bases[slot : slot + len(old)] = [base]
        return segment

    def _check_replaceable(self, old: Sequence[LogSegment]) -> int:
        """The slot of ``old`` in this log; ``ValueError`` unless it may be replaced."""
        if not old:
            raise ValueError("no segments to replace")
        try:
            slot = next(i for i, s in enumerate(self._segments) if s is old[0])
        except StopIteration:
            raise ValueError(f"{old[0]!r} is not a segment of {self!r}") from None
        if any(a is not b for a, b in zip(self._segments[slot:], old, strict=False)) or (
            slot + len(old) > len(self._segments)
        ):
            raise ValueError(f"{list(old)} are not consecutive segments of {self!r}")
        if slot + len(old) == len(self._segments):
            raise ValueError("the active segment cannot be replaced")
        return slot

    # ------------------------------------------------------------------ lifecycle

    def flush(self, now_ms: int | None = None) -> None:
        """fsync every dirty segment and checkpoint the recovery point at the log end."""
        self._check_open()
        for segment in self._segments:
            if segment.dirty:
                segment.flush()
        self._unflushed_messages = 0
        self._last_flush_ms = _now_ms() if now_ms is None else now_ms
        self._recovery_point = self.log_end_offset
        # No file means "recover from 0", so an empty log has nothing to write.
        if self._recovery_point != (self._checkpointed_recovery_point or 0):
            self._first_write()
            write_offset_checkpoint(
                self.directory / RECOVERY_POINT_CHECKPOINT, self._recovery_point
            )
            self._checkpointed_recovery_point = self._recovery_point

    def close(self, *, flush: bool = True) -> None:
        """Flush (a clean shutdown) and close every segment; ``flush=False`` for a log
        about to be deleted, whose checkpoint and fsyncs would be thrown away."""
        if self._closed:
            return
        try:
            if flush:
                self.flush()
        finally:
            self._close_segments()

    def _close_segments(self) -> None:
        self._closed = True
        for segment in self._segments:
            segment.close()

    def __enter__(self) -> PartitionLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"log {self.directory} is closed")

    def __repr__(self) -> str:
        return (
            f"PartitionLog({str(self.directory)!r}, start={self._log_start_offset}, "
            f"end={self.log_end_offset}, segments={len(self._segments)})"
        )
