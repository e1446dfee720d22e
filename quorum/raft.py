"""The metadata log over pysyncobj. The only module that imports pysyncobj.

One thread per node ("the raft thread") drives pysyncobj with ``doTick`` and
runs everything else that touches state: applies, propose callbacks,
leadership changes, functions posted with ``call_soon`` and the listener's
``on_tick``. Other threads only post work and read published views.

How pysyncobj's known weaknesses are handled here:

- One replicated method, ``apply_batch(payload: bytes)``, whose payload is a
  protobuf ``MetadataBatch``; no pickled domain object is ever proposed.
- ``apply_batch`` cannot raise: ``MetadataState.apply_payload`` decodes and
  replays defensively and turns every failure into a refusal or a no-op, so
  the state machine can never stall on an entry.
- Snapshots: the consumer's state is pickled only as a wrapper whose reduce
  encodes it as protobuf (``quorum.snapshot.encode_state``) inside pysyncobj's
  forked child, so the raft thread never serializes a large image.
- Durability: pysyncobj never syncs its journal, compacts it in place and can
  drop committed entries after a badly timed kill; ``quorum.raft_journal``
  makes appends synced and compaction atomic, reconciles journal and
  snapshot at start, and keeps snapshot children from outliving their node.
- Fail reasons are mapped to ``ProposeOutcome``: only QUEUE_FULL,
  MISSING_LEADER, DISCARDED and REQUEST_DENIED mean "not applied".
- ``commandsWaitLeader=False``, a low ``leaderFallbackTimeout``, a bound Raft
  address and a password (Fernet-encrypted, authenticated messages).
- No PreVote in pysyncobj: ``quorum.prevote`` asks before every election, so a
  voter cut off from the majority does not inflate its term and depose the leader
  when it comes back.
"""

from __future__ import annotations

import bisect
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.monotonic import monotonic as raft_monotonic
from pysyncobj.node import TCPNode
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.syncobj import _RAFT_STATE

from quorum import raft_journal, raft_wire
from quorum.config import Voter
from quorum.log import LogListener, ProposeCallback, ProposeOutcome
from quorum.prevote import PreVote
from quorum.snapshot import decode_state, encode_state
from quorum.state import BatchResult, MetadataState

log = logging.getLogger(__name__)

_NOT_APPLIED = {
    FAIL_REASON.QUEUE_FULL,
    FAIL_REASON.MISSING_LEADER,
    FAIL_REASON.DISCARDED,
    FAIL_REASON.REQUEST_DENIED,
}
_RAFT_STATE_LEADER = 2


@dataclass(frozen=True, slots=True)
class RaftTimeouts:
    election_min_s: float = 0.3
    election_max_s: float = 0.6
    heartbeat_s: float = 0.05
    leader_fallback_s: float = 0.25


_fork_hook_registered = False


def _register_fork_hook() -> None:
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=raft_journal.die_with_parent)
        _fork_hook_registered = True


def _restore_state(payload: bytes) -> MetadataState:
    return decode_state(payload)


class _StateSnapshot:
    """Pickles as protobuf bytes; encoding runs in pysyncobj's forked child."""

    def __init__(self, state: MetadataState):
        self.state = state

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return (_restore_state, (encode_state(self.state),))


class _MetadataConsumer(SyncObjConsumer):  # type: ignore[misc]
    def __init__(self, owner: RaftMetadataLog, tail_max_records: int):
        self._owner = owner
        self._tail_max = tail_max_records
        self.state = MetadataState(tail_max_records=tail_max_records)
        super().__init__()

    @replicated  # type: ignore[misc]
    def apply_batch(self, payload: bytes) -> BatchResult:
        result = self.state.apply_payload(payload)
        self._owner._on_apply(result)
        return result

    def _serialize(self) -> _StateSnapshot:
        return _StateSnapshot(self.state)

    def _deserialize(self, data: Any) -> None:
        if not isinstance(data, MetadataState):
            log.error("ignoring snapshot of unexpected type %s", type(data).__name__)
            return
        data.tail_max_records = self._tail_max
        self.state = data
        self._owner._on_snapshot_loaded()


