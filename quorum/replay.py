"""Replay: the only way metadata state changes.

``replay(image, record, offset)`` returns the next image. It is pure: no clock,
no randomness, no I/O. It never raises: a record that does not apply to the
image (an unknown broker, a stale broker epoch, an ISR outside the replicas)
leaves the image as it was, and the reason is returned so the caller can log
it. Every voter, every broker, a restart and a snapshot load all replay the
same records through this function, so they all reach the same image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

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
    changed, reason = _apply(image, record, offset)
    return replace(changed, offset=offset), reason


def replay_batch(
    image: MetadataImage, records: Sequence[pb.MetadataRecord], base_offset: int
) -> tuple[MetadataImage, list[tuple[int, str]]]:
    """Apply records at ``base_offset``, ``base_offset + 1``, ...; the same as
    replaying them one by one, with the image's offset set once at the end."""
    no_ops = []
    for i, record in enumerate(records):
        image, reason = _apply(image, record, base_offset + i)
        if reason is not None:
            no_ops.append((base_offset + i, reason))
    if records:
        image = replace(image, offset=base_offset + len(records) - 1)
    return image, no_ops


def _apply(
    image: MetadataImage, record: pb.MetadataRecord, offset: int
) -> tuple[MetadataImage, str | None]:
    name = record.WhichOneof("record")
    handler = _HANDLERS.get(name or "")
    if handler is None:
        return image, f"unknown record type {name!r}"
    try:
        return handler(image, getattr(record, name), offset), None  # type: ignore[arg-type]
    except NotApplied as exc:
        return image, str(exc)
    except Exception as exc:  # a bug must not wedge replay; it is deterministic on every node
        log.exception("replay of %s at offset %d failed", name, offset)
        return image, f"internal error: {exc!r}"


def _broker(image: MetadataImage, broker_id: int, broker_epoch: int) -> BrokerRegistration:
    broker = image.brokers.get(broker_id)
    if broker is None:
        raise NotApplied(f"broker {broker_id} is not registered")
    if broker.broker_epoch != broker_epoch:
        raise NotApplied(
            f"stale broker epoch {broker_epoch} for broker {broker_id}"
            f" (current {broker.broker_epoch})"
        )
    return broker


def _register_broker(
    image: MetadataImage, rec: pb.RegisterBrokerRecord, offset: int
) -> MetadataImage:
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
    return replace(image, brokers=image.brokers.set(rec.broker_id, broker))


def _unregister_broker(
    image: MetadataImage, rec: pb.UnregisterBrokerRecord, offset: int
) -> MetadataImage:
    _broker(image, rec.broker_id, rec.broker_epoch)
    return replace(image, brokers=image.brokers.delete(rec.broker_id))


def _fence_broker(image: MetadataImage, rec: pb.FenceBrokerRecord, offset: int) -> MetadataImage:
    broker = _broker(image, rec.broker_id, rec.broker_epoch)
    fenced = replace(broker, fenced=True)
    return replace(image, brokers=image.brokers.set(rec.broker_id, fenced))


def _unfence_broker(
    image: MetadataImage, rec: pb.UnfenceBrokerRecord, offset: int
) -> MetadataImage:
    broker = _broker(image, rec.broker_id, rec.broker_epoch)
    if broker.in_controlled_shutdown:
        raise NotApplied(f"broker {rec.broker_id} is shutting down")
    return replace(image, brokers=image.brokers.set(rec.broker_id, replace(broker, fenced=False)))


def _broker_shutdown(
    image: MetadataImage, rec: pb.BrokerShutdownRecord, offset: int
) -> MetadataImage:
    broker = _broker(image, rec.broker_id, rec.broker_epoch)
    changed = replace(broker, in_controlled_shutdown=True)
    return replace(image, brokers=image.brokers.set(rec.broker_id, changed))


def _counts(
    image: MetadataImage, old: PartitionRegistration | None, new: PartitionRegistration | None
) -> dict[str, Any]:
    """The per-broker replica and preferred-leader counts after a change, as
    fields for ``replace`` (none when the replicas did not change)."""
    if old is not None and new is not None and old.replicas == new.replicas:
        return {}
    replicas = image.replica_counts.mutate()
    leaders = image.preferred_leader_counts.mutate()
    for part, step in ((old, -1), (new, 1)):
        if part is None:
            continue
        for broker in part.replicas:
            _add_count(replicas, broker, step)
        if part.replicas:
            _add_count(leaders, part.replicas[0], step)
    return {"replica_counts": replicas.finish(), "preferred_leader_counts": leaders.finish()}


