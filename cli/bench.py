"""Metadata benchmarks: throughput, latency, failover, scale.

Figures come from the cluster itself where possible: committed records are
read as the growth of the metadata log's high watermark, not counted by the
client. Every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from raftka.v1 import broker_pb2, broker_pb2_grpc, common_pb2
from raftka.v1 import controller_pb2 as cpb

from client._controller import ControllerClient
from client.errors import check, error_for

log = logging.getLogger(__name__)


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
    sequential_latency_ms: dict[str, float | None]
    errors: int
    leader_epoch_start: int
    leader_epoch_end: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quorum(client: ControllerClient) -> cpb.DescribeQuorumResponse:
    return client.call("DescribeQuorum", cpb.DescribeQuorumRequest(), timeout_s=10)


class StandInBrokers:
    """Brokers that only register and heartbeat, from the benchmark process.

    Topics need unfenced brokers to be placed on. Real brokers also create a log for
    every partition placed on them, which on one machine takes CPU from the quorum (the
    ZooKeeper and etcd figures the issue quotes were measured on ensembles alone). These
    stand-ins let ``raftka bench metadata --stand-in-brokers N`` measure a quorum without
    brokers (a cluster started with ``--brokers 0``). They report the quorum's high
    watermark as their metadata offset, which is true of a broker that needs no
    metadata, and shut down in order at the end (fenced, as a stopped broker is).
    """

    HEARTBEAT_S = 1.0
    # Not an address anyone can reach (RFC 2606); also how a later run finds them.
    LISTENER = ("stand-in.invalid", 9)

    def __init__(self, client: ControllerClient, count: int) -> None:
        self.client = client
        self.count = count
        self.epochs: dict[int, int] = {}
        # Held while heartbeats go out, so that restart() can take a stand-in out
        # of them without a heartbeat of its old epoch arriving after its fencing.
        self._beating = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StandInBrokers:
        quorum = _quorum(self.client)
        described = self.client.call("DescribeCluster", cpb.DescribeClusterRequest(), timeout_s=10)
        # A fenced stand-in of an earlier run is registered again (as a restarted
        # broker is); other ids are never taken over.
        reusable = sorted(
            b.broker_id
            for b in described.brokers
            if b.fenced and [(e.host, e.port) for e in b.listeners] == [self.LISTENER]
        )
        after = max([b.broker_id for b in described.brokers] + [999]) + 1
        ids = (reusable + list(range(after, after + self.count)))[: self.count]
        try:
            self._register(ids, quorum.cluster_id)
        except BaseException:
            self._shut_down()  # those registered so far
            raise
        self._thread = threading.Thread(target=self._run, name="stand-in-brokers", daemon=True)
        self._thread.start()
        return self

    def _register_one(self, broker_id: int, cluster_id: str) -> int:
        """Register ``broker_id`` as a new incarnation; returns its broker epoch."""
        response = self.client.call(
            "RegisterBroker",
            cpb.RegisterBrokerRequest(
                broker_id=broker_id,
                incarnation_id=uuid.uuid4().hex,
                listeners=[
                    common_pb2.Endpoint(
                        name="PLAINTEXT", host=self.LISTENER[0], port=self.LISTENER[1]
                    )
                ],
                cluster_id=cluster_id,
            ),
            timeout_s=10,
        )
        check(response.error)
        return response.broker_epoch

    def _register(self, ids: list[int], cluster_id: str) -> None:
        for broker_id in ids:
            self.epochs[broker_id] = self._register_one(broker_id, cluster_id)
        deadline = time.monotonic() + 30
        while not all(self._beat(False).values()):  # every one unfenced
            if time.monotonic() > deadline:
                raise TimeoutError("stand-in brokers were not unfenced within 30 s")
            time.sleep(0.05)

    def _beat(self, want_shutdown: bool) -> dict[int, bool]:
        """One heartbeat each: broker id -> unfenced (or, shutting down, allowed to)."""
        offset = _quorum(self.client).high_watermark
        answers = {}
        with self._beating:
            for broker_id, epoch in self.epochs.items():
                response = self.client.call(
                    "BrokerHeartbeat",
                    cpb.BrokerHeartbeatRequest(
                        broker_id=broker_id,
                        broker_epoch=epoch,
                        metadata_offset=offset,
                        want_shutdown=want_shutdown,
                    ),
                    timeout_s=10,
                )
                answers[broker_id] = (
                    response.should_shut_down if want_shutdown else not response.is_fenced
                )
        return answers

    def restart(self, broker_id: int, timeout_s: float = 300) -> tuple[float, float]:
        """Stop one stand-in as a killed broker stops (its heartbeats end, and it is
        fenced), then register it again as a new incarnation. Returns the seconds
        until it led nothing, and from its registration until it was unfenced."""
        cluster_id = _quorum(self.client).cluster_id
        t0 = time.perf_counter()
        with self._beating:
            # The heartbeat thread forgets it; what the controller does when a
            # broker's connection drops is to fence it.
            epoch = self.epochs.pop(broker_id)
            try:
                fenced = self.client.call(
                    "BrokerHeartbeat",
                    cpb.BrokerHeartbeatRequest(
                        broker_id=broker_id,
                        broker_epoch=epoch,
                        metadata_offset=-1,
                        want_fence=True,
                    ),
                    timeout_s=10,
                )
                check(fenced.error)
            except BaseException:
                self.epochs[broker_id] = epoch  # so that it is shut down at the end
                raise
        _wait_broker(self.client, broker_id, t0 + timeout_s, "to lead nothing", _leads_nothing)
        t1 = time.perf_counter()
        new_epoch = self._register_one(broker_id, cluster_id)
        with self._beating:
            self.epochs[broker_id] = new_epoch
        deadline = t1 + timeout_s
        while not self._beat(False)[broker_id]:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"stand-in broker {broker_id} not unfenced in {timeout_s} s")
            time.sleep(0.1)
        return t1 - t0, time.perf_counter() - t1

    def _run(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                self._beat(False)
            except Exception as e:  # a failover in the benchmark; keep beating
                log.warning("stand-in broker heartbeat failed: %s", e)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._shut_down()

    def _shut_down(self) -> None:
        """Controlled shutdown, then fenced; never raises (the session timeout fences a
        stand-in that cannot be shut down), so the benchmark's own error shows."""
        if not self.epochs:
            return
        try:
            deadline = time.monotonic() + 30
            while not all(self._beat(True).values()) and time.monotonic() < deadline:
                time.sleep(0.1)
            self._beat(True)  # the heartbeat after an agreed shutdown fences the broker
        except Exception as e:
            log.warning("stand-in brokers not shut down (their sessions will expire): %s", e)


