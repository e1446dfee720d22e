"""Benchmark drivers without a cluster: what they leave behind when a run fails."""

from __future__ import annotations

import dataclasses
from concurrent import futures
from typing import Any

import grpc
import pytest
from raftka.v1 import broker_pb2, broker_pb2_grpc, common_pb2
from raftka.v1 import controller_pb2 as cpb

from cli import bench, bench_data
from cli.localcluster import NodeStatus
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


class _SettlingBroker(broker_pb2_grpc.BrokerServicer):
    """Reports a metadata offset that moves one record per DescribeBroker."""

    def __init__(self, start: int) -> None:
        self.offset = start
        self.asked: list[bool] = []

    def DescribeBroker(self, request, context):  # noqa: N802
        self.asked.append(request.omit_partitions)
        self.offset += 1
        return broker_pb2.DescribeBrokerResponse(
            metadata_offset=self.offset,
            partitions=[] if request.omit_partitions else [broker_pb2.LocalPartition()],
        )


def _serve_broker(servicer: _SettlingBroker) -> tuple[grpc.Server, NodeStatus]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    broker_pb2_grpc.add_BrokerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    node = NodeStatus(
        id=100, role="broker", pid=None, running=True, host="127.0.0.1", rpc_port=port,
        raft_port=None, config="", log="", state="running",
    )  # fmt: skip
    return server, node


def test_the_scale_bench_waits_for_every_broker_to_act_on_the_last_record():
    """A fresh broker's catch-up is timed on a settled cluster: the running brokers
    first report the last record applied (they act on a record before they report it)."""
    broker = _SettlingBroker(start=0)
    server, node = _serve_broker(broker)
    stopped = dataclasses.replace(node, id=101, running=False, state="stopped")
    try:
        cluster = type("Cluster", (), {"status": lambda self: [node, stopped]})()
        assert bench._wait_brokers_at(cluster, 3, timeout_s=10) is not None
        assert broker.offset == 3 and broker.asked == [True, True, True]
        with pytest.raises(TimeoutError, match=r"brokers \[100\] did not reach offset 1000"):
            bench._wait_brokers_at(cluster, 1000, timeout_s=0.3)
        nobody = type("Cluster", (), {"status": lambda self: [stopped]})()
        assert bench._wait_brokers_at(nobody, 3, timeout_s=1) is None
        # A broker that stops while it is waited for is waited for no longer.
        stuck = _SettlingBroker(start=-10_000)
        stuck_server, stuck_node = _serve_broker(stuck)
        stuck_node = dataclasses.replace(stuck_node, id=102)
        calls = [0]

        def status(self):
            calls[0] += 1
            if calls[0] < 3:
                return [node, stuck_node]
            return [node, dataclasses.replace(stuck_node, running=False, state="stopped")]

        try:
            changing = type("Cluster", (), {"status": status})()
            assert bench._wait_brokers_at(changing, 5, timeout_s=10) is not None
            assert calls[0] == 3 and stuck.asked
        finally:
            stuck_server.stop(grace=None)
    finally:
        server.stop(grace=None)


def test_measured_latencies_leave_out_records_sent_before_the_warm_up_ended():
    samples = [(90, 0.5), (100, 0.002), (99, 0.4), (150, 0.003)]
    assert bench_data.measured_latencies(samples, 100) == [0.002, 0.003]
    assert bench_data.measured_latencies([], 100) == []
