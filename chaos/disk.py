"""Disk faults and the replicas' own logs, read from a stopped broker's files.

- ``read_replica_log``: every record of one partition replica as ``(offset, value)``, read
  from its segment files up to the first torn or corrupt batch (what recovery would keep).
- ``damage_tail``: what a crash can leave on a disk: the last batches of the active segment
  torn off in the middle, and a flipped byte in the batch before the tear. Recovery must cut
  the log at the last valid batch and the replica must fetch the rest again.
- ``cut_log``: a log cut back to a given offset at a batch boundary, as after a power loss on
  a node that never fsynced (``log.flush.*`` unset). Done to every replica of a partition it
  loses acknowledged records: the run that does it must be judged invalid.
- ``DiskFiller``: fills the file system of a broker's log dir until writes fail (ENOSPC),
  and frees it again. The log dir must be on a small file system of its own
  (``mount_tmpfs``, which needs root).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import subprocess
from pathlib import Path

from broker.record_batch import BatchHeader, decode_records, iter_batches

LOG_SUFFIX = ".log"


def partition_dir(log_dir: Path, topic: str, partition: int) -> Path:
    return log_dir / f"{topic}-{partition}"


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{LOG_SUFFIX}"))


def _batches(path: Path) -> list[tuple[int, BatchHeader]]:
    return list(iter_batches(path.read_bytes()))


def read_replica_log(directory: Path) -> list[tuple[int, str]]:
    """``(offset, value as text)`` of every record, in offset order, up to a torn tail."""
    records: list[tuple[int, str]] = []
    for segment in _segments(directory):
        data = segment.read_bytes()
        batches = iter_batches(data)
        for position, header in batches:
            batch = data[position : position + header.size_bytes]
            for record in decode_records(batch):
                value = (record.value or b"").decode("utf-8", "surrogateescape")
                records.append((header.base_offset + record.offset_delta, value))
        if batches.error is not None:
            break  # Recovery keeps nothing after a bad batch.
    return records


def damage_tail(directory: Path, rng: random.Random, batches: int = 3) -> str:
    """Tear the active segment inside one of its last ``batches`` batches and flip a byte
    in the batch before the tear. Returns what was done, for the history."""
    segments = [s for s in _segments(directory) if s.stat().st_size > 0]
    if not segments:
        return f"{directory.name}: empty, nothing to damage"
    active = segments[-1]
    found = _batches(active)
    if not found:
        return f"{active.name}: no whole batch"
    pick = found[-min(batches, len(found)) :]
    position, header = pick[0]
    tear = position + rng.randrange(1, header.size_bytes)
    with open(active, "r+b") as f:
        f.truncate(tear)
        note = f"{directory.name}/{active.name}: torn at byte {tear} (batch at {position})"
        before = [b for b in found if b[0] < position]
        if before:
            at, previous = before[-1]
            # A byte of the records, past the header: the CRC no longer matches.
            flip = at + 61 + rng.randrange(max(previous.size_bytes - 61, 1))
            f.seek(flip)
            byte = f.read(1)
            if byte:
                f.seek(flip)
                f.write(bytes([byte[0] ^ 0xFF]))
                note += f", byte {flip} flipped (batch at {at})"
    return note


def cut_log(directory: Path, keep_below: int) -> str:
    """Keep only the batches wholly below offset ``keep_below`` (whole batches: a batch
    holding that offset goes too; later segments are deleted with their indexes, as if
    never written). Returns what was done."""
    cut = []
    for number, segment in enumerate(_segments(directory)):
        kept = 0
        for position, header in _batches(segment):
            if header.base_offset + header.last_offset_delta >= keep_below:
                break
            kept = position + header.size_bytes
        if kept == 0 and number > 0:
            for path in directory.glob(segment.stem + ".*"):
                path.unlink()
            cut.append(f"{segment.name} deleted")
        elif kept < segment.stat().st_size:
            os.truncate(segment, kept)
            cut.append(f"{segment.name}@{kept}")
    return f"{directory.name}: cut below offset {keep_below} ({', '.join(cut) or 'nothing'})"


def log_end_offset(directory: Path) -> int:
    end = 0
    for segment in _segments(directory):
        for _, header in _batches(segment):
            end = header.base_offset + header.last_offset_delta + 1
    return end


class DiskFiller:
    """Fills the file system holding ``directory`` with one file, until ENOSPC."""

    def __init__(self, directory: Path):
        self.path = directory / "chaos-disk-filler"

    def fill(self) -> int:
        """Write until the file system is full; returns the bytes written."""
        written = 0
        chunk = b"\0" * (1 << 20)
        with open(self.path, "ab", buffering=0) as f:
            for size in (1 << 20, 1 << 12, 1):
                while True:
                    try:
                        f.write(chunk[:size])
                    except OSError as e:
                        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        break
                    written += size
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def mount_tmpfs(directory: Path, size_mb: int) -> None:
    """Mount a tmpfs of ``size_mb`` at ``directory`` (root only): a disk that can fill."""
    if os.geteuid() != 0:
        raise PermissionError(
            "a full-disk fault needs its own small file system: run as root (it mounts a tmpfs)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(directory)],
        check=True,
        capture_output=True,
    )


def unmount(directory: Path) -> None:
    subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True)
