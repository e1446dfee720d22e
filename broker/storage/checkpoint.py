"""Small checkpoint files, written atomically.

Three text formats, all Kafka's:

* a single-partition offset (recovery point, log start offset)::

      0           <- format version
      <offset>

* a multi-partition offset file such as ``replication-offset-checkpoint``, and the
  ``leader-epoch-checkpoint`` (``broker.storage.leader_epoch``): Kafka's ``CheckpointFile``
  layout, a version line, a count line, then that many entries of space-separated fields::

      0
      2
      orders 0 1234
      orders 1 987

Writes go to ``<name>.tmp``, are fsynced, renamed over the target, and the directory is
fsynced, so a reader sees either the old or the new content, never a torn one.

``set_sync(False)`` turns those fsyncs (and ``fsync_dir``) off for the process: a broker
whose flush policy leaves its logs to the OS does so, since a power loss then costs the
unflushed tail of every log anyway, and the checkpoints are rebuilt or fall back safely
(a missing recovery point recovers every segment, a missing epoch cache is rebuilt from
the batches, a missing high watermark restarts at 0 and is raised by the leader). Without
it, creating or moving many partitions issues thousands of fsyncs, and on a disk the
metadata quorum shares they stall its journal syncs for seconds. Renames stay atomic, so
a crashed process (not machine) still never sees a torn file. A missing
file reads as "nothing recorded"; a malformed multi-entry file raises
``CorruptCheckpointError`` naming it (the single-offset reader predates that and returns
None, which makes the log recover everything).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "CorruptCheckpointError",
    "set_sync",
    "sync_enabled",
    "fsync_dir",
    "read_checkpoint_entries",
    "read_offset_checkpoint",
    "read_partition_offsets",
    "write_checkpoint_entries",
    "write_offset_checkpoint",
    "write_partition_offsets",
]

_VERSION = "0"
_sync = True


def set_sync(enabled: bool) -> None:
    """Whether checkpoint writes and ``fsync_dir`` reach the disk (see the module docstring)."""
    global _sync
    _sync = enabled


def sync_enabled() -> bool:
    return _sync


class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be parsed; the message names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"corrupt checkpoint file {path}: {reason}")
        self.path = path


def fsync_dir(directory: Path) -> None:
    """fsync a directory so created, renamed or removed entries are durable."""
    if not _sync:
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if _sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_offset_checkpoint(path: Path, offset: int) -> None:
    _write_atomically(Path(path), f"{_VERSION}\n{offset}\n")


def read_offset_checkpoint(path: Path) -> int | None:
    """The stored offset, or None when the file is missing or malformed."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    lines = text.split("\n")
    if len(lines) != 3 or lines[0] != _VERSION or lines[2] != "":
        return None
    try:
        offset = int(lines[1])
    except ValueError:
        return None
    return offset if offset >= 0 else None


# --------------------------------------------------------------------------- multi-entry


def write_checkpoint_entries(path: Path, entries: Sequence[Sequence[object]]) -> None:
    """Write Kafka's ``CheckpointFile`` layout: version, count, one entry per line."""
    lines = [_VERSION, str(len(entries))]
    for entry in entries:
        fields = [str(field) for field in entry]
        if any(not field or field.split() != [field] for field in fields):
            raise ValueError(f"checkpoint field in {entry!r} is empty or contains whitespace")
        lines.append(" ".join(fields))
    _write_atomically(Path(path), "\n".join(lines) + "\n")


def read_checkpoint_entries(path: Path, fields: int) -> list[list[str]] | None:
    """The entries of a ``CheckpointFile`` (each ``fields`` strings); None when missing.

    Strict, as Kafka's reader: version 0, a count equal to the number of entry lines, each
    entry exactly ``fields`` space-separated tokens, nothing after the last entry.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(path, f"not UTF-8 text ({e})") from None
    lines = text.split("\n")
    if lines[-1] != "":
        raise CorruptCheckpointError(path, "the last line is not terminated")
    lines.pop()
    if len(lines) < 2:
        raise CorruptCheckpointError(path, "missing the version or count line")
    if lines[0] != _VERSION:
        raise CorruptCheckpointError(path, f"unsupported version {lines[0]!r}")
    try:
        count = int(lines[1])
    except ValueError:
        raise CorruptCheckpointError(path, f"count line {lines[1]!r} is not a number") from None
    if count != len(lines) - 2:
        raise CorruptCheckpointError(path, f"count says {count} entries, found {len(lines) - 2}")
    entries = []
    for number, line in enumerate(lines[2:], start=3):
        tokens = line.split(" ")
        if len(tokens) != fields or not all(tokens):
            raise CorruptCheckpointError(path, f"line {number} {line!r} needs {fields} fields")
        entries.append(tokens)
    return entries


def _parse_offset(path: Path, token: str, what: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise CorruptCheckpointError(path, f"{what} {token!r} is not a number") from None
    if value < 0:
        raise CorruptCheckpointError(path, f"negative {what} {value}")
    return value


def write_partition_offsets(path: Path, offsets: Mapping[tuple[str, int], int]) -> None:
    """Write ``replication-offset-checkpoint``-style ``topic partition offset`` lines.

    Entries are sorted so the file content depends only on the mapping.
    """
    for (topic, partition), offset in offsets.items():
        if partition < 0 or offset < 0:
            raise ValueError(f"negative partition or offset in {(topic, partition, offset)}")
    entries = [
        (topic, partition, offsets[topic, partition]) for topic, partition in sorted(offsets)
    ]
    write_checkpoint_entries(path, entries)


def read_partition_offsets(path: Path) -> dict[tuple[str, int], int]:
    """The offsets of a ``write_partition_offsets`` file; empty when the file is missing.

    Raises ``CorruptCheckpointError`` naming the file when it is malformed, including a
    partition listed twice.
    """
    path = Path(path)
    offsets: dict[tuple[str, int], int] = {}
    for topic, partition, offset in read_checkpoint_entries(path, 3) or []:
        key = (topic, _parse_offset(path, partition, "partition"))
        if key in offsets:
            raise CorruptCheckpointError(path, f"partition {topic}-{key[1]} listed twice")
        offsets[key] = _parse_offset(path, offset, "offset")
    return offsets
