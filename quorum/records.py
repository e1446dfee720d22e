"""Metadata records: constructors, the batch codec and a human-readable form.

The protobuf messages of ``raftka.v1.metadata`` are the records. This module is
the one place that builds them, so the rest of the code reads as the domain.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from google.protobuf import json_format
from raftka.v1 import metadata_pb2 as pb
from raftka.v1.common_pb2 import Endpoint as EndpointPb

from quorum.image import Endpoint

BATCH_FORMAT_VERSION = 1
SNAPSHOT_FORMAT_VERSION = 1

CONFIG_TOPIC = pb.CONFIG_RESOURCE_TOPIC
CONFIG_BROKER = pb.CONFIG_RESOURCE_BROKER

MetadataRecord = pb.MetadataRecord
MetadataBatch = pb.MetadataBatch
MetadataLogEntry = pb.MetadataLogEntry


class BatchDecodeError(ValueError):
    """The bytes are not a metadata batch this version understands."""


def kind(record: pb.MetadataRecord) -> str:
    """The record's type, e.g. ``"partition_change"``; empty for an unset record."""
    return record.WhichOneof("record") or ""


_TOPIC_RECORDS = ("topic", "partition", "partition_change", "remove_topic")


def touched_topic_ids(records: Iterable[pb.MetadataRecord]) -> frozenset[str]:
    """The ids of the topics these records create, change or remove (the
    topic part of the delta they make)."""
    touched = set()
    for record in records:
        name = record.WhichOneof("record")
        if name in _TOPIC_RECORDS:
            touched.add(getattr(record, name).topic_id)
    return frozenset(touched)


def endpoints_to_pb(listeners: Iterable[Endpoint]) -> list[EndpointPb]:
    return [EndpointPb(name=e.name, host=e.host, port=e.port) for e in listeners]


def endpoints_from_pb(listeners: Iterable[EndpointPb]) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(e.name, e.host, e.port) for e in listeners)


def register_broker(
    broker_id: int,
    incarnation_id: str,
    listeners: Iterable[Endpoint],
    rack: str = "",
    *,
    fenced: bool = True,
    broker_epoch: int | None = None,
    in_controlled_shutdown: bool = False,
) -> pb.MetadataRecord:
    rec = pb.RegisterBrokerRecord(
        broker_id=broker_id,
        incarnation_id=incarnation_id,
        listeners=endpoints_to_pb(listeners),
        rack=rack,
        fenced=fenced,
        in_controlled_shutdown=in_controlled_shutdown,
    )
    if broker_epoch is not None:
        rec.broker_epoch = broker_epoch
    return pb.MetadataRecord(register_broker=rec)


def unregister_broker(broker_id: int, broker_epoch: int) -> pb.MetadataRecord:
    return pb.MetadataRecord(
        unregister_broker=pb.UnregisterBrokerRecord(broker_id=broker_id, broker_epoch=broker_epoch)
    )


def fence_broker(broker_id: int, broker_epoch: int) -> pb.MetadataRecord:
    return pb.MetadataRecord(
        fence_broker=pb.FenceBrokerRecord(broker_id=broker_id, broker_epoch=broker_epoch)
    )


def unfence_broker(broker_id: int, broker_epoch: int) -> pb.MetadataRecord:
    return pb.MetadataRecord(
        unfence_broker=pb.UnfenceBrokerRecord(broker_id=broker_id, broker_epoch=broker_epoch)
    )


def broker_shutdown(broker_id: int, broker_epoch: int) -> pb.MetadataRecord:
    return pb.MetadataRecord(
        broker_shutdown=pb.BrokerShutdownRecord(broker_id=broker_id, broker_epoch=broker_epoch)
    )


def topic(name: str, topic_id: str) -> pb.MetadataRecord:
    return pb.MetadataRecord(topic=pb.TopicRecord(name=name, topic_id=topic_id))


def remove_topic(topic_id: str) -> pb.MetadataRecord:
    return pb.MetadataRecord(remove_topic=pb.RemoveTopicRecord(topic_id=topic_id))


