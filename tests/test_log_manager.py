"""LogManager: where new partition logs go across log dirs, and what a restart finds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from broker.log_manager import LogManager
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
    # Deleting frees room: the next three fill the dir they left.
    for p in range(3):
        partition_dir = next(d for d in dirs if (d / f"t-{p}").exists())
        if partition_dir.name == "a":
            logs.delete("t", p)
    emptied = 3 - placement(dirs)["a"]
    for p in range(emptied):
        logs.get_or_create("u", p, "id-u")
    assert placement(dirs)["a"] == 3
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
    logs = manager(dirs)
    logs.get_or_create("t", 0, "old-id")
    logs.get_or_create("t", 0, "new-id")  # Recreated topic: the old log is deleted.
    logs.get_or_create("t", 1, "new-id")
    assert placement(dirs) == {"a": 1, "b": 1}
