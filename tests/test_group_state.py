"""The classic group state machine: scenarios told through a harness, then a simulation.

The harness plays the network layer: it passes each request with a fresh
token, collects the replies the group returns (now or later) and fails if a
token is answered twice. Time moves only when a test advances it.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.group import (
    ClassicGroup,
    GroupConfig,
    GroupError,
    GroupState,
    HeartbeatRequest,
    JoinGroupRequest,
    JoinGroupResponse,
    LeaveGroupRequest,
    LeaveGroupResponse,
    MemberIdentity,
    SyncGroupRequest,
    SyncGroupResponse,
)
from broker.group.messages import GroupResponse, GroupWrite, StoredGroup

E = GroupError
S = GroupState
SESSION_MS = 10_000
REBALANCE_MS = 30_000
RANGE = (("range", b"subscription: orders"),)


class Harness:
    """One group, a clock, and every answer it gave, by request token.

    The group's writes to ``__consumer_offsets`` are kept in ``writes`` and stored at
    once, unless ``hold_writes`` is set: then they wait in ``held`` for ``store``.
    """

    def __init__(self, **config: int) -> None:
        config.setdefault("initial_rebalance_delay_ms", 0)
        uuids = itertools.count(1)
        self.group = ClassicGroup("orders-app", GroupConfig(**config), lambda: str(next(uuids)))
        self.now = 0
        self.answers: dict[str, GroupResponse] = {}
        self._tokens = itertools.count(1)
        self.writes: list[GroupWrite] = []
        self.hold_writes = False
        self.held: list[GroupWrite] = []

    def _collect(self, replies) -> None:
        for reply in replies:
            assert reply.reply_to not in self.answers, f"{reply.reply_to} answered twice"
            self.answers[reply.reply_to] = reply.response
        for write in self.group.take_writes():
            self.writes.append(write)
            if self.hold_writes:
                self.held.append(write)
            else:
                self._collect(self.group.stored(write.write_id, E.NONE, self.now))

    def store(self, error: GroupError = GroupError.NONE) -> None:
        """The held writes are stored (or fail with ``error``), in order."""
        held, self.held = self.held, []
        for write in held:
            self._collect(self.group.stored(write.write_id, error, self.now))

    def join(
        self,
        member_id: str = "",
        client: str = "c",
        instance: str | None = None,
        protocols=RANGE,
        session_ms: int = SESSION_MS,
        rebalance_ms: int = REBALANCE_MS,
        protocol_type: str = "consumer",
    ) -> str:
        token = f"join-{next(self._tokens)}"
        request = JoinGroupRequest(
            member_id, instance, client, protocol_type, protocols, session_ms, rebalance_ms
        )
        self._collect(self.group.join(request, self.now, token))
        return token

    def new_member(self, client: str, **kw) -> tuple[str, str]:
        """The KIP-394 round trip; returns the member id and the token of the join that counts."""
        first = self.join_answer(self.join(client=client, **kw))
        assert first.error is E.MEMBER_ID_REQUIRED
        return first.member_id, self.join(first.member_id, client=client, **kw)

    def sync(
        self,
        member_id: str,
        generation: int | None = None,
        assignments: dict[str, bytes] | None = None,
        instance: str | None = None,
        protocol_name: str | None = None,
    ) -> str:
        token = f"sync-{next(self._tokens)}"
        request = SyncGroupRequest(
            member_id,
            self.group.generation_id if generation is None else generation,
            instance,
            protocol_name=protocol_name,
            assignments=tuple((assignments or {}).items()),
        )
        self._collect(self.group.sync(request, self.now, token))
        return token

    def heartbeat(self, member_id: str, generation: int | None = None, instance=None) -> E:
        gen = self.group.generation_id if generation is None else generation
        return self.group.heartbeat(HeartbeatRequest(member_id, gen, instance), self.now).error

    def leave(self, *identities: MemberIdentity | str) -> LeaveGroupResponse:
        token = f"leave-{next(self._tokens)}"
        members = tuple(
            i if isinstance(i, MemberIdentity) else MemberIdentity(i) for i in identities
        )
        self._collect(self.group.leave(LeaveGroupRequest(members), self.now, token))
        response = self.answers[token]
        assert isinstance(response, LeaveGroupResponse)
        return response

    def unload(self) -> None:
        self._collect(self.group.unload())

    def advance(self, ms: int) -> None:
        self.now += ms
        self._collect(self.group.tick(self.now))

    def join_answer(self, token: str) -> JoinGroupResponse:
        response = self.answers[token]
        assert isinstance(response, JoinGroupResponse)
        return response

    def sync_answer(self, token: str) -> SyncGroupResponse:
        response = self.answers[token]
        assert isinstance(response, SyncGroupResponse)
        return response

    def parked(self, *tokens: str) -> bool:
        return all(t not in self.answers for t in tokens)

    def show(self) -> str:
        g = self.group
        return f"{g.state} gen={g.generation_id} leader={g.leader_id} members={list(g.member_ids)}"

    def complete_sync(self, joins: dict[str, str]) -> None:
        """Every member syncs; the leader assigns b'<member id>' to each member."""
        leader = self.group.leader_id
        generation = self.group.generation_id
        for member_id in joins:
            if member_id != leader:
                self.sync(member_id, generation)
        assignments = {m: m.encode() for m in self.group.member_ids}
        self.sync(leader or "", generation, assignments)

    def joined_group(self, *clients: str, **kw) -> dict[str, str]:
        """Clients join together: all get their member ids first, so one join phase holds all.

        Returns the token of each member's join, by member id.
        """
        ids = [(c, self.join_answer(self.join(client=c, **kw)).member_id) for c in clients]
        return {member_id: self.join(member_id, client=c, **kw) for c, member_id in ids}

    def stable_group(self, *clients: str, **kw) -> list[str]:
        joins = self.joined_group(*clients, **kw)
        self.complete_sync(joins)
        assert self.group.state is S.STABLE
        return list(joins)

    def group_with_static_member(self, session_ms: int = SESSION_MS) -> tuple[str, str]:
        """A Stable generation 2 of c1-1 (dynamic, the leader) and a static member (i1)."""
        (c1,) = self.stable_group("c1", session_ms=session_ms)
        js = self.join(client="app", instance="i1")  # static: no MEMBER_ID_REQUIRED round trip
        j1 = self.join(c1, client="c1", session_ms=session_ms)
        static_id = self.join_answer(js).member_id
        self.complete_sync({c1: j1, static_id: js})
        assert self.show() == f"Stable gen=2 leader=c1-1 members=['c1-1', '{static_id}']"
        return c1, static_id


# ---- joining, syncing, the happy path


def test_three_members_join_sync_and_become_stable():
    h = Harness()
    first = h.join_answer(h.join(client="c1"))
    assert (first.error, first.member_id) == (E.MEMBER_ID_REQUIRED, "c1-1")
    assert h.show() == "Empty gen=0 leader=None members=[]"  # pending members are not members
    c2, c3 = (h.join_answer(h.join(client=c)).member_id for c in ("c2", "c3"))
    j1 = h.join("c1-1", client="c1")
    # c2 and c3 hold a member id but have not come back: the join phase waits for them.
    assert h.show() == "PreparingRebalance gen=0 leader=c1-1 members=['c1-1']"
    j2, j3 = h.join(c2, client="c2"), h.join(c3, client="c3")
    assert h.show() == "CompletingRebalance gen=1 leader=c1-1 members=['c1-1', 'c2-2', 'c3-3']"

    leader, follower = h.join_answer(j1), h.join_answer(j2)
    assert (leader.generation_id, leader.protocol_name, leader.leader_id) == (1, "range", "c1-1")
    assert [(m.member_id, m.metadata) for m in leader.members] == [
        (m, b"subscription: orders") for m in ("c1-1", "c2-2", "c3-3")
    ]
    assert follower.members == () and h.join_answer(j3).leader_id == "c1-1"

    s2, s3 = h.sync(c2), h.sync(c3)
    assert h.parked(s2, s3)  # followers wait for the leader's assignment
    s1 = h.sync("c1-1", assignments={"c1-1": b"p0", c2: b"p1"})  # c3 left out: b""
    assert h.show() == "Stable gen=1 leader=c1-1 members=['c1-1', 'c2-2', 'c3-3']"
    assert [h.sync_answer(t).assignment for t in (s1, s2, s3)] == [b"p0", b"p1", b""]
    assert h.sync_answer(s1).protocol_name == "range"
    assert [h.heartbeat(m) for m in ("c1-1", c2, c3)] == [E.NONE] * 3
    assert [m.assignment for m in h.group.describe().members] == [b"p0", b"p1", b""]


def test_a_late_sync_in_a_stable_group_gets_the_assignment_at_once():
    h = Harness()
    joins = h.joined_group("c1", "c2")
    h.sync("c1-1", assignments={"c1-1": b"a", "c2-2": b"b"})
    assert h.group.state is S.STABLE
    assert h.sync_answer(h.sync("c2-2")).assignment == b"b"
    assert set(joins) == {"c1-1", "c2-2"}


def test_the_first_join_phase_waits_for_more_members_and_each_new_one_extends_it():
    h = Harness(initial_rebalance_delay_ms=3_000)
    _, j1 = h.new_member("c1")
    assert h.group.next_deadline_ms() == 3_000
    h.advance(2_000)
    _, j2 = h.new_member("c2")
    h.advance(1_000)  # the first delay is over, but c2 came: wait another 3 s
    assert h.parked(j1, j2) and h.group.next_deadline_ms() == 6_000
    h.advance(3_000)
    assert h.show() == "CompletingRebalance gen=1 leader=c1-1 members=['c1-1', 'c2-2']"
    assert h.join_answer(j2).generation_id == 1


def test_the_protocol_is_the_one_most_members_prefer_among_those_all_support():
    h = Harness()
    both = (("roundrobin", b"rr"), ("range", b"r"))
    j1 = h.joined_group("c1", protocols=(("range", b"r"), ("roundrobin", b"rr"), ("x", b"")))
    h.advance(1)
    h.joined_group("c2", "c3", protocols=both)
    h.join("c1-1", client="c1", protocols=(("range", b"r"), ("roundrobin", b"rr")))
    assert h.group.state is S.COMPLETING_REBALANCE
    assert h.group.protocol_name == "roundrobin"  # two votes against one
    leader = h.join_answer(j1["c1-1"])
    assert leader.protocol_name == "range"  # generation 1 had c1 alone
    d = h.group.describe()
    assert [m.metadata for m in d.members] == [b"rr", b"rr", b"rr"]


@pytest.mark.parametrize(
    "protocol_type, protocols",
    [("consumer", (("sticky", b""),)), ("connect", RANGE)],
    ids=["no common protocol", "another protocol type"],
)
def test_a_member_that_cannot_agree_on_a_protocol_is_refused(protocol_type, protocols):
    h = Harness()
    h.stable_group("c1")
    token = h.join(client="c2", protocols=protocols, protocol_type=protocol_type)
    assert h.join_answer(token).error is E.INCONSISTENT_GROUP_PROTOCOL
    assert h.group.state is S.STABLE


def test_session_timeouts_outside_the_brokers_bounds_are_refused():
    h = Harness(min_session_timeout_ms=6_000, max_session_timeout_ms=60_000)
    assert h.join_answer(h.join(session_ms=5_999)).error is E.INVALID_SESSION_TIMEOUT
    assert h.join_answer(h.join(session_ms=60_001)).error is E.INVALID_SESSION_TIMEOUT


def test_a_full_group_refuses_new_members_but_not_its_own():
    h = Harness(max_size=2)
    members = h.stable_group("c1", "c2")
    assert h.join_answer(h.join(client="c3")).error is E.GROUP_MAX_SIZE_REACHED
    assert h.join_answer(h.join(members[1], client="c2")).error is E.NONE


# ---- rebalances


def test_a_member_joining_a_stable_group_makes_the_old_generation_rejoin():
    h = Harness()
    c1, c2, c3 = h.stable_group("c1", "c2", "c3")
    c4, j4 = h.new_member("c4")
    assert (
        h.show() == "PreparingRebalance gen=1 leader=c1-1 members=['c1-1', 'c2-2', 'c3-3', 'c4-4']"
    )
    assert h.heartbeat(c1, 1) is E.REBALANCE_IN_PROGRESS
    assert h.sync_answer(h.sync(c2, 1)).error is E.REBALANCE_IN_PROGRESS
    assert h.group.commit_allowed(c3, 1, h.now) is None  # commits go on while members rejoin
    joins = {c4: j4} | {m: h.join(m, client=m[:2]) for m in (c1, c2, c3)}
    assert (
        h.show() == "CompletingRebalance gen=2 leader=c1-1 members=['c1-1', 'c2-2', 'c3-3', 'c4-4']"
    )
    assert {h.join_answer(t).generation_id for t in joins.values()} == {2}
    assert h.heartbeat(c2, 1) is E.ILLEGAL_GENERATION
    assert h.sync_answer(h.sync(c2, 1)).error is E.ILLEGAL_GENERATION
    assert h.group.commit_allowed(c2, 1, h.now) is E.ILLEGAL_GENERATION
    assert h.group.commit_allowed(c2, 2, h.now) is E.REBALANCE_IN_PROGRESS  # not synced yet
    h.complete_sync(joins)
    assert h.group.commit_allowed(c2, 2, h.now) is None


def test_a_follower_rejoining_with_the_same_metadata_stays_in_its_generation():
    h = Harness()
    c1, c2 = h.stable_group("c1", "c2")
    answer = h.join_answer(h.join(c2, client="c2"))
    assert (answer.error, answer.generation_id, answer.members) == (E.NONE, 1, ())
    assert h.group.state is S.STABLE


def test_the_leader_rejoining_or_a_member_changing_its_subscription_rebalances():
    h = Harness()
    c1, c2 = h.stable_group("c1", "c2")
    assert h.parked(h.join(c1, client="c1"))
    assert h.group.state is S.PREPARING_REBALANCE
    h = Harness()
    c1, c2 = h.stable_group("c1", "c2")
    assert h.parked(h.join(c2, client="c2", protocols=(("range", b"subscription: new"),)))
    assert h.group.state is S.PREPARING_REBALANCE


def test_session_expiry_removes_the_member_and_rebalances():
    h = Harness()
    c1, c2, c3 = h.stable_group("c1", "c2", "c3")
    h.advance(6_000)
    assert h.heartbeat(c1) is E.NONE and h.heartbeat(c3) is E.NONE
    assert h.group.next_deadline_ms() == SESSION_MS  # c2's session
    h.advance(4_000)
    assert h.show() == "PreparingRebalance gen=1 leader=c1-1 members=['c1-1', 'c3-3']"
    assert h.heartbeat(c2) is E.UNKNOWN_MEMBER_ID
    joins = {m: h.join(m, client=m[:2]) for m in (c1, c3)}
    assert h.show() == "CompletingRebalance gen=2 leader=c1-1 members=['c1-1', 'c3-3']"
    h.complete_sync(joins)


def test_the_rebalance_timeout_removes_members_that_did_not_rejoin():
    h = Harness()
    c1, c2, c3 = h.stable_group("c1", "c2", "c3")
    c4, j4 = h.new_member("c4")
    j1, j2 = h.join(c1, client="c1"), h.join(c2, client="c2")
    for _ in range(5):  # c3 heartbeats (so its session lives) but never rejoins
        h.advance(5_000)
        assert h.heartbeat(c3, 1) is E.REBALANCE_IN_PROGRESS
    assert h.parked(j1, j2, j4)
    h.advance(5_000)  # 30 s after the rebalance began
    assert h.show() == "CompletingRebalance gen=2 leader=c1-1 members=['c1-1', 'c2-2', 'c4-4']"
    assert h.heartbeat(c3, 1) is E.UNKNOWN_MEMBER_ID
    assert [m.member_id for m in h.join_answer(j1).members] == [c1, c2, c4]


def test_a_new_leader_is_elected_when_the_leader_does_not_rejoin():
    h = Harness()
    c1, c2 = h.stable_group("c1", "c2")
    j2 = h.join(c2, client="c2", protocols=(("range", b"subscription: new"),))
    h.advance(REBALANCE_MS)
    assert h.show() == "CompletingRebalance gen=2 leader=c2-2 members=['c2-2']"
    assert h.join_answer(j2).members[0].metadata == b"subscription: new"


def test_leaving_rebalances_and_the_last_member_leaving_empties_the_group():
    h = Harness()
    c1, c2, c3 = h.stable_group("c1", "c2", "c3")
    response = h.leave(c2)
    assert [r.error for r in response.members] == [E.NONE]
    assert h.group.state is S.PREPARING_REBALANCE
    joins = {m: h.join(m, client=m[:2]) for m in (c1, c3)}
    assert h.group.generation_id == 2
    h.complete_sync(joins)
    assert [r.error for r in h.leave(c1, "nobody").members] == [E.NONE, E.UNKNOWN_MEMBER_ID]
    j3 = h.join(c3, client="c3")
    assert h.group.leader_id == c3 and h.group.generation_id == 3
    h.complete_sync({c3: j3})
    h.leave(c3)
    assert h.show() == "Empty gen=4 leader=None members=[]"
    assert h.group.protocol_name is None


def test_a_member_that_never_syncs_is_removed_one_rebalance_timeout_after_the_join():
    h = Harness()
    c1, c2 = h.joined_group("c1", "c2")
    h.sync(c1, assignments={c1: b"a", c2: b"b"})
    assert h.group.state is S.STABLE
    for _ in range(6):  # both heartbeat; heartbeats do not count as a sync
        h.advance(4_999)
        assert h.heartbeat(c1) is E.NONE and h.heartbeat(c2) is E.NONE
    assert h.now == REBALANCE_MS - 6
    h.advance(6)
    assert h.show() == "PreparingRebalance gen=1 leader=c1-1 members=['c1-1']"


def test_a_leader_that_dies_before_syncing_sends_the_followers_back_to_join():
    h = Harness()
    c1, c2 = h.joined_group("c1", "c2")
    s2 = h.sync(c2)
    h.advance(SESSION_MS)  # c1 neither syncs nor heartbeats; c2 waits for it, so cannot expire
    assert h.sync_answer(s2).error is E.REBALANCE_IN_PROGRESS
    assert h.show() == "PreparingRebalance gen=1 leader=c2-2 members=['c2-2']"


def test_a_join_sent_again_while_one_is_parked_answers_the_first():
    h = Harness()
    c1, c2 = h.stable_group("c1", "c2")
    first = h.join(c1, client="c1")
    second = h.join(c1, client="c1")
    assert h.join_answer(first).error is E.REBALANCE_IN_PROGRESS and h.parked(second)


# ---- KIP-394 pending members


def test_a_pending_member_that_never_comes_back_expires_and_stops_blocking_the_join():
    h = Harness()
    c1, c2 = h.stable_group("c1", "c2")
    ghost = h.join_answer(h.join(client="c3")).member_id
    joins = {m: h.join(m, client=m[:2]) for m in (c1, c2)}
    assert h.group.state is S.PREPARING_REBALANCE  # the leader rejoined
    assert h.parked(*joins.values())  # ...and the pending member blocks the phase
    h.advance(SESSION_MS)
    assert h.group.generation_id == 2 and h.group.member_ids == (c1, c2)
    assert h.join_answer(h.join(ghost, client="c3")).error is E.UNKNOWN_MEMBER_ID


def test_a_pending_member_can_leave():
    h = Harness()
    ghost = h.join_answer(h.join(client="c1")).member_id
    assert [r.error for r in h.leave(ghost).members] == [E.NONE]
    assert h.group.next_deadline_ms() is None


# ---- static membership


def test_static_member_restart_keeps_generation_assignment_and_fences_the_old_incarnation():
    h = Harness()
    c1, old_id = h.group_with_static_member()
    assert old_id == "i1-2"  # instance id + "-" + uuid
    h.advance(SESSION_MS - 1_000)
    assert h.heartbeat(c1) is E.NONE

    js2 = h.join(client="app", instance="i1")  # restarted: no member id
    restarted = h.join_answer(js2)
    assert (restarted.error, restarted.generation_id, restarted.leader_id) == (E.NONE, 2, c1)
    new_id = restarted.member_id
    assert h.show() == f"Stable gen=2 leader=c1-1 members=['c1-1', '{new_id}']"
    assert h.sync_answer(h.sync(new_id, instance="i1")).assignment == old_id.encode()
    assert h.heartbeat(old_id, instance="i1") is E.FENCED_INSTANCE_ID
    assert h.sync_answer(h.sync(old_id, instance="i1")).error is E.FENCED_INSTANCE_ID
    assert h.group.commit_allowed(old_id, 2, h.now, "i1") is E.FENCED_INSTANCE_ID
    h.advance(2_000)  # the old session's deadline has passed: nothing happens
    assert h.group.state is S.STABLE and h.heartbeat(new_id, instance="i1") is E.NONE


def test_a_restarted_static_leader_is_not_told_it_leads_a_stable_group():
    h = Harness()
    js = h.join(client="app", instance="i1")
    old_id = h.join_answer(js).member_id
    h.sync(old_id, assignments={old_id: b"all"})
    restarted = h.join_answer(h.join(client="app", instance="i1"))
    assert restarted.leader_id == old_id != restarted.member_id
    assert h.group.leader_id == restarted.member_id and h.group.generation_id == 1


def test_a_static_member_restarting_with_a_new_subscription_rebalances():
    h = Harness()
    h.group_with_static_member()
    js2 = h.join(client="app", instance="i1", protocols=(("range", b"subscription: new"),))
    assert h.parked(js2) and h.group.state is S.PREPARING_REBALANCE


def test_a_static_member_that_does_not_rejoin_is_kept_until_its_session_expires():
    h = Harness()
    c1, static_id = h.group_with_static_member(session_ms=60_000)
    h.join(c1, client="c1", session_ms=60_000)  # the leader asks for a rebalance
    for _ in range(6):  # the static member heartbeats but is too busy to rejoin
        h.advance(REBALANCE_MS // 6)
        assert h.heartbeat(static_id, 2, "i1") in (E.REBALANCE_IN_PROGRESS, E.ILLEGAL_GENERATION)
    assert h.show() == f"CompletingRebalance gen=3 leader=c1-1 members=['c1-1', '{static_id}']"
    h.sync(c1, assignments={c1: b"a"})
    h.advance(SESSION_MS)  # its session restarted when the join phase ended; now it is over
    assert h.group.member_ids == (c1,)


def test_static_members_can_be_removed_by_instance_id():
    h = Harness()
    js = h.join(client="app", instance="i1")
    static_id = h.join_answer(js).member_id
    response = h.leave(MemberIdentity("", "i1"), MemberIdentity("", "i2"))
    assert [r.error for r in response.members] == [E.NONE, E.UNKNOWN_MEMBER_ID]
    assert h.group.state is S.EMPTY and static_id not in h.group.member_ids


def test_leave_with_a_stale_member_id_of_a_static_member_is_fenced():
    h = Harness()
    old_id = h.join_answer(h.join(client="app", instance="i1")).member_id
    h.sync(old_id, assignments={})
    h.join(client="app", instance="i1")
    assert [r.error for r in h.leave(MemberIdentity(old_id, "i1")).members] == [
        E.FENCED_INSTANCE_ID
    ]


# ---- offsets, describe, delete, unload


@pytest.mark.parametrize(
    "member, generation, instance, expected",
    [
        ("c1-1", 2, None, None),
        ("i1-2", 2, "i1", None),
        ("c1-1", 1, None, E.ILLEGAL_GENERATION),  # an old generation
        ("c1-1", 3, None, E.ILLEGAL_GENERATION),
        ("c9-9", 2, None, E.UNKNOWN_MEMBER_ID),
        ("", -1, None, E.UNKNOWN_MEMBER_ID),  # a simple consumer, but the group has members
        ("", -1, "i1", E.FENCED_INSTANCE_ID),
    ],
)
def test_commit_validation_in_a_stable_group(member, generation, instance, expected):
    h = Harness()
    assert h.group_with_static_member() == ("c1-1", "i1-2")
    assert h.group.commit_allowed(member, generation, h.now, instance) is expected


def test_a_simple_consumer_commits_only_while_the_group_is_empty():
    h = Harness()
    assert h.group.commit_allowed("", -1, h.now) is None
    assert h.group.commit_allowed("c1-1", -1, h.now) is E.UNKNOWN_MEMBER_ID
    h.stable_group("c1")
    assert h.group.commit_allowed("", -1, h.now) is E.UNKNOWN_MEMBER_ID


def test_an_allowed_commit_keeps_the_session_alive():
    h = Harness()
    c1, c2 = h.stable_group("c1", "c2")
    for _ in range(3):
        h.advance(6_000)
        assert h.heartbeat(c1) is E.NONE and h.group.commit_allowed(c2, 1, h.now) is None
    assert h.group.state is S.STABLE


def test_describe_shows_state_protocol_leader_and_members():
    h = Harness()
    h.stable_group("c1", "c2")
    d = h.group.describe()
    assert (d.group_id, d.state, d.protocol_type, d.protocol_name) == (
        "orders-app",
        S.STABLE,
        "consumer",
        "range",
    )
    assert (d.generation_id, d.leader_id) == (1, "c1-1")
    assert [(m.member_id, m.client_id, m.metadata, m.assignment) for m in d.members] == [
        ("c1-1", "c1", b"subscription: orders", b"c1-1"),
        ("c2-2", "c2", b"subscription: orders", b"c2-2"),
    ]


def test_only_an_empty_group_can_be_deleted_and_a_dead_group_answers_nothing_else():
    h = Harness()
    (c1,) = h.stable_group("c1")
    assert h.group.delete() is E.NON_EMPTY_GROUP
    h.leave(c1)
    assert h.group.delete() is E.NONE and h.group.state is S.DEAD
    assert h.group.delete() is E.GROUP_ID_NOT_FOUND
    assert h.join_answer(h.join()).error is E.COORDINATOR_NOT_AVAILABLE
    assert h.heartbeat(c1) is E.COORDINATOR_NOT_AVAILABLE
    assert h.group.commit_allowed("", -1, h.now) is E.COORDINATOR_NOT_AVAILABLE


def test_unloading_answers_every_parked_request_with_not_coordinator():
    h = Harness()
    c1, c2 = h.joined_group("c1", "c2")
    s2 = h.sync(c2)
    # The leader rejoins with a new subscription: c2's sync is answered, j3 parks.
    j3 = h.join(c1, client="c1", protocols=(("range", b"subscription: new"),))
    assert h.sync_answer(s2).error is E.REBALANCE_IN_PROGRESS
    h.unload()
    assert h.join_answer(j3).error is E.NOT_COORDINATOR
    assert h.group.state is S.DEAD and h.group.next_deadline_ms() is None


@pytest.mark.parametrize(
    "generation, member, instance, expected",
    [
        (1, "c1-1", None, E.NONE),
        (0, "c1-1", None, E.ILLEGAL_GENERATION),
        (1, "nobody", None, E.UNKNOWN_MEMBER_ID),
        (1, "c1-1", "unknown-instance", E.NONE),  # an unknown instance id fences nobody
    ],
)
def test_heartbeat_answers(generation, member, instance, expected):
    h = Harness()
    h.stable_group("c1")
    assert h.heartbeat(member, generation, instance) is expected


# ---- stored group metadata: writes, their outcome, and a group loaded by a new coordinator


def test_the_generation_is_stored_before_any_member_gets_its_assignment():
    h = Harness()
    h.hold_writes = True
    c1, c2 = h.joined_group("c1", "c2")
    s2 = h.sync(c2)
    s1 = h.sync(c1, assignments={c1: b"p0", c2: b"p1", "stranger": b"x"})
    # Kafka's doSyncGroup: the group stays CompletingRebalance until the write is stored.
    assert h.parked(s1, s2) and h.group.state is S.COMPLETING_REBALANCE
    (write,) = h.held
    stored = write.group
    assert stored is not None
    assert (stored.protocol_type, stored.generation_id, stored.protocol_name) == (
        "consumer",
        1,
        "range",
    )
    assert stored.leader_id == c1
    assert [(m.member_id, m.client_id, m.subscription, m.assignment) for m in stored.members] == [
        (c1, "c1", b"subscription: orders", b"p0"),
        (c2, "c2", b"subscription: orders", b"p1"),
    ]
    assert [(m.session_timeout_ms, m.rebalance_timeout_ms) for m in stored.members] == [
        (SESSION_MS, REBALANCE_MS)
    ] * 2
    # The leader sending its SyncGroup again does not write again.
    s1_again = h.sync(c1, assignments={c1: b"p0", c2: b"p1"})
    assert h.sync_answer(s1).error is E.REBALANCE_IN_PROGRESS and h.parked(s1_again)
    assert len(h.held) == 1
    assert h.heartbeat(c1) is E.NONE  # members waiting for the write keep their session
    assert h.group.commit_allowed(c2, 1, h.now) is E.REBALANCE_IN_PROGRESS
    h.store()
    assert h.group.state is S.STABLE
    assert [h.sync_answer(t).assignment for t in (s1_again, s2)] == [b"p0", b"p1"]


def test_a_failed_write_sends_its_error_to_every_waiting_sync_and_the_group_rebalances():
    h = Harness()
    h.hold_writes = True
    c1, c2 = h.joined_group("c1", "c2")
    s2 = h.sync(c2)
    s1 = h.sync(c1, assignments={c1: b"p0", c2: b"p1"})
    h.advance(1_000)
    h.store(E.NOT_COORDINATOR)
    assert [h.sync_answer(t).error for t in (s1, s2)] == [E.NOT_COORDINATOR] * 2
    assert h.show() == "PreparingRebalance gen=1 leader=c1-1 members=['c1-1', 'c2-2']"
    assert [m.assignment for m in h.group.describe().members] == [b"", b""]
    assert h.heartbeat(c1) is E.REBALANCE_IN_PROGRESS
    # The members rejoin (as the client does after NOT_COORDINATOR) and the next write works.
    h.hold_writes = False
    joins = {m: h.join(m, client=m[:2]) for m in (c1, c2)}
    h.complete_sync(joins)
    assert h.show() == "Stable gen=2 leader=c1-1 members=['c1-1', 'c2-2']"
    assert [w.group.generation_id for w in h.writes if w.group] == [1, 2]


def test_a_write_that_the_group_moved_past_is_ignored():
    h = Harness()
    h.hold_writes = True
    c1, c2 = h.joined_group("c1", "c2")
    s1 = h.sync(c1, assignments={c1: b"p0", c2: b"p1"})
    h.new_member("c3")  # a rebalance starts while the write is in flight
    assert h.sync_answer(s1).error is E.REBALANCE_IN_PROGRESS
    h.store()
    assert h.group.state is S.PREPARING_REBALANCE


def test_a_group_that_becomes_empty_writes_a_tombstone():
    h = Harness()
    (c1,) = h.stable_group("c1")
    assert [w.group is None for w in h.writes] == [False]
    h.leave(c1)
    assert h.group.state is S.EMPTY
    assert [w.group is None for w in h.writes] == [False, True]
    # A group that never stored anything has nothing to delete.
    h = Harness()
    h.leave(h.join_answer(h.join()).member_id)  # a pending member leaves
    h.join("c-9")
    assert h.writes == []


def _loaded(h: Harness) -> Harness:
    """A new coordinator's view of ``h``'s group: loaded from its last write, at a
    later time of its own."""
    stored = h.writes[-1].group
    assert stored is not None
    later = Harness()
    later.now = h.now + 123_456
    later.group = ClassicGroup.loaded("orders-app", stored, later.now, GroupConfig())
    return later


def test_a_loaded_group_carries_on_in_its_generation_with_its_members():
    h = Harness()
    c1, static_id = h.group_with_static_member()
    before = h.group.describe()
    loaded = _loaded(h)
    g = loaded.group
    assert loaded.show() == f"Stable gen=2 leader=c1-1 members=['c1-1', '{static_id}']"
    after = g.describe()
    assert [
        (m.member_id, m.group_instance_id, m.assignment, m.metadata) for m in after.members
    ] == [(m.member_id, m.group_instance_id, m.assignment, m.metadata) for m in before.members]
    assert (after.protocol_type, after.protocol_name) == ("consumer", "range")
    # Heartbeats and commits with the stored generation are accepted; older ones are not.
    assert loaded.heartbeat(c1, 2) is E.NONE
    assert loaded.heartbeat(static_id, 2, "i1") is E.NONE
    assert g.commit_allowed(c1, 2, loaded.now) is None
    assert g.commit_allowed(static_id, 2, loaded.now, "i1") is None
    assert g.commit_allowed(c1, 1, loaded.now) is E.ILLEGAL_GENERATION
    assert loaded.heartbeat("c9-9", 2) is E.UNKNOWN_MEMBER_ID
    # The static member's instance id still names it: another member id is fenced.
    assert loaded.heartbeat("i1-old", 2, "i1") is E.FENCED_INSTANCE_ID
    # A member that lost its SyncGroup answer gets its assignment again.
    assert loaded.sync_answer(loaded.sync(static_id, 2, instance="i1")).assignment == (
        static_id.encode()
    )
    assert g.state is S.STABLE and g.generation_id == 2


def test_members_missing_after_the_load_expire_after_their_session_and_it_rebalances():
    h = Harness()
    c1, c2, c3 = h.stable_group("c1", "c2", "c3")
    loaded = _loaded(h)
    assert loaded.group.next_deadline_ms() == loaded.now + SESSION_MS  # fresh sessions
    for _ in range(3):  # c1 and c2 heartbeat to the new coordinator; c3 is gone
        loaded.advance(SESSION_MS // 3)
        assert loaded.group.state is S.STABLE
        assert loaded.heartbeat(c1) is E.NONE and loaded.heartbeat(c2) is E.NONE
    loaded.advance(1)
    assert loaded.show() == "PreparingRebalance gen=1 leader=c1-1 members=['c1-1', 'c2-2']"
    assert loaded.heartbeat(c1) is E.REBALANCE_IN_PROGRESS
    # The survivors rejoin: the loaded members support the stored protocol only, so
    # the group agrees on it again.
    joins = {m: loaded.join(m, client=m[:2]) for m in (c1, c2)}
    assert loaded.show() == "CompletingRebalance gen=2 leader=c1-1 members=['c1-1', 'c2-2']"
    loaded.complete_sync(joins)
    assert loaded.group.state is S.STABLE and loaded.writes[-1].group is not None


def test_a_loaded_group_without_members_is_empty_in_its_generation():
    stored = StoredGroup("consumer", 7, None, None, ())
    group = ClassicGroup.loaded("orders-app", stored, 0)
    assert (group.state, group.generation_id, group.member_ids) == (S.EMPTY, 7, ())
    assert group.commit_allowed("", -1, 0) is None


def test_a_restarted_static_member_is_answered_once_its_new_member_id_is_stored():
    h = Harness()
    c1, old_id = h.group_with_static_member()
    h.hold_writes = True
    js = h.join(client="app", instance="i1")
    assert h.parked(js)
    (write,) = h.held
    assert write.group is not None
    assert [m.member_id for m in write.group.members] == [c1, "i1-3"]
    assert [m.assignment for m in write.group.members] == [c1.encode(), old_id.encode()]
    h.store()
    restarted = h.join_answer(js)
    assert (restarted.error, restarted.member_id, restarted.leader_id) == (E.NONE, "i1-3", c1)


def test_a_static_member_whose_new_member_id_was_not_stored_is_reverted():
    h = Harness()
    c1, old_id = h.group_with_static_member()
    h.hold_writes = True
    js = h.join(client="app", instance="i1")
    assert h.heartbeat(old_id, instance="i1") is E.FENCED_INSTANCE_ID  # replaced meanwhile
    h.store(E.COORDINATOR_NOT_AVAILABLE)
    answer = h.join_answer(js)
    assert (answer.error, answer.member_id) == (E.COORDINATOR_NOT_AVAILABLE, "")
    # Kafka's revert: the old member id is the member again, with its assignment.
    assert h.show() == f"Stable gen=2 leader=c1-1 members=['c1-1', '{old_id}']"
    assert h.heartbeat(old_id, instance="i1") is E.NONE
    assert h.heartbeat("i1-3", instance="i1") is E.FENCED_INSTANCE_ID


# ---- simulation: Kafka-like consumers, crashes, restarts; invariants after every step


@dataclass
class Consumer:
    """A consumer client as the group sees it, following Kafka's client logic."""

    name: str
    instance: str | None
    member_id: str = ""
    generation: int = -1
    phase: str = "idle"  # idle, joining, syncing, stable, dead
    waiting_for: str | None = None
    assignment: bytes | None = None
    tokens: set[str] = field(default_factory=set)