def partition(
    topic_id: str,
    index: int,
    replicas: Sequence[int],
    isr: Sequence[int],
    leader: int,
    leader_epoch: int = 0,
    partition_epoch: int = 0,
) -> pb.MetadataRecord:
    return pb.MetadataRecord(
        partition=pb.PartitionRecord(
            topic_id=topic_id,
            partition=index,
            replicas=list(replicas),
            isr=list(isr),
            leader=leader,
            leader_epoch=leader_epoch,
            partition_epoch=partition_epoch,
        )
    )


def partition_change(
    topic_id: str,
    index: int,
    *,
    leader: int | None = None,
    isr: Sequence[int] | None = None,
    replicas: Sequence[int] | None = None,
) -> pb.MetadataRecord:
    rec = pb.PartitionChangeRecord(topic_id=topic_id, partition=index)
    if leader is not None:
        rec.leader = leader
    if isr is not None:
        rec.isr.ids.extend(isr)
    if replicas is not None:
        rec.replicas.ids.extend(replicas)
    return pb.MetadataRecord(partition_change=rec)


def config(
    resource_type: int, resource_name: str, name: str, value: str | None
) -> pb.MetadataRecord:
    rec = pb.ConfigRecord(resource_type=resource_type, resource_name=resource_name, name=name)  # type: ignore[arg-type]
    if value is not None:
        rec.value = value
    return pb.MetadataRecord(config=rec)


def producer_ids(
    broker_id: int, broker_epoch: int, first_producer_id: int, block_size: int
) -> pb.MetadataRecord:
    return pb.MetadataRecord(
        producer_ids=pb.ProducerIdsRecord(
            broker_id=broker_id,
            broker_epoch=broker_epoch,
            first_producer_id=first_producer_id,
            block_size=block_size,
        )
    )


def controller_epoch(epoch: int, controller_id: int) -> pb.MetadataRecord:
    return pb.MetadataRecord(
        controller_epoch=pb.ControllerEpochRecord(
            controller_epoch=epoch, controller_id=controller_id
        )
    )


def feature_level(name: str, level: int) -> pb.MetadataRecord:
    return pb.MetadataRecord(feature_level=pb.FeatureLevelRecord(name=name, feature_level=level))


def no_op() -> pb.MetadataRecord:
    return pb.MetadataRecord(no_op=pb.NoOpRecord())


def encode_batch(
    records: Sequence[pb.MetadataRecord],
    *,
    controller_epoch: int,
    proposer_id: int,
    expected_base_offset: int,
    append_time_ms: int,
) -> bytes:
    batch = pb.MetadataBatch(
        format_version=BATCH_FORMAT_VERSION,
        controller_epoch=controller_epoch,
        proposer_id=proposer_id,
        expected_base_offset=expected_base_offset,
        append_time_ms=append_time_ms,
        records=list(records),
    )
    return batch.SerializeToString()


def decode_batch(payload: bytes) -> pb.MetadataBatch:
    if not isinstance(payload, bytes | bytearray):
        raise BatchDecodeError(f"payload is {type(payload).__name__}, not bytes")
    batch = pb.MetadataBatch()
    try:
        batch.ParseFromString(payload)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise BatchDecodeError(f"undecodable batch: {exc}") from exc
    if batch.format_version != BATCH_FORMAT_VERSION:
        raise BatchDecodeError(f"unsupported batch format version {batch.format_version}")
    return batch


def describe(record: pb.MetadataRecord) -> str:
    """One line for humans: ``PartitionChange topic_id=... partition=0 leader=2``."""
    name = kind(record)
    if not name:
        return "(empty record)"
    body = json_format.MessageToDict(
        getattr(record, name),
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=False,
    )
    title = "".join(part.capitalize() for part in name.split("_"))
    fields = " ".join(f"{k}={_flat(v)}" for k, v in body.items())
    return f"{title} {fields}".rstrip()


def to_dict(record: pb.MetadataRecord) -> dict[str, object]:
    return json_format.MessageToDict(record, preserving_proto_field_name=True)


def _flat(value: object) -> str:
    if isinstance(value, dict) and set(value) == {"ids"}:
        value = value["ids"]
    if isinstance(value, list):
        return "[" + ",".join(_flat(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_flat(v)}" for k, v in value.items()) + "}"
    return str(value)
