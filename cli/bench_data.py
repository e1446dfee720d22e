"""Data-plane benchmarks: produce and consume throughput, end-to-end latency,
leader kill under acks=all load, and a broker's memory with many partitions.

Each runs against a live cluster through the client library, as a user's
program would, and returns a plain dict of figures. The producer and the
consumer of the latency bench run in separate processes so that one does not
steal the other's interpreter lock.
"""

from __future__ import annotations

import multiprocessing
import statistics
import struct
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from client import Admin, Consumer, Producer, TopicPartition
from client.errors import RaftkaError

_STAMP = struct.Struct(">q")
# A rate-capped loop sleeps once it is this far ahead of its schedule, not per record.
_MIN_SLEEP_S = 0.001


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def ensure_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    replication_factor: int,
    configs: dict[str, str] | None = None,
) -> None:
    """Create ``topic`` and wait until every partition has a leader and a full ISR."""
    with Admin(bootstrap) as admin:
        if topic not in admin.list_topics():
            admin.create_topic(topic, partitions, replication_factor, configs or {})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = admin.describe_topic(topic)
            if all(p.leader >= 0 and len(p.isr) == replication_factor for p in info.partitions):
                return
            time.sleep(0.1)
    raise TimeoutError(f"topic {topic} did not get leaders with full ISRs within 60 s")


def broker_bootstrap(admin_bootstrap: str) -> str:
    with Admin(admin_bootstrap) as admin:
        return ",".join(b.address for b in admin.describe_cluster().brokers if not b.fenced)


# --------------------------------------------------------------------------- produce


