"""One log segment: ``<base>.log`` plus its sparse ``.index`` and ``.timeindex``.

Layout, as Kafka's
------------------
``<20-digit base offset>.log`` holds whole RecordBatch v2 batches back to back, stored as
the leader stamped them. ``.index`` is a sparse offset index of 8-byte big-endian entries
(relative offset uint32, file position uint32): after every ``index_interval_bytes`` of
log, the next batch gets an entry keyed by its *last* offset, pointing at its first byte.
``.timeindex`` has 12-byte entries (max timestamp so far int64, relative offset uint32 of
the batch that carried it), appended with the offset entries whenever the maximum grew.

A lookup for offset ``t`` takes the greatest index entry ``<= t`` and scans batch headers
from there; at most ``index_interval_bytes`` plus one batch is scanned. Only headers are
read; the records are never touched.

The index files are append-only (Kafka preallocates and memory-maps them; here they grow as
entries are added) and mirrored in memory. They are opened only to be written: a segment
keeps one descriptor (its ``.log``) until its first index entry, and a segment opened
trusted keeps none for indexes it only read. A small partition costs one file and one
descriptor, not three, and a missing index file reads as an empty one. The first segment
of a new partition (``create``) makes even its ``.log`` only when the first batch comes.

A segment is opened either *trusted* (``load``: read the indexes, sanity-check them, scan
only the tail after the last index entry) or *recovering* (``recover``: scan the whole
``.log`` with CRC checks, cut at the first torn or corrupt batch, rebuild both indexes).
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from broker.record_batch import (
    RECORD_BATCH_OVERHEAD,
    BatchHeader,
    CorruptBatchError,
    decode_records,
    iter_batches,
    read_header,
)
from broker.storage.checkpoint import fsync_dir

log = logging.getLogger(__name__)

__all__ = ["LogSegment", "scan_batch_file", "segment_file_name"]

_OFFSET_ENTRY = struct.Struct(">II")
_TIME_ENTRY = struct.Struct(">qI")
_UINT32_MAX = (1 << 32) - 1


def segment_file_name(base_offset: int, suffix: str) -> str:
    """``00000000000000000042.log`` for base offset 42 and suffix ``.log``."""
    return f"{base_offset:020d}{suffix}"


def scan_batch_file(path: Path) -> Iterator[tuple[int, BatchHeader, bytes]]:
    """``(position, header, batch)`` for each batch of a segment-format file, one at a time.

    Every batch is CRC-checked; a torn or corrupt one raises ``CorruptBatchError`` naming
    the file. Used for files that must be whole (cleaned segments before and during the
    swap), not for recovery, which cuts a bad tail instead.
    """
    with open(path, "rb") as f:
        position = 0
        while True:
            head = f.read(RECORD_BATCH_OVERHEAD)
            if not head:
                return
            try:
                header = read_header(head)
                batch = head + f.read(max(header.size_bytes - len(head), 0))
                checked = iter_batches(batch)
                if next(checked, None) is None or checked.valid_bytes != len(batch):
                    raise checked.error or CorruptBatchError("not a whole batch")
            except CorruptBatchError as e:
                raise CorruptBatchError(f"{path}: batch at position {position}: {e}") from None
            yield position, header, batch
            position += len(batch)


def _open_fd(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _read_whole(path: Path, fd: int | None) -> bytes:
    """A whole file, through ``fd`` when it is open; empty when the file does not exist."""
    if fd is not None:
        return _pread_exact(fd, os.fstat(fd).st_size, 0)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def _pread_exact(fd: int, length: int, position: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, position)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        position += len(chunk)
    return b"".join(chunks)


def _pwrite_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


class LogSegment:
    """A segment of one partition's log; see the module docstring.

    Construct with ``LogSegment.open``; a new segment (no ``.log`` yet) starts empty.
    Not thread-safe: the owning ``PartitionLog`` serialises access.
    """

    def __init__(
        self, directory: Path, base_offset: int, index_interval_bytes: int, *, lazy: bool = False
    ) -> None:
        if base_offset < 0:
            raise ValueError(f"negative base offset {base_offset}")
        self.directory = Path(directory)
        self.base_offset = base_offset
        self.index_interval_bytes = index_interval_bytes
        self.log_path = self.directory / segment_file_name(base_offset, ".log")
        self.index_path = self.directory / segment_file_name(base_offset, ".index")
        self.time_index_path = self.directory / segment_file_name(base_offset, ".timeindex")
        # None until first used in a segment made by ``create`` (see ``_log``).
        self._log_fd: int | None = None if lazy else _open_fd(self.log_path)
        # Opened (created) by _index_fds when an entry is first written.
        self._index_fd: int | None = None
        self._time_index_fd: int | None = None
        self._closed = False
        self._reset_state()
        self._size = 0 if self._log_fd is None else os.fstat(self._log_fd).st_size
        self.truncated_on_recovery = 0
        """Bytes the last ``recover`` cut off a torn or corrupt tail."""
        self.dirty = False
        """True when bytes were written (or cut) since the last ``flush``."""
        self.rolling_base_ms: int | None = None
        """When the segment.ms roll clock started: first append, or on reopen the first
        batch's max timestamp (Kafka's rule)."""

    def _reset_state(self) -> None:
        self._size = 0
        self._next_offset = self.base_offset
        self._max_timestamp = -1
        self._offset_of_max_timestamp = self.base_offset
        self._bytes_since_index_entry = 0
        self._index_offsets: list[int] = []  # absolute offsets, increasing
        self._index_positions: list[int] = []
        self._time_stamps: list[int] = []
        self._time_offsets: list[int] = []  # absolute offsets
        # The index files may not hold the in-memory entries (a write failed).
        self._indexes_stale = False

    @classmethod
    def open(
        cls,
        directory: Path,
        base_offset: int,
        *,
        index_interval_bytes: int = 4096,
        recover: bool = True,
    ) -> LogSegment:
        """Open (or create) the segment; ``recover`` scans it all, otherwise trust it.

        An empty or missing ``.log`` opens as ``create`` makes a segment, holding no
        descriptor until the first append: a broker restarted with 100,000 idle
        replicas (each with an empty file, from a version that made one) ran out of
        descriptors. Index files beside an empty log describe nothing and go.
        """
        path = Path(directory) / segment_file_name(base_offset, ".log")
        try:
            empty = os.stat(path).st_size == 0
        except FileNotFoundError:
            empty = True
        if empty:
            segment = cls(directory, base_offset, index_interval_bytes, lazy=True)
            for index in (segment.index_path, segment.time_index_path):
                index.unlink(missing_ok=True)
            return segment
        segment = cls(directory, base_offset, index_interval_bytes)
        try:
            if recover:
                segment.recover()
            else:
                segment.load()
        except BaseException:
            segment.close()
            raise
        return segment

    @classmethod
    def create(
        cls, directory: Path, base_offset: int, *, index_interval_bytes: int = 4096
    ) -> LogSegment:
        """A new segment in a directory just made for it: nothing to read, and its
        ``.log`` is created when first used (an append), so a partition that never
        receives a batch costs a directory and no file."""
        return cls(directory, base_offset, index_interval_bytes, lazy=True)

    @property
    def _log(self) -> int:
        """The ``.log``'s descriptor; a lazy segment opens (creates) the file here, and
        makes its name durable. The file, when there is one, is empty."""
        fd = self._log_fd
        if fd is None:
            self._check_open()
            fd = os.open(self.log_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fsync_dir(self.directory)
            except BaseException:
                os.close(fd)  # Not durable: take the empty file back, try again later.
                self.log_path.unlink(missing_ok=True)
                raise
            self._log_fd = fd
        return fd

    def make_file(self) -> None:
        """Make the ``.log`` now (empty) and its name durable, for a segment whose
        position must survive a crash before its first append."""
        self._log  # noqa: B018 -- the property makes the file

    # ------------------------------------------------------------------ properties

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def next_offset(self) -> int:
        """One past the last offset in the segment; ``base_offset`` when empty."""
        return self._next_offset

    @property
    def max_timestamp_ms(self) -> int:
        """Largest batch max timestamp in the segment, -1 when none."""
        return self._max_timestamp

    @property
    def is_empty(self) -> bool:
        return self._size == 0

    @property
    def index_entries(self) -> list[tuple[int, int]]:
        """(absolute offset, position) pairs of the offset index, for tests and tools."""
        return list(zip(self._index_offsets, self._index_positions, strict=True))

    # ------------------------------------------------------------------ append

    def append(self, batch: bytes, now_ms: int | None = None) -> BatchHeader:
        """Append one whole batch whose base offset must be ``next_offset``."""
        self._check_open()
        header = read_header(batch)
        if header.size_bytes != len(batch):
            raise ValueError(f"batch says {header.size_bytes} bytes, {len(batch)} given")
        if header.base_offset != self._next_offset:
            raise ValueError(
                f"batch base offset {header.base_offset} != segment next offset "
                f"{self._next_offset} (segment {self.base_offset})"
            )
        if not self.fits(header):
            raise ValueError(f"batch at {header.base_offset} does not fit in this segment")
        if self._bytes_since_index_entry > self.index_interval_bytes:
            # This batch gets index entries: open (create) the index files first, so that
            # failing to (no descriptor left) appends nothing.
            self._index_fds()
        # Write first, account after: a failed write (a full disk) must not move the
        # next offset past bytes that are not there. A partial write is cut off again.
        try:
            _pwrite_all(self._log, batch, self._size)
        except BaseException:
            try:
                os.ftruncate(self._log, self._size)
            except OSError:
                pass  # The next open recovers the segment and cuts the torn tail.
            raise
        entries_added = self._track(header, self._size)
        self._size += len(batch)
        self.dirty = True
        if entries_added:
            try:
                self._write_last_index_entries(entries_added)
            except OSError as e:
                # The batch is in the log and counted: failing the append now would
                # have a retried produce append it twice. The index files only speed
                # up reads, and are rebuilt from the log when they disagree with it.
                self._indexes_stale = True
                log.warning("%s: index entry not written (%s); rewritten later", self.log_path, e)
        if self.rolling_base_ms is None:
            self.rolling_base_ms = now_ms if now_ms is not None else header.max_timestamp
        return header

    def fits(self, header: BatchHeader) -> bool:
        """Whether relative offset and file position of ``header`` fit the uint32 fields."""
        return (
            header.last_offset - self.base_offset <= _UINT32_MAX
            and self._size + header.size_bytes <= _UINT32_MAX
        )

    def _track(self, header: BatchHeader, position: int) -> int:
        """Account for a batch at ``position``; returns the index entries it got: 0,
        1 (an offset index entry) or 2 (a time index entry as well)."""
        if header.max_timestamp > self._max_timestamp:
            self._max_timestamp = header.max_timestamp
            self._offset_of_max_timestamp = header.last_offset
        added = 0
        if self._bytes_since_index_entry > self.index_interval_bytes:
            self._index_offsets.append(header.last_offset)
            self._index_positions.append(position)
            added = 1
            if not self._time_stamps or self._max_timestamp > self._time_stamps[-1]:
                self._time_stamps.append(self._max_timestamp)
                self._time_offsets.append(self._offset_of_max_timestamp)
                added = 2
            self._bytes_since_index_entry = 0
        self._bytes_since_index_entry += header.size_bytes
        self._next_offset = header.next_offset
        return added

    def _index_fds(self) -> tuple[int, int]:
        """The two index files' descriptors, opened (and created) on first use; their
        names are made durable then (a no-op when the broker does not sync)."""
        if self._index_fd is None or self._time_index_fd is None:
            if self._index_fd is None:
                self._index_fd = _open_fd(self.index_path)
            if self._time_index_fd is None:
                self._time_index_fd = _open_fd(self.time_index_path)
            fsync_dir(self.directory)
        return self._index_fd, self._time_index_fd

    def _write_last_index_entries(self, added: int) -> None:
        """Write the entries ``_track`` just added (``added`` as it returned) at the
        end of the index files. The files hold exactly the in-memory entries before:
        whatever else changes the entries (a truncation, a recovery, a rebuilt tail)
        rewrites the files whole."""
        if self._indexes_stale:
            self._write_indexes()
            return
        index_fd, time_index_fd = self._index_fds()
        count = len(self._index_offsets)
        entry = _OFFSET_ENTRY.pack(
            self._index_offsets[-1] - self.base_offset, self._index_positions[-1]
        )
        _pwrite_all(index_fd, entry, (count - 1) * _OFFSET_ENTRY.size)
        if added > 1:
            count = len(self._time_stamps)
            entry = _TIME_ENTRY.pack(
                self._time_stamps[-1], self._time_offsets[-1] - self.base_offset
            )
            _pwrite_all(time_index_fd, entry, (count - 1) * _TIME_ENTRY.size)

    def _write_indexes(self) -> None:
        """Rewrite both index files from the in-memory entries.

        With no entries and no index files (a new or small segment), nothing is created.
        """
        if (
            not self._index_offsets
            and self._index_fd is None
            and not self.index_path.exists()
            and not self.time_index_path.exists()
        ):
            return
        # Until both files are rewritten they may hold other entries than the lists
        # (a failure part-way): the next entry rewrites them whole instead.
        self._indexes_stale = True
        index_fd, time_index_fd = self._index_fds()
        data = b"".join(
            _OFFSET_ENTRY.pack(offset - self.base_offset, position)
            for offset, position in zip(self._index_offsets, self._index_positions, strict=True)
        )
        os.ftruncate(index_fd, 0)
        _pwrite_all(index_fd, data, 0)
        data = b"".join(
            _TIME_ENTRY.pack(stamp, offset - self.base_offset)
            for stamp, offset in zip(self._time_stamps, self._time_offsets, strict=True)
        )
        os.ftruncate(time_index_fd, 0)
        _pwrite_all(time_index_fd, data, 0)
        self._indexes_stale = False

    # ------------------------------------------------------------------ read

    def _header_at(self, position: int) -> BatchHeader:
        return read_header(_pread_exact(self._log, RECORD_BATCH_OVERHEAD, position))

    def _lookup(self, offset: int) -> int:
        """File position to start scanning from for ``offset``."""
        slot = bisect.bisect_right(self._index_offsets, offset) - 1
        return self._index_positions[slot] if slot >= 0 else 0

    def find_position(self, offset: int) -> tuple[int, BatchHeader] | None:
        """Position and header of the batch containing ``offset`` (or the first after it)."""
        self._check_open()
        position = self._lookup(offset)
        while position < self._size:
            header = self._header_at(position)
            if header.next_offset > offset:
                return position, header
            position += header.size_bytes
        return None

    def read(self, offset: int, max_bytes: int, max_offset: int | None = None) -> bytes:
        """Whole batches from the one containing ``offset``, up to ``max_bytes``.

        The first batch is returned even when it alone exceeds ``max_bytes`` (KIP-74), so
        a consumer can always make progress. With ``max_offset`` (a consumer's high
        watermark), only batches that end below it are returned: reading stops before the
        first batch whose ``next_offset`` exceeds it. Empty when nothing qualifies.
        """
        limit = self._next_offset if max_offset is None else min(max_offset, self._next_offset)
        if offset >= limit:
            return b""
        found = self.find_position(offset)
        if found is None or found[1].next_offset > limit:
            return b""
        start, header = found
        end = start + header.size_bytes
        while end < self._size:
            header = self._header_at(end)
            if end + header.size_bytes - start > max_bytes or header.next_offset > limit:
                break
            end += header.size_bytes
        return _pread_exact(self._log, end - start, start)

    def batches(self, start_position: int = 0) -> Iterator[tuple[int, BatchHeader]]:
        """``(position, header)`` of each batch from ``start_position`` on, headers only.

        Reads one header per batch, so memory stays small for any segment size. The
        segment must not change while the iterator is in use.
        """
        self._check_open()
        position = start_position
        while position < self._size:
            header = self._header_at(position)
            yield position, header
            position += header.size_bytes

    def read_batch(self, position: int, header: BatchHeader) -> bytes:
        """The whole batch at ``position`` whose header is ``header``."""
        self._check_open()
        data = _pread_exact(self._log, header.size_bytes, position)
        if len(data) != header.size_bytes:
            raise CorruptBatchError(f"{self.log_path}: batch at {position} is cut short")
        return data

    # ------------------------------------------------------------------ timestamps

    def find_offset_by_timestamp(
        self, timestamp_ms: int, starting_offset: int = 0
    ) -> tuple[int, int] | None:
        """``(offset, timestamp)`` of the first record at or after ``starting_offset`` whose
        timestamp is ``>= timestamp_ms``; None when the segment has none.

        Kafka's ``LogSegment.findOffsetByTimestamp``: the time index gives where to start
        (its last entry with a timestamp ``<= timestamp_ms`` points at the first batch that
        reached that timestamp; every earlier batch has a smaller max), batch headers are
        scanned for the first whose max timestamp reaches the target, and only that batch's
        records are decoded. If none of them qualifies at or after ``starting_offset`` (the
        log start may fall inside the batch), the scan goes on.
        """
        self._check_open()
        if self._max_timestamp < timestamp_ms:
            return None
        slot = bisect.bisect_right(self._time_stamps, timestamp_ms) - 1
        from_offset = self._time_offsets[slot] if slot >= 0 else self.base_offset
        position = self._lookup(max(from_offset, starting_offset))
        for batch_position, header in self.batches(position):
            if header.max_timestamp < timestamp_ms or header.next_offset <= starting_offset:
                continue
            for record in decode_records(self.read_batch(batch_position, header)):
                offset = header.base_offset + record.offset_delta
                if record.timestamp_ms >= timestamp_ms and offset >= starting_offset:
                    return offset, record.timestamp_ms
        return None

    def max_timestamp_offset(self) -> tuple[int, int] | None:
        """``(offset, timestamp)`` of the first record carrying the segment's largest
        timestamp (ListOffsets ``MAX_TIMESTAMP``, KAFKA-16310); None when empty.

        The batch that first reached the maximum is decoded. If its records no longer
        hold that timestamp (compaction removed the record), the batch's last offset is
        returned with the header's timestamp.
        """
        self._check_open()
        if self._size == 0:
            return None
        found = self.find_position(self._offset_of_max_timestamp)
        if found is None:
            return None
        position, header = found
        for record in decode_records(self.read_batch(position, header)):
            if record.timestamp_ms == header.max_timestamp:
                return header.base_offset + record.offset_delta, record.timestamp_ms
        return header.last_offset, header.max_timestamp

    # ------------------------------------------------------------------ open / recover

    def _scan_headers(self, start: int, end: int) -> list[tuple[int, BatchHeader]]:
        """Headers of the batches in [start, end), trusting the bytes (no CRC)."""
        data = _pread_exact(self._log, end - start, start)
        batches = iter_batches(data, verify_crc=False)
        found = [(start + position, header) for position, header in batches]
        if batches.error is not None:
            raise CorruptBatchError(f"{self.log_path}: {batches.error}")
        return found

    def load(self) -> None:
        """Open trusting the files: read the indexes, scan only the tail of the log.

        A missing index is rebuilt by that same scan (it then covers the whole log); a
        misaligned or inconsistent index, or a malformed tail, falls back to ``recover``.
        """
        self._check_open()
        size = os.fstat(self._log).st_size
        self._reset_state()
        self._size = size
        try:
            self._load_indexes(size)
            tail_start = self._index_positions[-1] if self._index_positions else 0
            entries_before = len(self._index_offsets), len(self._time_stamps)
            for position, header in self._scan_headers(tail_start, size):
                if position > tail_start or not self._index_offsets:
                    if header.base_offset != self._next_offset:
                        raise CorruptBatchError(f"offset gap at position {position}")
                if position == tail_start and self._index_offsets:
                    if header.last_offset != self._index_offsets[-1]:
                        raise CorruptBatchError("last index entry does not match the log")
                    # _track would add this entry again; account for it by hand.
                    if header.max_timestamp > self._max_timestamp:
                        self._max_timestamp = header.max_timestamp
                        self._offset_of_max_timestamp = header.last_offset
                    self._bytes_since_index_entry = header.size_bytes
                    self._next_offset = header.next_offset
                else:
                    self._track(header, position)
            if self._time_offsets and self._time_offsets[-1] >= self._next_offset:
                raise CorruptBatchError("time index points past the end of the log")
            if (len(self._index_offsets), len(self._time_stamps)) != entries_before:
                self._write_indexes()  # The files lacked entries: the tail was rebuilt.
        except (CorruptBatchError, struct.error, IndexError):
            self.recover()
            return
        self._set_rolling_base()

    def _load_indexes(self, log_size: int) -> None:
        raw = _read_whole(self.index_path, self._index_fd)
        times = _read_whole(self.time_index_path, self._time_index_fd)
        if len(raw) % _OFFSET_ENTRY.size or len(times) % _TIME_ENTRY.size:
            raise CorruptBatchError("index file size is not a whole number of entries")
        previous_offset, previous_position = -1, -1
        for relative, position in _OFFSET_ENTRY.iter_unpack(raw):
            offset = self.base_offset + relative
            if offset <= previous_offset or position <= previous_position or position >= log_size:
                raise CorruptBatchError("offset index entries out of order")
            self._index_offsets.append(offset)
            self._index_positions.append(position)
            previous_offset, previous_position = offset, position
        previous_stamp, previous_offset = -(1 << 63), -1
        for stamp, relative in _TIME_ENTRY.iter_unpack(times):
            offset = self.base_offset + relative
            if stamp <= previous_stamp or offset < previous_offset:
                raise CorruptBatchError("time index entries out of order")
            self._time_stamps.append(stamp)
            self._time_offsets.append(offset)
            previous_stamp, previous_offset = stamp, offset
        if self._time_stamps:
            self._max_timestamp = self._time_stamps[-1]
            self._offset_of_max_timestamp = self._time_offsets[-1]

    def recover(self) -> int:
        """Scan the whole log with CRC checks; cut the torn or corrupt tail.

        Batches must be contiguous (each base offset is the previous next offset, the
        first is the segment's base offset); the first that is not ends the valid prefix.
        Both indexes are rebuilt from the valid prefix. Returns the bytes cut off.
        """
        self._check_open()
        size = os.fstat(self._log).st_size
        data = _pread_exact(self._log, size, 0)
        self._reset_state()
        batches = iter_batches(data)
        valid = 0
        for position, header in batches:
            if header.base_offset != self._next_offset or not (
                header.last_offset - self.base_offset <= _UINT32_MAX
            ):
                break
            self._track(header, position)
            valid = position + header.size_bytes
        del data
        if valid < size:
            os.ftruncate(self._log, valid)
        # Recovered bytes may only be in the page cache, and the indexes were rewritten.
        self.dirty = True
        self.truncated_on_recovery = size - valid
        self._size = valid
        self._write_indexes()
        self._set_rolling_base()
        return size - valid

    def _set_rolling_base(self) -> None:
        self.rolling_base_ms = self._header_at(0).max_timestamp if self._size else None

    # ------------------------------------------------------------------ truncate

    def truncate_to(self, offset: int) -> int:
        """Drop every batch at and after ``offset``; returns the bytes cut.

        As Kafka's ``LogSegment.truncateTo``: when ``offset`` falls inside a batch the
        whole batch goes, so ``next_offset`` becomes that batch's base offset, which is
        below ``offset``. No-op at or past ``next_offset``; ``ValueError`` below the
        segment's base offset.
        """
        self._check_open()
        if offset >= self._next_offset:
            return 0
        if offset < self.base_offset:
            raise ValueError(f"offset {offset} is below segment base {self.base_offset}")
        found = self.find_position(offset)
        if found is None:  # Impossible for base <= offset < next_offset.
            raise CorruptBatchError(f"{self.log_path}: no batch holds offset {offset}")
        cut, cut_header = found
        new_next_offset = cut_header.base_offset
        removed = self._size - cut
        os.ftruncate(self._log, cut)
        self._size = cut
        self.dirty = True
        keep = bisect.bisect_left(self._index_positions, cut)
        del self._index_offsets[keep:]
        del self._index_positions[keep:]
        keep = bisect.bisect_left(self._time_offsets, new_next_offset)
        del self._time_stamps[keep:]
        del self._time_offsets[keep:]
        self._max_timestamp = self._time_stamps[-1] if self._time_stamps else -1
        self._offset_of_max_timestamp = (
            self._time_offsets[-1] if self._time_offsets else self.base_offset
        )
        self._next_offset = self.base_offset
        tail_start = self._index_positions[-1] if self._index_positions else 0
        self._bytes_since_index_entry = 0
        for _, header in self._scan_headers(tail_start, cut):
            if header.max_timestamp > self._max_timestamp:
                self._max_timestamp = header.max_timestamp
                self._offset_of_max_timestamp = header.last_offset
            self._next_offset = header.next_offset
        self._bytes_since_index_entry = cut - tail_start
        self._write_indexes()
        if cut == 0:
            self.rolling_base_ms = None
        return removed

    # ------------------------------------------------------------------ lifecycle

    def flush(self) -> None:
        """fsync the log and the indexes (index files are only written through their
        descriptors, so one that was never opened has nothing to sync)."""
        self._check_open()
        if self._indexes_stale:
            try:
                self._write_indexes()
            except OSError as e:  # Still rebuilt from the log when the segment opens.
                log.warning("%s: indexes not rewritten (%s)", self.log_path, e)
        for fd in (self._log_fd, self._index_fd, self._time_index_fd):
            if fd is not None:
                os.fsync(fd)
        self.dirty = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self._log_fd, self._index_fd, self._time_index_fd):
            if fd is not None:
                os.close(fd)

    def delete(self) -> None:
        """Close and remove the three files (the ``.log`` first: it defines the segment)."""
        self.close()
        for path in (self.log_path, self.index_path, self.time_index_path):
            path.unlink(missing_ok=True)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"segment {self.log_path} is closed")

    def __repr__(self) -> str:
        return f"LogSegment(base={self.base_offset}, next={self._next_offset}, size={self._size})"