class _DialedNode(TCPNode):  # type: ignore[misc]
    """A voter known by its own Raft address but reached at another one (a proxy).

    pysyncobj names a node by its address: the connecting side announces its own
    address, which the other side looks up among its peers. So the identity stays the
    voter's address and only the host and port that are dialed change.
    """

    def __init__(self, address: str, dialed: str):
        super().__init__(address)
        host, port = dialed.rsplit(":", 1)
        self._dialed = (host, int(port))

    @property
    def ip(self) -> str:
        return self._dialed[0]

    @property
    def port(self) -> int:
        return self._dialed[1]


# How long a leader may keep its followers waiting to learn a new commit index.
# Nothing waits on a follower's commit index: brokers fetch the metadata log from
# the leader, and a new leader commits what it holds in its own term. A read a
# follower answers from its image (DescribeTopics, DescribeCluster) may be that much
# staler than before; it names the metadata offset it describes.
COMMIT_NOTICE_DELAY_S = 0.005
# The longest a Raft loop iteration spends applying committed entries, and the
# longest it spends on controller requests, before it ticks Raft again: the
# leader's heartbeats and its followers' answers must not wait behind either.
APPLY_BUDGET_S = 0.05
REQUESTS_BUDGET_S = 0.05


class _GatedSyncObj(SyncObj):  # type: ignore[misc]
    """A SyncObj whose tick starts an election only when ``election_gate()`` allows
    it (PreVote's ``allows_election``). pysyncobj's one election check is
    ``deadline < now and self.__connectedToAnyone()``, so that is what is gated."""

    def __init__(self, *args: Any, **kwargs: Any):
        # Set before SyncObj.__init__ lists its own attributes: an attribute added
        # after that is pickled into every snapshot as replicated state.
        self.election_gate: Callable[[], bool] = _always
        # discount_stall's last credit to each follower's answer time.
        self.stall_credited: dict[Any, float] = {}
        # The last applied index an entry could not be applied after (applying()).
        self.apply_stuck_at = -1
        super().__init__(*args, **kwargs)

    def _SyncObj__connectedToAnyone(self) -> bool:  # noqa: N802
        return bool(SyncObj._SyncObj__connectedToAnyone(self) and self.election_gate())

    def discount_stall(self, seconds: float) -> None:
        """Time this leader spent on its own work, not reading its followers'
        answers, does not count against them in pysyncobj's leader fallback (a
        leader stepped down after its own long loop iteration, and won the next
        election: a new controller epoch for nothing). A follower is credited only
        if it answered since its last credit, so a cut-off leader still steps down
        after about one fallback timeout and one stall."""
        times = self._SyncObj__lastResponseTime
        for node, last in list(times.items()):
            if self.stall_credited.get(node) == last:
                continue  # No answer since its last credit: a silent follower ages.
            times[node] = self.stall_credited[node] = last + seconds

    def applying(self) -> bool:
        """Committed entries are waiting to be applied (and the next one can be: one
        that cannot be is tried again each tick, as pysyncobj logs, not in a spin)."""
        last = self._SyncObj__raftLastApplied
        return bool(self._SyncObj__raftCommitIndex > last and last != self.apply_stuck_at)

    def _SyncObj__applyLogEntries(self) -> bool:  # noqa: N802
        """pysyncobj's apply, with two differences.

        It applies committed entries one at a time for at most ``APPLY_BUDGET_S``;
        the rest wait for the next tick (``applying``). pysyncobj applied every
        committed entry in one tick: a follower catching up on batches of 2,000
        partition records sat there for 300-500 ms, past the election timeout,
        and then stood for election before reading the leader's messages.

        And a leader does not send every follower an AppendEntries right after it,
        only to tell them the new commit index: they learn it with the next write's
        AppendEntries or at most ``COMMIT_NOTICE_DELAY_S`` later. Those messages,
        their answers and their handling were a quarter of the quorum's CPU per
        sequential write."""
        commit: int = getattr(self, "_SyncObj__raftCommitIndex")  # noqa: B009
        deadline = raft_monotonic() + APPLY_BUDGET_S
        applied = False
        lowered = None
        try:
            while self._SyncObj__raftLastApplied < commit:
                before = self._SyncObj__raftLastApplied
                lowered = self._SyncObj__raftCommitIndex = before + 1
                SyncObj._SyncObj__applyLogEntries(self)
                if self._SyncObj__raftLastApplied == before:
                    self.apply_stuck_at = before  # pysyncobj logged why
                    break
                applied = True
                if raft_monotonic() >= deadline:
                    break
        finally:
            if lowered is None or self._SyncObj__raftCommitIndex == lowered:
                self._SyncObj__raftCommitIndex = commit
        if applied and self._SyncObj__raftState == _RAFT_STATE.LEADER:
            soon = raft_monotonic() + COMMIT_NOTICE_DELAY_S
            due: float = getattr(self, "_SyncObj__newAppendEntriesTime")  # noqa: B009
            if due > soon:
                self._SyncObj__newAppendEntriesTime = soon
            return False
        return applied