def _leads_nothing(broker: cpb.BrokerDescription) -> bool:
    return broker.fenced and broker.leader_count == 0


def _unfenced(broker: cpb.BrokerDescription) -> bool:
    return not broker.fenced and not broker.in_controlled_shutdown


def _wait_broker(
    client: ControllerClient,
    broker_id: int,
    deadline: float,
    what: str,
    predicate: Callable[[cpb.BrokerDescription], bool],
    incarnation_not: str = "",
) -> None:
    """Until the controllers' view of ``broker_id`` satisfies ``predicate`` (and, when
    given, it has an incarnation other than ``incarnation_not``)."""
    while True:
        described = client.call("DescribeCluster", cpb.DescribeClusterRequest(), timeout_s=10)
        broker = next((b for b in described.brokers if b.broker_id == broker_id), None)
        if broker is not None and broker.incarnation_id != incarnation_not and predicate(broker):
            return
        if time.perf_counter() > deadline:
            raise TimeoutError(f"broker {broker_id} did not come {what} in time")
        time.sleep(0.05)


def _restart_a_broker(
    cluster: Any, client: ControllerClient, timeout_s: float = 600
) -> tuple[float, float] | None:
    """kill -9 the running broker with the highest id and start it again. Returns the
    seconds until it led nothing (fenced, every leadership moved), and from its start
    until it was registered again and unfenced; None when no broker runs."""
    running = [n for n in cluster.status() if n.role == "broker" and n.state == "running"]
    if not running:
        return None
    node_id = max(n.id for n in running)
    described = client.call("DescribeCluster", cpb.DescribeClusterRequest(), timeout_s=10)
    before = next((b.incarnation_id for b in described.brokers if b.broker_id == node_id), None)
    if before is None:
        raise RuntimeError(f"broker {node_id} runs but is not registered")
    t0 = time.perf_counter()
    cluster.kill(node_id)
    try:
        _wait_broker(client, node_id, t0 + timeout_s, "to lead nothing", _leads_nothing)
    finally:
        t1 = time.perf_counter()
        cluster.start([node_id])  # also when the wait failed: leave the cluster whole
    _wait_broker(client, node_id, t1 + timeout_s, "back", _unfenced, incarnation_not=before)
    return t1 - t0, time.perf_counter() - t1


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
    duration_s: float | None = None,
    delete_after: bool = True,
    stand_in_brokers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> MetadataBenchResult:
    """Create ``requests`` topics with ``concurrency`` requests in flight, or
    as many as fit in ``duration_s`` when it is given.

    Each request creates one topic of ``partitions_per_topic`` partitions
    (replication factor 1), i.e. 1 + partitions_per_topic records. With
    ``stand_in_brokers``, that many ``StandInBrokers`` are registered first.
    """
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    with ControllerClient(bootstrap) as client, contextlib.ExitStack() as stack:
        if stand_in_brokers:
            # Their own client, as brokers have: their heartbeats do not take the
            # benchmark's stream from it.
            own = stack.enter_context(ControllerClient(bootstrap))
            stack.enter_context(StandInBrokers(own, stand_in_brokers))
        start_quorum = _quorum(client)
        leader = f"{start_quorum.voters[0].host}:{start_quorum.voters[0].port}"
        stub = client.stub(leader)
        # Sequential latency first, on an idle cluster, through the client library
        # (on its Requests stream to the active controller, which _quorum opened).
        latencies: list[float] = []
        for i in range(sequential):
            t0 = time.perf_counter()
            response = client.call(
                "CreateTopics", _create_request(prefix + "-seq", i, 1), timeout_s=10
            )
            latencies.append((time.perf_counter() - t0) * 1000.0)
            if response.error.code or response.results[0].error.code:
                raise RuntimeError(f"bench write failed: {response}")
        hw_before = _quorum(client).high_watermark
        requests, errors, elapsed = _run_concurrent(
            stub, prefix, requests, concurrency, partitions_per_topic, progress, duration_s
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
        sequential_latency_ms=_latency_summary(latencies),
        errors=errors,
        leader_epoch_start=start_quorum.leader_epoch,
        leader_epoch_end=end_quorum.leader_epoch,
    )