def run_produce_bench(
    bootstrap: str,
    brokers: str,
    *,
    topic: str | None = None,
    records: int = 1_000_000,
    record_size: int = 100,
    partitions: int = 6,
    replication_factor: int = 3,
    min_insync_replicas: int = 2,
    acks: str | int = "all",
    batch_size: int = 256 * 1024,
    linger_ms: float = 5,
    compression: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Send ``records`` records of ``record_size`` bytes from this one process."""
    topic = topic or f"bench-produce-{uuid.uuid4().hex[:8]}"
    ensure_topic(
        bootstrap,
        topic,
        partitions,
        replication_factor,
        {"min.insync.replicas": str(min_insync_replicas)},
    )
    payload = bytes(record_size)
    errors: list[BaseException] = []
    acked = 0

    def done(_metadata: Any, exc: BaseException | None) -> None:
        # Callbacks run one at a time on the producer's sender thread: no lock.
        nonlocal acked
        if exc is not None:
            errors.append(exc)
            return
        acked += 1

    with Producer(
        brokers,
        acks=acks,
        batch_size=batch_size,
        linger_ms=linger_ms,
        compression_type=compression,
        buffer_memory=64 * 1024 * 1024,
    ) as producer:
        producer.partitions_for(topic)  # Metadata first, outside the timing.
        step = max(records // 100, 1)
        start = time.perf_counter()
        send = producer.send
        for i in range(records):
            send(topic, payload, callback=done)
            if progress is not None and i % step == step - 1:
                progress(step)
        producer.flush()
        elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} records failed; first: {errors[0]!r}")
    return {
        "topic": topic,
        "records": records,
        "acknowledged": acked,
        "record_bytes": record_size,
        "acks": acks,
        "partitions": partitions,
        "replication_factor": replication_factor,
        "min_insync_replicas": min_insync_replicas,
        "batch_size": batch_size,
        "linger_ms": linger_ms,
        "compression": compression,
        "seconds": round(elapsed, 3),
        "records_per_s": round(records / elapsed),
        "mb_per_s": round(records * record_size / elapsed / 1e6, 2),
    }


# --------------------------------------------------------------------------- consume


def run_consume_bench(
    brokers: str,
    topic: str,
    *,
    records: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Read ``topic`` from the beginning with one consumer (every partition) and time it."""
    with Consumer(brokers, auto_offset_reset="earliest", max_poll_records=100_000) as consumer:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise ValueError(f"topic {topic} does not exist")
        assigned = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        ends = consumer.end_offsets(assigned)
        starts = consumer.beginning_offsets(assigned)
        total = sum(ends[tp] - starts[tp] for tp in assigned)
        wanted = total if records is None else min(records, total)
        got = 0
        nbytes = 0
        start = time.perf_counter()
        while got < wanted:
            for batch in consumer.poll(timeout_ms=1000).values():
                got += len(batch)
                for record in batch:
                    if record.value is not None:
                        nbytes += len(record.value)
                if progress is not None:
                    progress(len(batch))
        elapsed = time.perf_counter() - start
    return {
        "topic": topic,
        "records": got,
        "seconds": round(elapsed, 3),
        "records_per_s": round(got / elapsed) if elapsed > 0 else None,
        "mb_per_s": round(nbytes / elapsed / 1e6, 2) if elapsed > 0 else None,
    }


# --------------------------------------------------------------------------- latency


def _latency_consumer(brokers: str, topic: str, partitions: int, count: int, out: Any) -> None:
    """Child process: read ``count`` stamped records from the end and report each one's
    (send stamp in ns, latency in s)."""
    samples: list[tuple[int, float]] = []
    with Consumer(brokers, auto_offset_reset="latest", fetch_max_wait_ms=100) as consumer:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_end(*assigned)
        for tp in assigned:
            consumer.position(tp)
        out.put(("ready", None))
        deadline = time.monotonic() + 600
        while len(samples) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                now = time.time_ns()
                for record in batch:
                    if record.value and len(record.value) >= 8:
                        sent = _STAMP.unpack_from(record.value)[0]
                        samples.append((sent, (now - sent) / 1e9))
    out.put(("done", samples))


def measured_latencies(samples: list[tuple[int, float]], start_ns: int) -> list[float]:
    """The latencies of records sent at or after ``start_ns`` (the end of the warm-up)."""
    return [latency for sent, latency in samples if sent >= start_ns]


def run_latency_bench(
    bootstrap: str,
    brokers: str,
    *,
    rate: int = 10_000,
    seconds: float = 10.0,
    warmup_s: float = 1.0,
    record_size: int = 100,
    partitions: int = 6,
    replication_factor: int = 3,
    acks: str | int = "all",
    linger_ms: float = 0,
) -> dict[str, Any]:
    """Produce at ``rate`` records/s for ``warmup_s`` and then ``seconds``; a consumer in
    another process measures each record's produce-to-consume latency (both clocks are
    this host's). Only records sent after the warm-up count, as in the OpenMessaging
    Benchmark's warm-up phase: one-time costs (the clients opening their streams, the
    first writes to a topic created just before) are not a latency at ``rate``. The
    producer does not linger unless told to, as in Kafka's end-to-end latency tool
    (``kafka-e2e-latency.sh`` sets ``linger.ms=0``): a linger is a delay a
    producer takes on for throughput, up to ``linger_ms`` on every record."""
    topic = f"bench-latency-{uuid.uuid4().hex[:8]}"
    ensure_topic(bootstrap, topic, partitions, replication_factor, {"min.insync.replicas": "2"})
    warmup = round(rate * warmup_s)
    count = round(rate * seconds)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(
        target=_latency_consumer,
        args=(brokers, topic, partitions, warmup + count, queue),
        daemon=True,
    )
    child.start()
    try:
        kind, _ = queue.get(timeout=60)
        assert kind == "ready"
        padding = bytes(max(record_size - _STAMP.size, 0))
        ack_latencies: list[float] = []
        measure_from_ns = 0

        def acked(sent_ns: int) -> Callable[[Any, Any], None]:
            def done(_metadata: Any, exc: BaseException | None) -> None:
                if exc is None:
                    ack_latencies.append((time.time_ns() - sent_ns) / 1e9)

            return done

        with Producer(brokers, acks=acks, linger_ms=linger_ms) as producer:
            producer.partitions_for(topic)
            interval = 1.0 / rate
            start = time.perf_counter()
            measure_start = start
            for i in range(warmup + count):
                # Sleep only once ahead by _MIN_SLEEP_S, as Kafka's perf tools throttle:
                # a sleep per record (10,000 a second) costs this process more CPU
                # than the records do, on the cores the brokers need.
                delay = start + i * interval - time.perf_counter()
                if delay >= _MIN_SLEEP_S:
                    time.sleep(delay)
                now_ns = time.time_ns()
                if i < warmup:  # Not measured: no acknowledgement is timed either.
                    producer.send(topic, _STAMP.pack(now_ns) + padding)
                    continue
                if i == warmup:
                    measure_from_ns = now_ns
                    measure_start = time.perf_counter()
                producer.send(topic, _STAMP.pack(now_ns) + padding, callback=acked(now_ns))
            producer.flush()
            sent_for = time.perf_counter() - measure_start
        kind, samples = queue.get(timeout=120)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join(timeout=5)
    latencies = measured_latencies(samples, measure_from_ns) if count else []
    return {
        "topic": topic,
        "rate_target": rate,
        "rate_achieved": round(count / sent_for) if count and sent_for > 0 else 0,
        "warmup_records": warmup,
        "records": len(latencies),
        "acks": acks,
        "linger_ms": linger_ms,
        "p50_ms": _ms(_percentile(latencies, 50)),
        "p99_ms": _ms(_percentile(latencies, 99)),
        "p999_ms": _ms(_percentile(latencies, 99.9)),
        "max_ms": _ms(max(latencies) if latencies else None),
        "acked_records": len(ack_latencies),
        "ack_p50_ms": _ms(_percentile(ack_latencies, 50)),
        "ack_p99_ms": _ms(_percentile(ack_latencies, 99)),
    }


# --------------------------------------------------------------------------- leader kill


class _AckLog:
    """What an acks=all producer was told: acknowledged values per partition."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[int, list[tuple[int, bytes]]] = {}
        self.last_ack_s: dict[int, float] = {}
        self.failed = 0

    def callback(self, value: bytes, sent_s: float) -> Callable[[Any, Any], None]:
        def done(metadata: Any, exc: BaseException | None) -> None:
            if exc is not None:
                with self.lock:
                    self.failed += 1
                return
            with self.lock:
                self.acked.setdefault(metadata.partition, []).append((metadata.offset, value))
                self.last_ack_s[metadata.partition] = max(
                    self.last_ack_s.get(metadata.partition, 0.0), sent_s
                )

        return done


def run_leader_kill_bench(
    cluster: Any,
    *,
    runs: int = 5,
    partitions: int = 6,
    rate: int = 2000,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Kill -9 the leader of partition 0 under acks=all load, ``runs`` times.

    For each run: the time from the kill until a record *sent after the kill* to
    partition 0 is acknowledged. At the end every acknowledged record is read
    back: none may be missing, and each partition's offsets hold the values
    the producer was told they hold.
    """
    bootstrap = str(cluster.bootstrap)
    brokers = broker_bootstrap(bootstrap)
    topic = f"bench-kill-{uuid.uuid4().hex[:8]}"
    ensure_topic(bootstrap, topic, partitions, 3, {"min.insync.replicas": "2"})
    acks = _AckLog()
    stop = threading.Event()
    recoveries: list[float] = []
    killed: list[int] = []
    sent = 0

    with Producer(
        brokers, acks="all", linger_ms=2, retry_backoff_ms=20, retry_backoff_max_ms=100
    ) as producer:
        producer.partitions_for(topic)

        def load() -> None:
            nonlocal sent
            interval = 1.0 / rate
            next_due = time.perf_counter()
            while not stop.is_set():
                for p in range(partitions):
                    value = f"{sent:012d}".encode()
                    now_s = time.monotonic()
                    producer.send(topic, value, partition=p, callback=acks.callback(value, now_s))
                    sent += 1
                next_due += interval * partitions
                delay = next_due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)

        loader = threading.Thread(target=load, name="bench-load", daemon=True)
        loader.start()
        try:
            with Admin(bootstrap) as admin:
                for _ in range(runs):
                    _wait_full_isr(admin, topic, partitions)
                    time.sleep(1.0)  # Steady load before the fault.
                    leader = admin.describe_topic(topic).partitions[0].leader
                    t_kill = time.monotonic()
                    cluster.kill(leader)
                    killed.append(leader)
                    recoveries.append(_wait_ack_after(acks, 0, t_kill))
                    cluster.start([leader])
                    if progress is not None:
                        progress(1)
                _wait_full_isr(admin, topic, partitions)
        finally:
            stop.set()
            loader.join(timeout=10)
            producer.flush(timeout=60)
    lost, mismatched, total, duplicates = _verify_acked(brokers, topic, partitions, acks)
    return {
        "topic": topic,
        "runs": len(recoveries),
        "killed": killed,
        "recovery_s": [round(r, 3) for r in recoveries],
        "median_s": round(statistics.median(recoveries), 3) if recoveries else None,
        "max_s": round(max(recoveries), 3) if recoveries else None,
        "records_sent": sent,
        "records_acknowledged": total,
        "records_failed": acks.failed,
        "acknowledged_lost": lost,
        "acknowledged_mismatched": mismatched,
        "duplicates": duplicates,
    }