class Simulation:
    def __init__(self, seed: int, consumers: int) -> None:
        self.rng = random.Random(seed)
        self.h = Harness(initial_rebalance_delay_ms=3_000)
        self.h.hold_writes = True  # stored (or failed) when the simulation says
        self.consumers = [
            Consumer(f"c{i}", f"i{i}" if self.rng.random() < 0.4 else None)
            for i in range(consumers)
        ]
        self.seen: set[str] = set()
        self.generation = 0

    def act(self, c: Consumer) -> None:
        h = self.h
        if c.phase == "idle":
            c.waiting_for = h.join(c.member_id, client=c.name, instance=c.instance)
            c.phase = "joining"
        elif c.phase == "stable":
            self.on_error(c, h.heartbeat(c.member_id, c.generation, c.instance))

    def deliver(self) -> None:
        """Hand each consumer the answer it waits for, if it came."""
        for c in self.consumers:
            token = c.waiting_for
            if c.phase == "dead" or token is None or token not in self.h.answers:
                continue
            c.waiting_for = None
            response = self.h.answers[token]
            if isinstance(response, JoinGroupResponse):
                self.on_join(c, response)
            elif isinstance(response, SyncGroupResponse):
                if response.error is E.NONE:
                    c.phase, c.assignment = "stable", response.assignment
                else:
                    self.on_error(c, response.error)

    def on_join(self, c: Consumer, response: JoinGroupResponse) -> None:
        if response.error is E.MEMBER_ID_REQUIRED:
            c.member_id, c.phase = response.member_id, "idle"
        elif response.error is not E.NONE:
            self.on_error(c, response.error)
        else:
            c.member_id, c.generation, c.phase = (
                response.member_id,
                response.generation_id,
                "syncing",
            )
            is_leader = response.leader_id == c.member_id
            # Assign by instance id where there is one, as a sticky leader would.
            assignments = {
                m.member_id: (m.group_instance_id or m.member_id).encode() for m in response.members
            }
            c.waiting_for = self.h.sync(
                c.member_id, c.generation, assignments if is_leader else None, c.instance
            )

    def on_error(self, c: Consumer, error: E) -> None:
        if error in (E.UNKNOWN_MEMBER_ID, E.ILLEGAL_GENERATION):
            c.member_id = "" if error is E.UNKNOWN_MEMBER_ID else c.member_id
            c.phase, c.assignment = "idle", None
        elif error in (E.REBALANCE_IN_PROGRESS, E.NOT_COORDINATOR, E.COORDINATOR_NOT_AVAILABLE):
            c.phase = "idle"  # rejoin (after finding the coordinator again)
        elif error is E.FENCED_INSTANCE_ID:
            c.phase = "dead"
        else:
            assert error is E.NONE, error

    def fault(self) -> None:
        c = self.rng.choice(self.consumers)
        kind = self.rng.choice(["crash", "restart", "leave", "pause"])
        if kind == "crash":
            c.phase = "dead"
        elif kind == "restart":  # a fresh process: static members keep their instance id
            self.consumers[self.consumers.index(c)] = Consumer(c.name, c.instance)
        elif kind == "leave" and c.member_id and c.phase != "dead":
            self.h.leave(MemberIdentity(c.member_id, c.instance))
            c.member_id, c.phase, c.waiting_for = "", "idle", None
        elif kind == "pause":  # a long GC pause: time passes without this consumer
            self.h.advance(self.rng.choice([4_000, 12_000]))

    def check(self) -> None:
        g = self.h.group
        assert g.generation_id >= self.generation
        self.generation = g.generation_id
        members = g.member_ids
        assert (g.leader_id in members) if members else g.leader_id is None
        if g.state is S.EMPTY:
            assert not members
        elif not members:  # a join phase may wait for a pending member without members
            assert g.state in (S.PREPARING_REBALANCE, S.DEAD)
        if g.state is S.STABLE or g.state is S.COMPLETING_REBALANCE:
            assert g.protocol_name == "range"
        deadline = g.next_deadline_ms()
        assert deadline is None or deadline > self.h.now

    def step(self) -> None:
        if self.h.held and self.rng.random() < 0.5:
            self.h.store(E.NONE if self.rng.random() < 0.8 else E.NOT_COORDINATOR)
        if self.rng.random() < 0.1:
            self.fault()
        else:
            c = self.rng.choice(self.consumers)
            if c.phase != "dead":
                self.act(c)
        if self.rng.random() < 0.3:
            self.h.advance(self.rng.choice([100, 1_000, 3_000]))
        self.deliver()
        self.check()

    def settle(self) -> None:
        """No more faults: every live consumer acts each second; the group must settle."""
        for c in self.consumers:
            if c.phase == "dead":
                self.consumers[self.consumers.index(c)] = Consumer(c.name, c.instance)
        for _ in range(200):
            for c in self.consumers:
                self.act(c)
            self.h.store()
            self.deliver()
            self.h.advance(1_000)
            self.deliver()
            self.check()
            g = self.h.group
            live = sorted(c.member_id for c in self.consumers)
            if (
                g.state is S.STABLE
                and sorted(g.member_ids) == live
                and all(
                    c.phase == "stable" and c.generation == g.generation_id for c in self.consumers
                )
            ):
                assert all(
                    c.assignment == (c.instance or c.member_id).encode() for c in self.consumers
                )
                return
        pytest.fail(f"the group did not settle: {self.h.show()}")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 5), st.integers(0, 150))
def test_simulated_consumers_with_faults_always_settle_into_one_stable_generation(
    seed, consumers, steps
):
    sim = Simulation(seed, consumers)
    for _ in range(steps):
        sim.step()
    sim.settle()
