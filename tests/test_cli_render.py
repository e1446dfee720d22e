"""The CLI: pure rendering, and commands run by typer's CliRunner against a fake Admin."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest
from raftka.v1 import common_pb2, metadata_pb2
from rich.console import Console
from typer.testing import CliRunner

from cli import render
from cli.localcluster import LocalCluster, NodeStatus
from cli.main import Deps, app
from client.admin import (
    BrokerInfo,
    ClusterInfo,
    CreatedTopic,
    Endpoint,
    LogEntry,
    PartitionInfo,
    QuorumInfo,
    ReplicaInfo,
    ReplicaLog,
    TopicInfo,
)
from client.errors import error_for

NOW_MS = 1_700_000_000_000

QUORUM = QuorumInfo(
    cluster_id="c0ffee",
    leader_id=2,
    leader_epoch=7,
    high_watermark=120,
    voters=(
        ReplicaInfo(1, 118, 2, NOW_MS - 40, NOW_MS - 900),
        ReplicaInfo(2, 120, 0, NOW_MS, NOW_MS),
        ReplicaInfo(3, -1, -1, -1, -1),
    ),
    observers=(ReplicaInfo(100, 120, 0, NOW_MS - 5000, NOW_MS - 5000),),
)

TOPIC = TopicInfo(
    name="orders",
    topic_id="t-1",
    partitions=(
        PartitionInfo(0, 100, 3, 4, (100, 101, 102), (100, 101, 102)),
        PartitionInfo(1, 101, 1, 2, (101, 102, 100), (101, 102)),
        PartitionInfo(2, -1, 5, 9, (102, 100, 101), ()),
    ),
    configs={"retention.ms": "1000"},
)

CLUSTER = ClusterInfo(
    cluster_id="c0ffee",
    controller_id=2,
    controller_epoch=7,
    brokers=(
        BrokerInfo(100, 10, "i-100", (Endpoint("PLAINTEXT", "127.0.0.1", 9100),), "", False, False),
        BrokerInfo(
            101, 12, "i-101", (Endpoint("PLAINTEXT", "127.0.0.1", 9101),), "r1", True, False
        ),
    ),
)

NODES = [
    NodeStatus(
        1, "controller", 4242, True, "127.0.0.1", 19191, 19091, "/c/1.toml", "/c/1.log", "running"
    ),
    NodeStatus(
        100, "broker", None, False, "127.0.0.1", 19200, None, "/c/100.toml", "/c/100.log", "stopped"
    ),
]


def text_of(renderable: Any) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


# -- pure rendering ---------------------------------------------------------------


def test_format_age():
    assert render.format_age(-1, NOW_MS) == "-"
    assert render.format_age(NOW_MS - 40, NOW_MS) == "40 ms ago"
    assert render.format_age(NOW_MS - 3400, NOW_MS) == "3.4 s ago"
    assert render.format_age(NOW_MS - 600_000, NOW_MS) == "10 min ago"
    assert render.format_age(NOW_MS + 5, NOW_MS) == "0 ms ago"


def test_quorum_json_and_table():
    data = render.quorum_json(QUORUM)
    assert {k: data[k] for k in ("cluster_id", "leader_id", "leader_epoch", "high_watermark")} == {
        "cluster_id": "c0ffee",
        "leader_id": 2,
        "leader_epoch": 7,
        "high_watermark": 120,
    }
    assert [v["id"] for v in data["voters"]] == [1, 2, 3]
    assert data["voters"][0]["lag"] == 2 and data["observers"][0]["id"] == 100
    text = text_of(render.format_quorum(QUORUM, NOW_MS))
    assert "LeaderEpoch" in text and "HighWatermark" in text and "120" in text
    assert "Leader" in text and "Observer" in text and "40 ms ago" in text


def test_topics_json_is_the_stable_shape():
    (topic,) = render.topics_json([TOPIC])
    assert topic["name"] == "orders" and topic["configs"] == {"retention.ms": "1000"}
    assert topic["partitions"][1] == {
        "partition": 1,
        "leader": 101,
        "leader_epoch": 1,
        "partition_epoch": 2,
        "replicas": [101, 102, 100],
        "isr": [101, 102],
    }
    (listed,) = render.topic_list_json([TOPIC])
    assert listed["partitions"] == 3 and listed["replication_factor"] == 3
    assert listed["under_replicated_partitions"] == 2 and listed["offline_partitions"] == 1


def test_topic_tables_mark_unhealthy_partitions():
    text = text_of(render.format_topics([TOPIC]))
    assert "under-replicated" in text and "offline" in text and "none" in text
    assert "100,101,102" in text
    assert "orders" in text_of(render.format_topic_list([TOPIC]))


def test_brokers_and_nodes():
    data = render.cluster_json(CLUSTER)
    assert [b["state"] for b in data["brokers"]] == ["unfenced", "fenced"]
    text = text_of(render.format_brokers(CLUSTER))
    assert "127.0.0.1:9101" in text and "fenced" in text
    # In controlled shutdown: shutting down until fenced; the flag stays after that.
    shutting = dataclasses.replace(CLUSTER.brokers[0], in_controlled_shutdown=True)
    gone = dataclasses.replace(shutting, fenced=True)
    states = render.cluster_json(dataclasses.replace(CLUSTER, brokers=(shutting, gone)))
    assert [b["state"] for b in states["brokers"]] == ["shutting_down", "fenced"]
    nodes = render.nodes_json(NODES)
    assert set(nodes[0]) >= {"id", "role", "pid", "host", "rpc_port", "raft_port", "state"}
    assert nodes[1]["pid"] is None and nodes[1]["raft_port"] is None
    text = text_of(render.format_nodes(NODES))
    assert "4242" in text and "stopped" in text


def test_metadata_log_and_results():
    record = metadata_pb2.MetadataRecord(no_op=metadata_pb2.NoOpRecord())
    entries = [LogEntry(5, 2, NOW_MS, record)]
    (row,) = render.metadata_log_json(entries)
    assert row["offset"] == 5 and row["type"] == "no_op" and "no_op" in row["record"]
    assert "NoOp" in text_of(render.format_metadata_log(entries))
    results = {"a": None, ("t", 0): error_for(common_pb2.ELECTION_NOT_NEEDED, "")}
    assert render.results_json(results) == [
        {"name": "a", "error": None, "message": ""},
        {"topic": "t", "partition": 0, "error": "ELECTION_NOT_NEEDED", "message": ""},
    ]
    assert "ELECTION_NOT_NEEDED" in text_of(render.format_results(results, "x"))


# -- commands, with a fake Admin -----------------------------------------------------


class FakeAdmin:
    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.calls: list[tuple[str, Any]] = []
        self.topics = {"orders": TOPIC}

    def __enter__(self) -> FakeAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def describe_quorum(self) -> QuorumInfo:
        return QUORUM

    def describe_cluster(self) -> ClusterInfo:
        return CLUSTER

    def describe_topics(self, names=None) -> list[TopicInfo]:
        self.calls.append(("describe_topics", names))
        for name in names or ():
            if name not in self.topics:
                raise error_for(common_pb2.UNKNOWN_TOPIC_OR_PARTITION, f"{name}: no such topic")
        return [t for n, t in sorted(self.topics.items()) if not names or n in names]

    def list_topics(self) -> list[str]:
        return sorted(self.topics)

    def describe_replica_logs(self):
        self.calls.append(("describe_replica_logs", None))
        return {
            ("orders", 0): (
                ReplicaLog(100, "leader", 3, 5, 42, 40, 4096),
                ReplicaLog(101, "follower", 3, 5, 40, 40, 4000),
            )
        }

    def create_topic(self, name, num_partitions=-1, replication_factor=-1, configs=None, **kw):
        self.calls.append(("create_topic", (name, num_partitions, replication_factor, configs)))
        if name in self.topics:
            raise error_for(common_pb2.TOPIC_ALREADY_EXISTS, f"{name}: exists")
        self.topics[name] = TopicInfo(name, "new", ())
        return CreatedTopic(name, "new", num_partitions, replication_factor)

    def delete_topic(self, name: str) -> None:
        self.calls.append(("delete_topic", name))

    def read_metadata_log(self, offset: int, max_records: int) -> list[LogEntry]:
        self.calls.append(("read_metadata_log", (offset, max_records)))
        return [LogEntry(offset, 1, NOW_MS, metadata_pb2.MetadataRecord())]


class Harness:
    def __init__(self) -> None:
        self.admins: list[FakeAdmin] = []
        self.runner = CliRunner()

    def admin(self, bootstrap: str) -> FakeAdmin:
        self.admins.append(FakeAdmin(bootstrap))
        return self.admins[-1]

    def invoke(self, *args: str, env: dict[str, str] | None = None):
        deps = Deps(admin=self.admin, now_ms=lambda: NOW_MS)
        return self.runner.invoke(app, list(args), obj=deps, env=env)


@pytest.fixture
def cli() -> Harness:
    return Harness()


def test_quorum_status_json(cli):
    result = cli.invoke("quorum", "status", "--bootstrap", "h:1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["leader_id"] == 2 and data["high_watermark"] == 120
    assert set(data) >= {"cluster_id", "leader_epoch", "voters", "observers"}
    assert cli.admins[0].bootstrap == "h:1"


def test_quorum_status_table(cli):
    result = cli.invoke("quorum", "status", "-b", "h:1")
    assert result.exit_code == 0, result.output
    assert "LeaderId" in result.stdout and "Observer" in result.stdout


def test_bootstrap_from_the_environment(cli):
    result = cli.invoke("broker", "list", "--json", env={"RAFTKA_BOOTSTRAP": "e:9"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["brokers"][1]["id"] == 101
    assert cli.admins[0].bootstrap == "e:9"


def test_topic_describe_json(cli):
    result = cli.invoke("topic", "describe", "orders", "-b", "h:1", "--json")
    assert result.exit_code == 0, result.output
    (topic,) = json.loads(result.stdout)
    assert [p["partition"] for p in topic["partitions"]] == [0, 1, 2]
    assert set(topic["partitions"][0]) >= {"partition", "leader", "replicas", "isr", "leader_epoch"}
    first, second, _ = topic["partitions"]
    # The leader's own log gives the partition's offsets; every replica is listed.
    assert (first["log_start_offset"], first["log_end_offset"], first["high_watermark"]) == (
        5,
        42,
        40,
    )
    assert [r["broker_id"] for r in first["replica_logs"]] == [100, 101]
    assert second["high_watermark"] is None and second["replica_logs"] == []
    assert cli.admins[0].calls == [("describe_topics", ["orders"]), ("describe_replica_logs", None)]


def test_topic_create_parses_configs(cli):
    result = cli.invoke(
        "topic",
        "create",
        "t",
        "-p",
        "3",
        "-r",
        "2",
        "--config",
        "retention.ms=5",
        "-c",
        "a=b=c",
        "-b",
        "h:1",
    )
    assert result.exit_code == 0, result.output
    assert "created topic t" in result.stdout
    assert cli.admins[0].calls == [("create_topic", ("t", 3, 2, {"retention.ms": "5", "a": "b=c"}))]


def test_a_bad_config_is_a_usage_error(cli):
    result = cli.invoke("topic", "create", "t", "--config", "novalue", "-b", "h:1")
    assert result.exit_code == 2
    assert "name=value" in result.output


def test_cluster_errors_are_one_red_line_without_traceback(cli):
    result = cli.invoke("topic", "create", "orders", "-b", "h:1")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: TOPIC_ALREADY_EXISTS: orders: exists"
    assert "Traceback" not in result.output
    result = cli.invoke("topic", "describe", "ghost", "-b", "h:1", "--json")
    assert result.exit_code == 1 and "UNKNOWN_TOPIC_OR_PARTITION" in result.stderr


def test_topic_delete_and_metadata_log(cli):
    result = cli.invoke("topic", "delete", "orders", "-b", "h:1", "--json")
    assert json.loads(result.stdout) == {"deleted": "orders"}
    result = cli.invoke(
        "metadata", "log", "--offset", "4", "--max-records", "2", "-b", "h:1", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["offset"] == 4
    assert cli.admins[-1].calls == [("read_metadata_log", (4, 2))]


def test_cluster_demo_creates_the_topic_once(cli):
    result = cli.invoke("cluster", "demo", "-b", "h:1", "--records", "0", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["created"] and data["topic"]["name"] == "demo"
    # One unfenced broker in the fake cluster: replication factor 1.
    assert ("create_topic", ("demo", 3, 1, None)) in cli.admins[0].calls
    assert data["quorum"]["leader_id"] == 2


# -- commands on a local cluster directory (no processes) ------------------------------


def test_commands_read_the_local_cluster_manifest(cli, tmp_path: Path):
    LocalCluster(tmp_path).create(controllers=3, brokers=1)
    result = cli.invoke("cluster", "status", "--dir", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    nodes = json.loads(result.stdout)
    assert [(n["id"], n["role"], n["state"]) for n in nodes] == [
        (1, "controller", "stopped"),
        (2, "controller", "stopped"),
        (3, "controller", "stopped"),
        (100, "broker", "stopped"),
    ]
    assert all(n["pid"] is None for n in nodes)

    result = cli.invoke("quorum", "status", "--json", env={"RAFTKA_HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert cli.admins[0].bootstrap == LocalCluster(tmp_path).bootstrap

    result = cli.invoke("cluster", "down", "--dir", str(tmp_path), "--json")
    assert json.loads(result.stdout) == {"stopped": []}


def test_no_local_cluster_is_a_clear_error(cli, tmp_path: Path):
    result = cli.invoke("topic", "list", "--dir", str(tmp_path / "none"))
    assert result.exit_code == 1
    assert "no local cluster" in result.stderr and "--bootstrap" in result.stderr


def test_node_start_refuses_a_config_of_another_role(cli, tmp_path: Path):
    LocalCluster(tmp_path).create(controllers=1, brokers=1)
    config = tmp_path / "node-100" / "node.toml"
    result = cli.invoke("controller", "start", "--config", str(config))
    assert result.exit_code == 1
    assert "without controller" in result.stderr
    result = cli.invoke("broker", "start", "--config", str(tmp_path / "missing.toml"))
    assert result.exit_code == 1 and "cannot read config file" in result.stderr
