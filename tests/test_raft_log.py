"""The pysyncobj adapter: three voters in this process on loopback.

Commit on every voter, restart from the journal, restart from a snapshot
(whose payload is protobuf, not pickled domain objects), and journal syncing.
"""

from __future__ import annotations

import gzip
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cli.localcluster import free_ports
from quorum import raft
from quorum import records as r
from quorum.config import Voter
from quorum.raft import RaftMetadataLog, RaftTimeouts
from quorum.raft_journal import DurableJournal
from quorum.state import BatchResult

pytestmark = pytest.mark.integration


class Listener:
    def __init__(self) -> None:
        self.leading: tuple[bool, int] | None = None
        self.snapshots = 0

    def on_commit(self, result, state) -> None:
        pass

    def on_snapshot_loaded(self, state) -> None:
        self.snapshots += 1

    def on_leadership_change(self, is_leader: bool, term: int) -> None:
        self.leading = (is_leader, term)

    def on_tick(self, now: float) -> None:
        pass


def start_voters(voters, data_dir: Path, listener_type: type = Listener, **kwargs):
    listeners = {v.node_id: listener_type() for v in voters}
    logs = {
        v.node_id: RaftMetadataLog(
            v.node_id,
            voters,
            data_dir / str(v.node_id),
            password="pw",
            listener=listeners[v.node_id],
            **kwargs,
        )
        for v in voters
    }
    for log in logs.values():
        log.start()
    return logs, listeners


def stop_all(logs) -> None:
    for log in logs.values():
        log.stop()


def wait_leader(logs, listeners, timeout_s: float = 10.0) -> RaftMetadataLog:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node_id, listener in listeners.items():
            if listener.leading and listener.leading[0] and logs[node_id].is_leader():
                return logs[node_id]
        time.sleep(0.01)
    raise AssertionError("no leader elected")


def propose(log: RaftMetadataLog, records, *, claim: bool = False) -> BatchResult:
    term = log.term()
    done = threading.Event()
    out: list = []

    def submit() -> None:
        payload = r.encode_batch(
            records,
            controller_epoch=term,
            proposer_id=log.node_id,
            expected_base_offset=-1 if claim else log.state.next_offset,
            append_time_ms=0,
        )
        log.propose(payload, lambda result, outcome: (out.append((result, outcome)), done.set()))

    log.call_soon(submit)
    assert done.wait(10), "proposal never answered"
    result, outcome = out[0]
    assert outcome is None, outcome
    return result