def _latency_summary(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": round(percentile(latencies, 50), 3),
        "p99": round(percentile(latencies, 99), 3),
        "max": round(max(latencies), 3),
    }


def _run_concurrent(
    stub: Any,
    prefix: str,
    requests: int,
    concurrency: int,
    partitions: int,
    progress: Callable[[int], None] | None,
    duration_s: float | None = None,
) -> tuple[int, int, float]:
    """Keep ``concurrency`` calls in flight with gRPC futures.

    Returns (requests sent, errors, seconds).
    """
    semaphore = threading.Semaphore(concurrency)
    lock = threading.Lock()
    done = threading.Event()
    state = {"answered": 0, "errors": 0, "sent": 0, "closed": 0}

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
            if state["closed"] and state["answered"] == state["sent"]:
                done.set()
        semaphore.release()
        if progress is not None:
            progress(1)

    t0 = time.perf_counter()
    end = t0 + duration_s if duration_s is not None else None
    i = 0
    while (end is None and i < requests) or (end is not None and time.perf_counter() < end):
        semaphore.acquire()
        with lock:
            state["sent"] += 1
        future = stub.CreateTopics.future(_create_request(prefix, i, partitions), timeout=30)
        future.add_done_callback(on_done)
        i += 1
    with lock:
        state["closed"] = 1
        if state["answered"] == state["sent"]:
            done.set()
    if not done.wait(timeout=60.0):
        raise TimeoutError("benchmark requests were not answered within 60 s")
    return state["sent"], state["errors"], time.perf_counter() - t0


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
        error = response.results[0].error if response.results else response.error
        if error.code in (common_pb2.NONE, common_pb2.TOPIC_ALREADY_EXISTS):
            return leader, time.monotonic() - t0
        if error.code == common_pb2.INVALID_REPLICATION_FACTOR:
            # Decided by the new controller, and it will not change: no broker to place on.
            raise error_for(
                error.code,
                f"the timed write was refused: {error.message} "
                "(a cluster without brokers needs stand-in brokers)",
            )
    raise TimeoutError(f"no metadata write committed within {timeout_s}s of killing {leader}")


