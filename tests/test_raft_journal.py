"""Crash windows of pysyncobj's journal, reproduced on disk and closed."""

from __future__ import annotations

import gzip
import pickle

from pysyncobj.journal import FileJournal

from quorum.raft_journal import (
    DurableJournal,
    reconcile,
    rewrite,
    snapshot_entries,
    sync_before_acks,
)


def entries(first: int, last: int, term: int = 1) -> list[tuple[bytes, int, int]]:
    return [(f"cmd-{i}".encode(), i, term) for i in range(first, last + 1)]


def write_journal(path, items) -> None:
    journal = FileJournal(str(path))
    for item in items:
        journal.add(*item)
    journal.flush()
    journal._destroy()


def read_journal(path) -> list[tuple[bytes, int, int]]:
    journal = FileJournal(str(path))
    try:
        return [journal[i] for i in range(len(journal))]
    finally:
        journal._destroy()


def write_dump(path, before_last, last) -> None:
    # pysyncobj's dump layout: (state, last entry, second-to-last entry, cluster).
    with gzip.open(path, "wb") as fh:
        pickle.dump(([{}, None], last, before_last, set()), fh, protocol=2)


def test_snapshot_newer_than_journal_start_keeps_later_entries(tmp_path):
    """Killed after the snapshot rename, before the journal trim: the journal
    still starts at 1 while the snapshot covers up to 20. pysyncobj would clear
    the journal on load and lose 21..50; reconcile trims it to start at 19."""
    journal, dump = tmp_path / "raft.journal", tmp_path / "raft.snapshot"
    log = entries(1, 50)
    write_journal(journal, log)
    write_dump(dump, log[18], log[19])
    assert snapshot_entries(str(dump)) == (log[18], log[19])

    reconcile(str(journal), str(dump))

    kept = read_journal(journal)
    assert kept[:2] == [log[18], log[19]], "pysyncobj keeps a journal that starts at the dump"
    assert kept == log[18:], "every entry after the snapshot survives"


def test_reconcile_leaves_a_consistent_journal_alone(tmp_path):
    journal, dump = tmp_path / "raft.journal", tmp_path / "raft.snapshot"
    log = entries(19, 30)
    write_journal(journal, log)
    write_dump(dump, log[0], log[1])
    before = journal.read_bytes()
    reconcile(str(journal), str(dump))
    assert journal.read_bytes() == before


def test_reconcile_without_a_matching_entry_changes_nothing(tmp_path):
    """Entries of another term at those indexes: not ours to keep; pysyncobj's
    own load (which clears) is right then."""
    journal, dump = tmp_path / "raft.journal", tmp_path / "raft.snapshot"
    write_journal(journal, entries(1, 10, term=1))
    write_dump(dump, *entries(4, 5, term=2))
    before = journal.read_bytes()
    reconcile(str(journal), str(dump))
    assert journal.read_bytes() == before


def test_compaction_rewrites_atomically_and_keeps_the_commit_index(tmp_path):
    path = tmp_path / "raft.journal"
    journal = DurableJournal(str(path))
    for item in entries(1, 40):
        journal.add(*item)
    journal.setRaftCommitIndex(40)
    journal.deleteEntriesTo(25)
    assert [journal[i] for i in range(len(journal))] == entries(26, 40)
    assert journal.getRaftCommitIndex() == 40
    assert not (tmp_path / "raft.journal.rewrite").exists()
    journal._destroy()
    assert read_journal(path) == entries(26, 40)


def test_a_half_written_rewrite_leaves_the_journal_whole(tmp_path):
    """A kill during compaction leaves at most a stray temp file: the journal
    itself is only ever replaced by a complete one."""
    path = tmp_path / "raft.journal"
    write_journal(path, entries(1, 20))
    (tmp_path / "raft.journal.rewrite").write_bytes(b"half a file")
    rewrite(str(path), entries(11, 20))._destroy()
    assert read_journal(path) == entries(11, 20)


def test_durable_journal_syncs_pending_appends_once(tmp_path, monkeypatch):
    journal = DurableJournal(str(tmp_path / "raft.journal"))
    flushed = []
    inner = journal._journal
    monkeypatch.setattr(journal, "sync", lambda: flushed.append(len(inner)))
    journal.add(b"a", 1, 1)
    journal.add(b"b", 2, 1)
    journal.sync_pending()
    assert flushed == [2]
    journal.setCurrentTerm(3, None)
    assert journal.getCurrentTerm() == 3


def test_appends_are_synced_once_before_an_acknowledgement_or_vote_goes_out(tmp_path, monkeypatch):
    journal = DurableJournal(str(tmp_path / "raft.journal"))
    events: list[object] = []
    monkeypatch.setattr(journal, "sync", lambda: events.append(("sync", len(journal))))
    send = sync_before_acks(lambda node, message: events.append(message["type"]), journal)

    for idx in range(1, 101):  # one AppendEntries message with a hundred entries
        journal.add(b"entry", idx, 1)
    assert events == [], "appending alone syncs nothing"
    send("leader", {"type": "next_node_idx"})
    assert events == [("sync", 100), "next_node_idx"], "one sync, before the acknowledgement"

    journal.add(b"entry", 101, 1)
    send("peer", {"type": "append_entries"})
    assert events[-1] == "append_entries" and ("sync", 101) not in events, (
        "a leader sends AppendEntries before syncing its own copy"
    )
    journal.sync_pending()  # after the tick, before the next commit count
    assert events[-1] == ("sync", 101)
    send("candidate", {"type": "response_vote"})
    assert events[-1] == "response_vote" and events.count(("sync", 101)) == 1