def _wait_full_isr(admin: Admin, topic: str, partitions: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = admin.describe_topic(topic)
        except RaftkaError:
            time.sleep(0.2)
            continue
        if len(info.partitions) == partitions and all(
            p.leader >= 0 and len(p.isr) == len(p.replicas) for p in info.partitions
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{topic}: ISRs not full within {timeout_s} s")


def _wait_ack_after(acks: _AckLog, partition: int, t_kill: float, timeout_s: float = 60) -> float:
    deadline = t_kill + timeout_s
    while time.monotonic() < deadline:
        with acks.lock:
            last = acks.last_ack_s.get(partition, 0.0)
        if last > t_kill:
            return time.monotonic() - t_kill
        time.sleep(0.005)
    raise TimeoutError(f"no acknowledgement on partition {partition} within {timeout_s} s")


def _verify_acked(
    brokers: str, topic: str, partitions: int, acks: _AckLog
) -> tuple[int, int, int, int]:
    """(acknowledged records missing, acknowledged offsets holding another value, total,
    values stored more than once)."""
    with acks.lock:
        expected = {p: dict(v) for p, v in acks.acked.items()}
    found: dict[int, dict[int, bytes]] = {p: {} for p in range(partitions)}
    with Consumer(brokers, auto_offset_reset="earliest", max_poll_records=100_000) as consumer:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        ends = consumer.end_offsets(assigned)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(
            consumer.position(tp) < ends[tp] for tp in assigned
        ):
            for tp, batch in consumer.poll(timeout_ms=500).items():
                for record in batch:
                    found[tp.partition][record.offset] = record.value or b""
    seen: dict[bytes, int] = {}
    for offsets_found in found.values():
        for value in offsets_found.values():
            seen[value] = seen.get(value, 0) + 1
    duplicates = sum(1 for n in seen.values() if n > 1)
    lost = mismatched = total = 0
    for p, offsets in expected.items():
        for offset, value in offsets.items():
            total += 1
            got = found[p].get(offset)
            if got is None:
                lost += 1
            elif got != value:
                mismatched += 1
    return lost, mismatched, total, duplicates


# --------------------------------------------------------------------------- memory


def run_memory_bench(
    cluster: Any, *, partitions: int = 1000, settle_s: float = 10.0
) -> dict[str, Any]:
    """RSS of each broker hosting ``partitions`` replicas (rf = broker count), idle."""
    import psutil

    bootstrap = str(cluster.bootstrap)
    brokers = [n for n in cluster.status() if n.role == "broker" and n.running]
    before = {n.id: psutil.Process(n.pid).memory_info().rss for n in brokers}
    topic = f"bench-memory-{uuid.uuid4().hex[:8]}"
    per_topic = 100
    with Admin(bootstrap) as admin:
        for i in range(0, partitions, per_topic):
            admin.create_topic(
                f"{topic}-{i // per_topic}", min(per_topic, partitions - i), len(brokers)
            )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(_hosted(cluster, n.id) >= partitions for n in brokers):
            break
        time.sleep(0.5)
    time.sleep(settle_s)
    after = {n.id: psutil.Process(n.pid).memory_info().rss for n in brokers}
    return {
        "partitions_per_broker": partitions,
        "rss_mb_before": {b: round(v / 2**20, 1) for b, v in before.items()},
        "rss_mb_after": {b: round(v / 2**20, 1) for b, v in after.items()},
        "max_rss_mb": round(max(after.values()) / 2**20, 1),
    }


def _hosted(cluster: Any, broker_id: int) -> int:
    import grpc
    from raftka.v1 import broker_pb2, broker_pb2_grpc

    node = next(n for n in cluster.status() if n.id == broker_id)
    with grpc.insecure_channel(f"{node.host}:{node.rpc_port}") as channel:
        try:
            described = broker_pb2_grpc.BrokerStub(channel).DescribeBroker(
                broker_pb2.DescribeBrokerRequest(), timeout=10
            )
        except grpc.RpcError:
            return 0
    return len(described.partitions)
