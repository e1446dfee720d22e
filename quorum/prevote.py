"""PreVote (the Raft thesis, section 9.6; KRaft's KIP-996) for the pysyncobj voters.

pysyncobj starts an election as soon as a voter's election timer runs out: the voter
increments its term and asks for votes. A voter cut off from the majority does that
again at every timeout, so its term climbs for as long as it is cut off. Once it can
reach the others again, its term deposes the leader they elected meanwhile, and a write
in flight at that moment gets UNKNOWN_OUTCOME.

With PreVote, a voter whose timer runs out first asks the others whether they would vote
for it at the next term; nobody changes term for that. A voter says yes when the asker's
log is at least as up to date as its own and it has not heard from a leader within the
minimum election timeout (so a voter that merely lost touch cannot depose a leader the
others still follow). With a majority of yeses the voter starts the real election, at
the next term. A voter in a minority never gets a majority, so its term stays put.

A refusal carries the refuser's term; a voter that learns it is behind takes that term
(as Raft does with any higher term), so that a voter with the most up-to-date log but a
lower term can still win the next round. A leadership transfer (TimeoutNow) skips the
pre-vote, as in the thesis.

pysyncobj may start an election only when ``allows_election`` says so (a round won
for the next term, or a transfer): its own check runs inside its tick, and a timer
running out between ``before_tick`` and that check must not start an election
unasked. A heartbeat from a leader at the voter's term or above ends any round and
forgets a won one. A voter whose term is above the leader's (its election began and
was cut off) cannot rejoin: pysyncobj drops the leader's lower-term AppendEntries
without telling it, and the others, who hear the leader, refuse its pre-votes. So it
answers such a leader with a vote request at its own term that no log loses to, as
Raft answers a stale AppendEntries with its term: the leader steps down, keeps its
vote, and the next election includes this voter.

This module is the protocol alone; ``quorum.raft`` adapts it to pysyncobj's internals.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any, Protocol

log = logging.getLogger(__name__)

PRE_VOTE_REQUEST = "raftka_pre_vote_request"
PRE_VOTE_RESPONSE = "raftka_pre_vote_response"


class RaftView(Protocol):
    """What PreVote reads from and does to one voter's Raft state."""

    def now(self) -> float:
        """The clock the election timer uses."""
        ...

    def is_leader(self) -> bool: ...

    def term(self) -> int: ...

    def last_log(self) -> tuple[int, int]:
        """(index, term) of the last entry in the log."""
        ...

    def election_due(self) -> bool:
        """Whether this tick would start an election (the timer ran out, the voter is
        not leading, and it can reach someone)."""
        ...

    def transferring(self) -> bool:
        """Whether the election due is a leadership transfer (TimeoutNow)."""
        ...

    def postpone_election(self) -> None:
        """Restart the election timer with a new random timeout."""
        ...

    def start_election_now(self) -> None:
        """Make the next tick start the election."""
        ...

    def forget_leader(self) -> None:
        """The timer ran out: the voter no longer knows a leader (as when an election
        starts, but at the same term)."""
        ...

    def adopt_term(self, term: int) -> None:
        """Become a follower at ``term`` (higher than the current one), with no vote."""
        ...

    def voters(self) -> list[Any]:
        """The other voters, as the transport addresses them."""
        ...

    def voter_key(self, node: Any) -> Hashable: ...

    def send(self, node: Any, message: dict[str, Any]) -> None: ...