def run_failover_bench(
    cluster: Any,
    runs: int,
    *,
    stand_in_brokers: int = 0,
    progress: Callable[[int], None] | None = None,
    catch_up_timeout_s: float = 60.0,
) -> FailoverResult:
    """Kill -9 the active controller of a local cluster ``runs`` times.

    After each run the killed node is started again, also when the run fails,
    and the next run waits until every voter has caught up, so each failover
    starts from a whole quorum. The timed write creates a topic, so a cluster
    without brokers needs ``stand_in_brokers``.
    """
    result = FailoverResult()
    with ControllerClient(cluster.bootstrap) as client, contextlib.ExitStack() as stack:
        if stand_in_brokers:
            stack.enter_context(StandInBrokers(client, stand_in_brokers))
        killed: list[int] = []

        def kill(node_id: int) -> None:
            killed.append(node_id)
            cluster.kill(node_id)

        for _ in range(runs):
            _wait_voters_caught_up(client, catch_up_timeout_s)
            killed.clear()
            try:
                leader, seconds = measure_failover(client, kill)
            finally:
                if killed:
                    cluster.start(killed)
            result.failover_s.append(seconds)
            result.killed.append(leader)
            if progress is not None:
                progress(1)
        _wait_voters_caught_up(client, catch_up_timeout_s)
    return result


