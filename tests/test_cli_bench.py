"""Benchmark drivers without a cluster: what they leave behind when a run fails."""

from __future__ import annotations

from typing import Any

import pytest
from raftka.v1 import common_pb2
from raftka.v1 import controller_pb2 as cpb

from cli import bench
from client.errors import RaftkaError


class FakeCluster:
    bootstrap = "127.0.0.1:1"

    def __init__(self) -> None:
        self.killed: list[int] = []
        self.started: list[list[int]] = []

    def kill(self, node_id: int) -> None:
        self.killed.append(node_id)

    def start(self, ids: list[int]) -> None:
        self.started.append(list(ids))


class RefusingClient:
    """The active controller is node 2 and every CreateTopics is refused for good."""

    def __init__(self, bootstrap: str) -> None:
        pass

    def __enter__(self) -> RefusingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def call(self, method: str, request: Any, *, timeout_s: float | None = None) -> Any:
        if method == "DescribeQuorum":
            return cpb.DescribeQuorumResponse(leader_id=2)
        refused = common_pb2.Error(
            code=common_pb2.INVALID_REPLICATION_FACTOR, message="All brokers are currently fenced."
        )
        return cpb.CreateTopicsResponse(results=[cpb.CreateTopicResult(error=refused)])


def test_a_failover_run_that_fails_starts_the_killed_controller_again(monkeypatch):
    """A cluster without brokers refuses the timed write for good: the run says so at
    once, and the controller it killed is started again (it stayed down, and every
    later benchmark then waited for a voter that never came back)."""
    monkeypatch.setattr(bench, "ControllerClient", RefusingClient)
    monkeypatch.setattr(bench, "_wait_voters_caught_up", lambda client, timeout_s: None)
    cluster = FakeCluster()
    with pytest.raises(RaftkaError, match="needs stand-in brokers") as refused:
        bench.run_failover_bench(cluster, runs=3)
    assert refused.value.code == common_pb2.INVALID_REPLICATION_FACTOR
    assert cluster.killed == [2]
    assert cluster.started == [[2]]
