"""Partition log storage: segments, indexes, roll, read, truncation, retention, recovery."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from broker.record_batch import (
    BatchHeader,
    BatchTooLargeError,
    Compression,
    CorruptBatchError,
    Record,
    TimestampType,
    encode_batch,
    iter_batches,
    patch_batch,
    read_header,
)
from broker.storage import (
    LOG_START_CHECKPOINT,
    RECOVERY_POINT_CHECKPOINT,
    CorruptCheckpointError,
    LogConfig,
    LogSegment,
    OffsetOutOfRangeError,
    PartitionLog,
    read_offset_checkpoint,
    read_partition_offsets,
    segment_file_name,
    write_offset_checkpoint,
    write_partition_offsets,
)
from broker.storage.checkpoint import set_sync, sync_enabled

# --------------------------------------------------------------------------- helpers


def make_batch(base_offset: int, records: int = 1, value_bytes: int = 60, ts: int = 1000) -> bytes:
    raw = encode_batch(
        [Record(None, bytes([i % 256]) * value_bytes, timestamp_ms=ts + i) for i in range(records)]
    )
    return patch_batch(raw, base_offset, 0)


def fill(
    log: PartitionLog,
    count: int,
    *,
    records: int = 1,
    value_bytes: int = 60,
    ts: int = 1000,
    now_ms: int = 0,
) -> list[bytes]:
    """Append ``count`` batches at the log end; returns them in order."""
    batches = []
    for i in range(count):
        batch = make_batch(log.log_end_offset, records, value_bytes, ts + i)
        log.append(batch, now_ms=now_ms)
        batches.append(batch)
    return batches


def read_all(log: PartitionLog) -> bytes:
    out = []
    offset = log.log_start_offset
    while offset < log.log_end_offset:
        data = log.read(offset, 1 << 20)
        assert data
        last = None
        for _, header in iter_batches(data):
            last = header
        assert last is not None
        offset = last.next_offset
        out.append(data)
    return b"".join(out)


def batch_bounds(batches: list[bytes]) -> list[tuple[int, int]]:
    """(base offset, next offset) of each batch."""
    return [(read_header(b).base_offset, read_header(b).next_offset) for b in batches]


SMALL = LogConfig(segment_bytes=1000, index_interval_bytes=200)


# --------------------------------------------------------------------------- segment


def test_segment_round_trip_and_index(tmp_path: Path) -> None:
    seg = LogSegment.open(tmp_path, 100, index_interval_bytes=300)
    batches = []
    for i in range(40):
        batch = make_batch(seg.next_offset, records=1 + i % 3, ts=5000 + i)
        seg.append(batch, now_ms=7)
        batches.append(batch)
    assert seg.next_offset == 100 + sum(1 + i % 3 for i in range(40))
    assert (
        seg.size_bytes
        == sum(map(len, batches))
        == (tmp_path / "00000000000000000100.log").stat().st_size
    )
    assert seg.max_timestamp_ms == max(read_header(b).max_timestamp for b in batches)
    assert seg.rolling_base_ms == 7
    entries = seg.index_entries
    assert len(entries) >= 5
    assert (tmp_path / segment_file_name(100, ".index")).stat().st_size == 8 * len(entries)
    # Every entry points at a batch whose last offset is the entry's key.
    for offset, position in entries:
        assert read_header(seg.read(offset, 1)).last_offset == offset
        assert position < seg.size_bytes
    for batch, (base, nxt) in zip(batches, batch_bounds(batches), strict=True):
        for offset in range(base, nxt):
            assert seg.read(offset, 1) == batch
    assert seg.read(seg.next_offset, 1000) == b""
    index_bytes = (tmp_path / segment_file_name(100, ".index")).read_bytes()
    time_bytes = (tmp_path / segment_file_name(100, ".timeindex")).read_bytes()
    assert seg.recover() == 0
    assert (tmp_path / segment_file_name(100, ".index")).read_bytes() == index_bytes
    assert (tmp_path / segment_file_name(100, ".timeindex")).read_bytes() == time_bytes
    seg.close()
    # Trusted load gives the same state; so does a rebuild from a deleted index.
    for remove_index in (False, True):
        if remove_index:
            (tmp_path / segment_file_name(100, ".index")).unlink()
            (tmp_path / segment_file_name(100, ".timeindex")).unlink()
        seg = LogSegment.open(tmp_path, 100, index_interval_bytes=300, recover=False)
        assert seg.index_entries == entries
        assert seg.next_offset == 100 + sum(1 + i % 3 for i in range(40))
        assert seg.max_timestamp_ms == max(read_header(b).max_timestamp for b in batches)
        assert (tmp_path / segment_file_name(100, ".index")).read_bytes() == index_bytes
        assert (tmp_path / segment_file_name(100, ".timeindex")).read_bytes() == time_bytes
        seg.close()


def test_segment_refuses_wrong_base_offset(tmp_path: Path) -> None:
    seg = LogSegment.open(tmp_path, 10)
    with pytest.raises(ValueError, match="next offset"):
        seg.append(make_batch(11))
    seg.append(make_batch(10, records=2))
    with pytest.raises(ValueError):
        seg.append(make_batch(11))
    seg.append(make_batch(12))
    assert seg.next_offset == 13
    seg.delete()
    assert list(tmp_path.iterdir()) == []


def test_segment_corrupt_index_is_rebuilt(tmp_path: Path) -> None:
    seg = LogSegment.open(tmp_path, 0, index_interval_bytes=100)
    for _ in range(20):
        seg.append(make_batch(seg.next_offset))
    entries = seg.index_entries
    seg.close()
    index = tmp_path / segment_file_name(0, ".index")
    good = index.read_bytes()
    for bad in (good[:-3], good[:8] + struct.pack(">II", 0, 0) + good[16:], good + b"\xff" * 8):
        index.write_bytes(bad)
        seg = LogSegment.open(tmp_path, 0, index_interval_bytes=100, recover=False)
        assert seg.index_entries == entries
        assert seg.next_offset == 20
        seg.close()
        assert index.read_bytes() == good


def test_kip74_first_batch_even_when_too_big(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, LogConfig()) as log:
        big = make_batch(0, records=5, value_bytes=500)
        small = make_batch(5)
        log.append(big, now_ms=0)
        log.append(small, now_ms=0)
        log.append(make_batch(6), now_ms=0)
        assert log.read(0, 1) == big
        assert log.read(3, 0) == big
        assert log.read(0, len(big) + len(small)) == big + small
        assert log.read(0, len(big) + len(small) - 1) == big
        assert log.read(5, len(small)) == small


# --------------------------------------------------------------------------- partition log


def test_a_new_log_syncs_only_directory_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a partition's log makes nothing durable: it has no file until its first
    append, which makes that file's name durable, and a missing checkpoint means what an
    empty one says. (A broker creating a partition synced thirteen times, for every
    topic created.)"""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    previous = sync_enabled()
    set_sync(True)
    try:
        log = PartitionLog(tmp_path / "t-0", SMALL)
        assert synced == []
        log.append(make_batch(0, records=3), now_ms=0)
        assert synced[0] == str(tmp_path / "t-0")  # the new file's name, first
    finally:
        set_sync(previous)
    log.flush()
    log.close()
    with PartitionLog(tmp_path / "t-0", SMALL) as reopened:
        assert reopened.log_end_offset == 3
        assert reopened.leader_epoch_cache.entries() == log.leader_epoch_cache.entries()


