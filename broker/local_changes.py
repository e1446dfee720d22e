"""What one metadata change means for one broker: partitions to lead, follow, delete.

This is Kafka's ``TopicsDelta.localChanges``, computed from two images rather
than from a delta. Images share every object that a record did not touch, so
comparing ``TopicImage`` objects by identity skips unchanged topics without
looking at their partitions; the cost is one identity check per topic plus
work proportional to the partitions that really changed.

A broker takes up a leadership only while the image holds its own registration
(its incarnation), unfenced; one it already leads when it is fenced it keeps
until the controller moves it, as Kafka's brokers do (its log is intact, and
followers still fetch from it). A restarted broker's previous incarnation may
still lead partitions in the image: when a broker is in thousands of ISRs the
controller moves those leaderships in slices after the new registration
(``quorum/controller/reconcile.py``), and the new process may have lost the tail
of its log (no fsync), so leading with it could make followers truncate
acknowledged records. Such a partition is followed with no leader to fetch
from until the controller moves it; by the time the broker is unfenced every
one has moved, and any that has not is taken up then.

Pure: no I/O, no clock. The broker applies the result in this order: deletes
first, then leaders and followers. A topic deleted and re-created under the
same name in one change appears in both ``deletes`` and ``leaders`` or
``followers``; deleting first gives the new topic a fresh log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from quorum.image import NO_LEADER, MetadataImage, PartitionRegistration, TopicImage

TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class LocalChanges:
    """Partition changes that concern one broker, keyed by (topic name, partition)."""

    # Partitions this broker must now lead, with their new registration.
    leaders: dict[TopicPartition, PartitionRegistration] = field(default_factory=dict)
    # Partitions this broker must now follow (including ones that have no leader).
    followers: dict[TopicPartition, PartitionRegistration] = field(default_factory=dict)
    # Partitions this broker no longer hosts: the topic is gone or it left the replicas.
    deletes: frozenset[TopicPartition] = frozenset()
    # Topic id of every topic named in leaders or followers, so the data plane can
    # tell a re-created topic from the one whose log it holds.
    topic_ids: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.leaders or self.followers or self.deletes)


def local_changes(
    old: MetadataImage,
    new: MetadataImage,
    broker_id: int,
    touched: Iterable[str] | None = None,
    incarnation: str | None = None,
) -> LocalChanges:
    """The partitions whose registration changed between ``old`` and ``new`` for ``broker_id``.

    A partition appears in ``leaders`` or ``followers`` when it is new, or its
    registration differs, and ``broker_id`` is one of its replicas.
    ``touched`` limits the comparison to the topics the records between the
    two images touched (the delta); None compares every topic.
    """
    leaders: dict[TopicPartition, PartitionRegistration] = {}
    followers: dict[TopicPartition, PartitionRegistration] = {}
    deletes: set[TopicPartition] = set()
    topic_ids: dict[str, str] = {}
    may_lead = incarnation is None or _may_lead(new, broker_id, incarnation)
    if may_lead and incarnation is not None and not _may_lead(old, broker_id, incarnation):
        # Leaderships held back so far (there should be none left): take them up.
        for topic_id, index in new.isr_index.get(broker_id, {}).keys():
            topic = new.topics[topic_id]
            part = topic.partitions[index]
            if part.leader == broker_id:
                leaders[(topic.name, index)] = part
                topic_ids[topic.name] = topic_id
    if old.topics is new.topics:
        return LocalChanges(leaders, followers, frozenset(deletes), topic_ids)
    candidates = new.topics.keys() if touched is None else touched
    for topic_id in candidates:
        new_topic = new.topics.get(topic_id)
        old_topic = old.topics.get(topic_id)
        if old_topic is new_topic or new_topic is None:
            continue
        for index, before, after in _changed_partitions(old_topic, new_topic):
            key = (new_topic.name, index)
            if after is not None and broker_id in after.replicas:
                if after.leader != broker_id:
                    followers[key] = after
                elif may_lead:
                    leaders[key] = after
                else:
                    followers[key] = replace(after, leader=NO_LEADER)
                topic_ids[new_topic.name] = topic_id
            elif before is not None and broker_id in before.replicas:
                deletes.add(key)
    removed = old.topics.keys() if touched is None else touched
    for topic_id in removed:
        old_topic = old.topics.get(topic_id)
        if old_topic is not None and topic_id not in new.topics:
            deletes.update(
                (old_topic.name, index)
                for index, part in old_topic.partitions.items()
                if broker_id in part.replicas
            )
    return LocalChanges(leaders, followers, frozenset(deletes), topic_ids)


_Change = tuple[int, PartitionRegistration | None, PartitionRegistration | None]


def _may_lead(image: MetadataImage, broker_id: int, incarnation: str) -> bool:
    broker = image.brokers.get(broker_id)
    return broker is not None and broker.incarnation_id == incarnation and not broker.fenced


def _changed_partitions(old_topic: TopicImage | None, new_topic: TopicImage) -> list[_Change]:
    """(index, before, after) for every partition whose registration differs."""
    if old_topic is None:
        return [(index, None, part) for index, part in new_topic.partitions.items()]
    old_parts, new_parts = old_topic.partitions, new_topic.partitions
    if old_parts is new_parts:
        return []
    changed: list[_Change] = []
    matched = 0
    for index, part in new_parts.items():
        before = old_parts.get(index)
        matched += before is not None
        # Equal but distinct objects arise when an image is rebuilt from a
        # snapshot; they are not a change.
        if before is not part and before != part:
            changed.append((index, before, part))
    if matched < len(old_parts):
        # Replay never removes a single partition today; handle it anyway.
        changed.extend(
            (index, before, None) for index, before in old_parts.items() if index not in new_parts
        )
    return changed
