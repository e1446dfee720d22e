"""local_changes: what a metadata change means for one broker (pure)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.local_changes import LocalChanges, local_changes
from quorum import records as r
from quorum.image import EMPTY_IMAGE, NO_LEADER, Endpoint, MetadataImage, PartitionRegistration
from quorum.records import touched_topic_ids
from quorum.replay import replay
from quorum.snapshot import decode_image, encode_image

BROKERS = (0, 1, 2, 3)


def build(records, image: MetadataImage = EMPTY_IMAGE) -> MetadataImage:
    for record in records:
        image, _ = replay(image, record, image.offset + 1)
    return image


def hosted(image: MetadataImage, broker_id: int) -> dict[tuple[str, int], tuple[str, object]]:
    """What a broker should host according to the image: (name, p) -> (role, registration)."""
    out = {}
    for topic, index, part in image.iter_partitions():
        if broker_id in part.replicas:
            role = "leader" if part.leader == broker_id else "follower"
            out[(topic.name, index)] = (role, part)
    return out


def apply(state: dict, changes: LocalChanges) -> dict:
    state = dict(state)
    for key in changes.deletes:
        state.pop(key, None)
    for key, part in changes.leaders.items():
        state[key] = ("leader", part)
    for key, part in changes.followers.items():
        state[key] = ("follower", part)
    return state


BASE = [
    r.register_broker(b, f"inc{b}", [Endpoint("PLAINTEXT", "127.0.0.1", 9000 + b)]) for b in BROKERS
] + [
    r.topic("orders", "t-orders"),
    r.partition("t-orders", 0, [1, 2, 3], [1, 2, 3], 1),
    r.partition("t-orders", 1, [2, 3, 1], [2, 3, 1], 2),
    r.partition("t-orders", 2, [3, 2, 0], [3, 2, 0], 3),
    r.topic("other", "t-other"),
    r.partition("t-other", 0, [0], [0], 0),
]


def test_new_topic_gives_leaders_and_followers():
    image = build(BASE)
    changes = local_changes(EMPTY_IMAGE, image, 1)
    assert set(changes.leaders) == {("orders", 0)}
    assert set(changes.followers) == {("orders", 1)}
    assert changes.deletes == frozenset()
    assert changes.topic_ids == {"orders": "t-orders"}
    assert changes.leaders[("orders", 0)] == image.partition("t-orders", 0)


def test_leader_change_moves_between_maps():
    old = build(BASE)
    new = build([r.partition_change("t-orders", 0, leader=2)], old)
    one = local_changes(old, new, 1)
    assert one.followers == {("orders", 0): new.partition("t-orders", 0)}
    assert not one.leaders and not one.deletes
    two = local_changes(old, new, 2)
    assert set(two.leaders) == {("orders", 0)}
    assert two.leaders[("orders", 0)].leader_epoch == 1
    # Broker 0 is no replica of the changed partition.
    assert not local_changes(old, new, 0)


def test_isr_change_is_reported_to_replicas_only():
    old = build(BASE)
    new = build([r.partition_change("t-orders", 0, isr=[1, 2])], old)
    assert set(local_changes(old, new, 1).leaders) == {("orders", 0)}
    assert set(local_changes(old, new, 3).followers) == {("orders", 0)}
    assert not local_changes(old, new, 0)


def test_reassignment_away_deletes():
    old = build(BASE)
    new = build([r.partition_change("t-orders", 2, replicas=[3, 2, 1], isr=[3, 2, 1])], old)
    assert local_changes(old, new, 0).deletes == {("orders", 2)}
    assert set(local_changes(old, new, 1).followers) == {("orders", 2)}


def test_topic_removal_deletes_hosted_partitions():
    old = build(BASE)
    new = build([r.remove_topic("t-orders")], old)
    assert local_changes(old, new, 2).deletes == {("orders", 0), ("orders", 1), ("orders", 2)}
    assert local_changes(old, new, 0).deletes == {("orders", 2)}
    assert not local_changes(old, new, 0).leaders


def test_recreated_topic_is_deleted_then_created():
    old = build(BASE)
    new = build(
        [
            r.remove_topic("t-orders"),
            r.topic("orders", "t-orders-2"),
            r.partition("t-orders-2", 0, [1], [1], 1),
        ],
        old,
    )
    changes = local_changes(old, new, 1)
    assert changes.deletes == {("orders", 0), ("orders", 1)}
    assert set(changes.leaders) == {("orders", 0)}
    assert changes.topic_ids == {"orders": "t-orders-2"}
    assert apply(hosted(old, 1), changes) == hosted(new, 1)


def test_unrelated_changes_are_empty():
    old = build(BASE)
    new = build(
        [r.fence_broker(1, 0), r.config(r.CONFIG_TOPIC, "orders", "retention.ms", "1")], old
    )
    assert old.topics is new.topics
    assert local_changes(old, new, 1) == LocalChanges()


def test_snapshot_reload_reports_nothing_for_equal_registrations():
    old = build(BASE)
    reloaded = decode_image(encode_image(old))
    assert reloaded.topics is not old.topics
    assert not local_changes(old, reloaded, 1)


def test_unchanged_topics_are_skipped_by_identity():
    """Topics the change did not touch are never looked into."""

    class Exploding(dict):
        def items(self):  # pragma: no cover - must not be called
            raise AssertionError("unchanged topic was scanned")

        def get(self, key, default=None):  # pragma: no cover - must not be called
            raise AssertionError("unchanged topic was scanned")

    old = build(BASE)
    other = old.topics["t-other"]
    trap = replace(other, partitions=Exploding(other.partitions))
    old = replace(old, topics=old.topics.set("t-other", trap))
    new = build([r.partition_change("t-orders", 0, leader=2)], old)
    assert new.topics["t-other"] is trap
    assert set(local_changes(old, new, 2).leaders) == {("orders", 0)}


# -- property: applying local changes tracks the image ------------------------

NAMES = ("a", "b", "c")


@st.composite
def record_streams(draw):
    """A stream of topic and partition records, some of which replay as no-ops."""
    image = EMPTY_IMAGE
    records = []
    next_id = 0
    for _ in range(draw(st.integers(1, 25))):
        topic_ids = sorted(image.topics)
        choice = draw(st.sampled_from(["create", "remove", "change", "change", "other"]))
        if choice == "create" or not topic_ids:
            batch = [r.topic(draw(st.sampled_from(NAMES)), f"id{next_id}")]
            for index in range(draw(st.integers(1, 3))):
                replicas = draw(st.permutations(BROKERS))[: draw(st.integers(1, 3))]
                leader = draw(st.sampled_from([*replicas, NO_LEADER]))
                batch.append(r.partition(f"id{next_id}", index, replicas, replicas, leader))
            next_id += 1
        elif choice == "remove":
            batch = [r.remove_topic(draw(st.sampled_from(topic_ids)))]
        elif choice == "change":
            topic_id = draw(st.sampled_from(topic_ids))
            index = draw(st.sampled_from(sorted(image.topics[topic_id].partitions)))
            batch = [_change(draw, topic_id, index, image.partition(topic_id, index))]
        else:
            batch = [r.no_op()]
        image = build(batch, image)
        records.extend(batch)
    return records


def _change(draw, topic_id: str, index: int, part: PartitionRegistration):
    what = draw(st.sampled_from(["leader", "isr", "replicas"]))
    if what == "leader":
        return r.partition_change(topic_id, index, leader=draw(st.sampled_from([*part.isr, -1])))
    if what == "isr":
        isr = [b for b in part.replicas if draw(st.booleans())] or [part.replicas[0]]
        return r.partition_change(topic_id, index, isr=isr, leader=isr[0])
    replicas = draw(st.permutations(BROKERS))[: draw(st.integers(1, 3))]
    return r.partition_change(topic_id, index, replicas=replicas, isr=replicas, leader=replicas[0])


@settings(max_examples=200, deadline=None)
@given(records=record_streams(), data=st.data())
def test_local_changes_track_image_for_any_batching(records, data):
    """Any split of the stream into changes keeps every broker's partitions equal to the image's."""
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(records) - 1)), max_size=8)))
    bounds = [0, *cuts, len(records)]
    states = {b: {} for b in BROKERS}
    image = EMPTY_IMAGE
    for start, end in zip(bounds, bounds[1:], strict=False):
        new = build(records[start:end], image)
        touched = touched_topic_ids(records[start:end])
        for b in BROKERS:
            changes = local_changes(image, new, b)
            # Looking only at the topics the records touched finds the same.
            assert local_changes(image, new, b, touched) == changes
            _check_only_changed(image, new, b, changes)
            states[b] = apply(states[b], changes)
            assert states[b] == hosted(new, b)
        image = new


def _check_only_changed(old, new, broker_id, changes):
    for key, part in {**changes.leaders, **changes.followers}.items():
        topic_id = changes.topic_ids[key[0]]
        assert new.partition(topic_id, key[1]) is part
        assert old.partition(topic_id, key[1]) != part
        assert broker_id in part.replicas
    assert not set(changes.leaders) & set(changes.followers)
    assert all(p.leader == broker_id for p in changes.leaders.values())
    assert all(p.leader != broker_id for p in changes.followers.values())


@pytest.mark.parametrize("broker_id", BROKERS)
def test_from_empty_equals_hosted(broker_id):
    image = build(BASE)
    assert apply({}, local_changes(EMPTY_IMAGE, image, broker_id)) == hosted(image, broker_id)


# BASE with every broker unfenced (registered at offsets 0 to 3).
UNFENCED = BASE + [r.unfence_broker(b, b) for b in BROKERS]


def test_a_restarted_broker_does_not_lead_for_its_previous_incarnation():
    """Broker 1 restarted (incarnation "inc1-b"): the image still says its previous
    incarnation leads orders-0, as it does while the controller moves a large broker's
    leaderships in slices. The new process, whose log may be shorter than what the old
    one acknowledged, follows it with no one to fetch from until the leadership moves."""
    before = build(UNFENCED)
    held = local_changes(EMPTY_IMAGE, before, 1, incarnation="inc1-b")
    assert ("orders", 0) not in held.leaders
    assert held.followers[("orders", 0)].leader == NO_LEADER
    assert (
        held.followers[("orders", 0)].leader_epoch == before.partition("t-orders", 0).leader_epoch
    )
    assert held.followers[("orders", 1)].leader == 2  # others' leaderships as they are
    # Its own registration, still fenced: nothing to lead yet.
    registered = build([r.register_broker(1, "inc1-b", [], fenced=True)], before)
    assert not local_changes(before, registered, 1, incarnation="inc1-b").leaders
    # The controller moves the leadership: a follower of broker 2 at the next epoch.
    moved = build([r.partition_change("t-orders", 0, leader=2, isr=[2, 3])], registered)
    changes = local_changes(registered, moved, 1, incarnation="inc1-b")
    assert changes.followers[("orders", 0)].leader == 2 and not changes.leaders
    # Unfenced, it leads what it is elected for.
    unfenced = build([r.unfence_broker(1, registered.brokers[1].broker_epoch)], moved)
    elected = build([r.partition_change("t-orders", 1, leader=1)], unfenced)
    assert set(local_changes(unfenced, elected, 1, incarnation="inc1-b").leaders) == {("orders", 1)}
    # The incarnation that was registered leads as before; no incarnation: no check.
    assert ("orders", 0) in local_changes(EMPTY_IMAGE, before, 1, incarnation="inc1").leaders
    assert ("orders", 0) in local_changes(EMPTY_IMAGE, before, 1).leaders


def test_a_leadership_held_back_is_taken_up_when_the_broker_is_unfenced():
    """Should one be left when the broker is unfenced (the controller moves them all
    first), it is led then rather than never."""
    fenced = build([r.register_broker(1, "inc1-b", [], fenced=True)], build(UNFENCED))
    assert not local_changes(EMPTY_IMAGE, fenced, 1, incarnation="inc1-b").leaders
    unfenced = build([r.unfence_broker(1, fenced.brokers[1].broker_epoch)], fenced)
    changes = local_changes(fenced, unfenced, 1, incarnation="inc1-b")
    assert set(changes.leaders) == {("orders", 0)}
    assert changes.topic_ids["orders"] == "t-orders"