def test_a_new_log_reopens_empty_after_a_crash(tmp_path: Path) -> None:
    PartitionLog(tmp_path, SMALL)  # never closed: the process died
    with PartitionLog(tmp_path, SMALL) as log:
        assert (log.log_start_offset, log.log_end_offset) == (0, 0)
        log.append(make_batch(0), now_ms=0)
        assert log.read(0, 10_000) == make_batch(0)


def test_reopening_logs_that_never_received_a_batch_holds_no_descriptor(
    tmp_path: Path,
) -> None:
    """A broker restarted with thousands of idle replicas opens each log again; each
    created (and held open) an empty segment file, and one hosting 100,000 ran out of
    descriptors at 20,000 and never rejoined."""
    for i in range(3):
        PartitionLog(tmp_path / f"t-{i}", SMALL).close()
    logs = [PartitionLog(tmp_path / f"t-{i}", SMALL) for i in range(3)]
    try:
        assert _open_descriptors_under(tmp_path) == []
        assert list(tmp_path.glob("t-*/*.log")) == []
        logs[1].append(make_batch(0), now_ms=0)
        assert _open_descriptors_under(tmp_path) == [segment_file_name(0, ".log")]
    finally:
        for log in logs:
            log.close()
    with PartitionLog(tmp_path / "t-1", SMALL) as reopened:
        assert reopened.read(0, 10_000) == make_batch(0)


def test_an_empty_segment_file_reopens_without_a_descriptor(tmp_path: Path) -> None:
    """Versions before made an empty file for each idle log they reopened: 100,000 of
    them must not take 100,000 descriptors at the next restart. Stray index files
    beside an empty log go."""
    directory = tmp_path / "t-0"
    directory.mkdir()
    (directory / segment_file_name(0, ".log")).touch()
    (directory / segment_file_name(0, ".index")).write_bytes(b"\0" * 8)
    with PartitionLog(directory, SMALL) as log:
        assert _open_descriptors_under(directory) == []
        assert not (directory / segment_file_name(0, ".index")).exists()
        log.append(make_batch(0), now_ms=0)
        assert log.read(0, 10_000) == make_batch(0)
    with PartitionLog(directory, SMALL) as reopened:
        assert reopened.log_end_offset == 1


def _open_descriptors_under(directory: Path) -> list[str]:
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target.startswith(str(directory)):
            paths.append(os.path.basename(target))
    return sorted(paths)


def test_index_files_are_opened_only_to_be_written(tmp_path: Path) -> None:
    """A partition with less than one index interval of data holds one file and one
    descriptor; its index files come with its first index entry, and a segment that is
    reopened trusting its files keeps no descriptor for indexes it only read. (Each
    partition held three descriptors: a broker at 20,000 ran out at 6,600 partitions.)"""
    directory = tmp_path / "t-0"
    log = PartitionLog(directory, SMALL)
    first = segment_file_name(0, ".log")
    assert _open_descriptors_under(directory) == []  # no file before the first append
    log.append(make_batch(0), now_ms=0)
    assert sorted(p.name for p in directory.glob("0*")) == [first]
    log.flush()  # nothing to sync for indexes that do not exist
    assert _open_descriptors_under(directory) == [first]
    while not log.active_segment.index_entries:
        log.append(make_batch(log.log_end_offset, records=2, value_bytes=40), now_ms=0)
    entries = log.active_segment.index_entries
    assert _open_descriptors_under(directory) == sorted(
        [first, segment_file_name(0, ".index"), segment_file_name(0, ".timeindex")]
    )
    assert (directory / segment_file_name(0, ".index")).stat().st_size == 8 * len(entries)
    log.flush()
    end = log.log_end_offset
    log.close()
    assert _open_descriptors_under(directory) == []
    with PartitionLog(directory, SMALL) as reopened:
        # Recovered (the last segment after the recovery point) or trusted, the index
        # is the same; reading it left no descriptor behind for a segment not written.
        assert reopened.log_end_offset == end
        assert reopened.active_segment.index_entries == entries
        assert read_all(reopened)[: len(make_batch(0))] == make_batch(0)


