"""The leader-epoch cache: where each leader epoch starts in a partition's log.

Theory of operation
-------------------
Every batch carries the epoch of the leader that appended it (``partitionLeaderEpoch``).
The cache keeps one entry ``(epoch, start_offset)`` per epoch seen in the log: the offset
of the first batch written under that epoch. Entries are increasing in both fields. A
follower asks its leader where its last fetched epoch ends (OffsetsForLeaderEpoch,
KIP-101/KIP-279/KIP-320) and truncates its log there, so a divergent uncommitted tail
never survives a leader change.

The semantics are those of Kafka's ``LeaderEpochFileCache``
(``storage/.../internals/epoch/LeaderEpochFileCache.java``), method for method:
``assign``, ``end_offset_for`` (``endOffsetFor``), ``epoch_for`` (``epochForOffset``),
``truncate_from_end``, ``truncate_from_start``, ``clear`` (``clearAndFlush``).
Unlike Kafka, which flushes truncations asynchronously, every change is written to
``leader-epoch-checkpoint`` before the method returns (Kafka's text format: version line
``0``, count line, then ``epoch start_offset`` lines), atomically. The one exception is
``assign(..., write=False)``, for an entry that no batch follows yet (a new leader's epoch
at the log end): it is written by ``write_pending`` before the next batch is appended, or
with any later change. Unwritten, it is lost in a crash, which loses nothing: the log's
loader drops every entry at or past the log end anyway, as Kafka's does.

Not thread-safe: the owning ``PartitionLog`` (or its caller) serialises access.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from broker.storage.checkpoint import (
    CorruptCheckpointError,
    read_checkpoint_entries,
    write_checkpoint_entries,
)

__all__ = [
    "LEADER_EPOCH_CHECKPOINT",
    "UNDEFINED_EPOCH",
    "UNDEFINED_EPOCH_OFFSET",
    "EpochEntry",
    "LeaderEpochCache",
]

logger = logging.getLogger(__name__)

LEADER_EPOCH_CHECKPOINT = "leader-epoch-checkpoint"
UNDEFINED_EPOCH = -1
"""Kafka's ``OffsetsForLeaderEpochResponse.UNDEFINED_EPOCH``."""
UNDEFINED_EPOCH_OFFSET = -1
"""Kafka's ``OffsetsForLeaderEpochResponse.UNDEFINED_EPOCH_OFFSET``."""


class EpochEntry(NamedTuple):
    """The first offset written under a leader epoch."""

    epoch: int
    start_offset: int


def _epoch_of(entry: EpochEntry) -> int:
    return entry.epoch


