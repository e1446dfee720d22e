"""Leader-epoch cache: Kafka's LeaderEpochFileCacheTest cases, checkpoints, log integration."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.record_batch import Record, encode_batch, patch_batch
from broker.storage import (
    LEADER_EPOCH_CHECKPOINT,
    UNDEFINED_EPOCH,
    UNDEFINED_EPOCH_OFFSET,
    CorruptCheckpointError,
    LeaderEpochCache,
    LogConfig,
    PartitionLog,
)

UNDEFINED = (UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET)


@pytest.fixture
def cache(tmp_path: Path) -> LeaderEpochCache:
    return LeaderEpochCache.load(tmp_path / LEADER_EPOCH_CHECKPOINT)


def assigned(cache: LeaderEpochCache, *entries: tuple[int, int]) -> LeaderEpochCache:
    for epoch, start in entries:
        cache.assign(epoch, start)
    return cache


# --------------------------------------------------------------------------- Kafka's cases


def test_add_epoch_and_end_offset(cache: LeaderEpochCache) -> None:
    cache.assign(2, 10)
    assert cache.latest_epoch == 2
    assert cache.entries() == [(2, 10)]
    assert cache.end_offset_for(2, 11) == (2, 11)


def test_latest_epoch_requested_returns_log_end(cache: LeaderEpochCache) -> None:
    assigned(cache, (2, 11), (2, 12))
    assert cache.end_offset_for(2, 14) == (2, 14)
    assert cache.entries() == [(2, 11)]


def test_undefined_epoch_requested(cache: LeaderEpochCache) -> None:
    assert cache.end_offset_for(UNDEFINED_EPOCH, 73) == UNDEFINED
    assigned(cache, (2, 11), (3, 12))
    assert cache.end_offset_for(UNDEFINED_EPOCH, 0) == UNDEFINED


def test_empty_cache(cache: LeaderEpochCache) -> None:
    assert cache.latest_epoch == UNDEFINED_EPOCH
    assert cache.latest_entry is None and cache.earliest_entry is None
    assert cache.end_offset_for(0, 0) == UNDEFINED
    assert cache.end_offset_for(7, 0) == UNDEFINED
    assert cache.epoch_for(5) is None
    cache.truncate_from_start(7)
    cache.truncate_from_end(7)
    assert cache.entries() == []


def test_start_offset_of_an_epoch_is_never_moved_later(cache: LeaderEpochCache) -> None:
    assert cache.assign(2, 9)
    assert not cache.assign(2, 10)
    assert cache.entries() == [(2, 9)]


def test_start_offsets_increase_monotonically(cache: LeaderEpochCache) -> None:
    assigned(cache, (2, 9), (3, 9))
    assert cache.entries() == [(3, 9)]
    cache.clear()
    assigned(cache, (2, 6), (3, 5))
    assert cache.entries() == [(3, 5)]


def test_requested_epoch_below_first_epoch(cache: LeaderEpochCache) -> None:
    """Current Kafka answers (requested, first start), not (-1, -1)."""
    assigned(cache, (5, 11), (6, 12), (7, 13))
    assert cache.end_offset_for(4, 0) == (4, 11)


def test_matching_epoch_with_earlier_start_truncates(cache: LeaderEpochCache) -> None:
    assigned(cache, (5, 11), (6, 12), (7, 13), (7, 12))
    assert cache.entries() == [(5, 11), (7, 12)]
    assert cache.end_offset_for(5, 0) == (5, 12)
    assert cache.end_offset_for(6, 0) == (5, 12)


def test_end_offset_is_next_epoch_start(cache: LeaderEpochCache) -> None:
    assigned(cache, (1, 11), (1, 12), (2, 13), (2, 14), (3, 15), (3, 16))
    assert cache.end_offset_for(2, 17) == (2, 15)


def test_next_available_epoch_when_no_exact_match(cache: LeaderEpochCache) -> None:
    assigned(cache, (0, 10), (2, 13), (4, 17))
    assert cache.end_offset_for(1, 0) == (0, 13)
    assert cache.end_offset_for(2, 0) == (2, 17)
    assert cache.end_offset_for(3, 0) == (2, 17)
    assert cache.end_offset_for(4, 20) == (4, 20)


def test_epoch_above_every_entry_is_undefined(cache: LeaderEpochCache) -> None:
    cache.assign(2, 100)
    assert cache.end_offset_for(3, 100) == UNDEFINED


def test_lower_epoch_replaces_conflicting_entries(cache: LeaderEpochCache) -> None:
    """Kafka's shouldEnforceMonotonicallyIncreasingEpochs."""
    assigned(cache, (1, 5), (2, 6), (1, 7))
    assert cache.latest_epoch == 1
    assert cache.entries() == [(1, 7)]
    assert cache.end_offset_for(1, 8) == (1, 8)
    assert cache.end_offset_for(2, 8) == UNDEFINED


