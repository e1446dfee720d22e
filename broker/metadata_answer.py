"""The Metadata answer a broker gives clients, from its metadata image (pure)."""

from __future__ import annotations

from raftka.v1 import broker_pb2, common_pb2

from quorum.image import NO_LEADER, MetadataImage, TopicImage


def metadata_response(
    image: MetadataImage, offset: int, topics: list[str], cluster_id: str
) -> broker_pb2.MetadataResponse:
    """Live brokers and the topics asked for (every topic when ``topics`` is empty)."""
    live = {b.broker_id for b in image.brokers.values() if not b.fenced}
    response = broker_pb2.MetadataResponse(
        cluster_id=cluster_id, controller_id=image.controller_id, metadata_offset=offset
    )
    for broker_id in sorted(live):
        broker = image.brokers[broker_id]
        endpoint = broker.endpoint()
        if endpoint is not None:
            response.brokers.add(
                broker_id=broker_id, host=endpoint.host, port=endpoint.port, rack=broker.rack
            )
    names = topics or sorted(image.topic_ids.keys())
    for name in names:
        topic = image.topic_by_name(name)
        if topic is None:
            response.topics.add(
                name=name,
                error=common_pb2.Error(
                    code=common_pb2.UNKNOWN_TOPIC_OR_PARTITION,
                    message=f"topic {name!r} does not exist",
                ),
            )
            continue
        _add_topic(response.topics.add(), topic, live)
    return response


def _add_topic(out: broker_pb2.TopicMetadata, topic: TopicImage, live: set[int]) -> None:
    out.name = topic.name
    out.topic_id = topic.topic_id
    for index in sorted(topic.partitions.keys()):
        reg = topic.partitions[index]
        part = out.partitions.add(
            partition=index,
            leader=reg.leader,
            leader_epoch=reg.leader_epoch,
            replicas=list(reg.replicas),
            isr=list(reg.isr),
            offline_replicas=[r for r in reg.replicas if r not in live],
        )
        if reg.leader == NO_LEADER:
            part.error.code = common_pb2.LEADER_NOT_AVAILABLE
            part.error.message = f"{topic.name}-{index} has no leader"
