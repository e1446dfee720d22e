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
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from broker.record_batch import BatchHeader, BatchTooLargeError, read_header
from broker.storage.checkpoint import (
    fsync_dir,
    read_offset_checkpoint,
    write_offset_checkpoint,
)
from broker.storage.segment import LogSegment

__all__ = [
    "LOG_START_CHECKPOINT",
    "RECOVERY_POINT_CHECKPOINT",
    "LogConfig",
    "OffsetOutOfRangeError",
    "PartitionLog",
]

logger = logging.getLogger(__name__)

RECOVERY_POINT_CHECKPOINT = "recovery-point-offset-checkpoint"
LOG_START_CHECKPOINT = "log-start-offset-checkpoint"
_SEGMENT_LOG = re.compile(r"^(\d{20})\.log$")
_INDEX_SUFFIXES = (".index", ".timeindex")
_INT32_MAX = (1 << 31) - 1

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


class PartitionLog:
    """The log of one partition replica in ``directory``; see the module docstring.

    Not thread-safe: the caller serialises access (one writer, reads in between).
    """

    def __init__(self, directory: Path | str, config: LogConfig | None = None) -> None:
        self.directory = Path(directory)
        self.config = config or LogConfig()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._segments: list[LogSegment] = []
        self._bases: list[int] = []
        self._closed = False
        self._unflushed_messages = 0
        self._last_flush_ms = _now_ms()
        self._recovery_point = 0
        self._checkpointed_recovery_point: int | None = None  # What the file holds.
        self._log_start_offset = 0
        try:
            self._load()
        except BaseException:
            for segment in self._segments:
                segment.close()
            raise

    # ------------------------------------------------------------------ open

    def _load(self) -> None:
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
            start = start_checkpoint if start_checkpoint is not None else 0
            self._add_segment(
                LogSegment.open(
                    self.directory,
                    start,
                    index_interval_bytes=self.config.index_interval_bytes,
                )
            )
            fsync_dir(self.directory)
        first_base = self._segments[0].base_offset
        self._log_start_offset = min(max(start_checkpoint or 0, first_base), self.log_end_offset)
        # Recovered bytes may exist only in the page cache: make them durable now.
        self.flush()

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

    # ------------------------------------------------------------------ append

    def append(self, batch: bytes, now_ms: int | None = None) -> BatchHeader:
        """Append one whole batch whose base offset is already ``log_end_offset``.

        Rolls first when the batch would push the active segment past ``segment_bytes``
        or ``segment_ms`` has passed since its first append. ``now_ms`` defaults to the
        wall clock. Returns the batch header.
        """
        self._check_open()
        now = _now_ms() if now_ms is None else now_ms
        header = read_header(batch)
        if header.base_offset != self.log_end_offset:
            raise ValueError(
                f"batch base offset {header.base_offset} != log end offset {self.log_end_offset}"
            )
        if header.size_bytes > self.config.segment_bytes:
            raise BatchTooLargeError(
                f"batch of {header.size_bytes} bytes exceeds segment_bytes "
                f"{self.config.segment_bytes}"
            )
        if self._should_roll(header, now):
            self.roll()
        self.active_segment.append(batch, now)
        self._unflushed_messages += header.records_count
        config = self.config
        if (
            config.flush_messages is not None and self._unflushed_messages >= config.flush_messages
        ) or (config.flush_ms is not None and now - self._last_flush_ms >= config.flush_ms):
            self.flush(now)
        return header

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
        segment = LogSegment.open(
            self.directory,
            self.log_end_offset,
            index_interval_bytes=self.config.index_interval_bytes,
        )
        self._add_segment(segment)
        fsync_dir(self.directory)
        return segment

    # ------------------------------------------------------------------ read

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches from the one containing ``offset``, from a single segment.

        At most ``max_bytes``, except that the first batch is always whole (KIP-74).
        Empty at ``log_end_offset``; ``OffsetOutOfRangeError`` outside
        ``[log_start_offset, log_end_offset]``.
        """
        self._check_open()
        if offset < self._log_start_offset or offset > self.log_end_offset:
            raise OffsetOutOfRangeError(offset, self._log_start_offset, self.log_end_offset)
        slot = max(bisect.bisect_right(self._bases, offset) - 1, 0)
        for segment in self._segments[slot:]:
            data = segment.read(offset, max_bytes)
            if data:
                return data
        return b""

    # ------------------------------------------------------------------ truncate

    def truncate_to(self, offset: int) -> int:
        """Drop everything at and after ``offset`` (a follower matching its leader).

        ``offset`` must be a batch boundary (``ValueError`` otherwise, and nothing
        changes) and not below ``log_start_offset``; at or past ``log_end_offset`` this is a
        no-op. Whole segments are deleted and one is cut. Returns the bytes removed.
        """
        self._check_open()
        if offset >= self.log_end_offset:
            return 0
        if offset < self._log_start_offset:
            raise ValueError(
                f"offset {offset} is below log start offset {self._log_start_offset}; "
                "use truncate_fully_and_start_at"
            )
        slot = max(bisect.bisect_right(self._bases, offset) - 1, 0)
        target = self._segments[slot]
        if offset != target.base_offset:
            found = target.find_position(offset)
            if found is None or found[1].base_offset != offset:
                raise ValueError(f"offset {offset} is not a batch boundary")
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
        self._recovery_point = min(self._recovery_point, offset)
        self.flush()
        return removed

    def truncate_fully_and_start_at(self, offset: int) -> None:
        """Delete every segment and restart empty at ``offset`` (start and end)."""
        self._check_open()
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        for segment in self._segments:
            segment.delete()
        self._segments.clear()
        self._bases.clear()
        self._add_segment(
            LogSegment.open(
                self.directory, offset, index_interval_bytes=self.config.index_interval_bytes
            )
        )
        fsync_dir(self.directory)
        self._set_log_start_offset(offset)
        self._recovery_point = offset
        self.flush()

    # ------------------------------------------------------------------ retention

    def delete_before(self, offset: int) -> list[int]:
        """Advance ``log_start_offset`` to ``offset`` and delete segments wholly below it.

        Never deletes the active segment. Returns the base offsets of deleted segments.
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

    def _set_log_start_offset(self, offset: int) -> None:
        self._log_start_offset = offset
        write_offset_checkpoint(self.directory / LOG_START_CHECKPOINT, offset)

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
        if self._recovery_point != self._checkpointed_recovery_point:
            write_offset_checkpoint(
                self.directory / RECOVERY_POINT_CHECKPOINT, self._recovery_point
            )
            self._checkpointed_recovery_point = self._recovery_point

    def close(self) -> None:
        """Flush (a clean shutdown) and close every segment."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
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