def test_leader_changes_many_times(cache: LeaderEpochCache) -> None:
    assigned(cache, (0, 0), (1, 0))
    assert cache.entries() == [(1, 0)]
    assert cache.end_offset_for(1, 0) == (1, 0)
    assert cache.end_offset_for(0, 0) == (0, 0)
    assert cache.end_offset_for(1, 5) == (1, 5)
    cache.assign(2, 5)
    assert cache.end_offset_for(2, 10) == (2, 10)
    assert cache.end_offset_for(1, 10) == (1, 5)
    assert cache.end_offset_for(0, 10) == (0, 0)


def test_follower_receives_many_messages(cache: LeaderEpochCache) -> None:
    for offset in range(9):
        cache.assign(offset // 3, offset)
    assert cache.entries() == [(0, 0), (1, 3), (2, 6)]
    assert cache.end_offset_for(2, 9) == (2, 9)
    assert cache.end_offset_for(0, 9) == (0, 3)
    assert cache.end_offset_for(1, 9) == (1, 6)


def test_invalid_assign_is_refused(cache: LeaderEpochCache) -> None:
    for epoch, start in ((-1, 0), (0, -1)):
        with pytest.raises(ValueError, match="invalid leader epoch entry"):
            cache.assign(epoch, start)
    assert cache.entries() == []


@pytest.mark.parametrize(
    ("end_offset", "expected"),
    [
        (8, [(2, 6)]),  # on an epoch boundary
        (9, [(2, 6), (3, 8)]),  # between boundaries
        (11, [(2, 6), (3, 8)]),
        (12, [(2, 6), (3, 8), (4, 11)]),
        (6, []),
        (UNDEFINED_EPOCH_OFFSET, [(2, 6), (3, 8), (4, 11)]),
    ],
)
def test_truncate_from_end(
    cache: LeaderEpochCache, end_offset: int, expected: list[tuple[int, int]]
) -> None:
    assigned(cache, (2, 6), (3, 8), (4, 11))
    cache.truncate_from_end(end_offset)
    assert cache.entries() == expected


@pytest.mark.parametrize(
    ("start_offset", "expected"),
    [
        (8, [(3, 8), (4, 11)]),  # on a boundary: the entry stays
        (1, [(2, 6), (3, 8), (4, 11)]),  # too early: nothing changes
        (6, [(2, 6), (3, 8), (4, 11)]),  # the first offset
        (11, [(4, 11)]),
        (9, [(3, 9), (4, 11)]),  # between boundaries: the covering entry moves up
        (15, [(4, 15)]),
        (UNDEFINED_EPOCH_OFFSET, [(2, 6), (3, 8), (4, 11)]),
    ],
)
def test_truncate_from_start(
    cache: LeaderEpochCache, start_offset: int, expected: list[tuple[int, int]]
) -> None:
    assigned(cache, (2, 6), (3, 8), (4, 11))
    cache.truncate_from_start(start_offset)
    assert cache.entries() == expected


def test_truncate_from_start_between_first_two(cache: LeaderEpochCache) -> None:
    assigned(cache, (0, 0), (1, 7), (2, 10))
    cache.truncate_from_start(5)
    assert cache.entries() == [(0, 5), (1, 7), (2, 10)]


def test_epoch_for_offset(cache: LeaderEpochCache) -> None:
    assigned(cache, (0, 10), (1, 20), (5, 30))
    assert cache.epoch_for(25) == 1
    assert cache.epoch_for(20) == 1
    assert cache.epoch_for(30) == 5
    assert cache.epoch_for(50) == 5
    assert cache.epoch_for(10) == 0
    assert cache.epoch_for(5) is None


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / LEADER_EPOCH_CHECKPOINT
    cache = LeaderEpochCache.load(path)
    assert not path.exists()  # Loading a missing file writes nothing.
    assigned(cache, (2, 6), (3, 8), (4, 11))
    assert path.read_text() == "0\n3\n2 6\n3 8\n4 11\n"
    assert LeaderEpochCache.load(path).entries() == [(2, 6), (3, 8), (4, 11)]
    cache.truncate_from_end(11)
    cache.truncate_from_start(8)
    assert LeaderEpochCache.load(path).entries() == [(3, 8)]
    cache.clear()
    assert path.read_text() == "0\n0\n"
    assert LeaderEpochCache.load(path).entries() == []
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0\n",
        "1\n0\n",
        "0\n2\n1 5\n",  # count says 2, one entry
        "0\n1\n1 5\n2 6\n",  # extra entry
        "0\n1\n1\n",
        "0\n1\n1 5 7\n",
        "0\n1\nx 5\n",
        "0\n1\n-1 5\n",
        "0\nx\n",
        "0\n1\n1 5",  # unterminated
        "\xff\xfe",
    ],
)
def test_corrupt_checkpoint_names_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / LEADER_EPOCH_CHECKPOINT
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CorruptCheckpointError, match=LEADER_EPOCH_CHECKPOINT) as info:
        LeaderEpochCache.load(path)
    assert info.value.path == path