class LeaderEpochCache:
    """Epoch -> start offset entries of one partition, checkpointed in ``path``.

    Construct with ``LeaderEpochCache.load(path)``: a missing file is an empty cache, a
    malformed one raises ``CorruptCheckpointError`` naming the file.
    """

    def __init__(self, path: Path, entries: Iterable[EpochEntry] = ()) -> None:
        """A cache over ``entries`` (applied with ``assign``'s rules), not yet written."""
        self.path = Path(path)
        self._entries: list[EpochEntry] = []
        self._unwritten = False  # an entry was assigned with write=False
        for epoch, start_offset in entries:
            self._assign(EpochEntry(epoch, start_offset))

    @classmethod
    def load(cls, path: Path) -> LeaderEpochCache:
        """Read ``path``; entries are replayed through ``assign`` as Kafka's constructor does."""
        path = Path(path)
        rows = read_checkpoint_entries(path, 2) or []
        entries = []
        for epoch_text, offset_text in rows:
            try:
                entry = EpochEntry(int(epoch_text), int(offset_text))
            except ValueError:
                raise CorruptCheckpointError(
                    path, f"entry {epoch_text!r} {offset_text!r} is not two numbers"
                ) from None
            if entry.epoch < 0 or entry.start_offset < 0:
                raise CorruptCheckpointError(path, f"negative epoch or offset in {entry}")
            entries.append(entry)
        return cls(path, entries)

    # ------------------------------------------------------------------ queries

    def entries(self) -> list[EpochEntry]:
        """The entries, oldest epoch first (a copy)."""
        return list(self._entries)

    @property
    def latest_entry(self) -> EpochEntry | None:
        return self._entries[-1] if self._entries else None

    @property
    def latest_epoch(self) -> int:
        """The newest epoch with an entry; ``UNDEFINED_EPOCH`` (-1) when empty."""
        return self._entries[-1].epoch if self._entries else UNDEFINED_EPOCH

    @property
    def earliest_entry(self) -> EpochEntry | None:
        return self._entries[0] if self._entries else None

    def end_offset_for(self, requested_epoch: int, log_end_offset: int) -> tuple[int, int]:
        """``(epoch, end_offset)`` for OffsetsForLeaderEpoch, as Kafka's ``endOffsetFor``.

        * ``requested_epoch`` is ``UNDEFINED_EPOCH``, or the cache is empty, or the
          requested epoch is above every entry (but not the latest): ``(-1, -1)``.
        * ``requested_epoch`` is the latest epoch: ``(latest, log_end_offset)``.
        * otherwise, with ``floor`` the largest epoch ``<= requested_epoch`` and ``next``
          the first entry above it: ``(floor, next.start_offset)``.
        * the requested epoch is below every entry: ``(requested_epoch, first.start_offset)``.
          Older Kafka versions answered ``(-1, -1)`` here; current Kafka does not,
          because the data of those epochs was deleted and the follower should
          replicate from the first known epoch's start.
        """
        if requested_epoch == UNDEFINED_EPOCH or not self._entries:
            return UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET
        if requested_epoch == self.latest_epoch:
            return requested_epoch, log_end_offset
        higher = bisect.bisect_right(self._entries, requested_epoch, key=_epoch_of)
        if higher == len(self._entries):
            return UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET
        next_start = self._entries[higher].start_offset
        if higher == 0:
            return requested_epoch, next_start
        return self._entries[higher - 1].epoch, next_start

    def epoch_for(self, offset: int) -> int | None:
        """The epoch of the batch holding ``offset``: the last entry starting at or below it.

        None when ``offset`` is below the first entry (Kafka's ``epochForOffset``).
        """
        slot = bisect.bisect_right(self._entries, offset, key=lambda e: e.start_offset) - 1
        return self._entries[slot].epoch if slot >= 0 else None

    # ------------------------------------------------------------------ changes

    def assign(self, epoch: int, start_offset: int, *, write: bool = True) -> bool:
        """Record that ``epoch`` starts at ``start_offset``; True when the cache changed.

        Kafka's rules: nothing changes when ``epoch`` is already the latest epoch and
        ``start_offset`` is not below its start (an epoch's start is never moved later).
        Otherwise every entry from the end that conflicts with the new one (an epoch
        ``>= epoch`` or a start offset ``>= start_offset``) is removed and the new entry is
        appended, so both fields stay increasing. Assigning a lower epoch therefore replaces
        the later entries: callers that must not do that (the log's append path) check
        ``latest_epoch`` first. Negative arguments raise ``ValueError``. With
        ``write=False`` the file is written later, by ``write_pending`` or the next change.
        """
        changed = self._assign(EpochEntry(epoch, start_offset))
        if changed:
            if write:
                self._write()
            else:
                self._unwritten = True
        return changed

    def write_pending(self) -> None:
        """Write the file if an entry was assigned without writing it."""
        if self._unwritten:
            self._write()

    def _assign(self, entry: EpochEntry) -> bool:
        if entry.epoch < 0 or entry.start_offset < 0:
            raise ValueError(f"invalid leader epoch entry {entry}")
        latest = self.latest_entry
        if latest is not None and (
            entry.epoch == latest.epoch and entry.start_offset >= latest.start_offset
        ):
            return False
        removed = []
        while self._entries and (
            self._entries[-1].epoch >= entry.epoch
            or self._entries[-1].start_offset >= entry.start_offset
        ):
            removed.append(self._entries.pop())
        if len(removed) > 1 or (removed and removed[0].start_offset != entry.start_offset):
            # An entry at the same start offset is expected (an epoch with no data yet);
            # anything else means the log diverged and its entries are being replaced.
            logger.warning("%s: new epoch entry %s replaced %s", self.path, entry, removed)
        self._entries.append(entry)
        return True

    def truncate_from_end(self, end_offset: int) -> None:
        """Drop every entry starting at or after ``end_offset`` (the log was cut there).

        A negative ``end_offset`` (``UNDEFINED_EPOCH_OFFSET``) changes nothing.
        """
        if end_offset < 0:
            return
        keep = bisect.bisect_left(self._entries, end_offset, key=lambda e: e.start_offset)
        if keep < len(self._entries):
            del self._entries[keep:]
            self._write()

    def truncate_from_start(self, start_offset: int) -> None:
        """Forget what lies below ``start_offset`` (the log start moved up to it).

        Entries starting at or below ``start_offset`` are removed and the last of them is
        put back starting at ``start_offset``, so the epoch covering it stays known
        (``truncate_from_start(6)`` keeps an entry at 6). A negative offset changes nothing.
        """
        if start_offset < 0:
            return
        covered = bisect.bisect_right(self._entries, start_offset, key=lambda e: e.start_offset)
        if covered == 0:
            return
        first = EpochEntry(self._entries[covered - 1].epoch, start_offset)
        if covered == 1 and self._entries[0] == first:
            return
        self._entries[:covered] = [first]
        self._write()

    def clear(self) -> None:
        """Remove every entry (Kafka's ``clearAndFlush``)."""
        self._entries.clear()
        self._write()

    def flush(self) -> None:
        """Write the checkpoint file, whether or not anything changed."""
        self._write()

    def _write(self) -> None:
        write_checkpoint_entries(self.path, self._entries)
        self._unwritten = False

    def __repr__(self) -> str:
        return f"LeaderEpochCache({self._entries})"
