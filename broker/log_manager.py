"""The partition logs of one broker, across its log directories.

Layout (Kafka's): each log dir holds one directory per partition replica,
``<topic>-<partition>``, with its segments and per-partition checkpoints, a
``partition.metadata`` file naming the topic id, and at the top a
``replication-offset-checkpoint`` with the high watermark of every partition
in that dir. A topic deleted and created again under its name gets a new id;
a directory whose id does not match is the old topic's and is deleted. A new
partition's ``partition.metadata`` is written before its first batch, not when
its directory is made (or before a log start or recovery point is): a directory
without one holds nothing, and on a restart it is taken by the topic id that asks
for it.

Deleting renames the directory to ``<topic>-<partition>.<uuid>-delete`` (one
atomic step) and removes it afterwards; a rename left behind by a crash is
removed on the next start.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from broker.storage.checkpoint import (
    fsync_dir,
    read_partition_offsets,
    sync_enabled,
    write_partition_offsets,
)
from broker.storage.log import LogConfig, PartitionLog

log = logging.getLogger(__name__)

HW_CHECKPOINT = "replication-offset-checkpoint"
PARTITION_METADATA = "partition.metadata"
_DELETE_SUFFIX = "-delete"

TopicPartition = tuple[str, int]


def partition_dir_name(topic: str, partition: int) -> str:
    return f"{topic}-{partition}"


def parse_partition_dir(name: str) -> TopicPartition | None:
    """(topic, partition) for ``<topic>-<partition>``, None for anything else."""
    if name.endswith(_DELETE_SUFFIX) or "-" not in name:
        return None
    topic, _, index = name.rpartition("-")
    if not topic or not index.isdigit():
        return None
    return topic, int(index)


def read_topic_id(directory: Path) -> str | None:
    try:
        text = (directory / PARTITION_METADATA).read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "topic_id":
            return value.strip()
    return None


def write_topic_id(directory: Path, topic_id: str) -> None:
    tmp = directory / (PARTITION_METADATA + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(f"version: 0\ntopic_id: {topic_id}\n")
        if sync_enabled():
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, directory / PARTITION_METADATA)
    fsync_dir(directory)


class LogManager:
    """Opens, creates and deletes partition logs; checkpoints high watermarks.

    Thread-safe for the operations that change which logs exist.
    """

    def __init__(self, log_dirs: Sequence[Path], default_config: LogConfig):
        if not log_dirs:
            raise ValueError("a broker needs at least one log dir")
        self.log_dirs = [Path(d) for d in log_dirs]
        self.default_config = default_config
        self._lock = threading.Lock()
        self._logs: dict[TopicPartition, tuple[Path, str | None]] = {}
        # Partitions per log dir, kept with _logs (a new partition goes to the emptiest).
        self._dir_counts: dict[Path, int] = {d: 0 for d in self.log_dirs}
        self._open: dict[TopicPartition, PartitionLog] = {}
        self._saved_hws: dict[TopicPartition, int] = {}

    # ------------------------------------------------------------------ start

    def load(self) -> dict[TopicPartition, str | None]:
        """Find every partition directory (opening nothing yet) and the saved high
        watermarks; removes deletions a crash left behind. Returns topic ids found."""
        found: dict[TopicPartition, str | None] = {}
        for log_dir in self.log_dirs:
            log_dir.mkdir(parents=True, exist_ok=True)
            for entry in sorted(os.listdir(log_dir)):
                path = log_dir / entry
                if entry.endswith(_DELETE_SUFFIX) and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                    continue
                key = parse_partition_dir(entry)
                if key is None or not path.is_dir():
                    continue
                if key in found:
                    raise RuntimeError(f"partition {entry} exists in two log dirs")
                topic_id = read_topic_id(path)
                found[key] = topic_id
                self._set_log(key, path, topic_id)
            for key, offset in read_partition_offsets(log_dir / HW_CHECKPOINT).items():
                self._saved_hws[key] = offset
        return found

    def saved_high_watermark(self, key: TopicPartition) -> int:
        return self._saved_hws.get(key, 0)

    # ------------------------------------------------------------------ logs

    def get_or_create(
        self, topic: str, partition: int, topic_id: str, config: LogConfig | None = None
    ) -> PartitionLog:
        """The open log of this partition replica, created if needed.

        A directory left by an older topic of the same name is deleted first.
        """
        key = (topic, partition)
        with self._lock:
            opened = self._open.get(key)
            if opened is not None:
                return opened
            known = self._logs.get(key)
            if known is not None and known[1] not in (None, topic_id):
                log.info(
                    "%s-%d: removing the log of deleted topic id %s", topic, partition, known[1]
                )
                self._delete_dir(known[0])
                self._drop_log(key)
                self._saved_hws.pop(key, None)
                known = None
            new = False
            if known is None:
                directory = self._pick_dir() / partition_dir_name(topic, partition)
                try:
                    os.mkdir(directory)
                    new = True  # Made here: the log need not look for anything in it.
                except FileExistsError:
                    pass
                except FileNotFoundError:  # The log dir itself is missing (never loaded).
                    directory.mkdir(parents=True)
                    new = True
            else:
                directory = known[0]
            try:
                if known is None:
                    fsync_dir(directory.parent)
                if new:
                    # Written before its first batch (or log start, or recovery point):
                    # a directory without one holds nothing, so a restart may give it
                    # to whichever topic id asks first.
                    opened = PartitionLog(
                        directory,
                        config or self.default_config,
                        new=True,
                        before_first_write=lambda: write_topic_id(directory, topic_id),
                    )
                else:
                    if known is None or known[1] is None:
                        write_topic_id(directory, topic_id)
                    opened = PartitionLog(directory, config or self.default_config)
            except BaseException:
                # The directory exists now (no descriptor left, a full disk): keep it
                # known, so that a retry opens it and a deletion or the stray-log
                # sweep removes it, instead of leaving it behind until a restart.
                if known is None:
                    self._set_log(key, directory, None)
                raise
            self._set_log(key, directory, topic_id)
            self._open[key] = opened
            return opened

    def delete(self, topic: str, partition: int) -> None:
        """Close and delete this partition's log (if any)."""
        key = (topic, partition)
        with self._lock:
            opened = self._open.pop(key, None)
            if opened is not None:
                try:
                    # Not flushed: its fsyncs and recovery point would go with it.
                    opened.close(flush=False)
                except OSError as e:
                    log.warning("%s-%d: closing the log to delete it: %s", topic, partition, e)
            known = self._drop_log(key)
            self._saved_hws.pop(key, None)
            if known is not None:
                self._delete_dir(known[0])

    def known(self) -> dict[TopicPartition, str | None]:
        with self._lock:
            return {key: topic_id for key, (_, topic_id) in self._logs.items()}

    def _pick_dir(self) -> Path:
        """The log dir with the fewest partitions (Kafka's choice for new ones)."""
        counts = self._dir_counts
        return min(self.log_dirs, key=lambda d: counts[d])

    def _set_log(self, key: TopicPartition, path: Path, topic_id: str | None) -> None:
        """Under the lock (or while loading): record where a partition's log is."""
        previous = self._logs.get(key)
        if previous is not None and previous[0].parent in self._dir_counts:
            self._dir_counts[previous[0].parent] -= 1
        self._logs[key] = (path, topic_id)
        if path.parent in self._dir_counts:
            self._dir_counts[path.parent] += 1

    def _drop_log(self, key: TopicPartition) -> tuple[Path, str | None] | None:
        known = self._logs.pop(key, None)
        if known is not None and known[0].parent in self._dir_counts:
            self._dir_counts[known[0].parent] -= 1
        return known

    def _delete_dir(self, directory: Path) -> None:
        doomed = directory.with_name(f"{directory.name}.{uuid.uuid4().hex}{_DELETE_SUFFIX}")
        try:
            os.replace(directory, doomed)
        except FileNotFoundError:
            return
        fsync_dir(directory.parent)
        shutil.rmtree(doomed, ignore_errors=True)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_high_watermarks(self, hws: Mapping[TopicPartition, int]) -> None:
        """Write every log dir's ``replication-offset-checkpoint`` from ``hws``."""
        with self._lock:
            by_dir: dict[Path, dict[TopicPartition, int]] = {d: {} for d in self.log_dirs}
            for key, hw in hws.items():
                known = self._logs.get(key)
                if known is not None and known[0].parent in by_dir:
                    by_dir[known[0].parent][key] = hw
            for log_dir, offsets in by_dir.items():
                write_partition_offsets(log_dir / HW_CHECKPOINT, offsets)
            self._saved_hws.update(hws)

    def close(self) -> None:
        with self._lock:
            for opened in self._open.values():
                try:
                    opened.close()
                except (OSError, ValueError) as e:
                    log.warning("closing %s: %s", opened, e)
            self._open.clear()