def test_checkpoint_entries_are_replayed_through_assign(tmp_path: Path) -> None:
    """As Kafka's constructor: non-monotonic entries in a file resolve as assign would."""
    path = tmp_path / LEADER_EPOCH_CHECKPOINT
    path.write_text("0\n3\n1 5\n2 6\n1 7\n")
    assert LeaderEpochCache.load(path).entries() == [(1, 7)]


# --------------------------------------------------------------------------- PartitionLog


def epoch_batch(base_offset: int, epoch: int, records: int = 2) -> bytes:
    raw = encode_batch([Record(b"k", b"v" * 40, timestamp_ms=1000 + i) for i in range(records)])
    return patch_batch(raw, base_offset, epoch)


def append_epochs(log: PartitionLog, epochs: list[int], records: int = 2) -> None:
    for epoch in epochs:
        log.append(epoch_batch(log.log_end_offset, epoch, records), now_ms=0)


SMALL = LogConfig(segment_bytes=600, index_interval_bytes=100)


def test_append_assigns_new_epochs_only(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        assert log.latest_epoch == -1
        append_epochs(log, [-1, 0, 0, 2, 2, 1, 5])
        # -1 (a client's unstamped batch) and the stray older epoch 1 assign nothing.
        assert log.leader_epoch_cache.entries() == [(0, 2), (2, 6), (5, 12)]
        assert log.latest_epoch == 5
        assert log.leader_epoch_cache.end_offset_for(2, log.log_end_offset) == (2, 12)
    assert (tmp_path / LEADER_EPOCH_CHECKPOINT).read_text() == "0\n3\n0 2\n2 6\n5 12\n"


def test_rebuilt_on_open_without_checkpoint(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        append_epochs(log, [0, 0, 1, 1, 1, 3, 3, 4, 4, 4, 4])
        assert len(log.segments) > 2
        expected = log.leader_epoch_cache.entries()
    assert expected == [(0, 0), (1, 4), (3, 10), (4, 14)]
    (tmp_path / LEADER_EPOCH_CHECKPOINT).unlink()
    with PartitionLog(tmp_path, SMALL) as log:
        assert log.leader_epoch_cache.entries() == expected
    assert LeaderEpochCache.load(tmp_path / LEADER_EPOCH_CHECKPOINT).entries() == expected
    (tmp_path / LEADER_EPOCH_CHECKPOINT).write_text("garbage")
    with PartitionLog(tmp_path, SMALL) as log:
        assert log.leader_epoch_cache.entries() == expected


def test_recovered_segment_replays_epochs_missing_from_checkpoint(tmp_path: Path) -> None:
    """A crash between an append and its checkpoint write loses nothing."""
    with PartitionLog(tmp_path, SMALL) as log:
        append_epochs(log, [0, 0, 1, 1, 1, 3, 3, 4])
        expected = log.leader_epoch_cache.entries()
    assert expected[-1] == (4, 14)
    # The checkpoint as it was before the last batch (the first of epoch 4) was appended.
    (tmp_path / LEADER_EPOCH_CHECKPOINT).write_text("0\n3\n0 0\n1 4\n3 10\n")
    with PartitionLog(tmp_path, SMALL) as log:
        assert log.leader_epoch_cache.entries() == expected


def test_stale_entries_cut_after_torn_tail(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        append_epochs(log, [0, 0, 1, 2])
        assert log.leader_epoch_cache.entries() == [(0, 0), (1, 4), (2, 6)]
        active = log.active_segment.log_path
    data = active.read_bytes()
    active.write_bytes(data[:-5])  # Tear the epoch-2 batch.
    with PartitionLog(tmp_path, SMALL) as log:
        assert log.log_end_offset == 6
        assert log.leader_epoch_cache.entries() == [(0, 0), (1, 4)]
    assert LeaderEpochCache.load(tmp_path / LEADER_EPOCH_CHECKPOINT).entries() == [
        (0, 0),
        (1, 4),
    ]


def test_truncate_to_mid_batch_cuts_the_epoch_cache(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        append_epochs(log, [0, 1, 1, 2], records=3)  # epoch 2 at [9, 12)
        assert log.truncate_to(10) > 0
        assert log.log_end_offset == 9
        assert log.leader_epoch_cache.entries() == [(0, 0), (1, 3)]
        log.truncate_to(4)  # inside the first epoch-1 batch [3, 6)
        assert log.log_end_offset == 3
        assert log.leader_epoch_cache.entries() == [(0, 0)]
        append_epochs(log, [3])
        assert log.leader_epoch_cache.entries() == [(0, 0), (3, 3)]
    with PartitionLog(tmp_path, SMALL) as log:
        assert log.leader_epoch_cache.entries() == [(0, 0), (3, 3)]


def test_truncate_past_end_drops_an_empty_epoch(tmp_path: Path) -> None:
    """KAFKA-10706: a leader that wrote nothing left an entry at the log end."""
    with PartitionLog(tmp_path, SMALL) as log:
        append_epochs(log, [0, 0])
        log.leader_epoch_cache.assign(5, log.log_end_offset)  # became leader, wrote nothing
        assert log.latest_epoch == 5
        assert log.truncate_to(log.log_end_offset) == 0
        assert log.leader_epoch_cache.entries() == [(0, 0)]


def test_retention_and_full_truncation(tmp_path: Path) -> None:
    with PartitionLog(tmp_path, SMALL) as log:
        append_epochs(log, [0, 0, 1, 1, 1, 3, 3, 4, 4, 4])
        log.delete_before(7)
        assert log.leader_epoch_cache.entries() == [(1, 7), (3, 10), (4, 14)]
        log.apply_retention(0, None, 0)
        start = log.log_start_offset
        assert log.leader_epoch_cache.entries() == [(4, start)]
        log.truncate_fully_and_start_at(100)
        assert log.leader_epoch_cache.entries() == []
        append_epochs(log, [7])
        assert log.leader_epoch_cache.entries() == [(7, 100)]
    with PartitionLog(tmp_path, SMALL) as log:
        assert log.leader_epoch_cache.entries() == [(7, 100)]


def test_epoch_start_at_log_end_is_dropped_on_reopen(tmp_path: Path) -> None:
    """Kafka's LogLoader truncates the cache at the log end: an epoch without data goes."""
    with PartitionLog(tmp_path, SMALL) as log:
        append_epochs(log, [0])
        log.delete_before(log.log_end_offset)
        assert log.leader_epoch_cache.entries() == [(0, 2)]
    with PartitionLog(tmp_path, SMALL) as log:
        assert log.leader_epoch_cache.entries() == []


def test_an_epoch_assigned_unwritten_goes_to_disk_before_its_first_batch(tmp_path: Path) -> None:
    """A new leader's epoch at the log end is kept in memory until a batch follows it;
    then it is on disk before the batch, even though the batch's epoch is no newer than
    the cache's latest (which is when the append path itself writes nothing)."""
    path = tmp_path / LEADER_EPOCH_CHECKPOINT
    with PartitionLog(tmp_path, SMALL) as log:
        append_epochs(log, [0, 0])
        assert LeaderEpochCache.load(path).entries() == [(0, 0)]
        end = log.log_end_offset
        assert log.leader_epoch_cache.assign(3, end, write=False)
        assert log.leader_epoch_cache.latest_epoch == 3  # in memory
        assert LeaderEpochCache.load(path).entries() == [(0, 0)]  # the file not yet
        append_epochs(log, [3])
        assert LeaderEpochCache.load(path).entries() == [(0, 0), (3, end)]
    with PartitionLog(tmp_path, SMALL) as log:
        assert log.leader_epoch_cache.entries() == [(0, 0), (3, end)]


def test_an_unwritten_epoch_lost_in_a_crash_is_what_reopening_gives_anyway(
    tmp_path: Path,
) -> None:
    new_log = tmp_path / "new"
    log = PartitionLog(new_log, SMALL)
    log.leader_epoch_cache.assign(0, 0, write=False)
    assert not (new_log / LEADER_EPOCH_CHECKPOINT).exists()  # a new leader wrote a file
    # The process dies here (no close). Written or not, an epoch with no batch is dropped.
    with PartitionLog(new_log, SMALL) as reopened:
        assert reopened.leader_epoch_cache.entries() == []
    log.close()
    cache = LeaderEpochCache.load(tmp_path / "c")
    cache.assign(1, 0, write=False)
    cache.assign(2, 5)  # any later change writes the unwritten entry with it
    assert LeaderEpochCache.load(tmp_path / "c").entries() == [(1, 0), (2, 5)]
    cache.assign(3, 9, write=False)
    cache.write_pending()
    assert LeaderEpochCache.load(tmp_path / "c").entries() == [(1, 0), (2, 5), (3, 9)]


# --------------------------------------------------------------------------- property

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(-1, 6), st.integers(1, 3)),
        st.tuples(st.just("truncate"), st.integers(0, 60)),
        st.tuples(st.just("delete_before"), st.integers(0, 60)),
        st.tuples(st.just("reopen")),
    ),
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_ops)
def test_cache_equals_one_rebuilt_from_the_log(tmp_path: Path, ops: list[tuple]) -> None:
    """Any appends (epochs rising or repeating), truncations (at or inside batches), start
    moves and reopens leave the cache equal to one rebuilt from the batch headers.

    Epochs never fall within a real log (a leader writes its own epoch, and a follower
    cuts a divergent tail before it copies a newer leader), so a drawn epoch below the
    log's latest is raised to it. With a falling epoch the answer is ambiguous: after the
    start moves past the higher epoch's first batch, the live cache keeps the higher
    epoch at the new start while a rebuild sees the lower one (the stray-epoch rule has
    its own test)."""
    work = tmp_path / "log"
    shutil.rmtree(work, ignore_errors=True)
    log = PartitionLog(work, SMALL)
    try:
        for op in ops:
            if op[0] == "append":
                epoch = max(op[1], log.latest_epoch)
                log.append(epoch_batch(log.log_end_offset, epoch, op[2]), now_ms=0)
            elif op[0] == "truncate" and op[1] >= log.log_start_offset:
                log.truncate_to(op[1])
            elif op[0] == "delete_before" and log.log_start_offset <= op[1] < log.log_end_offset:
                log.delete_before(op[1])
            elif op[0] == "reopen":
                log.close()
                log = PartitionLog(work, SMALL)
        live = log.leader_epoch_cache.entries()
        log.close()
        (work / LEADER_EPOCH_CHECKPOINT).unlink(missing_ok=True)  # a new log has none
        log = PartitionLog(work, SMALL)
        assert log.leader_epoch_cache.entries() == live
        assert all(start < log.log_end_offset for _, start in live)
    finally:
        log.close()