def _counts_removed(image: MetadataImage, parts: Iterable[PartitionRegistration]) -> dict[str, Any]:
    """The counts after removing every one of ``parts`` (a deleted topic)."""
    replicas = image.replica_counts.mutate()
    leaders = image.preferred_leader_counts.mutate()
    for part in parts:
        for broker in part.replicas:
            _add_count(replicas, broker, -1)
        if part.replicas:
            _add_count(leaders, part.replicas[0], -1)
    return {"replica_counts": replicas.finish(), "preferred_leader_counts": leaders.finish()}


def _add_count(counts: immutables.MapMutation[int, int], key: int, step: int) -> None:
    # Zero counts are dropped, so equal images have equal maps.
    value = counts.get(key, 0) + step
    if value:
        counts[key] = value
    elif key in counts:
        del counts[key]


def unify_name(name: str) -> str:
    return name.replace(".", "_")


def _topic(image: MetadataImage, rec: pb.TopicRecord, offset: int) -> MetadataImage:
    if not rec.name or not rec.topic_id:
        raise NotApplied("topic record without name or id")
    if rec.name in image.topic_ids:
        raise NotApplied(f"topic {rec.name!r} already exists")
    if rec.topic_id in image.topics:
        raise NotApplied(f"topic id {rec.topic_id} already exists")
    if unify_name(rec.name) in image.unified_names:
        other = image.unified_names[unify_name(rec.name)]
        raise NotApplied(f"topic {rec.name!r} collides with {other!r}")
    return replace(
        image,
        topics=image.topics.set(rec.topic_id, TopicImage(rec.name, rec.topic_id)),
        topic_ids=image.topic_ids.set(rec.name, rec.topic_id),
        unified_names=image.unified_names.set(unify_name(rec.name), rec.name),
    )


def _remove_topic(image: MetadataImage, rec: pb.RemoveTopicRecord, offset: int) -> MetadataImage:
    topic = image.topics.get(rec.topic_id)
    if topic is None:
        raise NotApplied(f"unknown topic id {rec.topic_id}")
    counts = _counts_removed(image, topic.partitions.values())
    return replace(
        image,
        topics=image.topics.delete(rec.topic_id),
        topic_ids=image.topic_ids.delete(topic.name),
        unified_names=_drop(image.unified_names, unify_name(topic.name)),
        configs=_drop(image.configs, (CONFIG_TOPIC, topic.name)),
        **counts,
    )


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


def _partition(image: MetadataImage, rec: pb.PartitionRecord, offset: int) -> MetadataImage:
    topic = image.topics.get(rec.topic_id)
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
    counts = _counts(image, topic.partitions.get(rec.partition), part)
    changed = TopicImage(topic.name, topic.topic_id, topic.partitions.set(rec.partition, part))
    return replace(image, topics=image.topics.set(rec.topic_id, changed), **counts)


def _partition_change(
    image: MetadataImage, rec: pb.PartitionChangeRecord, offset: int
) -> MetadataImage:
    topic = image.topics.get(rec.topic_id)
    current = None if topic is None else topic.partitions.get(rec.partition)
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
    counts = _counts(image, current, part)
    changed = TopicImage(topic.name, topic.topic_id, topic.partitions.set(rec.partition, part))
    return replace(image, topics=image.topics.set(rec.topic_id, changed), **counts)


def _config(image: MetadataImage, rec: pb.ConfigRecord, offset: int) -> MetadataImage:
    key = (int(rec.resource_type), rec.resource_name)
    entries = image.configs.get(key, immutables.Map())
    if rec.HasField("value"):
        entries = entries.set(rec.name, rec.value)
    elif rec.name in entries:
        entries = entries.delete(rec.name)
    configs = image.configs.set(key, entries) if len(entries) else _drop(image.configs, key)
    return replace(image, configs=configs)


def _drop(mapping: immutables.Map, key: object) -> immutables.Map:
    return mapping.delete(key) if key in mapping else mapping


def _producer_ids(image: MetadataImage, rec: pb.ProducerIdsRecord, offset: int) -> MetadataImage:
    if rec.first_producer_id < 0 or rec.block_size < 0:
        raise NotApplied("negative producer id block")
    end = rec.first_producer_id + rec.block_size
    return replace(image, next_producer_id=max(image.next_producer_id, end))


def _controller_epoch(
    image: MetadataImage, rec: pb.ControllerEpochRecord, offset: int
) -> MetadataImage:
    if rec.controller_epoch <= image.controller_epoch:
        raise NotApplied(
            f"controller epoch {rec.controller_epoch} is not above {image.controller_epoch}"
        )
    return replace(image, controller_epoch=rec.controller_epoch, controller_id=rec.controller_id)


def _feature_level(image: MetadataImage, rec: pb.FeatureLevelRecord, offset: int) -> MetadataImage:
    return replace(image, features=image.features.set(rec.name, rec.feature_level))


def _no_op(image: MetadataImage, rec: pb.NoOpRecord, offset: int) -> MetadataImage:
    return image


_Handler = Callable[[MetadataImage, object, int], MetadataImage]
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
