"""LogManager: where new partition logs go across log dirs, and what a restart finds."""

from __future__ import annotations

import errno
from collections import Counter
from pathlib import Path

from broker.log_manager import LogManager
from broker.record_batch import Record, encode_batch
from broker.storage import log as storage_log
from broker.storage.log import LogConfig


def manager(dirs: list[Path]) -> LogManager:
    logs = LogManager(dirs, LogConfig())
    logs.load()
    return logs


def placement(dirs: list[Path]) -> Counter[str]:
    return Counter(d.name for d in dirs for p in d.iterdir() if p.is_dir())


def test_new_partitions_go_to_the_log_dir_with_the_fewest(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    logs = manager(dirs)
    for p in range(9):
        logs.get_or_create("t", p, "id-t")
    assert placement(dirs) == {"a": 3, "b": 3, "c": 3}
    # Deleting two logs of dir b frees room there: the next two go to b, not a.
    in_b = [p for p in range(9) if (dirs[1] / f"t-{p}").exists()][:2]
    for p in in_b:
        logs.delete("t", p)
    for p in range(2):
        logs.get_or_create("u", p, "id-u")
    assert (dirs[1] / "u-0").exists() and (dirs[1] / "u-1").exists()
    assert placement(dirs) == {"a": 3, "b": 3, "c": 3}
    logs.close()


def test_a_restart_counts_the_partitions_it_finds(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    first = manager(dirs[:1])  # Everything in the first dir, as a broker with one dir had.
    for p in range(4):
        first.get_or_create("t", p, "id-t")
    second = manager(dirs)
    assert set(second.known()) == {("t", p) for p in range(4)}
    for p in range(4):
        second.get_or_create("u", p, "id-u")
    assert placement(dirs) == {"a": 4, "b": 4}


def test_a_log_replaced_by_a_newer_topic_of_the_same_name_is_counted_once(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    manager(dirs).get_or_create("t", 0, "old-id")  # In a; then the broker restarts.
    logs = manager(dirs)
    logs.get_or_create("t", 0, "new-id")  # Recreated topic: the old log is deleted.
    assert (dirs[0] / "t-0").exists()
    logs.get_or_create("t", 1, "new-id")
    logs.get_or_create("t", 2, "new-id")
    # The old log no longer counts: a holds t-0 and t-2, b holds t-1.
    assert placement(dirs) == {"a": 2, "b": 1}


def test_a_log_that_cannot_write_its_checkpoint_is_still_deleted(tmp_path, monkeypatch):
    """Deleting a partition must not depend on writing its checkpoint (it writes none):
    with no file descriptor left or a full disk, the log's files are closed and its
    directory goes (a broker that kept such logs ran out of descriptors for good)."""
    logs = manager([tmp_path])
    doomed = logs.get_or_create("t", 0, "id-t")
    kept = logs.get_or_create("t", 1, "id-t")
    doomed.append(encode_batch([Record(None, b"v", (), 1000)]), now_ms=0)

    def no_descriptor_left(path, offset):
        raise OSError(errno.EMFILE, "Too many open files", str(path))

    monkeypatch.setattr(storage_log, "write_offset_checkpoint", no_descriptor_left)
    logs.delete("t", 0)
    assert not (tmp_path / "t-0").exists()
    assert all(segment._closed for segment in doomed.segments)
    assert set(logs.known()) == {("t", 1)}
    monkeypatch.undo()
    kept.append(encode_batch([Record(None, b"v", (), 1000)]), now_ms=0)
    logs.close()


def test_a_log_that_fails_to_open_after_its_directory_was_made_stays_known(tmp_path, monkeypatch):
    """With no descriptor left, a new partition's directory can be made and its log
    not opened. The directory must stay known: a retry opens it, and deleting the
    partition removes it (they were left behind until a restart, 76,000 of them
    after a few metadata benchmarks on a broker out of descriptors)."""
    import broker.log_manager as log_manager_module

    logs = manager([tmp_path])
    real = log_manager_module.PartitionLog

    def no_descriptor_left(directory, config, **options):
        raise OSError(errno.EMFILE, "Too many open files", str(directory))

    monkeypatch.setattr(log_manager_module, "PartitionLog", no_descriptor_left)
    for index in (0, 1):
        try:
            logs.get_or_create("t", index, "id-t")
        except OSError as e:
            assert e.errno == errno.EMFILE
        else:
            raise AssertionError("the open was expected to fail")
    assert set(logs.known()) == {("t", 0), ("t", 1)}
    monkeypatch.setattr(log_manager_module, "PartitionLog", real)
    logs.delete("t", 0)
    assert not (tmp_path / "t-0").exists()
    retried = logs.get_or_create("t", 1, "id-t")  # a retry opens it
    retried.append(encode_batch([Record(None, b"v", (), 1000)]), now_ms=0)
    assert logs.known() == {("t", 1): "id-t"}
    logs.close()
    reloaded = manager([tmp_path])
    assert reloaded.load() == {("t", 1): "id-t"}


def test_a_new_partition_log_is_made_without_reading_its_directory(tmp_path, monkeypatch):
    """A directory the manager has just made holds nothing: the log is created without
    listing it or reading checkpoints, makes no file until its first batch, and is the
    same log a full open would give."""
    logs = manager([tmp_path])
    listed: list[str] = []
    real_listdir = storage_log.os.listdir
    monkeypatch.setattr(
        storage_log.os, "listdir", lambda p: listed.append(str(p)) or real_listdir(p)
    )
    created = logs.get_or_create("t", 0, "id-t")
    assert listed == []

    def files() -> list[str]:
        return sorted(p.name for p in (tmp_path / "t-0").iterdir())

    assert files() == []  # the segment file and the topic id come with data
    assert (created.log_start_offset, created.log_end_offset) == (0, 0)
    assert created.read(0, 1 << 20) == b""
    created.flush()  # nothing to sync, nothing made
    assert files() == []
    batch = encode_batch([Record(None, b"v", (), 1000)])
    created.append(batch, now_ms=0)
    assert files() == ["00000000000000000000.log", "partition.metadata"]
    assert created.read(0, 1 << 20) == batch
    monkeypatch.undo()
    logs.close()
    reloaded = manager([tmp_path])
    assert reloaded.load() == {("t", 0): "id-t"}
    assert reloaded.get_or_create("t", 0, "id-t").log_end_offset == 1
    reloaded.close()


def test_a_directory_found_on_disk_after_loading_is_opened_not_assumed_empty(tmp_path):
    """Only a directory the manager made itself counts as new: one that appeared after
    the manager loaded (no partition is made that way, but a log is never assumed
    empty) is opened and recovered."""
    with storage_log.PartitionLog(tmp_path / "source", LogConfig()) as source:
        source.append(encode_batch([Record(None, b"v", (), 1000)] * 3), now_ms=0)
    logs = manager([tmp_path / "logs"])
    (tmp_path / "source").rename(tmp_path / "logs" / "t-0")
    opened = logs.get_or_create("t", 0, "id-t")
    assert opened.log_end_offset == 3
    logs.close()


def test_a_new_partition_names_its_topic_id_before_its_first_batch(tmp_path):
    """Until its first batch a new partition's directory holds no topic id, and a
    restart gives it to the topic id that asks (it holds no data); once it has data,
    its id is on disk first, and a re-created topic of that name gets a fresh log."""
    logs = manager([tmp_path])
    logs.get_or_create("t", 0, "id-old")  # the broker dies before any data
    logs.get_or_create("u", 0, "id-u").append(
        encode_batch([Record(None, b"v", (), 1000)]), now_ms=0
    )
    restarted = manager([tmp_path])
    assert restarted.known() == {("t", 0): None, ("u", 0): "id-u"}
    adopted = restarted.get_or_create("t", 0, "id-new")  # t was re-created meanwhile
    assert adopted.log_end_offset == 0
    assert restarted.known()[("t", 0)] == "id-new"
    fresh = restarted.get_or_create("u", 0, "id-u2")  # u re-created: its data goes
    assert fresh.log_end_offset == 0
    restarted.close()
    logs.close()


def test_a_new_partition_names_its_topic_id_before_it_starts_at_an_offset(tmp_path):
    """A new follower whose leader's log starts later restarts its empty log there:
    that log start is content a restart reads, so the topic id goes to disk first, and
    a re-created topic of the name does not take the log over."""
    logs = manager([tmp_path])
    logs.get_or_create("t", 0, "id-t").truncate_fully_and_start_at(100)
    restarted = manager([tmp_path])
    assert restarted.known() == {("t", 0): "id-t"}
    fresh = restarted.get_or_create("t", 0, "id-new")
    assert (fresh.log_start_offset, fresh.log_end_offset) == (0, 0)
    restarted.close()
    logs.close()


def test_a_new_directory_whose_name_cannot_be_synced_stays_known(tmp_path, monkeypatch):
    """Syncing the log dir after making a partition's directory can fail (a full disk):
    the directory exists then, and stays known, as when its log fails to open."""
    import broker.log_manager as log_manager_module

    logs = manager([tmp_path])

    def sync_fails(directory):
        raise OSError(errno.EIO, "Input/output error", str(directory))

    monkeypatch.setattr(log_manager_module, "fsync_dir", sync_fails)
    try:
        logs.get_or_create("t", 0, "id-t")
    except OSError as e:
        assert e.errno == errno.EIO
    else:
        raise AssertionError("the sync was expected to fail")
    assert set(logs.known()) == {("t", 0)}
    monkeypatch.undo()
    logs.delete("t", 0)
    assert not (tmp_path / "t-0").exists()
    logs.close()
