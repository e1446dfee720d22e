"""Pure tests of the leader's replication decisions (broker/replication.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.replication import (
    FollowerState,
    enough_replicas,
    high_watermark,
    may_join_isr,
    out_of_sync,
)

LAG_MS = 1000


def follower(broker_id: int, leo: int, caught_up_ms: int = 0) -> FollowerState:
    state = FollowerState(broker_id)
    state.log_end_offset = leo
    state.last_caught_up_ms = caught_up_ms
    return state


def test_high_watermark_is_the_smallest_log_end_over_the_isr():
    followers = {2: follower(2, 7), 3: follower(3, 5)}
    assert high_watermark(10, [1, 2, 3], 1, followers) == 5
    # A replica outside the ISR does not hold the high watermark back.
    assert high_watermark(10, [1, 2], 1, followers) == 7
    # A leader alone commits what it has.
    assert high_watermark(10, [1], 1, followers) == 10


def test_high_watermark_waits_for_members_that_have_not_fetched_this_epoch():
    followers = {2: FollowerState(2), 3: follower(3, 5)}
    assert high_watermark(10, [1, 2, 3], 1, followers) == -1
    assert high_watermark(10, [1, 3], 1, followers) == 5


def test_a_fetch_at_the_leaders_end_is_a_catch_up():
    state = FollowerState(2)
    state.on_fetch(fetch_offset=10, log_start_offset=0, leader_leo=10, now_ms=500)
    assert state.last_caught_up_ms == 500 and state.log_end_offset == 10


def test_reaching_the_end_seen_at_the_previous_fetch_counts_from_that_fetch():
    # Kafka's Replica.updateFetchState: a follower that is always one batch
    # behind a busy leader is still caught up, as of its previous fetch.
    state = FollowerState(2)
    state.on_fetch(fetch_offset=5, log_start_offset=0, leader_leo=10, now_ms=100)
    assert state.last_caught_up_ms == 0
    state.on_fetch(fetch_offset=10, log_start_offset=0, leader_leo=20, now_ms=200)
    assert state.last_caught_up_ms == 100
    state.on_fetch(fetch_offset=15, log_start_offset=0, leader_leo=30, now_ms=300)
    assert state.last_caught_up_ms == 100  # 15 < 20: it fell further behind.


def test_out_of_sync_after_the_lag_time_without_catching_up():
    followers = {2: follower(2, 10, caught_up_ms=0), 3: follower(3, 4, caught_up_ms=0)}
    # At the leader's end: never out of sync, whatever the clock says.
    assert out_of_sync([1, 2, 3], 1, followers, 10, LAG_MS, LAG_MS) == []
    assert out_of_sync([1, 2, 3], 1, followers, 10, LAG_MS + 1, LAG_MS) == [3]
    # A member the leader has no state for is out of sync.
    assert out_of_sync([1, 4], 1, followers, 10, 0, LAG_MS) == [4]


def test_reset_starts_isr_members_caught_up_now():
    state = follower(2, 10, caught_up_ms=5)
    state.reset(now_ms=1000, in_isr=True)
    assert state.log_end_offset == -1 and state.last_caught_up_ms == 1000
    state.reset(now_ms=2000, in_isr=False)
    assert state.last_caught_up_ms == 0


def test_joining_the_isr_needs_the_high_watermark_the_epoch_start_and_eligibility():
    state = follower(2, 10)
    assert may_join_isr(state, high_watermark=10, epoch_start_offset=8, eligible=True)
    assert not may_join_isr(state, high_watermark=11, epoch_start_offset=8, eligible=True)
    assert not may_join_isr(state, high_watermark=10, epoch_start_offset=12, eligible=True)
    assert not may_join_isr(state, high_watermark=10, epoch_start_offset=8, eligible=False)
    assert not may_join_isr(FollowerState(3), high_watermark=0, epoch_start_offset=0, eligible=True)


def test_min_insync_replicas():
    assert enough_replicas(2, 2) and not enough_replicas(1, 2)


@given(
    leader_leo=st.integers(0, 1000),
    leos=st.lists(st.integers(0, 1000), min_size=0, max_size=4),
)
def test_high_watermark_never_exceeds_any_isr_member(leader_leo, leos):
    followers = {i + 2: follower(i + 2, min(leo, leader_leo)) for i, leo in enumerate(leos)}
    isr = [1, *followers]
    hw = high_watermark(leader_leo, isr, 1, followers)
    assert hw <= leader_leo
    assert all(hw <= s.log_end_offset for s in followers.values())
    assert hw == min([leader_leo, *(s.log_end_offset for s in followers.values())])
