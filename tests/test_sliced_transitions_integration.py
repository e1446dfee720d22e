"""Broker transitions done in slices, with real processes: controllers configured
with a slice of a few partitions, so that a small cluster goes through the path a
100,000-partition one does (quorum/controller/reconcile.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import running_cluster
from typer.testing import CliRunner

from cli import bench
from cli.localcluster import LocalCluster
from cli.main import app
from client._controller import ControllerClient
from client.admin import Admin

pytestmark = pytest.mark.integration

SLICE = 4


def sliced_cluster(directory: Path, controllers: int, brokers: int):
    def configure(cluster: LocalCluster) -> None:
        for node in cluster.nodes():
            if node.role == "controller":
                cluster.update_config(node.id, {"controller.transition.slice.partitions": SLICE})

    return running_cluster(directory, configure, controllers=controllers, brokers=brokers)


def controller_log(cluster: LocalCluster) -> str:
    node = next(n for n in cluster.nodes() if n.role == "controller")
    return (cluster.directory / node.log).read_text()


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_killed_broker_in_many_isrs_hands_over_and_rejoins(tmp_path):
    """kill -9 of a broker in 12 ISRs (3 slices): every leadership moves, and its
    restart registers a new incarnation that is unfenced once it has left them all."""
    with sliced_cluster(tmp_path, controllers=1, brokers=3) as cluster:
        where = ("--dir", str(tmp_path))
        run("topic", "create", "wide", "-p", "12", "-r", "3", *where)
        with ControllerClient(cluster.bootstrap, timeout_s=30) as client:
            restarted = bench._restart_a_broker(cluster, client, timeout_s=60)
        assert restarted is not None
        with Admin(cluster.bootstrap) as admin:
            brokers = {b.broker_id: b for b in admin.describe_cluster().brokers}
            partitions = admin.describe_topics(["wide"])[0].partitions
        assert not brokers[102].fenced
        assert sum(b.leader_count for b in brokers.values()) == 12
        for p in partitions:
            assert p.leader in (100, 101, 102) and p.leader in p.isr
        listed = json.loads(run("broker", "list", *where, "--json"))["brokers"]
        assert sum(b["leader_count"] for b in listed) == 12
        assert all(b["isr_count"] >= 1 for b in listed if b["id"] != 102)
        # The path a large cluster takes, not the one-batch one.
        assert "broker 102 leaves its ISRs in slices" in controller_log(cluster)


def test_the_scale_bench_restarts_a_stand_in_and_shuts_every_one_down(tmp_path):
    """`bench scale` on a quorum alone: each stand-in is in 30 ISRs (8 slices); one is
    fenced and registered again, and at the end all three shut down in order."""
    with sliced_cluster(tmp_path, controllers=1, brokers=0) as cluster:
        where = ("--dir", str(tmp_path))
        args = ("bench", "scale", "--topics", "3", "--partitions", "10", "--failovers", "0")
        result = json.loads(run(*args, "--stand-in-brokers", "3", *where, "--json"))
        assert result["partitions"] == 30
        assert result["broker_moved_s"] is not None and result["broker_rejoined_s"] is not None
        listed = json.loads(run("broker", "list", *where, "--json"))["brokers"]
        assert [b["state"] for b in listed] == ["fenced"] * 3
        assert [b["leader_count"] for b in listed] == [0, 0, 0]
        assert controller_log(cluster).count("leaves its ISRs in slices") >= 4
