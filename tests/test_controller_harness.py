"""A small in-memory cluster for controller tests, and tests of the harness itself.

``Cluster`` plays the active controller's loop without Raft: it runs a pure
decision on the current image, replays the records as the log would, and
checks after every commit that no record was a no-op and that every
partition is valid. Tests then read like the story they tell.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pytest
from raftka.v1 import common_pb2
from raftka.v1 import controller_pb2 as cpb
from raftka.v1 import metadata_pb2 as pb

from quorum import records as r
from quorum.controller import brokers
from quorum.controller.heartbeats import BrokerHeartbeatManager
from quorum.controller.result import ControllerContext
from quorum.image import EMPTY_IMAGE, NO_LEADER, MetadataImage, PartitionRegistration
from quorum.replay import replay

CLUSTER_ID = "raftka-test"
SESSION_TIMEOUT_MS = 9000


def isr_request(broker_id: int, broker_epoch: int, **change) -> cpb.AlterPartitionRequest:
    """An AlterPartition request carrying one ISR change."""
    return cpb.AlterPartitionRequest(
        broker_id=broker_id, broker_epoch=broker_epoch, changes=[cpb.IsrChange(**change)]
    )


def isr_outcome(response: cpb.AlterPartitionResponse) -> cpb.IsrChangeResult:
    """The result of a one-change request; a refusal of the whole request stands for it."""
    if response.error.code != common_pb2.NONE:
        return cpb.IsrChangeResult(error=response.error)
    (result,) = response.results
    return result


class NoOpRecord(AssertionError):
    """A decision produced a record that replay refused."""


def check_partitions(image: MetadataImage) -> None:
    """Every partition invariant the controller promises, on one image."""
    for topic, index, part in image.iter_partitions():
        where = f"{topic.name}-{index} {part}"
        assert len(set(part.replicas)) == len(part.replicas), where
        assert set(part.isr) <= set(part.replicas), where
        assert part.isr, f"empty ISR: {where}"
        if part.leader != NO_LEADER:
            assert part.leader in part.isr, where
            leader = image.brokers[part.leader]
            assert not leader.fenced and not leader.in_controlled_shutdown, where


class Cluster:
    def __init__(self) -> None:
        self.image: MetadataImage = EMPTY_IMAGE
        self.next_offset = 0
        self.now_ms = 0
        self.heartbeats = BrokerHeartbeatManager(SESSION_TIMEOUT_MS)
        self._topic_ids = (f"id-{n}" for n in itertools.count())

    def ctx(self) -> ControllerContext:
        return ControllerContext(
            next_offset=self.next_offset,
            now_ms=self.now_ms,
            cluster_id=CLUSTER_ID,
            new_topic_id=lambda: next(self._topic_ids),
        )

    def commit(self, records: Sequence[pb.MetadataRecord]) -> None:
        for record in records:
            self.image, reason = replay(self.image, record, self.next_offset)
            if reason is not None:
                raise NoOpRecord(f"{r.describe(record)}: {reason}")
            self.next_offset += 1
        check_partitions(self.image)

    def run(self, decision: Callable, request, *args):
        """Run a decision, commit its records, return its response."""
        result = decision(self.image, request, self.ctx(), *args)
        self.commit(result.records)
        return result.response

    # Broker lifecycle, as a broker process would drive it.

    def register(self, broker_id: int, rack: str = "", incarnation: str | None = None) -> int:
        request = cpb.RegisterBrokerRequest(
            broker_id=broker_id,
            incarnation_id=incarnation or f"inc-{broker_id}",
            rack=rack,
            cluster_id=CLUSTER_ID,
        )
        response = self.run(brokers.register_broker, request)
        assert response.error.code == common_pb2.NONE, response.error
        return response.broker_epoch

    def heartbeat(self, broker_id: int, **flags) -> cpb.BrokerHeartbeatResponse:
        request = cpb.BrokerHeartbeatRequest(
            broker_id=broker_id,
            broker_epoch=self.epoch(broker_id),
            metadata_offset=self.next_offset - 1,
            **flags,
        )
        return self.run(brokers.heartbeat, request, self.heartbeats)

    def start_brokers(self, *broker_ids: int, racks: str = "") -> None:
        """Register the brokers, then let each heartbeat once it has caught up."""
        for i, broker_id in enumerate(broker_ids):
            self.register(broker_id, rack=racks[i] if racks else "")
        for broker_id in broker_ids:
            assert not self.heartbeat(broker_id).is_fenced

    def fence(self, broker_id: int) -> None:
        self.commit(brokers.fence_broker(self.image, broker_id).records)

    def epoch(self, broker_id: int) -> int:
        return self.image.brokers[broker_id].broker_epoch

    # Topics.

    def create_topic(self, name: str, partitions: int, rf: int, **configs: str) -> str:
        from quorum.controller import topics

        request = cpb.CreateTopicsRequest(
            topics=[
                cpb.CreatableTopic(
                    name=name, num_partitions=partitions, replication_factor=rf, configs=configs
                )
            ]
        )
        (result,) = self.run(topics.create_topics, request).results
        assert result.error.code == common_pb2.NONE, result.error
        return result.topic_id

    def partition(self, topic: str, index: int = 0) -> PartitionRegistration:
        found = self.image.topic_by_name(topic)
        assert found is not None, topic
        return found.partitions[index]

    def show(self, topic: str) -> str:
        """One line per partition, for comparing with an expected picture."""
        found = self.image.topic_by_name(topic)
        assert found is not None, topic
        return "\n".join(
            f"{topic}-{index} replicas={list(p.replicas)} isr={list(p.isr)} leader={p.leader}"
            f" epochs={p.leader_epoch}/{p.partition_epoch}"
            for index, p in sorted(found.partitions.items())
        )


def picture(text: str) -> str:
    """An expected ``Cluster.show`` output written as an indented block."""
    return "\n".join(line.strip() for line in text.strip().splitlines())


def test_commit_refuses_a_record_replay_would_ignore():
    cluster = Cluster()
    with pytest.raises(NoOpRecord, match="not registered"):
        cluster.commit([r.fence_broker(7, 0)])


def test_commit_refuses_a_partition_led_by_a_fenced_broker():
    cluster = Cluster()
    cluster.register(1)  # registered, still fenced
    cluster.commit([r.topic("t", "id-t")])
    with pytest.raises(AssertionError):
        cluster.commit([r.partition("id-t", 0, [1], [1], 1)])
