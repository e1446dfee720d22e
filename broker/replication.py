"""Replication decisions of a partition leader, as plain functions over plain data.

Theory of operation (Kafka's ``Partition``/``Replica``, KIP-497 and KIP-841):

- The leader learns a follower's log end offset from the follower's fetch
  offset: a follower asks for what it does not have yet.
- A follower is *caught up* at a moment when its fetch offset reached the
  leader's log end offset as it was at the follower's previous fetch. The
  leader remembers the last such moment (``last_caught_up_ms``); a follower
  whose last catch-up is older than ``replica.lag.time.max.ms`` is out of sync.
- The high watermark is the smallest log end offset over the *maximal* ISR:
  the committed ISR plus members being added, since a member being removed
  still counts until the controller has committed its removal, and a member
  being added must already hold what it is counted for.
- A follower joins the ISR once its log end offset reaches the high watermark
  and the start of the leader's current epoch, and its broker is neither
  fenced nor shutting down (KIP-841).

Nothing here reads a clock or touches a log: callers pass ``now_ms`` and offsets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

UNKNOWN_OFFSET = -1


@dataclass(slots=True)
class FollowerState:
    """What the leader knows of one follower replica."""

    broker_id: int
    log_end_offset: int = UNKNOWN_OFFSET
    log_start_offset: int = UNKNOWN_OFFSET
    last_caught_up_ms: int = 0
    # The leader's log end offset and the time at this follower's previous fetch.
    last_fetch_leader_leo: int = UNKNOWN_OFFSET
    last_fetch_ms: int = 0

    def reset(self, now_ms: int, in_isr: bool) -> None:
        """Forget positions on a leadership change; ISR members start caught up now."""
        self.log_end_offset = UNKNOWN_OFFSET
        self.log_start_offset = UNKNOWN_OFFSET
        self.last_caught_up_ms = now_ms if in_isr else 0
        self.last_fetch_leader_leo = UNKNOWN_OFFSET
        self.last_fetch_ms = 0

    def on_fetch(
        self, fetch_offset: int, log_start_offset: int, leader_leo: int, now_ms: int
    ) -> None:
        """Record a fetch at ``fetch_offset`` while the leader's log ends at ``leader_leo``."""
        if fetch_offset >= leader_leo:
            self.last_caught_up_ms = max(self.last_caught_up_ms, now_ms)
        elif fetch_offset >= self.last_fetch_leader_leo >= 0:
            self.last_caught_up_ms = max(self.last_caught_up_ms, self.last_fetch_ms)
        self.log_end_offset = fetch_offset
        self.log_start_offset = log_start_offset
        self.last_fetch_leader_leo = leader_leo
        self.last_fetch_ms = now_ms

    def is_caught_up(self, leader_leo: int, now_ms: int, max_lag_ms: int) -> bool:
        return self.log_end_offset == leader_leo or now_ms - self.last_caught_up_ms <= max_lag_ms


def high_watermark(
    leader_leo: int,
    maximal_isr: Iterable[int],
    leader_id: int,
    followers: Mapping[int, FollowerState],
) -> int:
    """The smallest log end offset over the maximal ISR (the leader counts with its own)."""
    hw = leader_leo
    for broker_id in maximal_isr:
        if broker_id == leader_id:
            continue
        state = followers.get(broker_id)
        if state is None or state.log_end_offset < 0:
            # A member that has not fetched since this leadership began holds
            # at least nothing we can prove; the high watermark waits for it.
            return -1
        hw = min(hw, state.log_end_offset)
    return hw


def out_of_sync(
    isr: Iterable[int],
    leader_id: int,
    followers: Mapping[int, FollowerState],
    leader_leo: int,
    now_ms: int,
    max_lag_ms: int,
) -> list[int]:
    """ISR members (never the leader) that have not caught up within ``max_lag_ms``."""
    lagging = []
    for broker_id in isr:
        if broker_id == leader_id:
            continue
        state = followers.get(broker_id)
        if state is None or not state.is_caught_up(leader_leo, now_ms, max_lag_ms):
            lagging.append(broker_id)
    return lagging


def may_join_isr(
    state: FollowerState, high_watermark: int, epoch_start_offset: int, eligible: bool
) -> bool:
    """Whether a follower outside the ISR has caught up enough to join it."""
    return (
        eligible
        and state.log_end_offset >= 0
        and state.log_end_offset >= high_watermark
        and state.log_end_offset >= epoch_start_offset
    )


def enough_replicas(isr_size: int, min_insync_replicas: int) -> bool:
    """acks=all is refused before the append when the ISR is smaller than the minimum."""
    return isr_size >= min_insync_replicas