def _always() -> bool:
    return True


class _SyncObjRaft:
    """``quorum.prevote.RaftView`` over a SyncObj's private state (pysyncobj is
    pinned; tests/test_prevote.py runs PreVote on real voters)."""

    def __init__(self, so: SyncObj):
        self._so = so

    def _connected(self) -> bool:
        return bool(SyncObj._SyncObj__connectedToAnyone(self._so))

    def now(self) -> float:
        return float(raft_monotonic())

    def is_leader(self) -> bool:
        return bool(self._so._SyncObj__raftState == _RAFT_STATE.LEADER)

    def term(self) -> int:
        return int(self._so._SyncObj__raftCurrentTerm)

    def last_log(self) -> tuple[int, int]:
        so = self._so
        return so._SyncObj__getCurrentLogIndex(), so._SyncObj__getCurrentLogTerm()

    def election_due(self) -> bool:
        # The condition of pysyncobj's _onTick for starting an election.
        so = self._so
        return bool(
            so._SyncObj__raftState in (_RAFT_STATE.FOLLOWER, _RAFT_STATE.CANDIDATE)
            and so._SyncObj__selfNode is not None
            and so._SyncObj__raftElectionDeadline < raft_monotonic()
            and self._connected()
        )

    def transferring(self) -> bool:
        return bool(self._so._SyncObj__transferInProgress)

    def postpone_election(self) -> None:
        so = self._so
        so._SyncObj__raftElectionDeadline = raft_monotonic() + so._SyncObj__generateRaftTimeout()

    def start_election_now(self) -> None:
        self._so._SyncObj__raftElectionDeadline = 0

    def forget_leader(self) -> None:
        # What pysyncobj does to the leader when it starts an election.
        so = self._so
        if so._SyncObj__raftLeader is not None:
            so._SyncObj__raftLeader = None
            so._SyncObj__onLeaderChanged()

    def adopt_term(self, term: int) -> None:
        # What pysyncobj does on a vote request with a higher term.
        so = self._so
        so._SyncObj__setCurrentTerm(term, None)
        so._SyncObj__setState(_RAFT_STATE.FOLLOWER)
        so._SyncObj__raftLeader = None

    def voters(self) -> list[Any]:
        return list(self._so._SyncObj__otherNodes)

    def voter_key(self, node: Any) -> Any:
        return node.id

    def send(self, node: Any, message: dict[str, Any]) -> None:
        self._so._SyncObj__transport.send(node, message)