def test_a_segment_reopened_trusted_reads_its_indexes_without_keeping_them_open(
    tmp_path: Path,
) -> None:
    segment = LogSegment.open(tmp_path, 0, index_interval_bytes=100, recover=False)
    for base in range(0, 20, 2):
        segment.append(make_batch(base, records=2, value_bytes=40), now_ms=0)
    entries = segment.index_entries
    assert entries
    segment.close()
    reopened = LogSegment.open(tmp_path, 0, index_interval_bytes=100, recover=False)
    try:
        assert reopened.index_entries == entries
        assert reopened.find_position(entries[-1][0]) is not None
        assert _open_descriptors_under(tmp_path) == [segment_file_name(0, ".log")]
        # Written to again, it opens them and appends in place.
        for base in range(20, 40, 2):
            reopened.append(make_batch(base, records=2, value_bytes=40), now_ms=0)
        assert len(reopened.index_entries) > len(entries)
        assert (tmp_path / segment_file_name(0, ".index")).stat().st_size == 8 * len(
            reopened.index_entries
        )
    finally:
        reopened.close()


def _index_files_match(segment: LogSegment) -> bool:
    """Whether both index files hold exactly the segment's in-memory entries."""
    offsets = b"".join(
        struct.pack(">II", offset - segment.base_offset, position)
        for offset, position in segment.index_entries
    )
    times = b"".join(
        struct.pack(">qI", stamp, offset - segment.base_offset)
        for stamp, offset in zip(segment._time_stamps, segment._time_offsets, strict=True)
    )
    return (
        segment.index_path.read_bytes() == offsets and segment.time_index_path.read_bytes() == times
    )


def test_index_files_hold_exactly_their_entries_after_a_truncation_and_more_appends(
    tmp_path: Path,
) -> None:
    """An append writes its entries at the end of the index files without resizing
    them; a truncation has already cut the files to the entries it kept."""
    segment = LogSegment.open(tmp_path, 0, index_interval_bytes=100, recover=False)
    try:
        for base in range(0, 40, 2):
            segment.append(make_batch(base, records=2, value_bytes=40, ts=base), now_ms=0)
        before = segment.index_entries
        assert len(before) > 3 and _index_files_match(segment)
        segment.truncate_to(before[1][0])
        assert len(segment.index_entries) < len(before) and _index_files_match(segment)
        for base in range(segment.next_offset, segment.next_offset + 10, 2):
            segment.append(make_batch(base, records=2, value_bytes=40, ts=base), now_ms=0)
        assert len(segment.index_entries) >= 2 and _index_files_match(segment)
        entries, end = segment.index_entries, segment.next_offset
    finally:
        segment.close()
    reopened = LogSegment.open(tmp_path, 0, index_interval_bytes=100, recover=False)
    try:
        assert reopened.index_entries == entries
        assert reopened.next_offset == end
    finally:
        reopened.close()


def test_an_index_entry_that_cannot_be_written_does_not_fail_the_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch is in the log once its bytes are written: an append that then failed
    (a full disk under the index files) would be retried and appended twice. The
    entries are kept in memory and the files rewritten whole later."""
    from broker.storage import segment as segment_module

    segment = LogSegment.open(tmp_path, 0, index_interval_bytes=100, recover=False)
    write = segment_module._pwrite_all

    def full_for_indexes(fd: int, data: bytes, position: int) -> None:
        if fd in (segment._index_fd, segment._time_index_fd):
            raise OSError(28, "No space left on device")
        write(fd, data, position)

    try:
        segment.append(make_batch(0, records=2, value_bytes=40, ts=0), now_ms=0)
        segment.append(make_batch(2, records=2, value_bytes=40, ts=2), now_ms=0)
        count = len(segment.index_entries)
        monkeypatch.setattr(segment_module, "_pwrite_all", full_for_indexes)
        batch = make_batch(4, records=2, value_bytes=40, ts=4)
        segment.append(batch, now_ms=0)  # This batch gets index entries.
        assert len(segment.index_entries) == count + 1 and not _index_files_match(segment)
        assert segment.next_offset == 6
        assert segment.read(4, 1 << 20) == batch
        monkeypatch.setattr(segment_module, "_pwrite_all", write)
        base, count = segment.next_offset, len(segment.index_entries)
        while len(segment.index_entries) == count:
            segment.append(make_batch(base, records=2, value_bytes=40, ts=base), now_ms=0)
            base = segment.next_offset
        assert _index_files_match(segment)
        entries = segment.index_entries
    finally:
        segment.close()
    reopened = LogSegment.open(tmp_path, 0, index_interval_bytes=100, recover=False)
    try:
        assert reopened.index_entries == entries
        assert reopened.read(4, 1 << 20)[: len(batch)] == batch
    finally:
        reopened.close()


def test_index_files_that_a_truncation_failed_to_rewrite_are_rewritten_by_the_next_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncation cuts the entries in memory, then rewrites the files; if that fails,
    the next entry must not be written in place after entries the truncation removed."""
    from broker.storage import segment as segment_module

    segment = LogSegment.open(tmp_path, 0, index_interval_bytes=100, recover=False)
    try:
        for base in range(0, 40, 2):
            segment.append(make_batch(base, records=2, value_bytes=40, ts=base), now_ms=0)
        entries = segment.index_entries
        real_ftruncate = os.ftruncate

        def failing(fd: int, length: int) -> None:
            if fd in (segment._index_fd, segment._time_index_fd):
                raise OSError(5, "Input/output error")
            real_ftruncate(fd, length)

        monkeypatch.setattr(segment_module.os, "ftruncate", failing)
        with pytest.raises(OSError):
            segment.truncate_to(entries[1][0])
        monkeypatch.setattr(segment_module.os, "ftruncate", real_ftruncate)
        count = len(segment.index_entries)
        base = segment.next_offset
        while len(segment.index_entries) == count:
            segment.append(make_batch(base, records=2, value_bytes=40, ts=base), now_ms=0)
            base = segment.next_offset
        assert _index_files_match(segment)
    finally:
        segment.close()