class PreVote:
    """One voter's pre-vote rounds and answers; runs on the Raft thread only."""

    def __init__(self, raft: RaftView, min_election_timeout_s: float):
        self._raft = raft
        # Shorter than the minimum election timeout by a margin: the voter whose timer
        # ran out first may have heard the leader's last heartbeat a little earlier than
        # the others did, and must not be refused for that (a whole extra timeout).
        # A leader that is alive is heard from every heartbeat, far more often.
        self._lease_s = min_election_timeout_s * 0.8
        self._last_leader_contact = float("-inf")
        # The term the current round asks for, and who said yes.
        self._round_term: int | None = None
        self._grants: set[Hashable] = set()
        # A term a round won: the election at it may start.
        self._won_term: int | None = None
        self._round_started = 0.0
        # When each leader at a lower term was last answered (_answer_stale_leader).
        self._stale_answered: dict[Hashable, float] = {}
        self.rounds = 0
        self.rounds_won = 0

    def allows_election(self) -> bool:
        """Whether pysyncobj may start an election in this tick."""
        raft = self._raft
        return raft.transferring() or self._won_term == raft.term() + 1

    def before_tick(self) -> None:
        """Call before every pysyncobj tick: turns an election that is due into a
        pre-vote round, unless a round won the election's term already."""
        raft = self._raft
        if not raft.election_due() or raft.transferring():
            return
        next_term = raft.term() + 1
        if self._won_term == next_term:
            return  # pysyncobj starts the election at next_term in this tick.
        raft.postpone_election()
        raft.forget_leader()
        self.rounds += 1
        self._round_started = raft.now()
        self._round_term = next_term
        self._grants = {None}  # This voter's own yes.
        index, log_term = raft.last_log()
        request = {
            "type": PRE_VOTE_REQUEST,
            "term": next_term,
            "last_log_index": index,
            "last_log_term": log_term,
        }
        for node in raft.voters():
            raft.send(node, request)
        self._check_majority()

    def on_message(self, node: Any, message: Any) -> bool:
        """Look at a message before pysyncobj does; True when it was PreVote's own
        (pysyncobj must not see it)."""
        kind = message.get("type") if isinstance(message, dict) else None
        if kind in (PRE_VOTE_REQUEST, PRE_VOTE_RESPONSE):
            try:
                if kind == PRE_VOTE_REQUEST:
                    self._answer(node, message)
                else:
                    self._count(node, message)
            except (KeyError, TypeError) as e:
                # Only voters that know the password get here; a malformed message
                # is dropped, unanswered, and changes nothing.
                log.warning("dropped a malformed %s: %r", kind, e)
            return True
        if kind == "append_entries":
            term = message.get("term", -1)
            if term >= self._raft.term():
                # A leader is alive: no round goes on, and none won counts any more.
                self._last_leader_contact = self._raft.now()
                self._round_term = None
                self._won_term = None
            else:
                self._answer_stale_leader(node)
        return False

    def _answer_stale_leader(self, node: Any) -> None:
        raft = self._raft
        now = raft.now()
        key = raft.voter_key(node)
        if key not in {raft.voter_key(v) for v in raft.voters()}:
            return
        if now - self._stale_answered.get(key, float("-inf")) < self._lease_s:
            return  # Once per lease: the first answer makes it step down.
        self._stale_answered[key] = now
        # pysyncobj takes a higher term from a vote request before it looks at the
        # log: a log older than any makes it a way to tell the term, like Raft's
        # answer to a stale AppendEntries, and never takes the leader's vote (which
        # the election at this term may need for another candidate).
        raft.send(
            node,
            {
                "type": "request_vote",
                "term": raft.term(),
                "last_log_index": -1,
                "last_log_term": -1,
            },
        )

    def _answer(self, node: Any, message: dict[str, Any]) -> None:
        raft = self._raft
        term = raft.term()
        index, log_term = raft.last_log()
        up_to_date = (message["last_log_term"], message["last_log_index"]) >= (log_term, index)
        leader_alive = raft.is_leader() or (raft.now() - self._last_leader_contact < self._lease_s)
        granted = message["term"] > term and up_to_date and not leader_alive
        raft.send(
            node,
            {
                "type": PRE_VOTE_RESPONSE,
                "term": message["term"],
                "granted": granted,
                "current_term": term,
            },
        )

    def _count(self, node: Any, message: dict[str, Any]) -> None:
        raft = self._raft
        if raft.is_leader():
            return
        if message.get("current_term", -1) > raft.term():
            raft.adopt_term(message["current_term"])
            self._round_term = None
            return
        if self._round_term is None or message["term"] != self._round_term:
            return  # An answer to an earlier round.
        if self._round_term != raft.term() + 1:
            self._round_term = None  # The term moved since the round began.
            return
        key = raft.voter_key(node)
        if message.get("granted") and key in {raft.voter_key(v) for v in raft.voters()}:
            self._grants.add(key)
            self._check_majority()

    def _check_majority(self) -> None:
        raft = self._raft
        if self._round_term is None:
            return
        if len(self._grants) * 2 > len(raft.voters()) + 1:
            log.info(
                "pre-vote for term %d won in %.1f ms (round %d)",
                self._round_term,
                (raft.now() - self._round_started) * 1000,
                self.rounds,
            )
            self._won_term = self._round_term
            self._round_term = None
            self.rounds_won += 1
            raft.start_election_now()
