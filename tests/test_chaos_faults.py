"""Fault schedules, disk faults on real segment files, and the group and metadata checkers
(pure; no cluster)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from broker.record_batch import Record, encode_batch
from broker.storage.log import LogConfig, PartitionLog
from chaos import disk
from chaos.checkers import COMMITTED_REPROCESSED, check, committed_reprocessed
from chaos.history import History, Op
from chaos.metadata_checks import CREATE, DELETE, GROW, check_metadata, possible_counts
from chaos.scenarios import SCENARIOS

# -- schedules ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_a_seed_gives_the_same_schedule_and_faults_fit_the_run(name):
    make, _ = SCENARIOS[name]
    first, again = make(random.Random(5), 60.0), make(random.Random(5), 60.0)
    assert first == again and first
    for fault in first:
        assert 2.0 <= fault.at_s and fault.at_s + fault.heal_after_s <= 58.0


def test_other_seeds_give_other_schedules():
    make, _ = SCENARIOS["network-isolate-leader"]
    schedules = {tuple(make(random.Random(seed), 60.0)) for seed in range(5)}
    assert len(schedules) == 5


def test_random_mix_never_fills_a_disk_or_loses_data():
    make, _ = SCENARIOS["random-mix"]
    kinds = {f.kind for seed in range(30) for f in make(random.Random(seed), 120.0)}
    assert kinds & {"net-isolate-leader", "net-isolate-active-controller", "kill-partition-leader"}
    assert not kinds & {"fill-disk", "power-loss-all-replicas"}


# -- disk faults on real segments ---------------------------------------------------------


def _write_log(directory: Path, count: int, per_batch: int = 5) -> None:
    log = PartitionLog(directory, LogConfig(segment_bytes=4096))
    for base in range(0, count, per_batch):
        records = [Record(None, f"v{i}".encode()) for i in range(base, base + per_batch)]
        log.append(encode_batch(records, base_offset=base))
    log.close()


def test_read_replica_log_returns_every_record_across_segments(tmp_path):
    _write_log(tmp_path / "t-0", 400)
    assert len(list((tmp_path / "t-0").glob("*.log"))) > 1
    assert disk.read_replica_log(tmp_path / "t-0") == [(i, f"v{i}") for i in range(400)]
    assert disk.log_end_offset(tmp_path / "t-0") == 400


def test_a_damaged_tail_reads_back_as_a_prefix_and_recovery_agrees(tmp_path):
    directory = tmp_path / "t-0"
    _write_log(directory, 400)
    note = disk.damage_tail(directory, random.Random(1))
    assert "torn" in note and "flipped" in note
    kept = disk.read_replica_log(directory)
    assert kept == [(i, f"v{i}") for i in range(len(kept))]
    assert 400 - 3 * 5 - 5 <= len(kept) < 400
    # The broker's own recovery keeps exactly the same prefix.
    log = PartitionLog(directory, LogConfig(segment_bytes=4096))
    try:
        assert log.log_end_offset == len(kept)
    finally:
        log.close()


def test_cut_log_drops_whole_batches_at_and_above_the_offset(tmp_path):
    directory = tmp_path / "t-0"
    _write_log(directory, 400)
    disk.cut_log(directory, 203)
    assert disk.read_replica_log(directory) == [(i, f"v{i}") for i in range(200)]


def test_disk_filler_fills_until_enospc_and_frees(tmp_path, monkeypatch):
    import errno

    written: list[int] = []
    real_open = open

    class Small:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if sum(written) + len(data) > 3_000_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(len(data))
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Small(real_open(*a, **k)))
    filler = disk.DiskFiller(tmp_path)
    assert filler.fill() == 3_000_000
    monkeypatch.undo()
    assert filler.path.stat().st_size == 3_000_000
    filler.free()
    assert not filler.path.exists()
    filler.free()  # Twice is fine.


# -- group: committed records processed again ---------------------------------------------


def _poll(process: int, at: float, *records: tuple[int, int, str]) -> Op:
    return Op(process, "poll", at, at, "ok", "chaos", records=records)


def _commit(process: int, at: float, partition: int, offset: int) -> Op:
    return Op(process, "commit", at, at, "ok", "chaos", partition, offset=offset)


def test_reprocessing_what_was_not_committed_is_allowed():
    history = History(
        [
            _poll(10, 1.0, (0, 0, "a"), (0, 1, "b")),
            _commit(10, 1.1, 0, 1),  # Only "a" committed, then member 10 dies.
            _poll(11, 5.0, (0, 1, "b")),
        ]
    )
    assert committed_reprocessed(history).count == 0


def test_reprocessing_a_committed_record_is_found():
    history = History(
        [
            _poll(10, 1.0, (0, 0, "a"), (0, 1, "b")),
            _commit(10, 1.1, 0, 2),
            _poll(11, 5.0, (0, 1, "b")),
        ]
    )
    found = committed_reprocessed(history)
    assert found.count == 1 and found.findings[0].locations == ((0, 1),)
    verdict = check(history, {0: [(0, "a"), (1, "b")]})
    assert not verdict.valid and COMMITTED_REPROCESSED in verdict.anomalies


def test_a_commit_within_the_slack_or_of_another_partition_does_not_count():
    history = History(
        [
            _poll(10, 1.0, (0, 0, "a")),
            _commit(10, 4.5, 0, 1),
            _poll(11, 5.0, (0, 0, "a")),  # 0.5 s after the commit: ordering unknown.
            _commit(11, 6.0, 1, 9),
            _poll(12, 9.0, (0, 0, "a")),  # Partition 0's commit covers it: found.
        ]
    )
    found = committed_reprocessed(history)
    assert [f.detail.split(" by ")[1].split(" ")[1] for f in found.findings] == ["12"]


# -- metadata ---------------------------------------------------------------------------------


def _admin(topic: str, action: str, count: int, outcome: str = "ok") -> Op:
    return Op(3, "admin", 1.0, 1.5, outcome, topic, offset=count, detail=action)  # type: ignore[arg-type]


def test_acknowledged_metadata_operations_present_at_the_end_are_valid():
    history = History(
        [
            _admin("m0", CREATE, 1),
            _admin("m0", GROW, 2),
            _admin("m1", CREATE, 1, "info"),
            _admin("m2", CREATE, 1, "fail"),
            _admin("m0", GROW, 3, "info"),
        ]
    )
    verdict = check_metadata(history, {"m0": 3, "m1": 1, "chaos": 3})
    assert verdict.valid, verdict.anomalies
    assert verdict.anomalies.keys() == {"metadata-unknown"}
    assert (verdict.operations, verdict.acknowledged) == (5, 2)


def test_a_lost_topic_or_partition_increase_is_found():
    history = History([_admin("m0", CREATE, 1), _admin("m1", CREATE, 1), _admin("m1", GROW, 2)])
    verdict = check_metadata(history, {"m1": 1})
    assert not verdict.valid
    assert len(verdict.anomalies["metadata-lost"]) == 2


def test_possible_counts_follow_the_operations_in_order():
    assert possible_counts([_admin("m", CREATE, 1, "info")]) == {0, 1}
    assert possible_counts([_admin("m", CREATE, 1), _admin("m", GROW, 3, "info")]) == {1, 3}
    assert possible_counts([_admin("m", CREATE, 1), _admin("m", DELETE, 0)]) == {0}
    assert possible_counts([_admin("m", CREATE, 1), _admin("m", DELETE, 0, "info")]) == {0, 1}
    assert possible_counts([_admin("m", CREATE, 1, "fail")]) == {0}


def test_a_deleted_topic_that_is_back_or_a_topic_gone_undeleted_is_found():
    history = History(
        [
            _admin("m0", CREATE, 1),
            _admin("m0", DELETE, 0),
            _admin("m1", CREATE, 1),
            _admin("m1", GROW, 2),
            _admin("m2", CREATE, 1),
            _admin("m2", DELETE, 0, "info"),
        ]
    )
    assert check_metadata(history, {"m1": 2}).valid
    assert check_metadata(history, {"m1": 2, "m2": 1}).valid
    verdict = check_metadata(history, {"m0": 1})
    assert not verdict.valid
    assert [t.split(":")[0] for t in verdict.anomalies["metadata-phantom"]] == ["m0"]
    assert [t.split(":")[0] for t in verdict.anomalies["metadata-lost"]] == ["m1"]


def test_a_refused_creation_that_exists_is_a_phantom():
    history = History([_admin("m0", CREATE, 1, "fail"), _admin("m1", CREATE, 1)])
    verdict = check_metadata(history, {"m0": 1, "m1": 4})
    assert not verdict.valid
    assert len(verdict.anomalies["metadata-phantom"]) == 2


def test_a_disk_full_run_without_root_is_refused_before_anything_starts(tmp_path, monkeypatch):
    from chaos import runner

    monkeypatch.setattr(runner.os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError, match="run it as root"):
        runner.run("disk-full", duration_s=30, seed=1, directory=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="unknown scenario"):
        runner.run("no-such-scenario", directory=tmp_path / "run")
