"""The CLI over a real local cluster: 3 controllers and 3 brokers, as processes on loopback."""

from __future__ import annotations

import json

import pytest
from conftest import running_cluster
from typer.testing import CliRunner

from cli.main import app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cluster")
    with running_cluster(directory, controllers=3, brokers=3):
        yield directory


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_demo_quorum_and_topics(cluster_dir):
    where = ("--dir", str(cluster_dir))
    demo = json.loads(run("cluster", "demo", *where, "--json").stdout)
    assert demo["created"] and len(demo["topic"]["partitions"]) == 3
    assert all(len(p["replicas"]) == 3 for p in demo["topic"]["partitions"])

    quorum = json.loads(run("quorum", "status", *where, "--json").stdout)
    assert quorum["leader_id"] in (1, 2, 3) and quorum["high_watermark"] > 0
    assert sorted(v["id"] for v in quorum["voters"]) == [1, 2, 3]

    brokers = json.loads(run("broker", "list", *where, "--json").stdout)["brokers"]
    assert [(b["id"], b["state"]) for b in brokers] == [
        (100, "unfenced"),
        (101, "unfenced"),
        (102, "unfenced"),
    ]

    run("topic", "create", "t1", "-p", "2", "-r", "2", *where)
    failed = CliRunner().invoke(app, ["topic", "create", "t1", *where])
    assert failed.exit_code == 1 and "TOPIC_ALREADY_EXISTS" in failed.stderr
    names = [t["name"] for t in json.loads(run("topic", "list", *where, "--json").stdout)]
    assert names == ["demo", "t1"]
    run("topic", "delete", "t1", *where)

    log = json.loads(run("metadata", "log", "--max-records", "1000", *where, "--json").stdout)
    types = {entry["type"] for entry in log}
    assert {"register_broker", "topic", "partition"} <= types
    offsets = [entry["offset"] for entry in log]
    assert offsets == sorted(offsets)

    nodes = json.loads(run("cluster", "status", *where, "--json").stdout)
    assert [n["state"] for n in nodes] == ["running"] * 6


def test_metadata_bench_with_stand_in_brokers_on_a_quorum_alone(tmp_path):
    """A quorum with no brokers can be benchmarked: stand-in brokers register and
    heartbeat so that topics can be placed, every topic is deleted again, and at the end
    the stand-ins shut down in order and are fenced; a second run registers the same
    ids again instead of adding more."""
    where = ("--dir", str(tmp_path))
    with running_cluster(tmp_path, controllers=1, brokers=0):
        args = ("bench", "metadata", "--requests", "20", "--partitions", "2")
        args += ("--sequential", "3", "--stand-in-brokers", "2", *where, "--json")
        for _ in range(2):
            result = json.loads(run(*args).stdout)
            assert result["errors"] == 0
            assert result["requests"] == 20
            assert result["records"] == 20 * 3  # a topic record and two partitions each
            brokers = json.loads(run("broker", "list", *where, "--json").stdout)["brokers"]
            assert [(b["id"], b["state"]) for b in brokers] == [
                (1000, "fenced"),
                (1001, "fenced"),
            ]
            assert all(b["listeners"][0]["host"] == "stand-in.invalid" for b in brokers)
        assert json.loads(run("topic", "list", *where, "--json").stdout) == []
