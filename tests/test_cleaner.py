"""Log compaction: latest value per key, tombstone expiry, offsets kept, crash-safe swap."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.record_batch import (
    Compression,
    CorruptBatchError,
    Record,
    decode_records,
    encode_batch,
    iter_batches,
    patch_batch,
    read_header,
)
from broker.storage import (
    CLEANED_SUFFIX,
    SWAP_SUFFIX,
    LogConfig,
    PartitionLog,
    compact,
    segment_file_name,
)

CONFIG = LogConfig(segment_bytes=700, index_interval_bytes=120)
Row = tuple[int, bytes | None, bytes | None]  # (offset, key, value)


def keyed_batch(
    base_offset: int,
    pairs: Sequence[tuple[bytes | None, bytes | None]],
    *,
    ts: int = 1000,
    epoch: int = 0,
    **kwargs: Any,
) -> bytes:
    records = [Record(k, v, timestamp_ms=ts + i) for i, (k, v) in enumerate(pairs)]
    return patch_batch(encode_batch(records, **kwargs), base_offset, epoch)


def put(
    log: PartitionLog, pairs: Sequence[tuple[bytes | None, bytes | None]], **kwargs: Any
) -> None:
    log.append(keyed_batch(log.log_end_offset, pairs, **kwargs), now_ms=0)


def all_batches(log: PartitionLog) -> list[bytes]:
    out = []
    offset = log.log_start_offset
    while offset < log.log_end_offset:
        data = log.read(offset, 1 << 20)
        for position, header in iter_batches(data):  # CRC-checked
            out.append(data[position : position + header.size_bytes])
            offset = header.next_offset
        assert iter_batches(data).error is None
    return out


def rows(log: PartitionLog) -> list[Row]:
    """Every record as (offset, key, value); also checks the log is contiguous."""
    out: list[Row] = []
    expected = log.log_start_offset
    for batch in all_batches(log):
        header = read_header(batch)
        assert header.base_offset == expected
        expected = header.next_offset
        for record in decode_records(batch):
            out.append((header.base_offset + record.offset_delta, record.key, record.value))
    assert expected == log.log_end_offset
    return out


def latest_state(records: list[Row]) -> dict[bytes, bytes]:
    """Key -> value after replaying ``records``; a tombstone deletes the key."""
    state: dict[bytes, bytes] = {}
    for _, key, value in records:
        if key is None:
            continue
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    return state


def fill_keyed(log: PartitionLog, batches: int, keys: int = 5, **kwargs: Any) -> None:
    for i in range(batches):
        pairs = [(b"k%d" % ((i * 3 + j) % keys), b"v%d-%d" % (i, j) + b"." * 30) for j in range(3)]
        put(log, pairs, **kwargs)


# --------------------------------------------------------------------------- semantics


def test_latest_value_per_key_survives_at_its_offset(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, CONFIG) as log:
        fill_keyed(log, 30)
        put(log, [(None, b"keyless"), (b"k1", b"last")])
        before = rows(log)
        end, epochs = log.log_end_offset, log.leader_epoch_cache.entries()
        upto = log.active_segment.base_offset
        result = compact(log, clean_upto_offset=upto, delete_retention_ms=0, now_ms=0)
        after = rows(log)
        assert result.cleaned_upto_offset == upto
        assert result.records_removed == len(before) - len(after) > 0
        assert result.bytes_after < result.bytes_before
        assert set(after) <= set(before)  # nothing moved or changed
        assert latest_state(after) == latest_state(before)
        cleaned = [r for r in after if r[0] < upto]
        keys = [k for _, k, _ in cleaned if k is not None]
        assert len(keys) == len(set(keys))  # one record per key in the cleaned range
        last_offset = {k: o for o, k, _ in before if o < upto and k is not None}
        assert {(k, o) for o, k, _ in cleaned if k is not None} == set(
            (k, o) for k, o in last_offset.items()
        )
        assert [r for r in after if r[0] >= upto] == [r for r in before if r[0] >= upto]
        assert (None, b"keyless") in {(k, v) for _, k, v in after}
        assert log.log_end_offset == end
        assert log.leader_epoch_cache.entries() == epochs
        # Appends and reads at every offset work on the rewritten segments.
        put(log, [(b"k2", b"new")])
        for offset in range(log.log_start_offset, log.log_end_offset):
            header = read_header(log.read(offset, 1))
            assert header.base_offset <= offset <= header.last_offset
    with PartitionLog(tmp_path, CONFIG) as log:
        assert rows(log) == after + [(end, b"k2", b"new")]


def test_tombstones_expire_after_delete_retention(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, CONFIG) as log:
        put(log, [(b"a", b"1"), (b"b", b"1"), (b"c", b"1")], ts=1000)
        put(log, [(b"a", None), (b"c", b"2")], ts=5000)  # max timestamp 5001
        put(log, [(None, None), (b"b", None)], ts=5000)  # keyless "tombstone" stays
        log.roll()
        put(log, [(b"d", b"1")], ts=9000)
        upto = log.active_segment.base_offset
        result = compact(log, clean_upto_offset=upto, delete_retention_ms=1000, now_ms=6001)
        assert result.tombstones_removed == 0
        assert [(k, v) for _, k, v in rows(log)] == [
            (b"a", None),
            (b"c", b"2"),
            (None, None),
            (b"b", None),
            (b"d", b"1"),
        ]
        result = compact(log, clean_upto_offset=upto, delete_retention_ms=1000, now_ms=6002)
        assert result.tombstones_removed == 2
        assert [(o, k, v) for o, k, v in rows(log)] == [
            (4, b"c", b"2"),
            (5, None, None),
            (7, b"d", b"1"),
        ]
        assert log.log_start_offset == 0 and log.log_end_offset == 8


@pytest.mark.parametrize("codec", list(Compression))
def test_compressed_batches_keep_their_codec(tmp_path: Path, codec: Compression) -> None:
    with PartitionLog(tmp_path, LogConfig()) as log:
        for i in range(4):
            put(
                log,
                [(b"x", b"%d" % i), (b"y%d" % i, b"1" * 50), (b"x", b"%d!" % i)],
                compression=codec,
            )
        log.roll()
        put(log, [(b"z", b"1")])
        compact(log, clean_upto_offset=log.log_end_offset, delete_retention_ms=0, now_ms=0)
        batches = all_batches(log)
        assert [read_header(b).compression for b in batches[:4]] == [codec] * 4
        assert [(o, k, v) for o, k, v in rows(log)] == [
            (1, b"y0", b"1" * 50),
            (4, b"y1", b"1" * 50),
            (7, b"y2", b"1" * 50),
            (10, b"y3", b"1" * 50),
            (11, b"x", b"3!"),
            (12, b"z", b"1"),
        ]
        # Offsets, lastOffsetDelta and counts: the last batch spans [9, 12) with 2 records.
        last = read_header(batches[3])
        assert (last.base_offset, last.last_offset_delta, last.records_count) == (9, 2, 2)


def test_producer_fields_and_epochs_are_kept(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, LogConfig()) as log:
        put(
            log,
            [(b"a", b"1"), (b"b", b"1")],
            epoch=3,
            producer_id=7,
            producer_epoch=2,
            base_sequence=40,
        )
        put(log, [(b"a", b"2")], epoch=3, producer_id=7, producer_epoch=2, base_sequence=42)
        put(log, [(b"b", b"2")], epoch=4)
        log.roll()
        put(log, [(b"c", b"1")], epoch=4)
        compact(log, clean_upto_offset=4, delete_retention_ms=0, now_ms=0)
        headers = [read_header(b) for b in all_batches(log)]
        first = headers[0]
        assert (first.producer_id, first.producer_epoch, first.base_sequence) == (7, 2, 40)
        assert (first.base_offset, first.last_offset_delta, first.records_count) == (0, 1, 0)
        assert first.partition_leader_epoch == 3
        assert [h.partition_leader_epoch for h in headers] == [3, 3, 4, 4]
        assert log.leader_epoch_cache.entries() == [(3, 0), (4, 3)]


def test_empty_batches_merge_into_one(tmp_path: Path) -> None:
    """A superseded stretch of plain batches costs one header per leader epoch."""
    with PartitionLog(tmp_path, LogConfig()) as log:
        for i in range(20):
            put(log, [(b"k", b"v%d" % i)], epoch=0 if i < 12 else 1)
        log.roll()
        put(log, [(b"k", b"final")], epoch=1)
        result = compact(log, clean_upto_offset=20, delete_retention_ms=0, now_ms=0)
        headers = [read_header(b) for b in all_batches(log)]
        assert [(h.base_offset, h.next_offset, h.records_count) for h in headers] == [
            (0, 12, 0),
            (12, 19, 0),
            (19, 20, 1),
            (20, 21, 1),
        ]
        assert result.records_removed == 19
        assert result.bytes_after == 61 * 2 + len(all_batches(log)[2])
        # Cleaning again changes nothing.
        segments = log.segments
        again = compact(log, clean_upto_offset=20, delete_retention_ms=0, now_ms=0)
        assert again.records_removed == 0 and log.segments == segments


def test_control_and_transactional_batches_are_copied(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, LogConfig()) as log:
        txn = keyed_batch(
            0,
            [(b"a", b"t")],
            producer_id=5,
            producer_epoch=0,
            base_sequence=0,
            is_transactional=True,
        )
        log.append(txn, now_ms=0)
        put(log, [(b"a", b"2")])
        put(log, [(b"b", b"1")])
        log.roll()
        put(log, [(b"c", b"1")])
        compact(log, clean_upto_offset=3, delete_retention_ms=0, now_ms=0)
        assert all_batches(log)[0] == txn
        assert [(o, k, v) for o, k, v in rows(log)] == [
            (0, b"a", b"t"),
            (1, b"a", b"2"),
            (2, b"b", b"1"),
            (3, b"c", b"1"),
        ]


def test_only_below_clean_upto_and_never_the_active_segment(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, CONFIG) as log:
        fill_keyed(log, 12)
        segments = log.segments
        assert len(segments) >= 3
        before = rows(log)
        upto = segments[1].next_offset - 1  # inside segment 1: only segment 0 is cleaned
        result = compact(log, clean_upto_offset=upto, delete_retention_ms=0, now_ms=0)
        assert result.segments_before == 1 and result.cleaned_upto_offset == segments[0].next_offset
        assert [r for r in rows(log) if r[0] >= segments[0].next_offset] == [
            r for r in before if r[0] >= segments[0].next_offset
        ]
        assert log.segments[1:] == segments[1:]
        nothing = compact(log, clean_upto_offset=0, delete_retention_ms=0, now_ms=0)
        assert nothing.segments_before == 0 and nothing.records_removed == 0
        # Far past the end: the active segment still stays as it is.
        active = log.active_segment
        compact(log, clean_upto_offset=10**9, delete_retention_ms=0, now_ms=0)
        assert log.active_segment is active


def test_segments_merge_over_passes(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, CONFIG) as log:
        fill_keyed(log, 40, keys=3)
        many = len(log.segments)
        upto = log.active_segment.base_offset
        first = compact(log, clean_upto_offset=upto, delete_retention_ms=0, now_ms=0)
        second = compact(log, clean_upto_offset=upto, delete_retention_ms=0, now_ms=0)
        assert first.segments_before == many - 1
        assert second.segments_after < second.segments_before
        assert len(log.segments) < many
        for segment in log.segments:
            assert segment.size_bytes <= CONFIG.segment_bytes
        assert latest_state(rows(log))
        bases = [s.base_offset for s in log.segments]
        assert bases == sorted(bases) and bases[0] == 0
    with PartitionLog(tmp_path, CONFIG) as log:
        assert [s.base_offset for s in log.segments] == bases


def test_max_map_keys_limits_one_pass(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, CONFIG) as log:
        for i in range(30):
            put(log, [(b"key%d" % i, b"v" * 40)])
        upto = log.active_segment.base_offset
        result = compact(
            log, clean_upto_offset=upto, delete_retention_ms=0, now_ms=0, max_map_keys=5
        )
        assert result.segments_before == 1
        assert result.cleaned_upto_offset == log.segments[0].next_offset
        with pytest.raises(ValueError, match="max_map_keys"):
            compact(log, clean_upto_offset=upto, delete_retention_ms=0, now_ms=0, max_map_keys=0)


def test_follower_replicates_a_compacted_log(tmp_path: Path) -> None:
    with PartitionLog(tmp_path / "leader", CONFIG) as leader:
        fill_keyed(leader, 20)
        compact(
            leader,
            clean_upto_offset=leader.active_segment.base_offset,
            delete_retention_ms=0,
            now_ms=0,
        )
        with PartitionLog(tmp_path / "follower", CONFIG) as follower:
            while follower.log_end_offset < leader.log_end_offset:
                follower.append_batches(leader.read(follower.log_end_offset, 500), now_ms=0)
            assert rows(follower) == rows(leader)


# --------------------------------------------------------------------------- swap safety


def test_replace_segments_checks_the_cleaned_file(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, CONFIG) as log:
        fill_keyed(log, 12)
        segments = log.segments
        before = rows(log)
        path = log.cleaned_path(0)
        data = b"".join(all_batches(log))
        first = segments[0]
        wrong = {
            "gap": data[: read_header(data).size_bytes] + all_batches(log)[2],
            "short": all_batches(log)[0],
            "torn": data[: first.size_bytes - 1],
        }
        for name, content in wrong.items():
            path.write_bytes(content)
            with pytest.raises((ValueError, CorruptBatchError)):
                log.replace_segments(segments[:1], path)
            assert not path.exists(), name
            assert rows(log) == before and log.segments == segments, name
        path.write_bytes(data[: first.size_bytes])
        with pytest.raises(ValueError, match="active"):
            log.replace_segments(segments[-1:], path)
        with pytest.raises(ValueError, match="consecutive"):
            log.replace_segments([segments[0], segments[2]], path)
        with pytest.raises(ValueError, match="is not"):
            log.replace_segments(segments[1:2], path)
        assert rows(log) == before


def crash_copies(tmp_path: Path) -> tuple[Path, Path, int, bytes]:
    """A pristine log, its compacted twin, the swap base and the cleaned segment bytes."""
    pristine, cleaned = tmp_path / "pristine", tmp_path / "cleaned"
    with PartitionLog(pristine, CONFIG) as log:
        fill_keyed(log, 20, keys=3)
        upto = log.segments[3].next_offset  # the first four segments form one group
    shutil.copytree(pristine, cleaned)
    with PartitionLog(cleaned, LogConfig(segment_bytes=10_000, index_interval_bytes=120)) as log:
        result = compact(log, clean_upto_offset=upto, delete_retention_ms=0, now_ms=0)
        assert result.segments_before == 4 and result.segments_after == 1
        swapped = log.segments[0].log_path.read_bytes()
    return pristine, cleaned, 0, swapped


@pytest.mark.parametrize(
    "state",
    [
        "cleaned-partial",  # crashed while writing the .cleaned file
        "cleaned-whole",  # crashed before the commit rename
        "swap",  # committed, nothing deleted yet
        "swap-first-deleted",  # the first old segment gone (its indexes still there)
        "swap-some-deleted",  # two old .log files gone, orphan indexes left
        "renamed",  # swap renamed into place, old indexes already deleted
    ],
)
def test_crash_during_swap_leaves_a_consistent_log(tmp_path: Path, state: str) -> None:
    pristine, cleaned, base, swapped = crash_copies(tmp_path)
    with PartitionLog(pristine, CONFIG) as log:
        all_bases = [s.base_offset for s in log.segments]
        old_bases = all_bases[:4]
        original = rows(log)
    with PartitionLog(cleaned, CONFIG) as log:
        compacted = rows(log)
    work = tmp_path / "work"
    shutil.copytree(pristine, work)
    log_name = segment_file_name(base, ".log")
    if state.startswith("cleaned"):
        part = swapped if state == "cleaned-whole" else swapped[: len(swapped) // 2]
        (work / (log_name + CLEANED_SUFFIX)).write_bytes(part)
        expected, expected_bases = original, all_bases
    else:
        (work / (log_name + SWAP_SUFFIX)).write_bytes(swapped)
        expected, expected_bases = compacted, [base] + all_bases[4:]
        if state == "swap-first-deleted":
            (work / log_name).unlink()
        elif state == "swap-some-deleted":
            for old in old_bases[:2]:
                (work / segment_file_name(old, ".log")).unlink()
        elif state == "renamed":
            for old in old_bases:
                for suffix in (".log", ".index", ".timeindex"):
                    (work / segment_file_name(old, suffix)).unlink()
            (work / (log_name + SWAP_SUFFIX)).rename(work / log_name)
    with PartitionLog(work, CONFIG) as log:
        assert rows(log) == expected
        assert [s.base_offset for s in log.segments] == expected_bases
        for offset in range(log.log_end_offset):  # indexes agree with the new files
            header = read_header(log.read(offset, 1))
            assert header.base_offset <= offset <= header.last_offset
        put(log, [(b"after", b"crash")])
    assert not list(work.glob("*" + CLEANED_SUFFIX)) and not list(work.glob("*" + SWAP_SUFFIX))
    with PartitionLog(work, CONFIG) as log:
        assert rows(log) == expected + [(original[-1][0] + 1, b"after", b"crash")]


def test_corrupt_swap_file_refuses_to_open(tmp_path: Path) -> None:
    pristine, _, base, swapped = crash_copies(tmp_path)
    (pristine / (segment_file_name(base, ".log") + SWAP_SUFFIX)).write_bytes(swapped[:-1])
    with pytest.raises(CorruptBatchError, match=r"\.swap"):
        PartitionLog(pristine, CONFIG)


# --------------------------------------------------------------------------- property

_writes = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from([b"a", b"b", b"c", b"d", None]),
            st.one_of(st.none(), st.binary(max_size=12)),
        ),
        min_size=1,
        max_size=4,
    ),
    min_size=1,
    max_size=30,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    writes=_writes,
    clean_points=st.lists(st.integers(0, 30), max_size=3),
    codec=st.sampled_from([Compression.NONE, Compression.LZ4]),
    expire=st.booleans(),
)
def test_compaction_preserves_the_latest_state(
    tmp_path: Path,
    writes: list[list[tuple[bytes | None, bytes | None]]],
    clean_points: list[int],
    codec: Compression,
    expire: bool,
) -> None:
    """Cleaning at any points between appends never changes the replayed key -> value
    state, never moves a record, and leaves one record per key in the cleaned range."""
    work = tmp_path / "log"
    shutil.rmtree(work, ignore_errors=True)
    config = LogConfig(segment_bytes=300, index_interval_bytes=64)
    with PartitionLog(work, config) as log:
        reference: list[Row] = []
        for i, pairs in enumerate(writes):
            base = log.log_end_offset
            put(log, pairs, compression=codec, ts=i * 10)
            reference += [(base + j, k, v) for j, (k, v) in enumerate(pairs)]
            if i in clean_points:
                before = rows(log)
                upto = min(log.active_segment.base_offset, log.log_end_offset)
                now = 10**6 if expire else 0
                compact(log, clean_upto_offset=upto, delete_retention_ms=100, now_ms=now)
                after = rows(log)
                assert set(after) <= set(before)
                assert latest_state(after) == latest_state(reference)
                keyed = [k for o, k, _ in after if k is not None and o < upto]
                assert len(keyed) == len(set(keyed))
                if not expire:
                    assert {k for _, k, _ in after} >= {k for _, k, _ in reference if k}
        assert latest_state(rows(log)) == latest_state(reference)
        assert log.log_end_offset == len(reference)
