"""The metadata image: an immutable view of the cluster at one metadata offset.

Every field is immutable (frozen dataclasses, tuples and ``immutables.Map``), so
an image can be handed to any thread without a lock, and replaying a record
builds a new image that shares everything it did not change. That sharing is
what keeps a change to one partition of a 100,000-partition cluster cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import immutables

NO_LEADER = -1


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class BrokerRegistration:
    broker_id: int
    # The metadata offset of the registration record.
    broker_epoch: int
    incarnation_id: str
    listeners: tuple[Endpoint, ...]
    rack: str
    fenced: bool
    in_controlled_shutdown: bool = False

    def endpoint(self, name: str | None = None) -> Endpoint | None:
        for listener in self.listeners:
            if name is None or listener.name == name:
                return listener
        return None


@dataclass(frozen=True, slots=True)
class PartitionRegistration:
    replicas: tuple[int, ...]
    isr: tuple[int, ...]
    leader: int
    leader_epoch: int
    partition_epoch: int

    @property
    def preferred_leader(self) -> int:
        return self.replicas[0] if self.replicas else NO_LEADER


@dataclass(frozen=True, slots=True)
class TopicImage:
    name: str
    topic_id: str
    partitions: immutables.Map[int, PartitionRegistration] = field(default_factory=immutables.Map)


@dataclass(frozen=True, slots=True)
class MetadataImage:
    # The offset of the last record replayed into this image, -1 when empty.
    offset: int = -1
    controller_epoch: int = 0
    controller_id: int = -1
    brokers: immutables.Map[int, BrokerRegistration] = field(default_factory=immutables.Map)
    # Topics by topic id, and the name index.
    topics: immutables.Map[str, TopicImage] = field(default_factory=immutables.Map)
    topic_ids: immutables.Map[str, str] = field(default_factory=immutables.Map)
    # Configs by (resource type, resource name).
    configs: immutables.Map[tuple[int, str], immutables.Map[str, str]] = field(
        default_factory=immutables.Map
    )
    next_producer_id: int = 0
    features: immutables.Map[str, int] = field(default_factory=immutables.Map)
    # Indexes kept by replay so that decisions stay cheap at 100,000
    # partitions: replicas and preferred leaderships per broker, and topic
    # names with '.' unified to '_' (Kafka refuses names that collide so).
    replica_counts: immutables.Map[int, int] = field(default_factory=immutables.Map)
    preferred_leader_counts: immutables.Map[int, int] = field(default_factory=immutables.Map)
    unified_names: immutables.Map[str, str] = field(default_factory=immutables.Map)
    # For each broker, the partitions whose ISR holds it, as (topic id,
    # partition) keys (Kafka's BrokersToIsrs). A leader is always in its ISR,
    # so this also finds what a broker leads. Fencing, shutdown and
    # unfencing then cost what the broker hosts, not the whole cluster.
    isr_index: immutables.Map[int, immutables.Map[tuple[str, int], bool]] = field(
        default_factory=immutables.Map
    )
    # Partitions led per broker, and the leaderless partitions as (topic id,
    # partition) keys: whether a broker still leads anything, and which
    # partitions wait for an election, without a pass over its partitions.
    leader_counts: immutables.Map[int, int] = field(default_factory=immutables.Map)
    leaderless: immutables.Map[tuple[str, int], bool] = field(default_factory=immutables.Map)

    def topic_by_name(self, name: str) -> TopicImage | None:
        topic_id = self.topic_ids.get(name)
        return None if topic_id is None else self.topics.get(topic_id)

    def partition(self, topic_id: str, partition: int) -> PartitionRegistration | None:
        topic = self.topics.get(topic_id)
        return None if topic is None else topic.partitions.get(partition)

    def topic_configs(self, name: str) -> immutables.Map[str, str]:
        from quorum.records import CONFIG_TOPIC

        return self.configs.get((CONFIG_TOPIC, name), immutables.Map())

    def active_brokers(self) -> list[BrokerRegistration]:
        """Brokers that may take new replicas and leaderships, by id."""
        return sorted(
            (b for b in self.brokers.values() if not b.fenced and not b.in_controlled_shutdown),
            key=lambda b: b.broker_id,
        )

    def iter_partitions(self) -> Iterator[tuple[TopicImage, int, PartitionRegistration]]:
        for topic in self.topics.values():
            for index, part in topic.partitions.items():
                yield topic, index, part

    def partitions_with_isr_member(
        self, broker_id: int
    ) -> list[tuple[TopicImage, int, PartitionRegistration]]:
        """Partitions whose ISR holds ``broker_id``, sorted by topic name and index
        (so that records built from them do not depend on map order)."""
        out = []
        for topic_id, index in self.isr_index.get(broker_id, immutables.Map()).keys():
            topic = self.topics[topic_id]
            out.append((topic, index, topic.partitions[index]))
        out.sort(key=lambda item: (item[0].name, item[1]))
        return out

    def leaderless_partitions(self) -> list[tuple[TopicImage, int, PartitionRegistration]]:
        """Partitions without a leader, sorted by topic name and index."""
        out = []
        for topic_id, index in self.leaderless.keys():
            topic = self.topics[topic_id]
            out.append((topic, index, topic.partitions[index]))
        out.sort(key=lambda item: (item[0].name, item[1]))
        return out

    def leads(self, broker_id: int) -> bool:
        return self.leader_counts.get(broker_id, 0) > 0

    def partition_count(self) -> int:
        return sum(len(t.partitions) for t in self.topics.values())


EMPTY_IMAGE = MetadataImage()
