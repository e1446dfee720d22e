"""Metadata benchmarks: throughput, latency, failover, scale.

Figures come from the cluster itself where possible: committed records are
read as the growth of the metadata log's high watermark, not counted by the
client. Every loop is bounded in count and time.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from raftka.v1 import common_pb2
from raftka.v1 import controller_pb2 as cpb

from client._controller import ControllerClient


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class MetadataBenchResult:
    requests: int
    records: int
    seconds: float
    records_per_s: float
    requests_per_s: float
    concurrency: int
    partitions_per_topic: int
    sequential_latency_ms: dict[str, float]
    errors: int
    leader_epoch_start: int
    leader_epoch_end: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quorum(client: ControllerClient) -> cpb.DescribeQuorumResponse:
    return client.call("DescribeQuorum", cpb.DescribeQuorumRequest(), timeout_s=10)


def _create_request(prefix: str, index: int, partitions: int) -> cpb.CreateTopicsRequest:
    return cpb.CreateTopicsRequest(
        topics=[
            cpb.CreatableTopic(
                name=f"{prefix}-{index}", num_partitions=partitions, replication_factor=1
            )
        ]
    )


def run_metadata_bench(
    bootstrap: str,
    *,
    requests: int = 5000,
    concurrency: int = 64,
    partitions_per_topic: int = 4,
    sequential: int = 200,
    delete_after: bool = True,
    progress: Callable[[int], None] | None = None,
) -> MetadataBenchResult:
    """Create ``requests`` topics with ``concurrency`` requests in flight.

    Each request creates one topic of ``partitions_per_topic`` partitions
    (replication factor 1), i.e. 1 + partitions_per_topic records.
    """
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    with ControllerClient(bootstrap) as client:
        start_quorum = _quorum(client)
        leader = f"{start_quorum.voters[0].host}:{start_quorum.voters[0].port}"
        stub = client.stub(leader)
        # Sequential latency first, on an idle cluster.
        latencies: list[float] = []
        for i in range(sequential):
            t0 = time.perf_counter()
            response = stub.CreateTopics(_create_request(prefix + "-seq", i, 1), timeout=10)
            latencies.append((time.perf_counter() - t0) * 1000.0)
            if response.error.code or response.results[0].error.code:
                raise RuntimeError(f"bench write failed: {response}")
        hw_before = _quorum(client).high_watermark
        errors, elapsed = _run_concurrent(
            stub, prefix, requests, concurrency, partitions_per_topic, progress
        )
        # The records are committed when answered; read the watermark now.
        end_quorum = _quorum(client)
        records = end_quorum.high_watermark - hw_before
        if delete_after:
            _delete_prefix(client, prefix)
    return MetadataBenchResult(
        requests=requests,
        records=records,
        seconds=round(elapsed, 3),
        records_per_s=round(records / elapsed, 1),
        requests_per_s=round(requests / elapsed, 1),
        concurrency=concurrency,
        partitions_per_topic=partitions_per_topic,
        sequential_latency_ms={
            "p50": round(percentile(latencies, 50), 3),
            "p99": round(percentile(latencies, 99), 3),
            "max": round(max(latencies), 3),
        },
        errors=errors,
        leader_epoch_start=start_quorum.leader_epoch,
        leader_epoch_end=end_quorum.leader_epoch,
    )


def _run_concurrent(
    stub: Any,
    prefix: str,
    requests: int,
    concurrency: int,
    partitions: int,
    progress: Callable[[int], None] | None,
) -> tuple[int, float]:
    """Keep ``concurrency`` calls in flight with gRPC futures; return (errors, seconds)."""
    semaphore = threading.Semaphore(concurrency)
    lock = threading.Lock()
    done = threading.Event()
    state = {"answered": 0, "errors": 0}

    def on_done(future: grpc.Future) -> None:
        try:
            response = future.result()
            failed = response.error.code != common_pb2.NONE or any(
                r.error.code for r in response.results
            )
        except grpc.RpcError:
            failed = True
        with lock:
            state["answered"] += 1
            state["errors"] += int(failed)
            if state["answered"] == requests:
                done.set()
        semaphore.release()
        if progress is not None:
            progress(1)

    t0 = time.perf_counter()
    for i in range(requests):
        semaphore.acquire()
        future = stub.CreateTopics.future(_create_request(prefix, i, partitions), timeout=30)
        future.add_done_callback(on_done)
    if not done.wait(timeout=max(60.0, requests / 100.0)):
        raise TimeoutError("benchmark requests did not finish in time")
    return state["errors"], time.perf_counter() - t0


def _delete_prefix(client: ControllerClient, prefix: str) -> None:
    topics = client.call("DescribeTopics", cpb.DescribeTopicsRequest(), timeout_s=30).topics
    names = [t.name for t in topics if t.name.startswith(prefix)]
    for i in range(0, len(names), 500):
        client.call("DeleteTopics", cpb.DeleteTopicsRequest(names=names[i : i + 500]), timeout_s=30)


@dataclass
class FailoverResult:
    failover_s: list[float] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        values = self.failover_s
        return {
            "runs": len(values),
            "failover_s": [round(v, 3) for v in values],
            "median_s": round(statistics.median(values), 3) if values else None,
            "max_s": round(max(values), 3) if values else None,
            "killed": self.killed,
        }


def measure_failover(
    client: ControllerClient,
    kill_active: Callable[[int], None],
    *,
    timeout_s: float = 30.0,
) -> tuple[int, float]:
    """Kill the active controller; return (its id, seconds to the next committed write).

    The write goes through the client library (``ControllerClient``), which finds
    the new active controller by itself.
    """
    leader = _quorum(client).leader_id
    name = f"failover-{uuid.uuid4().hex[:10]}"
    t0 = time.monotonic()
    kill_active(leader)
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        try:
            response = client.call(
                "CreateTopics",
                cpb.CreateTopicsRequest(
                    topics=[cpb.CreatableTopic(name=name, num_partitions=1, replication_factor=1)]
                ),
                timeout_s=max(0.1, deadline - time.monotonic()),
            )
        except Exception:  # unknown outcomes and timeouts: try again until committed
            continue
        code = response.results[0].error.code if response.results else response.error.code
        if code in (common_pb2.NONE, common_pb2.TOPIC_ALREADY_EXISTS):
            return leader, time.monotonic() - t0
    raise TimeoutError(f"no metadata write committed within {timeout_s}s of killing {leader}")
