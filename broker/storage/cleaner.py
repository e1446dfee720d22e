"""Log compaction (``cleanup.policy=compact``): keep the latest record of every key.

Theory of operation
-------------------
Kafka's ``LogCleaner``, simplified to one partition at a time and one pass over it:

1. **Cleanable range.** Segments before the active one that end at or below
   ``clean_upto_offset`` (the broker passes min(high watermark, active segment base), so
   uncommitted data is never cleaned). Every pass starts at the first segment; there is no
   cleaner-offset checkpoint.
2. **Offset map.** Key -> offset of its last record in that range, built by decoding the
   batches (the slow path, as in Kafka). The map is bounded by ``max_map_keys``: once a
   segment fills it, the range ends after that segment and the rest waits for a later pass
   (Kafka's dedupe buffer does the same).
3. **Rewrite.** Segments are grouped, oldest first, into runs whose combined size fits
   ``segment_bytes`` (Kafka's ``groupSegmentsBySize``), so small cleaned segments merge
   over passes. Each group is rewritten into one ``<base>.log.cleaned`` file and swapped
   in by ``PartitionLog.replace_segments`` (crash-safe renames, see ``broker.storage.log``).

Per record: one whose key has a later offset in the map is removed; records with a null
key are kept (Kafka refuses them on compacted topics at produce time; here they stay); a
tombstone (null value) that is the latest of its key is removed once its batch's max
timestamp is more than ``delete_retention_ms`` before ``now_ms``. That is the batch-time
rule, not Kafka's KIP-534 delete horizon (which stamps the horizon into the batch on the
first pass): simpler and stateless, at the cost of trusting producer clocks for
CreateTime topics (a producer clock far behind makes a tombstone expire early).

Offsets never move, and the log stays contiguous, which recovery and follower appends
rely on. A batch that keeps all its records is copied byte for byte. One that loses some
is re-encoded with the same codec, base offset, ``lastOffsetDelta``, offset deltas,
producer id/epoch/base sequence and partition leader epoch (Kafka's
``MemoryRecords.filterTo``); its timestamps are recomputed from the kept records. A batch
that loses all its records becomes an empty header-only batch spanning the same offsets
(Kafka's ``writeEmptyHeader``, which it uses to retain producer state); consecutive empty
batches without a producer id and of the same leader epoch are merged into one, so a
fully superseded stretch costs 61 bytes. A rewrite is never allowed to grow a batch: if
re-encoding would, the original is kept (compaction promises at least the latest value).
Control and transactional batches are copied unchanged and their keys do not enter the
map: without a transaction index, aborted data cannot be told from committed data.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import crc32c

# The record encoder and codecs are the producer path's; compaction must re-encode with
# the original offset deltas, which the public encode_batch deliberately ignores.
from broker.record_batch import (
    BatchHeader,
    Record,
    _compress,
    _encode_record,
    decode_records,
)
from broker.storage.log import PartitionLog
from broker.storage.segment import LogSegment

__all__ = ["DEFAULT_MAX_MAP_KEYS", "CleanResult", "compact"]

DEFAULT_MAX_MAP_KEYS = 1_000_000
"""Default bound of the key -> offset map (about 100 MB of Python objects for short keys)."""

_MAGIC = 2
_NO_TIMESTAMP = -1
_DELETE_HORIZON_BIT = 0x40
_TYPE_BITS = 0x38  # timestamp type, transactional, control: what an empty batch keeps
_HEAD = struct.Struct(">qiibI")  # baseOffset, batchLength, partitionLeaderEpoch, magic, crc
_AFTER_CRC = struct.Struct(">hiqqqhii")  # attributes .. recordsCount
_CRC_COVERS_FROM = 21
_UINT32_MAX = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class CleanResult:
    """What one ``compact`` pass did."""

    segments_before: int
    """Segments in the cleaned range before the pass."""
    segments_after: int
    """Segments that replaced them."""
    bytes_before: int
    bytes_after: int
    records_removed: int
    """Superseded records and expired tombstones removed."""
    tombstones_removed: int
    cleaned_upto_offset: int
    """End of the cleaned range (exclusive); the log start offset when nothing was cleaned."""


def compact(
    log: PartitionLog,
    *,
    clean_upto_offset: int,
    delete_retention_ms: int,
    now_ms: int,
    max_map_keys: int = DEFAULT_MAX_MAP_KEYS,
) -> CleanResult:
    """Compact ``log`` below ``clean_upto_offset``; see the module docstring.

    Reads and appends work as before afterwards (the rewritten segments get fresh
    indexes). Not thread-safe: the caller holds the log's lock for the whole pass.
    """
    if max_map_keys < 1:
        raise ValueError(f"max_map_keys {max_map_keys} must be positive")
    cleanable = [s for s in log.segments[:-1] if s.next_offset <= clean_upto_offset]
    offset_map, cleanable = _build_offset_map(cleanable, max_map_keys)
    bytes_before = sum(segment.size_bytes for segment in cleanable)
    stats = _Stats()
    for group in _group_by_size(cleanable, log.config.segment_bytes):
        _clean_group(log, group, offset_map, stats, now_ms - delete_retention_ms)
    return CleanResult(
        segments_before=len(cleanable),
        segments_after=stats.segments_after,
        bytes_before=bytes_before,
        bytes_after=stats.bytes_after,
        records_removed=stats.records_removed,
        tombstones_removed=stats.tombstones_removed,
        cleaned_upto_offset=cleanable[-1].next_offset if cleanable else log.log_start_offset,
    )


# --------------------------------------------------------------------------- map


def _keeps_its_records(header: BatchHeader) -> bool:
    """Batches copied unchanged, whose keys stay out of the map."""
    return header.is_control or header.is_transactional


def _build_offset_map(
    segments: Sequence[LogSegment], max_map_keys: int
) -> tuple[dict[bytes, int], list[LogSegment]]:
    """Key -> last offset over ``segments``, and the segments it covers (a prefix)."""
    offset_map: dict[bytes, int] = {}
    covered: list[LogSegment] = []
    for segment in segments:
        if len(offset_map) >= max_map_keys:
            break
        for position, header in segment.batches():
            if _keeps_its_records(header) or header.records_count == 0:
                continue
            for record in decode_records(segment.read_batch(position, header)):
                if record.key is not None:
                    offset_map[record.key] = header.base_offset + record.offset_delta
        covered.append(segment)
    return offset_map, covered


def _group_by_size(segments: Sequence[LogSegment], max_bytes: int) -> list[list[LogSegment]]:
    """Consecutive runs of at most ``max_bytes`` whose offsets fit one segment's index."""
    groups: list[list[LogSegment]] = []
    group_bytes = 0
    for segment in segments:
        if (
            groups
            and group_bytes + segment.size_bytes <= max_bytes
            and segment.next_offset - 1 - groups[-1][0].base_offset <= _UINT32_MAX
        ):
            groups[-1].append(segment)
            group_bytes += segment.size_bytes
        else:
            groups.append([segment])
            group_bytes = segment.size_bytes
    return groups


