"""Quorum checkers: a common prefix, rising epochs, one controller per epoch, and one
metadata image per offset on every node."""

from __future__ import annotations

from chaos.quorum_checks import LogEntry, check_images, check_quorum


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


A, B = "a" * 64, "b" * 64


def test_images_that_agree_at_one_offset_are_valid():
    verdict = check_images({1: (42, A), 2: (42, A), 3: (42, A)}, {4: (42, A), 5: (42, A)})
    assert verdict.valid, verdict.anomalies
    assert verdict.to_dict() == {
        "valid": True,
        "anomalies": {},
        "offset": 42,
        "controllers": 3,
        "brokers": 2,
    }


def test_a_broker_with_another_image_at_the_controllers_offset_diverges():
    verdict = check_images({1: (42, A), 2: (42, A)}, {4: (42, A), 5: (42, B)})
    assert not verdict.valid
    assert list(verdict.anomalies) == ["image-divergence"]
    (text,) = verdict.anomalies["image-divergence"]
    assert "offset 42" in text and "broker 5 has bbbbbbbbbbbb" in text
    assert "controller 1, controller 2, broker 4 have aaaaaaaaaaaa" in text


def test_controllers_that_disagree_at_one_offset_diverge():
    verdict = check_images({1: (7, A), 2: (7, B), 3: (7, A)}, {})
    assert list(verdict.anomalies) == ["image-divergence"]
    assert "controller 2 has" in verdict.anomalies["image-divergence"][0]


def test_images_are_compared_only_at_equal_offsets():
    # Not quiet (gathered while records were committing): different offsets,
    # different images, no anomaly; the same offset still has to agree.
    lagging = {1: (50, A), 2: (48, B)}
    assert check_images(lagging, {4: (48, B), 5: (49, "c" * 64)}, quiet=False).valid
    verdict = check_images(lagging, {4: (48, A)}, quiet=False)
    assert list(verdict.anomalies) == ["image-divergence"]
    assert "offset 48" in verdict.anomalies["image-divergence"][0]


def test_after_a_quiet_spell_every_node_has_reached_the_controllers():
    verdict = check_images({1: (42, A), 2: (40, B)}, {4: (42, A), 5: (30, B)})
    assert list(verdict.anomalies) == ["image-behind"]
    assert verdict.anomalies["image-behind"] == [
        "controller 2 at offset 40, the controllers reached 42",
        "broker 5 at offset 30, the controllers reached 42",
    ]
    ahead = check_images({1: (42, A)}, {4: (43, B)})
    assert list(ahead.anomalies) == ["image-ahead"]
    assert "broker 4 at offset 43" in ahead.anomalies["image-ahead"][0]


def test_each_image_anomaly_is_found_in_one_history():
    verdict = check_images(
        {1: (42, A), 2: (42, B), 3: (41, A)},
        {4: (42, A), 5: (41, B), 6: (44, A)},
    )
    assert set(verdict.anomalies) == {"image-divergence", "image-behind", "image-ahead"}
    assert len(verdict.anomalies["image-divergence"]) == 2  # At offsets 41 and 42.
    assert len(verdict.anomalies["image-behind"]) == 2
    assert verdict.offset == 42 and not verdict.valid
