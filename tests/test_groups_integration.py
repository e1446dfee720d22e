"""Committed offsets over real processes: stored in __consumer_offsets by the group's
coordinator, read back after a restart of the consumer and after the coordinator dies."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import running_cluster
from dataplane import stub, wait_until
from raftka.v1 import broker_pb2

from broker.coordinator import OFFSETS_TOPIC, partition_for
from client import Admin, Consumer, Producer, TopicPartition

pytestmark = pytest.mark.integration

OFFSETS_PARTITIONS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(
        tmp_path_factory.mktemp("groups"),
        controllers=3,
        brokers=3,
        overrides={
            "broker.session.timeout.ms": 3000,
            "broker.heartbeat.interval.ms": 250,
            "offsets.topic.num.partitions": OFFSETS_PARTITIONS,
        },
    ) as cluster:
        yield cluster


@pytest.fixture
def admin(cluster):
    with Admin(cluster.bootstrap, timeout_s=10.0) as admin:
        yield admin
    cluster.start()
    cluster.wait_ready(timeout_s=60)


def brokers(admin: Admin) -> str:
    return ",".join(b.address for b in admin.describe_cluster().brokers if not b.fenced)


def topic_with_records(admin: Admin, name: str, records: int) -> list[TopicPartition]:
    admin.create_topic(name, 2, 3, {"min.insync.replicas": "2"})
    with Producer(brokers(admin), acks="all") as producer:
        for i in range(records):
            producer.send(name, b"%s-%d" % (name.encode(), i), partition=i % 2)
        producer.flush(timeout=30)
    return [TopicPartition(name, 0), TopicPartition(name, 1)]


def read(consumer: Consumer, count: int) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []

    def more() -> bool:
        for records in consumer.poll(200, max_records=count - len(got)).values():
            got.extend((r.partition, r.offset) for r in records)
        return len(got) >= count

    wait_until(f"{count} records", more, timeout_s=30)
    return got


def test_a_consumer_resumes_from_the_committed_offsets(cluster, admin):
    tps = topic_with_records(admin, "resume", 40)
    with Consumer(
        brokers(admin), group_id="resumers", auto_offset_reset="earliest", enable_auto_commit=False
    ) as first:
        first.assign(tps)
        assert len(read(first, 10)) == 10
        first.commit()
        positions = {tp: first.position(tp) for tp in tps}
    assert sum(positions.values()) == 10
    with Consumer(brokers(admin), group_id="resumers", auto_offset_reset="earliest") as second:
        second.assign(tps)
        assert {tp: second.committed(tp) for tp in tps} == positions
        rest = read(second, 30)
        assert all(offset >= positions[TopicPartition("resume", p)] for p, offset in rest)
        assert len(set(rest)) == 30
    # Auto commit on close stored the end.
    with Consumer(brokers(admin), group_id="resumers") as third:
        assert sum(third.committed(tp) or 0 for tp in tps) == 40


def test_committed_offsets_survive_the_coordinators_death(cluster, admin):
    tps = topic_with_records(admin, "survive", 20)
    group = "survivors"
    with Consumer(brokers(admin), group_id=group, enable_auto_commit=False) as consumer:
        consumer.assign(tps)
        consumer.commit({tps[0]: 7, tps[1]: 9})
    index = partition_for(group, OFFSETS_PARTITIONS)
    coordinator = admin.describe_topic(OFFSETS_TOPIC).partitions[index].leader
    cluster.kill(coordinator)
    started = time.monotonic()
    with Consumer(brokers(admin), group_id=group, enable_auto_commit=False) as consumer:
        consumer.assign(tps)
        assert consumer.committed(tps[0]) == 7 and consumer.committed(tps[1]) == 9
        consumer.commit({tps[0]: 8, tps[1]: 10})
        took_s = time.monotonic() - started
        assert consumer.committed(tps[0]) == 8
    # Found again and written within the coordinator's failover (connection-loss
    # fencing takes about half a second; the load is small).
    assert took_s < 10, took_s
    new_coordinator = admin.describe_topic(OFFSETS_TOPIC).partitions[index].leader
    assert new_coordinator != coordinator


def test_cli_consume_with_a_group_commits_what_it_printed(cluster, admin):
    topic_with_records(admin, "cli-group", 10)
    any_broker = admin.describe_cluster().brokers[0].broker_id
    assert stub(cluster, any_broker).ListGroups(broker_pb2.ListGroupsRequest(), timeout=5)
    servers = brokers(admin)

    def raftka(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args, "-b", servers],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    first = raftka(
        "consume", "cli-group", "--group", "g", "--from-beginning", "--max-messages", "4"
    )
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 4
    described = raftka("group", "describe", "g", "--json")
    assert described.returncode == 0, described.stderr
    offsets = json.loads(described.stdout)["offsets"]
    assert sum(row["committed_offset"] for row in offsets) == 4
    assert all(row["lag"] == row["log_end_offset"] - row["committed_offset"] for row in offsets)
    # Partitions the group never committed start as --from-beginning says.
    rest = raftka("consume", "cli-group", "-g", "g", "--from-beginning", "--timeout-ms", "2000")
    assert len(rest.stdout.splitlines()) == 6, rest.stderr
    reset = raftka("group", "reset-offsets", "g", "--topic", "cli-group", "--to-earliest")
    assert reset.returncode == 0, reset.stderr
    again = raftka("consume", "cli-group", "--group", "g", "--timeout-ms", "2000")
    assert len(again.stdout.splitlines()) == 10
    assert raftka("group", "delete", "g").returncode == 0
    listed = json.loads(raftka("group", "list", "--json").stdout)
    assert "g" not in [row["group"] for row in listed]
