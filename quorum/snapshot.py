"""Snapshots: an image written as the records that rebuild it.

``image_to_records(image)`` lists records that, replayed from an empty image,
give back ``image``. Brokers that fall behind the retained tail load this, and
the Raft layer persists the whole replicated state in the same form, so no
pickled Python object describes metadata anywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace

from raftka.v1 import metadata_pb2 as pb

from quorum import records as r
from quorum.image import EMPTY_IMAGE, MetadataImage
from quorum.replay import replay_batch
from quorum.state import MetadataState, frame

_TAIL_FIELD = pb.MetadataStateSnapshot.DESCRIPTOR.fields_by_name["tail"].number
_DIGEST_VERSION = b"raftka-image-digest-v2"


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


# -- digest ---------------------------------------------------------------------------


def image_digest(image: MetadataImage) -> str:
    """sha256 hex of a canonical serialization of ``image``, its offset included.

    Two nodes that replayed the same records to the same offset get the same
    digest, whatever order they built their maps in and whatever their
    PYTHONHASHSEED: ``immutables.Map`` iterates in an order that depends on
    str hashes, so every entry is written as one line (the ``repr`` of a tuple
    of ints, strs and bools, which does not depend on hashing) and the lines
    are sorted before hashing.

    Everything in the image is covered. Nothing in it is node-local or
    time-dependent: broker epochs are offsets of registration records,
    controller epoch and id come from the ControllerEpochRecord, and append
    times live only in log entries (the retained tail and ``log_start_offset``
    belong to ``MetadataState``, not to the image, and are not covered). The
    derived indexes (``topic_ids``, replica, preferred-leader and leader
    counts, ``unified_names``, ``isr_index``, ``leaderless``) follow from the
    rest, but replay keeps them incrementally while a snapshot load rebuilds them, so they are
    covered too: nodes that disagree on them have diverged in a way that
    changes decisions.

    Costs O(n log n) over the image's entries; compute it only when asked.
    """
    lines = sorted(_canonical_lines(image))
    digest = hashlib.sha256(_DIGEST_VERSION)
    for line in lines:
        digest.update(line)
        digest.update(b"\n")
    return digest.hexdigest()


def _canonical_lines(image: MetadataImage) -> Iterator[bytes]:
    def line(*fields: object) -> bytes:
        # repr escapes newlines, so one entry is exactly one line.
        return repr(fields).encode("utf-8", "backslashreplace")

    yield line("offset", image.offset)
    yield line("controller", image.controller_epoch, image.controller_id)
    yield line("next_producer_id", image.next_producer_id)
    for name, level in image.features.items():
        yield line("feature", name, level)
    for b in image.brokers.values():
        yield line(
            "broker",
            b.broker_id,
            b.broker_epoch,
            b.incarnation_id,
            # Listener order is part of the registration (the first is the default).
            tuple((e.name, e.host, e.port) for e in b.listeners),
            b.rack,
            b.fenced,
            b.in_controlled_shutdown,
        )
    for topic_id, topic in image.topics.items():
        yield line("topic", topic_id, topic.topic_id, topic.name)
        for index, p in topic.partitions.items():
            yield line(
                "partition",
                topic_id,
                index,
                p.replicas,
                p.isr,
                p.leader,
                p.leader_epoch,
                p.partition_epoch,
            )
    for (resource_type, resource_name), entries in image.configs.items():
        for name, value in entries.items():
            yield line("config", resource_type, resource_name, name, value)
    for name, topic_id in image.topic_ids.items():
        yield line("topic_id", name, topic_id)
    for name_key, name in image.unified_names.items():
        yield line("unified_name", name_key, name)
    for broker_id, count in image.replica_counts.items():
        yield line("replica_count", broker_id, count)
    for broker_id, count in image.preferred_leader_counts.items():
        yield line("preferred_leader_count", broker_id, count)
    for broker_id, members in image.isr_index.items():
        for topic_id, index in members.keys():
            yield line("isr_member", broker_id, topic_id, index)
    for broker_id, count in image.leader_counts.items():
        yield line("leader_count", broker_id, count)
    for topic_id, index in image.leaderless.keys():
        yield line("leaderless", topic_id, index)


class DigestCache:
    """The digest of the last image asked about: polling an image that has not
    changed (a quiet cluster) costs nothing. Safe from any thread: the pair is
    replaced whole, and images are immutable."""

    def __init__(self) -> None:
        self._last: tuple[MetadataImage, str] | None = None

    def digest(self, image: MetadataImage) -> str:
        last = self._last
        if last is not None and last[0] is image:
            return last[1]
        value = image_digest(image)
        self._last = (image, value)
        return value
