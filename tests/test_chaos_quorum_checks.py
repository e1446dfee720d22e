"""Quorum checkers: a common prefix, rising epochs, one controller per epoch."""

from __future__ import annotations

from chaos.quorum_checks import LogEntry, check_quorum


def entries(*items: tuple[int, int, bytes]) -> list[LogEntry]:
    return [LogEntry(offset, epoch, record) for offset, epoch, record in items]


def test_voters_that_agree_on_a_common_prefix_are_valid():
    leader = entries((0, 1, b"a"), (1, 1, b"b"), (2, 2, b"c"))
    lagging = entries((0, 1, b"a"), (1, 1, b"b"))
    verdict = check_quorum({1: leader, 2: lagging, 3: leader[1:]})
    assert verdict.valid and verdict.compared_offsets == 3


def test_a_different_record_at_one_offset_is_divergence():
    verdict = check_quorum({1: entries((0, 1, b"a")), 2: entries((0, 1, b"z"))})
    assert not verdict.valid and "log-divergence" in verdict.anomalies


def test_epochs_must_rise_and_be_claimed_once():
    regress = entries((0, 2, b"a"), (1, 1, b"b"))
    assert "epoch-regression" in check_quorum({1: regress}).anomalies
    claims = [
        LogEntry(0, 3, b"x", claimed_epoch=3, claimed_by=1),
        LogEntry(5, 3, b"y", claimed_epoch=3, claimed_by=2),
    ]
    assert "split-brain" in check_quorum({1: claims}).anomalies