class RaftMetadataLog:
    """``MetadataLog`` over a pysyncobj voter; owns the raft thread."""

    def __init__(
        self,
        node_id: int,
        voters: tuple[Voter, ...],
        data_dir: Path,
        *,
        password: str = "",
        timeouts: RaftTimeouts = RaftTimeouts(),
        tail_max_records: int = 50_000,
        snapshot_min_entries: int = 20_000,
        fsync: bool = True,
        listener: LogListener | None = None,
        tick_interval_s: float = 0.01,
        dial: Callable[[str], str] | None = None,
    ):
        self.node_id = node_id
        self.listener = listener
        self._voters = {v.node_id: v for v in voters}
        me = self._voters[node_id]
        self._address_to_id = {v.raft_address: v.node_id for v in voters}
        data_dir.mkdir(parents=True, exist_ok=True)
        journal_path = str(data_dir / "raft.journal")
        dump_path = str(data_dir / "raft.snapshot")
        raft_journal.reconcile(journal_path, dump_path)
        _register_fork_hook()
        conf = SyncObjConf(
            autoTick=False,
            journalFile=journal_path,
            fullDumpFile=dump_path,
            appendEntriesUseBatch=False,
            raftMinTimeout=timeouts.election_min_s,
            raftMaxTimeout=timeouts.election_max_s,
            appendEntriesPeriod=timeouts.heartbeat_s,
            leaderFallbackTimeout=timeouts.leader_fallback_s,
            # pysyncobj drops a connection on which nothing was *read* for this
            # long, checked right before a send. Followers never talk to each
            # other, so with a short timeout the first vote request after a
            # leader dies found its connection "idle", was dropped, and every
            # failover took a second election round. Dead peers are found by
            # TCP keepalive instead (about 4 s), live idle ones stay connected.
            connectionTimeout=10.0,
            tcp_keepalive=(1, 1, 3),
            connectionRetryTime=0.3,
            commandsWaitLeader=False,
            commandsQueueSize=10_000,
            logCompactionMinEntries=snapshot_min_entries,
            logCompactionMinTime=3600,
            logCompactionSplit=False,
            dynamicMembershipChange=False,
            password=password or None,
            bindAddress=me.raft_address,
            onStateChanged=self._on_state_changed,
        )
        self._consumer = _MetadataConsumer(self, tail_max_records)
        dial = dial or (lambda address: address)
        others = [
            _DialedNode(v.raft_address, dial(v.raft_address))
            for v in voters
            if v.node_id != node_id
        ]
        raft_wire.install()  # Small messages without zlib's set-up cost.
        self._so = _GatedSyncObj(me.raft_address, others, conf=conf, consumers=[self._consumer])
        # Swap pysyncobj's journal for the crash-safe one on the same file.
        opened = self._so._SyncObj__raftLog
        opened.flush()
        opened._destroy()
        self._journal = raft_journal.DurableJournal(journal_path, fsync=fsync)
        self._so._SyncObj__raftLog = self._journal
        transport = self._so._SyncObj__transport
        transport.send = raft_journal.sync_before_acks(transport.send, self._journal)
        # pysyncobj runs tick callbacks after it has sent this tick's
        # AppendEntries and before it polls for the answers: the leader's own
        # sync then overlaps the followers' work instead of following it.
        self._so.addOnTickCallback(self._journal.sync_pending)
        # PreVote: an election whose timer ran out asks first (quorum.prevote).
        raft_view = _SyncObjRaft(self._so)
        self._prevote = PreVote(raft_view, timeouts.election_min_s)
        self._so.election_gate = self._prevote.allows_election
        deliver = self._so._SyncObj__onMessageReceived

        def on_message(node: Any, message: Any) -> None:
            if not self._prevote.on_message(node, message):
                deliver(node, message)

        transport.setOnMessageReceivedCallback(on_message)
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = PipeNotifier(self._so._poller)
        self._tick_interval_s = tick_interval_s
        self._timeouts = timeouts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"raft-{node_id}", daemon=True)
        self._was_leader = False
        self._term = 0
        # (raft index, next metadata offset after it), for mapping voters'
        # Raft positions to metadata offsets in quorum status.
        self._index_offsets: list[tuple[int, int]] = []
        self.commit_condition = threading.Condition()

    # -- MetadataLog ---------------------------------------------------------

    @property
    def state(self) -> MetadataState:
        return self._consumer.state

    def propose(self, payload: bytes, callback: ProposeCallback) -> None:
        def done(result: Any, error: int) -> None:
            if error == FAIL_REASON.SUCCESS:
                callback(result, None)
            elif error in _NOT_APPLIED:
                callback(None, ProposeOutcome.NOT_APPLIED)
            else:
                callback(None, ProposeOutcome.UNKNOWN)

        self._consumer.apply_batch(payload, callback=done)

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)
        try:
            self._wakeup.notify()
        except OSError:  # the pipe is full: the raft thread is awake anyway
            pass

    def term(self) -> int:
        return int(self._so.raftCurrentTerm)

    def is_leader(self) -> bool:
        return bool(self._so._isLeader())

    def leader_id(self) -> int | None:
        leader = self._so._getLeader()
        if leader is None:
            return None
        return self._address_to_id.get(
            str(leader.address) if hasattr(leader, "address") else str(leader)
        )

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self.call_soon(lambda: None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        self._so.destroy()
        raft_journal.reap_snapshot_child(self._so._SyncObj__serializer)

    def _run(self) -> None:
        slow_s = max(0.05, self._timeouts.heartbeat_s * 2)
        backlog = False
        listened = time.monotonic()  # when pysyncobj last read its peers
        while not self._stop.is_set():
            try:
                started = time.monotonic()
                # After a long iteration pysyncobj's tick would judge the leader lost
                # (a follower) or the followers gone (the leader's fallback) before it
                # read what came meanwhile: a leader does not count its own work
                # against its followers, and every node reads its messages first.
                stall = started - listened
                if stall > self._timeouts.heartbeat_s and self._so._isLeader():
                    self._so.discount_stall(stall)
                self._so._poller.poll(0)
                self._prevote.before_tick()
                busy = backlog or self._so.applying()
                self._so.doTick(0 if busy else self._tick_interval_s)
                listened = time.monotonic()
                # Before the next tick can count the leader towards a commit
                # (followers' entries are synced before they acknowledge them).
                self._journal.sync_pending()
                ticked = time.monotonic()
                backlog = self._drain_inbox(ticked + REQUESTS_BUDGET_S)
                self._check_leadership()
                drained = time.monotonic()
                if self.listener is not None:
                    self.listener.on_tick(drained)
                done = time.monotonic()
                if done - started > slow_s + self._tick_interval_s:
                    # Anything this slow delays heartbeats and risks an election.
                    log.warning(
                        "slow raft loop iteration: %.0f ms (raft %.0f, requests %.0f, tick %.0f)",
                        (done - started) * 1000,
                        (ticked - started) * 1000,
                        (drained - ticked) * 1000,
                        (done - drained) * 1000,
                    )
            except Exception:  # keep ticking: a bug here must not stop Raft
                log.exception("raft loop iteration failed")
                time.sleep(self._tick_interval_s)

    def _drain_inbox(self, deadline: float) -> bool:
        """Run what was handed to the raft thread until ``deadline``; True when some
        is left for the next iteration."""
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return False
            fn()
            if time.monotonic() >= deadline:
                return not self._inbox.empty()

    # -- callbacks from pysyncobj, on the raft thread -----------------------

    def _on_state_changed(self, old: int, new: int) -> None:
        # pysyncobj calls this before it has finished becoming leader; the
        # loop checks leadership after each tick instead (_check_leadership).
        return None

    def _check_leadership(self) -> None:
        leader = self.is_leader()
        term = self.term()
        if leader != self._was_leader or (leader and term != self._term):
            self._was_leader = leader
            self._term = term
            log.info("node %d %s in term %d", self.node_id, "leads" if leader else "follows", term)
            if self.listener is not None:
                self.listener.on_leadership_change(leader, term)

    def _on_apply(self, result: BatchResult) -> None:
        raft_index = int(self._so.raftLastApplied) + 1
        self._index_offsets.append((raft_index, self.state.next_offset))
        if len(self._index_offsets) > 20_000:
            del self._index_offsets[:10_000]
        if self.listener is not None:
            # pysyncobj retries an entry whose apply raised, forever: a bug in a
            # listener must cost a log line, never the state machine.
            try:
                self.listener.on_commit(result, self.state)
            except Exception:
                log.exception("commit listener failed at offset %d", self.state.next_offset)
        with self.commit_condition:
            self.commit_condition.notify_all()

    def _on_snapshot_loaded(self) -> None:
        self._index_offsets.clear()
        if self.listener is not None:
            try:
                self.listener.on_snapshot_loaded(self.state)
            except Exception:
                log.exception("snapshot listener failed")
        with self.commit_condition:
            self.commit_condition.notify_all()

    # -- status ----------------------------------------------------------------

    def offset_at_raft_index(self, raft_index: int) -> int:
        """The metadata log end offset once ``raft_index`` is applied (best known)."""
        pairs = self._index_offsets
        if not pairs:
            return self.state.next_offset
        pos = bisect.bisect_right(pairs, (raft_index, 1 << 62)) - 1
        if pos < 0:
            return pairs[0][1]
        return pairs[pos][1]

    def voter_status(self) -> dict[int, dict[str, Any]]:
        """Per voter: Raft match index and last response time (leader only)."""
        status = self._so.getStatus()
        out: dict[int, dict[str, Any]] = {}
        response_times = getattr(self._so, "_SyncObj__lastResponseTime", {})
        for node in self._so.otherNodes:
            node_id = self._address_to_id.get(node.address)
            if node_id is None:
                continue
            match = status.get(f"match_idx_server_{node.id}", 0)
            last = response_times.get(node)
            out[node_id] = {
                "match_index": int(match or 0),
                # pysyncobj's clock is CLOCK_MONOTONIC_RAW, not time.monotonic.
                "last_response_age_s": None if last is None else raft_monotonic() - last,
                "connected": status.get(f"partner_node_status_server_{node.id}") == 2,
            }
        return out

    def raft_status(self) -> dict[str, Any]:
        return dict(self._so.getStatus())