# --------------------------------------------------------------------------- rewrite


@dataclass
class _Stats:
    segments_after: int = 0
    bytes_after: int = 0
    records_removed: int = 0
    tombstones_removed: int = 0


@dataclass
class _EmptyRun:
    """Consecutive batches left without records, merged into one header-only batch."""

    first: BatchHeader
    last: BatchHeader
    max_timestamp: int
    original: bytes | None
    """The batch's bytes when the run is one batch that was already empty."""

    def accepts(self, header: BatchHeader) -> bool:
        return (
            _mergeable(header)
            and _mergeable(self.first)
            and header.partition_leader_epoch == self.first.partition_leader_epoch
        )


def _mergeable(header: BatchHeader) -> bool:
    return header.producer_id < 0 and not header.is_transactional and not header.is_control


class _GroupWriter:
    """Writes one group's cleaned batches to the ``.cleaned`` file."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._run: _EmptyRun | None = None
        self.changed = False
        self.size = 0

    def write(self, batch: bytes, changed: bool) -> None:
        self._flush_run()
        self._write(batch)
        self.changed |= changed

    def write_empty(self, header: BatchHeader, batch: bytes) -> None:
        """A batch with no records left; ``batch`` is its bytes before cleaning."""
        was_empty = header.records_count == 0
        run = self._run
        if run is not None and run.accepts(header):
            run.last = header
            run.max_timestamp = max(run.max_timestamp, header.max_timestamp)
            run.original = None
            return
        self._flush_run()
        self._run = _EmptyRun(header, header, header.max_timestamp, batch if was_empty else None)

    def finish(self) -> None:
        self._flush_run()

    def _flush_run(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        if run.original is not None:
            self._write(run.original)  # A lone batch that was already empty: unchanged.
            return
        self._write(_empty_batch(run.first, run.last, run.max_timestamp))
        self.changed = True

    def _write(self, batch: bytes) -> None:
        self._out.write(batch)
        self.size += len(batch)


def _clean_group(
    log: PartitionLog,
    group: list[LogSegment],
    offset_map: dict[bytes, int],
    stats: _Stats,
    tombstone_horizon_ms: int,
) -> None:
    """Rewrite ``group`` into one segment and swap it in (skipped when nothing changes)."""
    path = log.cleaned_path(group[0].base_offset)
    try:
        with open(path, "wb") as out:
            writer = _GroupWriter(out)
            for segment in group:
                for position, header in segment.batches():
                    batch = segment.read_batch(position, header)
                    _clean_batch(writer, header, batch, offset_map, stats, tombstone_horizon_ms)
            writer.finish()
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if not writer.changed and len(group) == 1:
        path.unlink()
        stats.segments_after += 1
        stats.bytes_after += group[0].size_bytes
        return
    log.replace_segments(group, path)
    stats.segments_after += 1
    stats.bytes_after += writer.size


def _clean_batch(
    writer: _GroupWriter,
    header: BatchHeader,
    batch: bytes,
    offset_map: dict[bytes, int],
    stats: _Stats,
    tombstone_horizon_ms: int,
) -> None:
    if _keeps_its_records(header):
        writer.write(batch, changed=False)
        return
    records = decode_records(batch)
    expire_tombstones = header.max_timestamp < tombstone_horizon_ms
    kept: list[Record] = []
    tombstones = 0
    for record in records:
        if record.key is not None:
            offset = header.base_offset + record.offset_delta
            if offset_map.get(record.key, offset) > offset:
                continue  # A later record of the same key supersedes it.
            if record.value is None and expire_tombstones:
                tombstones += 1
                continue
        kept.append(record)
    if len(kept) == len(records) and records:
        writer.write(batch, changed=False)
        return
    if not kept:
        writer.write_empty(header, batch)
    else:
        rewritten = _encode_kept(header, kept)
        if len(rewritten) > len(batch):
            writer.write(batch, changed=False)  # Never grow a batch; keeping is allowed.
            return
        writer.write(rewritten, changed=True)
    stats.records_removed += len(records) - len(kept)
    stats.tombstones_removed += tombstones


def _assemble(
    header: BatchHeader,
    *,
    attributes: int,
    base_timestamp: int,
    max_timestamp: int,
    producer: tuple[int, int, int],
    records_count: int,
    payload: bytes,
    last_offset_delta: int,
) -> bytes:
    after_crc = (
        _AFTER_CRC.pack(
            attributes,
            last_offset_delta,
            base_timestamp,
            max_timestamp,
            *producer,
            records_count,
        )
        + payload
    )
    batch_length = len(after_crc) + _CRC_COVERS_FROM - 12
    crc = crc32c.crc32c(after_crc)
    head = _HEAD.pack(header.base_offset, batch_length, header.partition_leader_epoch, _MAGIC, crc)
    return head + after_crc


def _encode_kept(header: BatchHeader, kept: list[Record]) -> bytes:
    """``kept`` re-encoded as a batch with ``header``'s offsets, producer fields and codec."""
    base_timestamp = kept[0].timestamp_ms
    payload = bytearray()
    for record in kept:
        _encode_record(payload, record, record.offset_delta, record.timestamp_ms - base_timestamp)
    return _assemble(
        header,
        attributes=header.attributes & ~_DELETE_HORIZON_BIT,
        base_timestamp=base_timestamp,
        max_timestamp=max(record.timestamp_ms for record in kept),
        producer=(header.producer_id, header.producer_epoch, header.base_sequence),
        records_count=len(kept),
        payload=_compress(header.compression, bytes(payload)),
        last_offset_delta=header.last_offset_delta,
    )


def _empty_batch(first: BatchHeader, last: BatchHeader, max_timestamp: int) -> bytes:
    """A header-only batch spanning ``first.base_offset`` .. ``last.last_offset``.

    As Kafka's ``DefaultRecordBatch.writeEmptyHeader``: no codec, base timestamp -1, the
    run's max timestamp, and the producer fields of ``first`` (a run of several batches
    only merges batches without a producer id).
    """
    return _assemble(
        first,
        attributes=first.attributes & _TYPE_BITS,
        base_timestamp=_NO_TIMESTAMP,
        max_timestamp=max_timestamp,
        producer=(first.producer_id, first.producer_epoch, first.base_sequence),
        records_count=0,
        payload=b"",
        last_offset_delta=last.last_offset - first.base_offset,
    )