def _wait_voters_caught_up(client: ControllerClient, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            quorum = _quorum(client)
        except Exception:  # no leader yet
            time.sleep(0.1)
            continue
        if quorum.voters and all(v.log_end_offset >= quorum.high_watermark for v in quorum.voters):
            if all(v.last_fetch_timestamp_ms > 0 for v in quorum.voters):
                return
        time.sleep(0.1)
    raise TimeoutError(f"voters did not catch up within {timeout_s}s")


@dataclass
class ScaleResult:
    topics: int
    partitions: int
    create_s: float
    metadata_records: int
    # After the last CreateTopics answer, until every running broker had acted on
    # every record (made its logs); None with no broker of its own.
    brokers_settled_s: float | None
    fresh_follower_catch_up_s: float
    snapshot_loaded: bool
    failover_s: list[float]
    # A broker in every ISR killed (real brokers) or fenced (stand-ins): seconds until
    # it led nothing; then, restarted as a new incarnation, until it was unfenced.
    # None when the run had no broker to restart.
    broker_moved_s: float | None = None
    broker_rejoined_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["failover_median_s"] = (
            round(statistics.median(self.failover_s), 3) if self.failover_s else None
        )
        return data


def _wait_brokers_at(cluster: Any, offset: int, *, timeout_s: float) -> float | None:
    """Seconds until every running broker of ``cluster`` reports ``offset`` applied
    (a broker acts on a record before it reports it); None when none runs. A broker
    that stops meanwhile is no longer waited for."""
    start = time.perf_counter()
    deadline = start + timeout_s
    done: set[int] = set()
    seen_any = False
    while True:
        running = [n for n in cluster.status() if n.role == "broker" and n.state == "running"]
        waiting = [n for n in running if n.id not in done]
        seen_any = seen_any or bool(running)
        if not waiting:
            return time.perf_counter() - start if seen_any else None
        for node in waiting:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            with grpc.insecure_channel(node.rpc_address) as channel:
                try:
                    described = broker_pb2_grpc.BrokerStub(channel).DescribeBroker(
                        broker_pb2.DescribeBrokerRequest(omit_partitions=True),
                        timeout=min(10.0, remaining),
                    )
                except grpc.RpcError:
                    continue
            if described.metadata_offset >= offset:
                done.add(node.id)
        if time.perf_counter() >= deadline:
            late = sorted(n.id for n in waiting if n.id not in done)
            raise TimeoutError(f"brokers {late} did not reach offset {offset}")
        time.sleep(0.2)


def run_scale_bench(
    cluster: Any,
    *,
    topics: int = 1000,
    partitions_per_topic: int = 100,
    topics_per_request: int = 20,
    replication_factor: int = 3,
    failover_runs: int = 3,
    stand_in_brokers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ScaleResult:
    """Create topics x partitions, time a fresh follower's catch-up, then failover.

    With ``stand_in_brokers``, the replicas go to ``StandInBrokers`` (the quorum alone);
    they shut down at the end, so the topics stay, without leaders."""
    from broker.metadata_follower import MetadataFollower

    prefix = f"scale-{uuid.uuid4().hex[:6]}"
    stand_ins: StandInBrokers | None = None
    with (
        ControllerClient(cluster.bootstrap, timeout_s=60) as client,
        contextlib.ExitStack() as stack,
    ):
        if stand_in_brokers:
            stand_ins = stack.enter_context(StandInBrokers(client, stand_in_brokers))
        t0 = time.perf_counter()
        for first in range(0, topics, topics_per_request):
            batch = [
                cpb.CreatableTopic(
                    name=f"{prefix}-{i}",
                    num_partitions=partitions_per_topic,
                    replication_factor=replication_factor,
                )
                for i in range(first, min(topics, first + topics_per_request))
            ]
            response = client.call("CreateTopics", cpb.CreateTopicsRequest(topics=batch))
            failed = [r for r in response.results if r.error.code]
            if failed:
                raise RuntimeError(f"creating topics failed: {failed[0]}")
            if progress is not None:
                progress(len(batch))
        create_s = time.perf_counter() - t0
        quorum = _quorum(client)
        # A broker joins a settled cluster: the running brokers have made their logs
        # first, as they would have long before on separate machines. Timing the
        # catch-up while they still work on the same two cores would measure them.
        settled_s = _wait_brokers_at(cluster, quorum.high_watermark - 1, timeout_s=600)
        # A fresh broker's view: a follower starting from nothing.
        follower = MetadataFollower(cluster.bootstrap.split(","), broker_id=-1)
        t1 = time.perf_counter()
        follower.start()
        try:
            if not follower.wait_for_offset(quorum.high_watermark - 1, timeout_s=120):
                raise TimeoutError("a fresh follower did not catch up within 120 s")
            catch_up_s = time.perf_counter() - t1
            snapshot_loaded = follower.snapshots_loaded > 0
        finally:
            follower.stop()
        failover = run_failover_bench(cluster, failover_runs)
        if stand_ins is not None:
            restart: tuple[float, float] | None = stand_ins.restart(max(stand_ins.epochs))
        else:
            restart = _restart_a_broker(cluster, client)
    return ScaleResult(
        topics=topics,
        partitions=topics * partitions_per_topic,
        create_s=round(create_s, 3),
        metadata_records=quorum.high_watermark,
        brokers_settled_s=None if settled_s is None else round(settled_s, 3),
        fresh_follower_catch_up_s=round(catch_up_s, 3),
        snapshot_loaded=snapshot_loaded,
        failover_s=[round(v, 3) for v in failover.failover_s],
        broker_moved_s=None if restart is None else round(restart[0], 3),
        broker_rejoined_s=None if restart is None else round(restart[1], 3),
    )