def wait_offsets(logs, next_offset: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(log.state.next_offset == next_offset for log in logs.values()):
            return
        time.sleep(0.01)
    raise AssertionError(
        {
            i: (log.state.next_offset, {k: log.raft_status().get(k) for k in _STATUS})
            for i, log in logs.items()
        }
    )


_STATUS = ("log_len", "commit_idx", "last_applied", "leader", "raft_term", "state")


@pytest.fixture
def voters():
    ports = free_ports(6)
    return tuple(Voter(i + 1, "127.0.0.1", ports[2 * i], ports[2 * i + 1]) for i in range(3))


def write_some(leader: RaftMetadataLog, topics: int) -> None:
    assert propose(leader, [r.controller_epoch(leader.term(), leader.node_id)], claim=True).accepted
    for i in range(topics):
        assert propose(leader, [r.topic(f"t{i}", f"id-{i}")]).accepted


def test_commits_reach_every_voter_and_survive_a_full_restart(voters, tmp_path):
    logs, listeners = start_voters(voters, tmp_path)
    try:
        leader = wait_leader(logs, listeners)
        write_some(leader, 30)
        wait_offsets(logs, 31)
        images = {i: log.state.image for i, log in logs.items()}
        assert len({id(image) for image in images.values()}) == 3
        assert all(image == images[leader.node_id] for image in images.values())
        assert all(isinstance(log._so._SyncObj__raftLog, DurableJournal) for log in logs.values())
    finally:
        stop_all(logs)

    logs, listeners = start_voters(voters, tmp_path)
    try:
        wait_offsets(logs, 31)
        assert all(log.state.image == images[1] for log in logs.values())
    finally:
        stop_all(logs)


def test_restart_from_a_protobuf_snapshot(voters, tmp_path):
    logs, listeners = start_voters(voters, tmp_path, snapshot_min_entries=10, tail_max_records=5)
    try:
        leader = wait_leader(logs, listeners)
        write_some(leader, 40)
        wait_offsets(logs, 41)
        expected = leader.state.image
        # Wait until each voter has written a snapshot of its state.
        deadline = time.monotonic() + 20
        dumps = [tmp_path / str(v.node_id) / "raft.snapshot" for v in voters]
        while time.monotonic() < deadline and not all(d.exists() for d in dumps):
            for log in logs.values():
                log.call_soon(log._so.forceLogCompaction)
            time.sleep(0.2)
        assert all(d.exists() for d in dumps)
    finally:
        stop_all(logs)

    raw = gzip.decompress(dumps[0].read_bytes())
    # The state travels as protobuf bytes: no domain class is named in the dump.
    assert b"MetadataImage" not in raw and b"PartitionRegistration" not in raw
    assert b"_restore_state" in raw

    logs, listeners = start_voters(voters, tmp_path, snapshot_min_entries=10, tail_max_records=5)
    try:
        wait_offsets(logs, 41)
        assert all(log.state.image == expected for log in logs.values())
        assert sum(listener.snapshots for listener in listeners.values()) >= 1
        # The restored voters keep committing.
        leader = wait_leader(logs, listeners)
        assert propose(
            leader, [r.controller_epoch(leader.term(), leader.node_id)], claim=True
        ).accepted
        assert propose(leader, [r.topic("after", "id-after")]).accepted
        wait_offsets(logs, 43)
    finally:
        stop_all(logs)


class FailingListener(Listener):
    def on_commit(self, result, state) -> None:
        raise RuntimeError("a bug in a listener")


def test_garbage_and_failing_listeners_never_stall_the_state_machine(voters, tmp_path):
    logs, listeners = start_voters(voters, tmp_path, FailingListener)
    try:
        leader = wait_leader(logs, listeners)
        assert propose(
            leader, [r.controller_epoch(leader.term(), leader.node_id)], claim=True
        ).accepted
        done = threading.Event()
        out: list = []
        leader.call_soon(
            lambda: leader.propose(
                b"\x00garbage", lambda result, outcome: (out.append(result), done.set())
            )
        )
        assert done.wait(10)
        assert not out[0].accepted and out[0].reason
        # Every voter keeps applying after the garbage entry and the raising listener.
        for i in range(5):
            assert propose(leader, [r.topic(f"after-{i}", f"id-{i}")]).accepted
        wait_offsets(logs, 6)
    finally:
        stop_all(logs)


def test_followers_learn_a_commit_with_the_next_write_not_a_message_of_its_own(
    voters, tmp_path, monkeypatch
):
    """pysyncobj sent every follower an AppendEntries after each commit only to
    carry the new commit index (and each follower answered it). Now the next write's
    AppendEntries carries it, or one sent at most COMMIT_NOTICE_DELAY_S later."""
    monkeypatch.setattr(raft, "COMMIT_NOTICE_DELAY_S", 0.2)
    timeouts = RaftTimeouts(
        election_min_s=2.0, election_max_s=3.0, heartbeat_s=0.2, leader_fallback_s=1.5
    )
    logs, listeners = start_voters(voters, tmp_path, timeouts=timeouts)
    try:
        leader = wait_leader(logs, listeners)
        write_some(leader, 2)
        wait_offsets(logs, 3)
        transport = leader._so._SyncObj__transport
        sent: list[str] = []
        send = transport.send

        def counting(node, message):
            sent.append(message.get("type", "?") if isinstance(message, dict) else "?")
            return send(node, message)

        transport.send = counting
        writes = 30
        started = time.monotonic()
        for i in range(writes):
            assert propose(leader, [r.topic(f"u{i}", f"uid-{i}")]).accepted
        elapsed = time.monotonic() - started
        transport.send = send
        wait_offsets(logs, 3 + writes)  # the last commit reaches them all the same
        appends = sent.count("append_entries")
        # One per write and follower, and at most a commit notice and a heartbeat per
        # 200 ms each; a notice after every commit would be two per write and follower.
        assert appends <= 2 * (writes + 2 * (elapsed / 0.2 + 1)), (appends, elapsed)
        assert appends < 4 * writes, (appends, elapsed)
    finally:
        stop_all(logs)


def test_a_leader_busy_with_its_own_work_does_not_step_down(voters, tmp_path, monkeypatch):
    """pysyncobj's leader steps down when no follower has answered for its fallback
    timeout (250 ms), checked before it reads what they sent: a leader whose loop
    was busy for longer stepped down, and an election followed. The time it spent
    on its own work no longer counts against its followers."""
    discounted: list[float] = []
    discount = raft._GatedSyncObj.discount_stall

    def recording(self, seconds: float) -> None:
        discounted.append(seconds)
        discount(self, seconds)

    monkeypatch.setattr(raft._GatedSyncObj, "discount_stall", recording)
    timeouts = RaftTimeouts(
        election_min_s=2.0, election_max_s=3.0, heartbeat_s=0.05, leader_fallback_s=0.25
    )
    logs, listeners = start_voters(voters, tmp_path, timeouts=timeouts)
    try:
        leader = wait_leader(logs, listeners)
        write_some(leader, 1)
        term = leader.term()
        for _ in range(3):
            done = threading.Event()
            leader.call_soon(lambda done=done: (time.sleep(0.4), done.set()))
            assert done.wait(5)
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                assert leader.is_leader() and leader.term() == term, "stepped down"
                time.sleep(0.01)
        assert len([s for s in discounted if s >= 0.4]) >= 3
        assert propose(leader, [r.topic("after", "id-after")]).accepted
    finally:
        stop_all(logs)


def test_entries_applied_a_few_a_tick_and_requests_a_few_an_iteration_all_run(
    voters, tmp_path, monkeypatch
):
    """With no time budget at all, each tick applies one committed entry and each
    loop iteration runs one request: nothing is left behind. (pysyncobj applied all
    the entries a commit covered at once.)"""
    monkeypatch.setattr(raft, "APPLY_BUDGET_S", 0.0)
    monkeypatch.setattr(raft, "REQUESTS_BUDGET_S", 0.0)
    steps: list[int] = []
    apply = raft._GatedSyncObj._SyncObj__applyLogEntries

    def recording(self) -> bool:
        before = self._SyncObj__raftLastApplied
        out = apply(self)
        steps.append(self._SyncObj__raftLastApplied - before)
        return out

    monkeypatch.setattr(raft._GatedSyncObj, "_SyncObj__applyLogEntries", recording)
    logs, listeners = start_voters(voters, tmp_path)
    try:
        leader = wait_leader(logs, listeners)
        write_some(leader, 1)
        wait_offsets(logs, 2)
        term, base = leader.term(), leader.state.next_offset

        def burst() -> None:  # 30 entries proposed at once: commits cover several
            for i in range(30):
                payload = r.encode_batch(
                    [r.topic(f"b{i}", f"bid-{i}")],
                    controller_epoch=term,
                    proposer_id=leader.node_id,
                    expected_base_offset=base + i,
                    append_time_ms=0,
                )
                leader.propose(payload, lambda result, outcome: None)

        leader.call_soon(burst)
        wait_offsets(logs, base + 30)
        assert max(steps) == 1 and sum(steps) >= 3 * 30
        ran = threading.Event()
        left = [50]

        def one() -> None:
            left[0] -= 1
            if left[0] == 0:
                ran.set()

        for _ in range(50):
            leader.call_soon(one)
        assert ran.wait(5)
    finally:
        stop_all(logs)


def test_a_silent_follower_is_credited_one_stall_at_most():
    """Else a cut-off leader that stalls often would count its silent followers as
    answering, and step down long after its fallback timeout."""
    node = SimpleNamespace(_SyncObj__lastResponseTime={"a": 10.0, "b": 10.0}, stall_credited={})
    raft._GatedSyncObj.discount_stall(node, 0.3)
    assert node._SyncObj__lastResponseTime == {"a": 10.3, "b": 10.3}
    node._SyncObj__lastResponseTime["a"] = 11.0  # "a" answered since; "b" did not
    raft._GatedSyncObj.discount_stall(node, 0.3)
    assert node._SyncObj__lastResponseTime == {"a": 11.3, "b": 10.3}
