"""A combined node (process.roles = broker,controller) as one real process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from cli.localcluster import free_ports
from client import Admin
from client.errors import RaftkaError

pytestmark = pytest.mark.integration


def test_combined_node_registers_itself_and_stops_cleanly(tmp_path):
    raft_port, rpc_port, broker_port = free_ports(3)
    config = tmp_path / "node.toml"
    config.write_text(
        "\n".join(
            [
                "node.id = 1",
                'process.roles = "broker,controller"',
                'cluster.id = "combined-test"',
                f'controller.quorum.voters = "1@127.0.0.1:{raft_port}:{rpc_port}"',
                'controller.quorum.password = "test-secret"',
                f'metadata.log.dir = "{tmp_path / "metadata"}"',
                f'log.dirs = "{tmp_path / "data"}"',
                f'listeners = "127.0.0.1:{broker_port}"',
            ]
        )
        + "\n"
    )
    log_file = (tmp_path / "node.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "controller", "start", "--config", str(config)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        brokers = []
        with Admin(f"127.0.0.1:{rpc_port}", timeout_s=2) as admin:
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    brokers = admin.describe_cluster().brokers
                except RaftkaError:
                    brokers = []
                if brokers and not brokers[0].fenced:
                    break
                time.sleep(0.1)
            assert [(b.broker_id, b.fenced) for b in brokers] == [(1, False)], (
                tmp_path / "node.log"
            ).read_text()[-2000:]
            admin.create_topic("combined", num_partitions=2, replication_factor=1)
            assert [p.leader for p in admin.describe_topic("combined").partitions] == [1, 1]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log_file.close()
