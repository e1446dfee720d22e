"""Replay: the only way metadata state changes.

``replay(image, record, offset)`` returns the next image, and
``replay_batch(image, records, base_offset)`` does the same for a run of
records. Replay is pure: no clock, no randomness, no I/O. It never raises: a
record that does not apply to the image (an unknown broker, a stale broker
epoch, an ISR outside the replicas) leaves the image as it was, and the
reason is returned so the caller can log it. Every voter, every broker, a
restart and a snapshot load all replay the same records through this module,
so they all reach the same image.

How. A batch is replayed into a ``_Delta``: mutable views
(``immutables.MapMutation``) of the image's maps, like Kafka's MetadataDelta.
The new image is built once at the end; maps and topics a batch did not touch
are the very objects of the old image, which is what lets a broker find its
changes by identity. Every handler checks everything before it changes
anything, so a record that does not apply changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import immutables
from raftka.v1 import metadata_pb2 as pb

from quorum.image import (
    NO_LEADER,
    BrokerRegistration,
    MetadataImage,
    PartitionRegistration,
    TopicImage,
)
from quorum.records import CONFIG_TOPIC, endpoints_from_pb

log = logging.getLogger(__name__)


class NotApplied(Exception):
    """Raised inside a replay handler; becomes a no-op with this reason."""


def replay(
    image: MetadataImage, record: pb.MetadataRecord, offset: int
) -> tuple[MetadataImage, str | None]:
    """Apply one committed record at ``offset``; return (image, reason-if-no-op)."""
    changed, no_ops = replay_batch(image, [record], offset)
    return changed, (no_ops[0][1] if no_ops else None)


def replay_batch(
    image: MetadataImage, records: Sequence[pb.MetadataRecord], base_offset: int
) -> tuple[MetadataImage, list[tuple[int, str]]]:
    """Apply records at ``base_offset``, ``base_offset + 1``, ...; the same as
    replaying them one by one. Returns the image and (offset, reason) for each
    record that was a no-op."""
    if not records:
        return image, []
    delta = _Delta(image)
    no_ops = []
    for i, record in enumerate(records):
        reason = _apply(delta, record, base_offset + i)
        if reason is not None:
            no_ops.append((base_offset + i, reason))
    return delta.finish(base_offset + len(records) - 1), no_ops


def unify_name(name: str) -> str:
    """Kafka refuses topic names that differ only in '.' versus '_'."""
    return name.replace(".", "_")


class _Map:
    """A lazily opened mutation of one image map; untouched, it finishes as the
    original object."""

    __slots__ = ("base", "mutation")

    def __init__(self, base: immutables.Map) -> None:
        self.base = base
        self.mutation: immutables.MapMutation | None = None

    def get(self, key: object, default: object = None) -> object:
        source = self.base if self.mutation is None else self.mutation
        return source.get(key, default)

    def __contains__(self, key: object) -> bool:
        source = self.base if self.mutation is None else self.mutation
        return key in source

    def _open(self) -> immutables.MapMutation:
        if self.mutation is None:
            self.mutation = self.base.mutate()
        return self.mutation

    def set(self, key: object, value: object) -> None:
        self._open()[key] = value

    def delete(self, key: object) -> None:
        if key in self:
            del self._open()[key]

    def add(self, key: object, step: int) -> None:
        """Add ``step`` to a count, dropping it at zero (equal images, equal maps)."""
        value = self.get(key, 0) + step  # type: ignore[operator]
        if value:
            self.set(key, value)
        else:
            self.delete(key)

    def finish(self) -> immutables.Map:
        return self.base if self.mutation is None else self.mutation.finish()


class _Delta:
    """The image as a batch is changing it."""

    def __init__(self, image: MetadataImage) -> None:
        self.image = image
        self.brokers = _Map(image.brokers)
        self.topics = _Map(image.topics)
        self.topic_ids = _Map(image.topic_ids)
        self.configs = _Map(image.configs)
        self.features = _Map(image.features)
        self.replica_counts = _Map(image.replica_counts)
        self.preferred_leader_counts = _Map(image.preferred_leader_counts)
        self.unified_names = _Map(image.unified_names)
        self.isr_index = _Map(image.isr_index)
        self.leader_counts = _Map(image.leader_counts)
        self.leaderless = _Map(image.leaderless)
        # Per broker, the open ISR index entries this batch changes.
        self.isr_members: dict[int, _Map] = {}
        # Partitions of the topics this batch changes, by topic id.
        self.partitions: dict[str, _Map] = {}
        self.controller_epoch = image.controller_epoch
        self.controller_id = image.controller_id
        self.next_producer_id = image.next_producer_id

    def topic(self, topic_id: str) -> TopicImage | None:
        return self.topics.get(topic_id)  # type: ignore[return-value]

    def partitions_of(self, topic: TopicImage) -> _Map:
        parts = self.partitions.get(topic.topic_id)
        if parts is None:
            parts = self.partitions[topic.topic_id] = _Map(topic.partitions)
        return parts

    def index_isr(
        self,
        key: tuple[str, int],
        old: PartitionRegistration | None,
        new: PartitionRegistration | None,
    ) -> None:
        # New and removed partitions are the common cases; diff only changes.
        if old is None or new is None:
            part = new if new is not None else old
            assert part is not None
            for broker in part.isr:
                if new is None:
                    self._isr_members(broker).delete(key)
                else:
                    self._isr_members(broker).set(key, True)
            return
        for broker in old.isr:
            if broker not in new.isr:
                self._isr_members(broker).delete(key)
        for broker in new.isr:
            if broker not in old.isr:
                self._isr_members(broker).set(key, True)

    def _isr_members(self, broker: int) -> _Map:
        members = self.isr_members.get(broker)
        if members is None:
            current = self.isr_index.get(broker, immutables.Map())
            members = self.isr_members[broker] = _Map(current)  # type: ignore[arg-type]
        return members

    def index_leader(
        self,
        key: tuple[str, int],
        old: PartitionRegistration | None,
        new: PartitionRegistration | None,
    ) -> None:
        if old is not None:
            if old.leader == NO_LEADER:
                self.leaderless.delete(key)
            else:
                self.leader_counts.add(old.leader, -1)
        if new is not None:
            if new.leader == NO_LEADER:
                self.leaderless.set(key, True)
            else:
                self.leader_counts.add(new.leader, 1)

    def count(self, part: PartitionRegistration, step: int) -> None:
        for broker in part.replicas:
            self.replica_counts.add(broker, step)
        if part.replicas:
            self.preferred_leader_counts.add(part.replicas[0], step)

    def finish(self, offset: int) -> MetadataImage:
        for broker, members in self.isr_members.items():
            if members.mutation is not None:
                finished = members.finish()
                if len(finished):
                    self.isr_index.set(broker, finished)
                else:
                    self.isr_index.delete(broker)
        for topic_id, parts in self.partitions.items():
            topic = self.topic(topic_id)
            if topic is not None and parts.mutation is not None:
                self.topics.set(topic_id, TopicImage(topic.name, topic.topic_id, parts.finish()))
        return MetadataImage(
            offset=offset,
            controller_epoch=self.controller_epoch,
            controller_id=self.controller_id,
            brokers=self.brokers.finish(),
            topics=self.topics.finish(),
            topic_ids=self.topic_ids.finish(),
            configs=self.configs.finish(),
            next_producer_id=self.next_producer_id,
            features=self.features.finish(),
            replica_counts=self.replica_counts.finish(),
            preferred_leader_counts=self.preferred_leader_counts.finish(),
            unified_names=self.unified_names.finish(),
            isr_index=self.isr_index.finish(),
            leader_counts=self.leader_counts.finish(),
            leaderless=self.leaderless.finish(),
        )


def _apply(delta: _Delta, record: pb.MetadataRecord, offset: int) -> str | None:
    name = record.WhichOneof("record")
    handler = _HANDLERS.get(name or "")
    if handler is None:
        return f"unknown record type {name!r}"
    try:
        handler(delta, getattr(record, name), offset)  # type: ignore[arg-type]
    except NotApplied as exc:
        return str(exc)
    except Exception as exc:  # a bug must not wedge replay; it is deterministic on every node
        log.exception("replay of %s at offset %d failed", name, offset)
        return f"internal error: {exc!r}"
    return None


# -- brokers ----------------------------------------------------------------------


def _broker(delta: _Delta, broker_id: int, broker_epoch: int) -> BrokerRegistration:
    broker: BrokerRegistration | None = delta.brokers.get(broker_id)  # type: ignore[assignment]
    if broker is None:
        raise NotApplied(f"broker {broker_id} is not registered")
    if broker.broker_epoch != broker_epoch:
        raise NotApplied(
            f"stale broker epoch {broker_epoch} for broker {broker_id}"
            f" (current {broker.broker_epoch})"
        )
    return broker


def _register_broker(delta: _Delta, rec: pb.RegisterBrokerRecord, offset: int) -> None:
    if rec.broker_id < 0:
        raise NotApplied(f"invalid broker id {rec.broker_id}")
    epoch = rec.broker_epoch if rec.HasField("broker_epoch") else offset
    broker = BrokerRegistration(
        broker_id=rec.broker_id,
        broker_epoch=epoch,
        incarnation_id=rec.incarnation_id,
        listeners=endpoints_from_pb(rec.listeners),
        rack=rec.rack,
        fenced=rec.fenced,
        in_controlled_shutdown=rec.in_controlled_shutdown,
    )
    delta.brokers.set(rec.broker_id, broker)


def _unregister_broker(delta: _Delta, rec: pb.UnregisterBrokerRecord, offset: int) -> None:
    _broker(delta, rec.broker_id, rec.broker_epoch)
    delta.brokers.delete(rec.broker_id)


def _fence_broker(delta: _Delta, rec: pb.FenceBrokerRecord, offset: int) -> None:
    broker = _broker(delta, rec.broker_id, rec.broker_epoch)
    delta.brokers.set(rec.broker_id, replace(broker, fenced=True))


def _unfence_broker(delta: _Delta, rec: pb.UnfenceBrokerRecord, offset: int) -> None:
    broker = _broker(delta, rec.broker_id, rec.broker_epoch)
    if broker.in_controlled_shutdown:
        raise NotApplied(f"broker {rec.broker_id} is shutting down")
    delta.brokers.set(rec.broker_id, replace(broker, fenced=False))


def _broker_shutdown(delta: _Delta, rec: pb.BrokerShutdownRecord, offset: int) -> None:
    broker = _broker(delta, rec.broker_id, rec.broker_epoch)
    delta.brokers.set(rec.broker_id, replace(broker, in_controlled_shutdown=True))


# -- topics and partitions ------------------------------------------------------------


def _topic(delta: _Delta, rec: pb.TopicRecord, offset: int) -> None:
    if not rec.name or not rec.topic_id:
        raise NotApplied("topic record without name or id")
    if rec.name in delta.topic_ids:
        raise NotApplied(f"topic {rec.name!r} already exists")
    if rec.topic_id in delta.topics:
        raise NotApplied(f"topic id {rec.topic_id} already exists")
    unified = unify_name(rec.name)
    if unified in delta.unified_names:
        raise NotApplied(f"topic {rec.name!r} collides with {delta.unified_names.get(unified)!r}")
    delta.topics.set(rec.topic_id, TopicImage(rec.name, rec.topic_id))
    delta.partitions.pop(rec.topic_id, None)
    delta.topic_ids.set(rec.name, rec.topic_id)
    delta.unified_names.set(unified, rec.name)


def _remove_topic(delta: _Delta, rec: pb.RemoveTopicRecord, offset: int) -> None:
    topic = delta.topic(rec.topic_id)
    if topic is None:
        raise NotApplied(f"unknown topic id {rec.topic_id}")
    parts = delta.partitions.pop(topic.topic_id, None)
    current = topic.partitions if parts is None else parts.finish()
    for index, part in current.items():
        delta.count(part, -1)
        delta.index_isr((topic.topic_id, index), part, None)
        delta.index_leader((topic.topic_id, index), part, None)
    delta.topics.delete(rec.topic_id)
    delta.topic_ids.delete(topic.name)
    delta.unified_names.delete(unify_name(topic.name))
    delta.configs.delete((CONFIG_TOPIC, topic.name))


def _check_partition(replicas: tuple[int, ...], isr: tuple[int, ...], leader: int) -> None:
    if not replicas:
        raise NotApplied("partition without replicas")
    if len(set(replicas)) != len(replicas):
        raise NotApplied(f"duplicate replicas {list(replicas)}")
    if not isr:
        raise NotApplied("partition with an empty ISR")
    if len(set(isr)) != len(isr) or not set(isr) <= set(replicas):
        raise NotApplied(f"ISR {list(isr)} is not a subset of replicas {list(replicas)}")
    if leader != NO_LEADER and leader not in isr:
        raise NotApplied(f"leader {leader} is not in ISR {list(isr)}")


def _set_partition(
    delta: _Delta,
    topic: TopicImage,
    index: int,
    old: PartitionRegistration | None,
    new: PartitionRegistration,
) -> None:
    if old is None or old.replicas != new.replicas:
        if old is not None:
            delta.count(old, -1)
        delta.count(new, 1)
    if old is None or old.isr != new.isr:
        delta.index_isr((topic.topic_id, index), old, new)
    if old is None or old.leader != new.leader:
        delta.index_leader((topic.topic_id, index), old, new)
    delta.partitions_of(topic).set(index, new)


def _partition(delta: _Delta, rec: pb.PartitionRecord, offset: int) -> None:
    topic = delta.topic(rec.topic_id)
    if topic is None:
        raise NotApplied(f"unknown topic id {rec.topic_id}")
    if rec.partition < 0:
        raise NotApplied(f"invalid partition index {rec.partition}")
    part = PartitionRegistration(
        replicas=tuple(rec.replicas),
        isr=tuple(rec.isr),
        leader=rec.leader,
        leader_epoch=rec.leader_epoch,
        partition_epoch=rec.partition_epoch,
    )
    _check_partition(part.replicas, part.isr, part.leader)
    old = delta.partitions_of(topic).get(rec.partition)
    _set_partition(delta, topic, rec.partition, old, part)  # type: ignore[arg-type]


def _partition_change(delta: _Delta, rec: pb.PartitionChangeRecord, offset: int) -> None:
    topic = delta.topic(rec.topic_id)
    current: PartitionRegistration | None = (
        None if topic is None else delta.partitions_of(topic).get(rec.partition)  # type: ignore[assignment]
    )
    if topic is None or current is None:
        raise NotApplied(f"unknown partition {rec.topic_id}-{rec.partition}")
    replicas = tuple(rec.replicas.ids) if rec.HasField("replicas") else current.replicas
    isr = tuple(rec.isr.ids) if rec.HasField("isr") else current.isr
    leader = rec.leader if rec.HasField("leader") else current.leader
    _check_partition(replicas, isr, leader)
    part = PartitionRegistration(
        replicas=replicas,
        isr=isr,
        leader=leader,
        leader_epoch=current.leader_epoch + (1 if rec.HasField("leader") else 0),
        partition_epoch=current.partition_epoch + 1,
    )
    _set_partition(delta, topic, rec.partition, current, part)


# -- everything else ---------------------------------------------------------------------


def _config(delta: _Delta, rec: pb.ConfigRecord, offset: int) -> None:
    key = (int(rec.resource_type), rec.resource_name)
    entries: immutables.Map[str, str] = delta.configs.get(key, immutables.Map())  # type: ignore[assignment]
    if rec.HasField("value"):
        entries = entries.set(rec.name, rec.value)
    elif rec.name in entries:
        entries = entries.delete(rec.name)
    if len(entries):
        delta.configs.set(key, entries)
    else:
        delta.configs.delete(key)


def _producer_ids(delta: _Delta, rec: pb.ProducerIdsRecord, offset: int) -> None:
    if rec.first_producer_id < 0 or rec.block_size < 0:
        raise NotApplied("negative producer id block")
    delta.next_producer_id = max(delta.next_producer_id, rec.first_producer_id + rec.block_size)


def _controller_epoch(delta: _Delta, rec: pb.ControllerEpochRecord, offset: int) -> None:
    if rec.controller_epoch <= delta.controller_epoch:
        raise NotApplied(
            f"controller epoch {rec.controller_epoch} is not above {delta.controller_epoch}"
        )
    delta.controller_epoch = rec.controller_epoch
    delta.controller_id = rec.controller_id


def _feature_level(delta: _Delta, rec: pb.FeatureLevelRecord, offset: int) -> None:
    delta.features.set(rec.name, rec.feature_level)


def _no_op(delta: _Delta, rec: pb.NoOpRecord, offset: int) -> None:
    return None


_Handler = Callable[[_Delta, object, int], None]
_HANDLERS: dict[str, _Handler] = {
    "register_broker": _register_broker,  # type: ignore[dict-item]
    "unregister_broker": _unregister_broker,  # type: ignore[dict-item]
    "fence_broker": _fence_broker,  # type: ignore[dict-item]
    "unfence_broker": _unfence_broker,  # type: ignore[dict-item]
    "broker_shutdown": _broker_shutdown,  # type: ignore[dict-item]
    "topic": _topic,  # type: ignore[dict-item]
    "remove_topic": _remove_topic,  # type: ignore[dict-item]
    "partition": _partition,  # type: ignore[dict-item]
    "partition_change": _partition_change,  # type: ignore[dict-item]
    "config": _config,  # type: ignore[dict-item]
    "producer_ids": _producer_ids,  # type: ignore[dict-item]
    "controller_epoch": _controller_epoch,  # type: ignore[dict-item]
    "feature_level": _feature_level,  # type: ignore[dict-item]
    "no_op": _no_op,  # type: ignore[dict-item]
}