def test_a_created_segment_makes_its_file_with_its_first_append(tmp_path: Path) -> None:
    """A new partition's first segment creates no file until a batch comes; reading,
    flushing or truncating it meanwhile creates nothing, and closing or deleting it is
    fine without one."""
    segment = LogSegment.create(tmp_path, 0, index_interval_bytes=100)
    assert segment.read(0, 1 << 20) == b""
    assert segment.find_position(0) is None
    assert list(segment.batches()) == []
    assert segment.max_timestamp_offset() is None
    assert segment.find_offset_by_timestamp(0) is None
    assert segment.truncate_to(0) == 0
    segment.flush()
    assert list(tmp_path.iterdir()) == []
    segment.append(make_batch(0, records=2), now_ms=0)
    assert [p.name for p in tmp_path.iterdir()] == [segment_file_name(0, ".log")]
    assert segment.read(0, 1 << 20) == make_batch(0, records=2)
    segment.close()
    reopened = LogSegment.open(tmp_path, 0, index_interval_bytes=100)
    try:
        assert reopened.next_offset == 2
    finally:
        reopened.close()
    untouched = LogSegment.create(tmp_path / "never-made", 0)
    untouched.close()
    untouched.delete()  # no file to remove


def test_an_append_that_cannot_open_its_index_files_appends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index files are opened before the batch that needs them is written: with no
    descriptor left, the append fails whole (it used to fail after the batch was in)."""
    import broker.storage.segment as segment_module

    segment = LogSegment.open(tmp_path, 0, index_interval_bytes=100, recover=False)
    try:
        while not segment.index_entries:
            before = (segment.next_offset, segment.size_bytes)
            batch = make_batch(segment.next_offset, records=2, value_bytes=40)
            if segment._bytes_since_index_entry > segment.index_interval_bytes:
                real = segment_module._open_fd

                def no_descriptor_left(path: Path) -> int:
                    raise OSError(24, "Too many open files", str(path))

                monkeypatch.setattr(segment_module, "_open_fd", no_descriptor_left)
                with pytest.raises(OSError):
                    segment.append(batch, now_ms=0)
                assert (segment.next_offset, segment.size_bytes) == before
                assert segment.log_path.stat().st_size == before[1]
                assert segment.index_entries == []
                monkeypatch.setattr(segment_module, "_open_fd", real)
            segment.append(batch, now_ms=0)
        assert (tmp_path / segment_file_name(0, ".index")).stat().st_size == 8
    finally:
        segment.close()


def test_round_trip_roll_by_size(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path, SMALL)
    batches = []
    for i in range(60):
        batch = make_batch(log.log_end_offset, records=1 + i % 4, value_bytes=40)
        log.append(batch, now_ms=0)
        batches.append(batch)
    assert len(log.segments) > 5
    for seg in log.segments:
        assert seg.size_bytes <= SMALL.segment_bytes
    assert [s.base_offset for s in log.segments[1:]] == [s.next_offset for s in log.segments[:-1]]
    assert read_all(log) == b"".join(batches)
    for batch, (base, nxt) in zip(batches, batch_bounds(batches), strict=True):
        for offset in range(base, nxt):
            assert log.read(offset, 1) == batch
    # A read stays within one segment.
    first = log.segments[0]
    assert len(log.read(0, 1 << 20)) == first.size_bytes
    # Rolled segments were flushed; the recovery point is at least the active base.
    assert log.recovery_point >= log.active_segment.base_offset
    assert log.size_bytes == sum(map(len, batches))
    log.close()


def test_roll_by_time(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path, LogConfig(segment_ms=100))
    log.append(make_batch(0), now_ms=1000)
    log.append(make_batch(1), now_ms=1099)
    assert len(log.segments) == 1
    log.append(make_batch(2), now_ms=1100)
    assert [s.base_offset for s in log.segments] == [0, 2]
    log.append(make_batch(3), now_ms=1150)
    log.append(make_batch(4), now_ms=1199)
    assert [s.base_offset for s in log.segments] == [0, 2]
    log.append(make_batch(5), now_ms=1200)
    assert [s.base_offset for s in log.segments] == [0, 2, 5]
    assert log.read(2, 1 << 20) == make_batch(2) + make_batch(3) + make_batch(4)
    log.close()


def test_append_refuses_wrong_offset(tmp_path: Path) -> None:
    with PartitionLog(tmp_path) as log:
        with pytest.raises(ValueError, match="log end offset"):
            log.append(make_batch(1))
        log.append(make_batch(0, records=3))
        with pytest.raises(ValueError):
            log.append(make_batch(2))
        assert log.log_end_offset == 3
    with PartitionLog(tmp_path / "small", LogConfig(segment_bytes=500)) as log:
        with pytest.raises(BatchTooLargeError):
            log.append(make_batch(0, value_bytes=500))
        assert log.log_end_offset == 0


def test_out_of_range(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        fill(log, 30, records=2)
        assert log.read(60, 100) == b""
        with pytest.raises(OffsetOutOfRangeError):
            log.read(61, 100)
        with pytest.raises(OffsetOutOfRangeError):
            log.read(-1, 100)
        log.delete_before(log.segments[2].base_offset + 1)
        start = log.log_start_offset
        assert start == log.segments[0].base_offset + 1
        with pytest.raises(OffsetOutOfRangeError) as info:
            log.read(start - 1, 100)
        assert info.value.log_start_offset == start
        assert info.value.log_end_offset == 60
        assert read_header(log.read(start, 1)).base_offset == start - 1


@pytest.mark.parametrize("inside", [0, 1, 2])
def test_truncate_to_every_batch_boundary(tmp_path: Path, inside: int) -> None:
    """Truncating at a batch's base, or inside it (Kafka: cut at the batch's start)."""
    pristine = tmp_path / "pristine"
    with PartitionLog(pristine, SMALL) as log:
        batches = fill(log, 25, records=3, value_bytes=30)
    bounds = batch_bounds(batches)
    for k, (base, _) in enumerate(bounds):
        work = tmp_path / f"t{k}"
        shutil.copytree(pristine, work)
        log = PartitionLog(work, SMALL)
        removed = log.truncate_to(base + inside)
        assert removed == sum(map(len, batches[k:]))
        assert log.log_end_offset == base
        assert read_all(log) == b"".join(batches[:k])
        assert log.recovery_point == base
        assert read_offset_checkpoint(work / RECOVERY_POINT_CHECKPOINT) == base
        # Appending continues at the cut; a reopen sees the same log.
        again = fill(log, 3, records=2, ts=9000)
        log.close()
        log = PartitionLog(work, SMALL)
        assert log.log_end_offset == base + 6
        assert read_all(log) == b"".join(batches[:k] + again)
        for seg in log.segments:
            assert seg.size_bytes <= SMALL.segment_bytes
        log.close()
        shutil.rmtree(work)
    with PartitionLog(pristine, SMALL) as log:
        assert log.truncate_to(75) == 0 and log.truncate_to(1000) == 0
        assert log.log_end_offset == 75


def test_truncate_below_start_and_fully(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        fill(log, 30)
        log.delete_before(10)
        with pytest.raises(ValueError, match="log start"):
            log.truncate_to(5)
        log.truncate_fully_and_start_at(500)
        assert (log.log_start_offset, log.log_end_offset) == (500, 500)
        assert [s.base_offset for s in log.segments] == [500]
        fill(log, 2)
    with PartitionLog(tmp_path, SMALL) as log:
        assert (log.log_start_offset, log.log_end_offset) == (500, 502)


def test_retention_by_bytes(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        batches = fill(log, 50)
        segments = log.segments
        total = log.size_bytes
        assert log.apply_retention(0, None, total) == []
        limit = total - segments[0].size_bytes - segments[1].size_bytes
        assert log.apply_retention(0, None, limit) == [s.base_offset for s in segments[:2]]
        assert log.log_start_offset == segments[2].base_offset
        assert log.size_bytes == limit
        assert not segments[0].log_path.exists()
        assert read_offset_checkpoint(tmp_path / LOG_START_CHECKPOINT) == log.log_start_offset
        # Even a zero limit keeps the active segment.
        deleted = log.apply_retention(0, -1, 0)
        assert deleted == [s.base_offset for s in segments[2:-1]]
        assert log.segments == [segments[-1]]
        assert log.log_start_offset == segments[-1].base_offset
        assert log.log_end_offset == 50
        kept = len(batches) - (50 - log.log_start_offset)
        assert read_all(log) == b"".join(batches[kept:])
        fill(log, 1)
        assert log.log_end_offset == 51
    with PartitionLog(tmp_path, SMALL) as log:
        assert (log.log_start_offset, log.log_end_offset) == (segments[-1].base_offset, 51)


def test_retention_by_time(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        fill(log, 50, ts=10_000)  # batch i has max timestamp 10_000 + i
        segments = log.segments
        assert len(segments) >= 4
        newest_of_second = segments[1].max_timestamp_ms
        assert newest_of_second == 10_000 + segments[1].next_offset - 1
        # Exactly the first two segments are older than the retention.
        assert log.apply_retention(newest_of_second + 1000, 999, None) == [
            segments[0].base_offset,
            segments[1].base_offset,
        ]
        assert log.log_start_offset == segments[2].base_offset
        assert log.apply_retention(newest_of_second + 1000, 999, None) == []
        assert log.apply_retention(10**12, 0, None) == [s.base_offset for s in segments[2:-1]]
        assert len(log.segments) == 1
        assert log.log_start_offset == log.active_segment.base_offset


def test_delete_before(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        fill(log, 40)
        segments = log.segments
        boundary = segments[2].base_offset
        assert log.delete_before(boundary) == [segments[0].base_offset, segments[1].base_offset]
        assert log.log_start_offset == boundary
        assert log.delete_before(boundary - 5) == []
        assert log.log_start_offset == boundary
        with pytest.raises(OffsetOutOfRangeError):
            log.delete_before(41)
        assert log.delete_before(40) == [s.base_offset for s in segments[2:-1]]
        assert (log.log_start_offset, log.log_end_offset) == (40, 40)
        assert log.read(40, 100) == b""


def test_reopen_after_close(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path, SMALL)
    batches = fill(log, 45, records=2)
    log.delete_before(7)
    bases = [s.base_offset for s in log.segments]
    log.close()
    assert read_offset_checkpoint(tmp_path / RECOVERY_POINT_CHECKPOINT) == 90
    for _ in range(2):
        log = PartitionLog(tmp_path, SMALL)
        assert (log.log_start_offset, log.log_end_offset) == (7, 90)
        assert [s.base_offset for s in log.segments] == bases
        assert log.read(7, 1) == batches[3]
        assert bases[0] == 0
        assert read_all(log) == b"".join(batches[3:])
        log.close()
    with PartitionLog(tmp_path, SMALL) as log:
        more = fill(log, 3)
        assert log.read(90, 1 << 20)[: len(more[0])] == more[0]


def test_reopen_without_checkpoint_recovers_everything(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        batches = fill(log, 30)
    (tmp_path / RECOVERY_POINT_CHECKPOINT).unlink()
    (tmp_path / segment_file_name(0, ".index")).unlink()
    (tmp_path / "00000000000000000001.index").write_bytes(b"orphan")
    (tmp_path / f"{RECOVERY_POINT_CHECKPOINT}.tmp").write_text("junk")
    with PartitionLog(tmp_path, SMALL) as log:
        assert log.log_end_offset == 30
        assert read_all(log) == b"".join(batches)
        assert (tmp_path / segment_file_name(0, ".index")).exists()
    assert not (tmp_path / "00000000000000000001.index").exists()
    assert not (tmp_path / f"{RECOVERY_POINT_CHECKPOINT}.tmp").exists()
    assert read_offset_checkpoint(tmp_path / RECOVERY_POINT_CHECKPOINT) == 30


def test_corrupt_middle_segment_drops_later_ones(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        batches = fill(log, 40)
        segments = log.segments
    write_offset_checkpoint(tmp_path / RECOVERY_POINT_CHECKPOINT, segments[1].base_offset)
    path = segments[1].log_path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with PartitionLog(tmp_path, SMALL) as log:
        assert [s.base_offset for s in log.segments] == [s.base_offset for s in segments[:2]]
        assert log.log_end_offset == segments[1].next_offset - 1
        assert read_all(log) == b"".join(batches[: log.log_end_offset])
        fill(log, 1)


def test_flush_policy(tmp_path: Path) -> None:
    with PartitionLog(tmp_path / "a", LogConfig(flush_messages=3)) as log:
        log.append(make_batch(0, records=2), now_ms=0)
        assert log.recovery_point == 0
        log.append(make_batch(2), now_ms=0)
        assert log.recovery_point == 3
    with PartitionLog(tmp_path / "b", LogConfig(flush_ms=50)) as log:
        log.append(make_batch(0), now_ms=10**15)
        assert log.recovery_point == 1  # The clock jumped far past the last flush.
        log.append(make_batch(1), now_ms=10**15 + 49)
        assert log.recovery_point == 1
        log.append(make_batch(2), now_ms=10**15 + 50)
        assert log.recovery_point == 3
    with PartitionLog(tmp_path / "c") as log:
        fill(log, 5)
        assert log.recovery_point == 0
        log.flush()
        assert log.recovery_point == 5


def test_checkpoint_files(tmp_path: Path) -> None:
    path = tmp_path / "cp"
    assert read_offset_checkpoint(path) is None
    write_offset_checkpoint(path, 42)
    assert path.read_text() == "0\n42\n"
    assert read_offset_checkpoint(path) == 42
    for bad in ("", "0\n", "1\n5\n", "0\nx\n", "0\n-3\n", "0\n5"):
        path.write_text(bad)
        assert read_offset_checkpoint(path) is None


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        LogConfig(segment_bytes=0)
    with pytest.raises(ValueError):
        LogConfig(segment_bytes=1 << 31)
    with pytest.raises(ValueError):
        LogConfig(flush_messages=0)


# --------------------------------------------------------------------------- torn tail


@pytest.mark.parametrize(
    ("segment_bytes", "count", "last_indexed"),
    [
        (1 << 20, 13, True),  # one segment; the torn batch has a (stale) index entry
        (1 << 20, 12, False),  # one segment; the torn batch is past the last entry
        (700, 13, True),  # several segments; the active one keeps two batches
        (700, 11, False),  # several segments; the torn batch is the active one's only one
    ],
)
def test_torn_or_corrupt_tail_recovers_preceding_batches(
    tmp_path: Path, segment_bytes: int, count: int, last_indexed: bool
) -> None:
    """Cut the last batch at every byte, or flip any checked byte: recovery keeps the rest."""
    config = LogConfig(segment_bytes=segment_bytes, index_interval_bytes=150)
    pristine = tmp_path / "pristine"
    reference = tmp_path / "reference"
    with PartitionLog(pristine, config) as log:
        batches = fill(log, count, records=2, value_bytes=25)
    with PartitionLog(reference, config) as log:
        fill(log, count - 1, records=2, value_bytes=25)
        ref_segments = [(s.base_offset, s.index_entries) for s in log.segments]
    last = batches[-1]
    last_base = read_header(last).base_offset
    with PartitionLog(pristine, config) as log:
        active = log.active_segment
        seg_name = active.log_path.name
        start = active.size_bytes - len(last)
        assert (active.index_entries[-1:] == [(last_base + 1, start)]) == last_indexed
        assert (len(log.segments) > 1) == (segment_bytes < 1000)
    full = (pristine / seg_name).read_bytes()
    expected = b"".join(batches[:-1])

    def check(mutated: bytes, label: str) -> None:
        work = tmp_path / "work"
        shutil.copytree(pristine, work)
        (work / seg_name).write_bytes(mutated)
        log = PartitionLog(work, config)
        try:
            assert log.log_end_offset == last_base, label
            assert (work / seg_name).stat().st_size == start, label
            assert read_all(log) == expected, label
            segments = [(s.base_offset, s.index_entries) for s in log.segments]
            if start == 0:  # The torn batch was alone in its segment, which stays, empty.
                assert segments.pop() == (last_base, []), label
            assert segments == ref_segments, label
            index = work / seg_name.replace(".log", ".index")
            index_size = index.stat().st_size if index.exists() else 0  # missing: empty
            assert index_size == 8 * len(segments[-1][1] if start else []), label
            log.append(last, now_ms=0)
            assert log.log_end_offset == last_base + 2
            assert log.read(last_base + 1, 1 << 20) == last
        finally:
            log.close()
            shutil.rmtree(work)

    for cut in range(start, len(full)):
        check(full[:cut], f"cut at {cut}")
    for i in range(start, len(full)):
        if start + 12 <= i < start + 16:
            continue  # partitionLeaderEpoch lies outside the CRC, as in Kafka.
        mutated = bytearray(full)
        mutated[i] ^= 0x5A
        check(bytes(mutated), f"byte {i} flipped")


# --------------------------------------------------------------------------- follower append


def leader_log(path: Path, count: int, config: LogConfig = SMALL) -> list[bytes]:
    """A leader's log of ``count`` 2-record batches stamped with epochs 0, 0, 1, 1, ..."""
    with PartitionLog(path, config) as log:
        batches = []
        for i in range(count):
            batch = patch_batch(make_batch(0, records=2, ts=1000 + i), 2 * i, i // 2)
            log.append(batch, now_ms=0)
            batches.append(batch)
    return batches


def test_append_batches_copies_the_leader(tmp_path: Path) -> None:
    batches = leader_log(tmp_path / "leader", 20)
    with PartitionLog(tmp_path / "follower", SMALL) as log:
        assert log.append_batches(b"") == 0
        assert log.append_batches(b"".join(batches[:7]), now_ms=0) == 14
        assert log.append_batches(b"".join(batches[7:]), now_ms=0) == 40
        assert len(log.segments) > 3
        assert read_all(log) == b"".join(batches)
        assert log.leader_epoch_cache.entries() == [(e, 4 * e) for e in range(10)]
    with PartitionLog(tmp_path / "follower", SMALL) as log:
        assert read_all(log) == b"".join(batches)


def test_append_batches_is_all_or_nothing(tmp_path: Path) -> None:
    """A bad second batch (CRC, torn, gap, overlap) appends nothing, not even the first."""
    batches = leader_log(tmp_path / "leader", 6)
    bad_crc = bytearray(batches[2])
    bad_crc[-1] ^= 0x01
    bad_magic = bytearray(batches[2])
    bad_magic[16] = 1
    second_batches: dict[str, tuple[bytes, type[Exception], str]] = {
        "CRC": (bytes(bad_crc), CorruptBatchError, "CRC"),
        "magic": (bytes(bad_magic), CorruptBatchError, "magic"),
        "torn": (batches[2][:-3], CorruptBatchError, "needs"),
        "gap": (batches[3], ValueError, "batch 1 starts at offset 6, expected 4"),
        "overlap": (batches[1], ValueError, "batch 1 starts at offset 2, expected 4"),
    }
    with PartitionLog(tmp_path / "follower", SMALL) as log:
        log.append_batches(batches[0], now_ms=0)
        before = read_all(log)
        for name, (second, error, message) in second_batches.items():
            with pytest.raises(error, match=message):
                log.append_batches(batches[1] + second, now_ms=0)
            assert log.log_end_offset == 2, name
            assert read_all(log) == before, name
            assert log.leader_epoch_cache.entries() == [(0, 0)], name
        with pytest.raises(ValueError, match="expected 2"):
            log.append_batches(batches[0])
        assert log.append_batches(b"".join(batches[1:]), now_ms=0) == 12
        assert log.leader_epoch_cache.entries() == [(0, 0), (1, 4), (2, 8)]
    with PartitionLog(tmp_path / "tiny", LogConfig(segment_bytes=100)) as log:
        with pytest.raises(BatchTooLargeError):
            log.append_batches(batches[0])
        assert log.log_end_offset == 0


def test_append_batches_undoes_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = leader_log(tmp_path / "leader", 8)
    with PartitionLog(tmp_path / "follower", SMALL) as log:
        log.append_batches(batches[0], now_ms=0)
        calls = 0
        original = LogSegment.append

        def failing(self: LogSegment, batch: bytes, now_ms: int | None = None) -> BatchHeader:
            nonlocal calls
            calls += 1
            if calls == 4:
                raise OSError("disk full")
            return original(self, batch, now_ms)

        monkeypatch.setattr(LogSegment, "append", failing)
        with pytest.raises(OSError, match="disk full"):
            log.append_batches(b"".join(batches[1:]), now_ms=0)
        monkeypatch.undo()
        assert log.log_end_offset == 2
        assert read_all(log) == batches[0]
        assert log.leader_epoch_cache.entries() == [(0, 0)]


# --------------------------------------------------------------------------- consumer reads


def test_read_up_to_max_offset(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        batches = fill(log, 12, records=3)  # batch k holds [3k, 3k + 3)
        first = log.segments[0]
        in_first = first.next_offset // 3
        assert log.read(0, 1 << 20, max_offset=0) == b""
        assert log.read(0, 1 << 20, max_offset=2) == b""  # the first batch straddles 2
        assert log.read(0, 1 << 20, max_offset=3) == batches[0]
        assert log.read(1, 1 << 20, max_offset=8) == batches[0] + batches[1]
        assert log.read(0, 1 << 20, max_offset=1000) == b"".join(batches[:in_first])
        assert log.read(0, 1, max_offset=1000) == batches[0]  # KIP-74 still holds
        assert log.read(6, 1 << 20, max_offset=6) == b""
        assert log.read(36, 1 << 20, max_offset=36) == b""
        assert (
            log.read(first.next_offset, 1 << 20, max_offset=first.next_offset + 3)
            == (batches[in_first])
        )
        with pytest.raises(OffsetOutOfRangeError):
            log.read(37, 100, max_offset=40)


def timed_batch(base_offset: int, stamps: list[int], **kwargs: Any) -> bytes:
    records = [Record(b"k%d" % i, b"v", timestamp_ms=ts) for i, ts in enumerate(stamps)]
    return patch_batch(encode_batch(records, **kwargs), base_offset, 0)


def test_offset_for_timestamp(tmp_path: Path) -> None:
    """Against a brute force of Kafka's rule, for every target around every timestamp.

    Record timestamps are out of order within and across batches, and the log spans
    several segments with sparse time indexes.
    """
    config = LogConfig(segment_bytes=400, index_interval_bytes=50)
    pattern = [[100, 300, 200], [250, 260], [400, 350, 500], [500, 600], [50, 700]]
    batches = [[t + 1000 * round_ for t in stamps] for round_ in range(3) for stamps in pattern]
    records: list[tuple[int, int]] = []  # (offset, timestamp)
    spans: list[list[tuple[int, int]]] = []  # the records of each batch
    with PartitionLog(tmp_path, config) as log:
        for stamps in batches:
            base = log.log_end_offset
            log.append(timed_batch(base, stamps))
            spans.append([(base + i, ts) for i, ts in enumerate(stamps)])
            records += spans[-1]
        assert len(log.segments) > 3
        for target in sorted({ts + d for _, ts in records for d in (-1, 0, 1)}):
            # Kafka: the first batch whose max timestamp reaches the target, then the first
            # of its records that does.
            span = next((s for s in spans if max(ts for _, ts in s) >= target), None)
            expected = next(r for r in span if r[1] >= target) if span else None
            assert log.offset_for_timestamp(target) == expected, target
        largest = max(ts for _, ts in records)
        assert log.max_timestamp_offset() == next(r for r in records if r[1] == largest)


def test_offset_for_timestamp_respects_log_start(tmp_path: Path) -> None:
    with PartitionLog(tmp_path) as log:
        log.append(timed_batch(0, [10, 20, 30]))
        log.append(timed_batch(3, [40]))
        assert log.offset_for_timestamp(15) == (1, 20)
        log.delete_before(2)
        assert log.offset_for_timestamp(15) == (2, 30)
        assert log.offset_for_timestamp(41) is None
        assert log.max_timestamp_offset() == (3, 40)


def test_timestamps_of_compressed_and_log_append_time_batches(tmp_path: Path) -> None:
    with PartitionLog(tmp_path) as log:
        assert log.offset_for_timestamp(0) is None
        assert log.max_timestamp_offset() is None
        log.append(timed_batch(0, [10, 90, 30], compression=Compression.ZSTD))
        log.append(
            timed_batch(
                3,
                [1, 2],
                timestamp_type=TimestampType.LOG_APPEND_TIME,
                max_timestamp=50,
            )
        )
        assert log.offset_for_timestamp(20) == (1, 90)
        assert log.offset_for_timestamp(91) is None
        assert log.max_timestamp_offset() == (1, 90)
        log.append(timed_batch(5, [5, 95, 95]))
        assert log.max_timestamp_offset() == (6, 95)
    with PartitionLog(tmp_path) as log:
        assert log.max_timestamp_offset() == (6, 95)


# --------------------------------------------------------------------------- partition offsets


def test_partition_offsets_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "replication-offset-checkpoint"
    assert read_partition_offsets(path) == {}
    offsets = {("orders", 1): 987, ("orders", 0): 1234, ("__consumer_offsets", 7): 0}
    write_partition_offsets(path, offsets)
    assert path.read_text() == "0\n3\n__consumer_offsets 7 0\norders 0 1234\norders 1 987\n"
    assert read_partition_offsets(path) == offsets
    write_partition_offsets(path, {})
    assert read_partition_offsets(path) == {}
    with pytest.raises(ValueError, match="whitespace"):
        write_partition_offsets(path, {("bad topic", 0): 1})
    with pytest.raises(ValueError, match="negative"):
        write_partition_offsets(path, {("t", 0): -1})
    assert read_partition_offsets(path) == {}  # A refused write leaves the old file.
    for bad in ("0\n1\nt 0\n", "0\n1\nt x 5\n", "0\n2\nt 0 5\nt 0 6\n", "1\n0\n", "0\n1\n"):
        path.write_text(bad)
        with pytest.raises(CorruptCheckpointError, match="replication-offset-checkpoint"):
            read_partition_offsets(path)


def test_a_failed_write_moves_no_offset_and_leaves_no_bytes(tmp_path, monkeypatch):
    """A full disk: the append raises, and the log is as it was (no hole in the offsets)."""
    import broker.storage.segment as segment_module

    log = PartitionLog(tmp_path / "p", LogConfig())
    log.append(make_batch(0, records=2))
    size = log.size_bytes
    real = segment_module._pwrite_all

    def full_disk(fd: int, data: bytes, position: int) -> None:
        real(fd, data[: len(data) // 2], position)  # Part of it lands, then ENOSPC.
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segment_module, "_pwrite_all", full_disk)
    with pytest.raises(OSError):
        log.append(make_batch(2, records=3))
    monkeypatch.setattr(segment_module, "_pwrite_all", real)
    assert (log.log_end_offset, log.size_bytes) == (2, size)
    log.append(make_batch(2, records=3))
    assert log.log_end_offset == 5
    log.close()
    reopened = PartitionLog(tmp_path / "p", LogConfig())
    assert reopened.log_end_offset == 5
    assert [h.base_offset for _, h in iter_batches(reopened.read(0, 1 << 20))] == [0, 2]
    reopened.close()


def test_a_full_truncation_cut_short_by_a_crash_restarts_at_its_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new empty segment's file marks where the log restarts: a crash after the
    old segments went and before the log start checkpoint was written must not bring
    the log back at offset 0 (segments are otherwise made by their first append)."""
    directory = tmp_path / "t-0"
    log = PartitionLog(directory, SMALL)
    for _ in range(3):
        log.append(make_batch(log.log_end_offset), now_ms=0)
    log.flush()

    def crash(self: PartitionLog, offset: int) -> None:
        raise SystemExit("the process died here")

    monkeypatch.setattr(PartitionLog, "_set_log_start_offset", crash)
    with pytest.raises(SystemExit):
        log.truncate_fully_and_start_at(50)
    monkeypatch.undo()
    with PartitionLog(directory, SMALL) as reopened:
        assert (reopened.log_start_offset, reopened.log_end_offset) == (50, 50)
