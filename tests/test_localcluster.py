"""LocalCluster without real nodes: configs, the manifest, and process safety.

Processes are harmless Python sleepers started through the ``command`` seam
or by the test itself; every one is stopped by its pid before the test ends.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cli.localcluster import LocalCluster, LocalClusterError, NodeSpec, free_ports, live_process
from quorum.config import NodeConfig

SLEEPER = "import time\nfor _ in range(600): time.sleep(0.1)\n"
# Ignores SIGTERM, to prove escalation to SIGKILL.
STUBBORN = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "for _ in range(600): time.sleep(0.1)\n"
)


def sleeper(_node: NodeSpec, _config: Path) -> list[str]:
    return [sys.executable, "-c", SLEEPER]


def stubborn(_node: NodeSpec, _config: Path) -> list[str]:
    return [sys.executable, "-c", STUBBORN]


@pytest.fixture
def cluster(tmp_path):
    created = LocalCluster(tmp_path / "lc", command=sleeper)
    created.create(controllers=3, brokers=2)
    yield created
    # Whatever a test left running is stopped by its recorded pid.
    created.stop(timeout_s=2, kill=True)


@pytest.fixture
def own_process():
    """A sleeper this test starts itself; reaped and killed by pid at the end."""
    child = subprocess.Popen([sys.executable, "-c", SLEEPER])
    yield child
    if child.poll() is None:
        child.kill()
    child.wait(timeout=5)


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- create --------------------------------------------------------------------


def test_create_writes_a_manifest_and_configs_that_load(cluster):
    manifest = json.loads(cluster.manifest_path.read_text())
    nodes = manifest["nodes"]
    assert [n["id"] for n in nodes] == [1, 2, 3, 100, 101]
    assert [n["role"] for n in nodes] == ["controller"] * 3 + ["broker"] * 2
    ports = [n["rpc_port"] for n in nodes] + [n["raft_port"] for n in nodes if n["raft_port"]]
    assert len(set(ports)) == len(ports) == 8
    assert all(n["pid"] is None for n in nodes)
    assert len(manifest["cluster_id"]) == 32

    configs = {
        n.id: NodeConfig.load(cluster.directory / n.config, environ={}) for n in cluster.nodes()
    }
    voters = configs[1].voters
    assert [(v.node_id, v.raft_port, v.rpc_port) for v in voters] == [
        (n["id"], n["raft_port"], n["rpc_port"]) for n in nodes[:3]
    ]
    for node_id, config in configs.items():
        assert config.node_id == node_id
        assert config.cluster_id == manifest["cluster_id"]
        assert config.voters == voters
    password = configs[1]["controller.quorum.password"]
    assert len(password) >= 32 and configs[2]["controller.quorum.password"] == password
    assert configs[100]["controller.quorum.password"] == ""  # brokers do not get the secret
    assert configs[100].roles == {"broker"} and configs[1].roles == {"controller"}
    assert configs[100].listener == ("127.0.0.1", nodes[3]["rpc_port"])
    assert configs[1].path("metadata.log.dir") == cluster.directory / "node-1" / "metadata"
    assert configs[101].path("log.dirs") == cluster.directory / "node-101" / "data"
    assert configs[1]["default.replication.factor"] == 2
    mode = stat.S_IMODE((cluster.directory / "node-1" / "node.toml").stat().st_mode)
    assert mode == 0o600


def test_bootstrap_lists_the_controllers(cluster):
    controllers = [n for n in cluster.nodes() if n.role == "controller"]
    assert cluster.bootstrap == ",".join(f"127.0.0.1:{n.rpc_port}" for n in controllers)


def test_create_refuses_an_existing_cluster(cluster):
    with pytest.raises(LocalClusterError, match="already exists"):
        cluster.create()


def test_missing_cluster_is_a_clear_error(tmp_path):
    with pytest.raises(LocalClusterError, match="no local cluster"):
        LocalCluster(tmp_path).status()


def test_free_ports_are_distinct():
    ports = free_ports(10)
    assert len(set(ports)) == 10 and all(p > 0 for p in ports)


# -- the pid guard ---------------------------------------------------------------


def record_process(cluster: LocalCluster, node_id: int, pid: int, create_time: float) -> None:
    data = json.loads(cluster.manifest_path.read_text())
    for node in data["nodes"]:
        if node["id"] == node_id:
            node["pid"], node["create_time"] = pid, create_time
    cluster.manifest_path.write_text(json.dumps(data))


def test_live_process_requires_matching_create_time(own_process):
    created = psutil.Process(own_process.pid).create_time()
    assert live_process(own_process.pid, created) is not None
    assert live_process(own_process.pid, created - 3600) is None
    assert live_process(own_process.pid, None) is None
    assert live_process(None, created) is None


def test_a_reused_pid_is_never_signalled(cluster, own_process):
    # The manifest names our process's pid, but with another creation time:
    # as if the node died and the kernel gave its pid to a stranger.
    created = psutil.Process(own_process.pid).create_time()
    record_process(cluster, 100, own_process.pid, created - 60)
    status = {s.id: s for s in cluster.status()}
    assert not status[100].running and status[100].state == "stopped"
    assert cluster.stop([100], timeout_s=1) == []
    cluster.kill(100)
    with pytest.raises(LocalClusterError, match="not running"):
        cluster.pause(100)
    assert own_process.poll() is None and psutil.pid_exists(own_process.pid)


def test_a_recorded_process_is_stopped_by_pid(cluster, own_process):
    created = psutil.Process(own_process.pid).create_time()
    record_process(cluster, 100, own_process.pid, created)
    assert {s.id: s.running for s in cluster.status()}[100]
    assert cluster.stop([100], timeout_s=5) == [100]
    assert own_process.wait(timeout=5) == -signal.SIGTERM
    node = {n.id: n for n in cluster.nodes()}[100]
    assert node.pid is None and node.create_time is None


# -- start, stop, pause ------------------------------------------------------


def test_start_launches_only_what_is_down(cluster):
    assert cluster.start() == [1, 2, 3, 100, 101]
    status = {s.id: s for s in cluster.status()}
    assert all(s.running and s.state == "running" for s in status.values())
    assert cluster.start() == []  # everything already runs

    first_pid = status[2].pid
    assert cluster.kill(2)
    assert not {s.id: s.running for s in cluster.status()}[2]
    assert cluster.start() == [2]
    again = {s.id: s for s in cluster.status()}
    assert again[2].running and again[2].pid != first_pid
    assert again[1].pid == status[1].pid

    log = (cluster.directory / "node-2" / "node.log").read_text()
    assert log.count("starting node 2") == 2

    assert sorted(cluster.stop(timeout_s=5)) == [1, 2, 3, 100, 101]
    assert not any(s.running for s in cluster.status())


def test_a_second_instance_reads_the_same_manifest(cluster):
    cluster.start([1])
    other = LocalCluster(cluster.directory, command=sleeper)
    assert [s.id for s in other.status() if s.running] == [1]
    assert other.start() == [2, 3, 100, 101]
    assert sorted(other.stop(timeout_s=5)) == [1, 2, 3, 100, 101]


def test_pause_and_resume(cluster):
    cluster.start([100])
    cluster.pause(100)
    assert wait_until(lambda: {s.id: s.state for s in cluster.status()}[100] == "paused")
    cluster.resume(100)
    assert wait_until(lambda: {s.id: s.state for s in cluster.status()}[100] == "running")
    # A paused node is stopped too (SIGCONT follows the SIGTERM).
    cluster.pause(100)
    assert cluster.stop([100], timeout_s=5) == [100]


def test_stop_escalates_to_sigkill(tmp_path):
    cluster = LocalCluster(tmp_path, command=stubborn)
    cluster.create(controllers=1, brokers=0)
    cluster.start()
    # Give the child time to install its handler before it is signalled.
    time.sleep(0.5)
    started = time.monotonic()
    assert cluster.stop(timeout_s=0.5) == [1]
    assert time.monotonic() - started < 5
    assert not cluster.status()[0].running


def test_unknown_node_ids_are_refused(cluster):
    with pytest.raises(LocalClusterError, match="no such node"):
        cluster.start([7])


def test_wait_ready_fails_fast_when_a_node_died(tmp_path):
    def exits(_node: NodeSpec, _config: Path) -> list[str]:
        return [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]

    cluster = LocalCluster(tmp_path, command=exits)
    cluster.create(controllers=1, brokers=0)
    cluster.start()
    assert wait_until(lambda: not cluster.status()[0].running)
    with pytest.raises(LocalClusterError, match="(?s)controller 1 is not running.*boom"):
        cluster.wait_ready(timeout_s=5)
    assert os.path.exists(cluster.status()[0].log)
