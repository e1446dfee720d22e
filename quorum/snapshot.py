"""Snapshots: an image written as the records that rebuild it.

``image_to_records(image)`` lists records that, replayed from an empty image,
give back ``image``. Brokers that fall behind the retained tail load this, and
the Raft layer persists the whole replicated state in the same form, so no
pickled Python object describes metadata anywhere.
"""

from __future__ import annotations

from dataclasses import replace

from raftka.v1 import metadata_pb2 as pb

from quorum import records as r
from quorum.image import EMPTY_IMAGE, MetadataImage
from quorum.replay import replay_batch
from quorum.state import MetadataState, frame

_TAIL_FIELD = pb.MetadataStateSnapshot.DESCRIPTOR.fields_by_name["tail"].number


class SnapshotError(ValueError):
    """The snapshot cannot be loaded."""


def image_to_records(image: MetadataImage) -> list[pb.MetadataRecord]:
    out: list[pb.MetadataRecord] = []
    for name, level in sorted(image.features.items()):
        out.append(r.feature_level(name, level))
    if image.controller_epoch > 0:
        out.append(r.controller_epoch(image.controller_epoch, image.controller_id))
    for broker_id in sorted(image.brokers.keys()):
        b = image.brokers[broker_id]
        out.append(
            r.register_broker(
                b.broker_id,
                b.incarnation_id,
                b.listeners,
                b.rack,
                fenced=b.fenced,
                broker_epoch=b.broker_epoch,
                in_controlled_shutdown=b.in_controlled_shutdown,
            )
        )
    for topic_id in sorted(image.topics.keys()):
        topic = image.topics[topic_id]
        out.append(r.topic(topic.name, topic.topic_id))
        for index in sorted(topic.partitions.keys()):
            p = topic.partitions[index]
            out.append(
                r.partition(
                    topic_id, index, p.replicas, p.isr, p.leader, p.leader_epoch, p.partition_epoch
                )
            )
    for resource_type, resource_name in sorted(image.configs.keys()):
        for name, value in sorted(image.configs[(resource_type, resource_name)].items()):
            out.append(r.config(resource_type, resource_name, name, value))
    if image.next_producer_id:
        out.append(r.producer_ids(-1, -1, image.next_producer_id, 0))
    return out


def records_to_image(records: list[pb.MetadataRecord], end_offset: int) -> MetadataImage:
    # Snapshot records carry what the log derives from offsets (broker epochs),
    # so replaying them all at one offset rebuilds the image exactly.
    image, no_ops = replay_batch(EMPTY_IMAGE, records, end_offset)
    if no_ops:
        raise SnapshotError(f"snapshot record does not apply: {no_ops[0][1]}")
    return replace(image, offset=end_offset)


def encode_image(image: MetadataImage) -> pb.MetadataSnapshot:
    return pb.MetadataSnapshot(
        format_version=r.SNAPSHOT_FORMAT_VERSION,
        end_offset=image.offset,
        controller_epoch=image.controller_epoch,
        records=image_to_records(image),
    )


def decode_image(snapshot: pb.MetadataSnapshot) -> MetadataImage:
    if snapshot.format_version != r.SNAPSHOT_FORMAT_VERSION:
        raise SnapshotError(f"unsupported snapshot format {snapshot.format_version}")
    return records_to_image(list(snapshot.records), snapshot.end_offset)


def encode_state(state: MetadataState) -> bytes:
    msg = pb.MetadataStateSnapshot(
        format_version=r.SNAPSHOT_FORMAT_VERSION,
        image=encode_image(state.image),
        log_start_offset=state.log_start_offset,
    )
    return msg.SerializeToString() + frame(_TAIL_FIELD, state.tail)


def decode_state(payload: bytes, tail_max_records: int | None = None) -> MetadataState:
    msg = pb.MetadataStateSnapshot()
    msg.ParseFromString(payload)
    if msg.format_version != r.SNAPSHOT_FORMAT_VERSION:
        raise SnapshotError(f"unsupported state snapshot format {msg.format_version}")
    image = decode_image(msg.image)
    state = MetadataState(
        image=image,
        next_offset=image.offset + 1,
        log_start_offset=msg.log_start_offset,
        tail=[entry.SerializeToString() for entry in msg.tail],
    )
    if tail_max_records is not None:
        state.tail_max_records = tail_max_records
    return state
