"""Small offset checkpoint files, written atomically.

Format (text, like Kafka's checkpoint files but for one partition)::

    0           <- format version
    <offset>

Writes go to ``<name>.tmp``, are fsynced, renamed over the target, and the directory is
fsynced, so a reader sees either the old or the new value, never a torn one.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "read_offset_checkpoint", "write_offset_checkpoint"]

_VERSION = "0"


def fsync_dir(directory: Path) -> None:
    """fsync a directory so created, renamed or removed entries are durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_offset_checkpoint(path: Path, offset: int) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{_VERSION}\n{offset}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
