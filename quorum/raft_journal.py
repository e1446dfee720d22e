"""Crash safety for pysyncobj's journal and snapshots (part of the Raft adapter).

pysyncobj 0.3.17 can lose committed entries when a voter is killed at the
wrong moment. This module closes the windows we found:

1. **Journal writes are not synced.** ``DurableJournal.add`` syncs each
   entry (fdatasync), and term/vote changes are fsynced, before Raft acts on
   them.
2. **Compaction rewrites the journal in place** (clear, then re-add the
   remaining entries), so a kill in the middle truncates it. Here the rewrite
   goes to a new file that replaces the old one atomically.
3. **A snapshot newer than the journal start loses the journal.** The
   snapshot is written by a forked child and renamed into place; the parent
   trims the journal only when it notices, a tick later. A kill in between
   leaves a snapshot whose entries are not the journal's first two, and on
   load pysyncobj then *clears the whole journal*, including committed
   entries after the snapshot. ``reconcile`` runs before pysyncobj opens the
   files and trims the journal to start at the snapshot instead.
4. **Snapshot children outlive their parent.** A killed voter's child could
   rename a stale snapshot over the restarted voter's files. Children now die
   with their parent (``PR_SET_PDEATHSIG``), and ``stop`` reaps them.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import logging
import os
import pickle
import signal
from collections.abc import Callable
from typing import Any

from pysyncobj.journal import FileJournal

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def fsync_path(path: str) -> None:
    """fsync a file and its directory, so a rename or a write is on disk."""
    for target, flags in ((path, os.O_RDONLY), (os.path.dirname(path) or ".", os.O_RDONLY)):
        try:
            fd = os.open(target, flags)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DurableJournal:
    """pysyncobj's FileJournal with synced appends and atomic compaction."""

    def __init__(self, path: str, *, fsync: bool = True):
        self._path = path
        self._fsync = fsync
        self._journal = FileJournal(path)
        self._unsynced = False

    def sync(self) -> None:
        """Write the journal's dirty pages to disk.

        fdatasync on the file rather than pysyncobj's mmap.flush: on Linux it
        covers pages written through the shared mapping, it writes only dirty
        pages instead of walking the whole mapping, and it releases the GIL.
        """
        os.fdatasync(self._journal._FileJournal__journalFile._ResizableFile__f.fileno())

    def sync_pending(self) -> None:
        """Sync the entries appended since the last sync, if any."""
        if self._unsynced:
            self._unsynced = False
            self.sync()

    # The methods pysyncobj calls and we change.
    def add(self, command: bytes, idx: int, term: int) -> None:
        """Append an entry; it is synced before anyone can rely on it.

        Raft needs an entry on disk before a follower acknowledges it and
        before the leader counts itself towards its commit. So appends only
        mark the journal unsynced, and the Raft adapter syncs before sending
        an acknowledgement or a vote (``sync_before_acks``) and after every
        tick (the leader counts itself only at the start of the next one). A
        follower that appends a hundred entries from one message syncs once,
        and the leader syncs while its followers write, not before it sends.
        """
        self._journal.add(command, idx, term)
        if self._fsync:
            self._unsynced = True

    def setCurrentTerm(self, term: int, voted_for: Any) -> None:  # noqa: N802 (pysyncobj's name)
        self._journal.setCurrentTerm(term, voted_for)
        if self._fsync:
            fsync_path(self._path + ".meta")

    def deleteEntriesTo(self, entry_to: int) -> None:  # noqa: N802 (pysyncobj's name)
        remaining = [self._journal[i] for i in range(entry_to, len(self._journal))]
        commit_index = self._journal.getRaftCommitIndex()
        self._journal = rewrite(self._path, remaining, self._journal)
        self._journal.setRaftCommitIndex(commit_index)

    def deleteEntriesFrom(self, entry_from: int) -> None:  # noqa: N802 (pysyncobj's name)
        # A follower truncates before it appends what replaces the entries (and
        # pysyncobj truncates even matching entries on every AppendEntries); the
        # sync before its acknowledgement covers both, as they share the file.
        self._journal.deleteEntriesFrom(entry_from)
        if self._fsync:
            self._unsynced = True

    # Everything else as pysyncobj's journal does it.
    def __getattr__(self, name: str) -> Any:
        return getattr(self._journal, name)

    def __getitem__(self, item: Any) -> Any:
        return self._journal[item]

    def __len__(self) -> int:
        return len(self._journal)


# pysyncobj messages that promise the sender's log: a follower's
# acknowledgement of appended entries, and a vote (judged on the log).
_PROMISES = frozenset({"next_node_idx", "response_vote"})


def sync_before_acks(
    send: Callable[[Any, Any], Any], journal: DurableJournal
) -> Callable[[Any, Any], Any]:
    """Wrap a pysyncobj transport's ``send`` so the journal is synced before any
    message that promises what the log holds."""

    def send_synced(node: Any, message: Any) -> Any:
        if isinstance(message, dict) and message.get("type") in _PROMISES:
            journal.sync_pending()
        return send(node, message)

    return send_synced


def rewrite(path: str, entries: list[tuple[bytes, int, int]], current: Any = None) -> FileJournal:
    """Replace the journal at ``path`` with ``entries``, atomically.

    The term/vote/commit file (``path.meta``) is left as it is.
    """
    tmp = path + ".rewrite"
    for leftover in (tmp, tmp + ".meta"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(leftover)
    fresh = FileJournal(tmp)
    for entry in entries:
        fresh.add(*entry)
    fresh.flush()
    fresh._destroy()
    fsync_path(tmp)
    if current is not None:
        current._destroy()
    os.replace(tmp, path)
    fsync_path(path)
    return FileJournal(path)


class _EntriesOnly(pickle.Unpickler):
    """Unpickles a pysyncobj dump without decoding our state in it."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("quorum.raft", "_restore_state"):
            return lambda payload: None
        return super().find_class(module, name)


def snapshot_entries(dump_path: str) -> tuple[Any, Any] | None:
    """The (second-to-last, last) Raft entries a pysyncobj dump covers, or None."""
    try:
        with gzip.open(dump_path, "rb") as fh:
            data = _EntriesOnly(fh).load()
    except FileNotFoundError:
        return None
    except Exception:
        log.exception("cannot read the Raft snapshot %s; leaving it to pysyncobj", dump_path)
        return None
    # (state, last entry, second-to-last entry, cluster): see pysyncobj's serializer.
    return data[2], data[1]


def reconcile(journal_path: str, dump_path: str) -> None:
    """Make the journal start at the snapshot's entries when it holds them."""
    covered = snapshot_entries(dump_path)
    if covered is None or not os.path.exists(journal_path):
        return
    before_last, last = covered
    journal = FileJournal(journal_path)
    try:
        entries = [journal[i] for i in range(len(journal))]
    finally:
        journal._destroy()
    for position in range(len(entries) - 1):
        if entries[position] == before_last and entries[position + 1] == last:
            if position > 0:
                log.warning(
                    "Raft journal started before the snapshot (index %d < %d): trimming it "
                    "so the entries after the snapshot are kept",
                    entries[0][1],
                    before_last[1],
                )
                rewrite(journal_path, entries[position:])._destroy()
            return


def die_with_parent() -> None:
    """In a forked snapshot child: die when the parent does."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the stop() reaping still applies
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def reap_snapshot_child(serializer: Any) -> None:
    """Kill and reap a snapshot child still running (its half file is harmless:
    the rename is what publishes a snapshot)."""
    pid = getattr(serializer, "_Serializer__pid", 0)
    if pid and pid > 0:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
