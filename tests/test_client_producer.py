"""Producer: argument checks without a network, then batching, partitioning, retries and
delivery against fake brokers on loopback (tests/fake_broker.py)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fake_broker import FakeCluster
from raftka.v1 import common_pb2

from broker.record_batch import iter_batches
from client import (
    ClientTimeoutError,
    InvalidRecordError,
    Producer,
    RecordMetadata,
    RecordTooLargeError,
    UnknownTopicError,
)
from client.partitioner import partition_for_key

VALUE = b"v" * 100
RECORD_BYTES = 109  # VALUE with a null key and no headers, in a batch.
FAST = {
    "linger_ms": 0,
    "retry_backoff_ms": 5,
    "retry_backoff_max_ms": 50,
    "request_timeout_ms": 2000,
    "delivery_timeout_ms": 5000,
    "max_block_ms": 2000,
}


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    with FakeCluster(brokers=2) as fake:
        fake.create_topic("t", 3)
        yield fake


@contextmanager
def producer(cluster: FakeCluster | None = None, **options: Any) -> Iterator[Producer]:
    bootstrap = cluster.bootstrap if cluster else "127.0.0.1:1"
    p = Producer(bootstrap, **{**FAST, **options})
    try:
        yield p
    finally:
        p.close(timeout=5)


def offsets(futures: list[Any]) -> list[tuple[int, int]]:
    return [(f.result(5).partition, f.result(5).offset) for f in futures]


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"acks": 2}, "acks must be"),
        ({"acks": "most"}, "acks must be"),
        ({"compression_type": "brotli"}, "compression_type must be"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"max_in_flight_requests_per_connection": 0}, "max_in_flight"),
        ({"linger_ms": -1}, "must be >= 0"),
        ({"delivery_timeout_ms": 1000, "request_timeout_ms": 2000}, "delivery_timeout_ms"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Producer("127.0.0.1:1", **options)


def test_bad_bootstrap_is_refused():
    with pytest.raises(ValueError, match="not host:port"):
        Producer("localhost")


def test_bad_records_are_refused_before_any_network():
    with producer(max_request_size=1000) as p:
        with pytest.raises(TypeError, match=r"value must be bytes or None, not str \(encode"):
            p.send("t", "text")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="key must be bytes"):
            p.send("t", b"v", key=7)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="header"):
            p.send("t", b"v", headers=[("h", 1)])  # type: ignore[list-item]
        with pytest.raises(RecordTooLargeError, match="max_request_size"):
            p.send("t", b"x" * 1000)
        with pytest.raises(ValueError, match="partition must be an int"):
            p.send("t", b"x", partition=-1)


def test_send_after_close_is_an_error():
    p = Producer("127.0.0.1:1")
    p.close()
    p.close()  # Idempotent.
    with pytest.raises(RuntimeError, match="closed"):
        p.send("t", b"v")


# --------------------------------------------------------------------------- delivery


def test_records_are_delivered_with_offsets_and_land_in_the_log(cluster):
    with producer(cluster) as p:
        futures = [p.send("t", b"%d" % i, partition=1, timestamp_ms=1000 + i) for i in range(5)]
        p.flush(5)
        assert [f.result() for f in futures] == [
            RecordMetadata("t", 1, i, 1000 + i) for i in range(5)
        ]
    assert [(o, r.value) for o, r in cluster.records("t", 1)] == [(i, b"%d" % i) for i in range(5)]


def test_keyed_records_land_where_murmur2_puts_them(cluster):
    keys = [b"key-%d" % i for i in range(30)]
    with producer(cluster) as p:
        futures = [p.send("t", VALUE, key=k) for k in keys]
        p.flush(5)
    assert [f.result().partition for f in futures] == [partition_for_key(k, 3) for k in keys]
    assert len({f.result().partition for f in futures}) == 3


def test_a_custom_partitioner_is_used_and_checked(cluster):
    with producer(cluster, partitioner=lambda key, count: len(key) % count) as p:
        assert p.send("t", VALUE, key=b"ab").result(5).partition == 2
    with producer(cluster, partitioner=lambda key, count: count) as p:
        with pytest.raises(ValueError, match="the partitioner chose 3, not in 0..2"):
            p.send("t", VALUE, key=b"k")


def test_keyless_records_stick_to_a_partition_until_its_batch_is_full(cluster):
    per_batch = 5
    with producer(
        cluster,
        batch_size=61 + per_batch * RECORD_BYTES,
        linger_ms=60000,
        delivery_timeout_ms=120000,
    ) as p:
        futures = [p.send("t", VALUE) for _ in range(3 * per_batch + 2)]
        # Full batches go at once; the last, partial one waits for its linger (60 s).
        for f in futures[: 3 * per_batch]:
            f.result(5)
        assert not futures[-1].done()
        p.flush(5)
    partitions = [f.result().partition for f in futures]
    runs = [partitions[i : i + per_batch] for i in range(0, len(partitions), per_batch)]
    assert all(len(set(run)) == 1 for run in runs)
    assert all(a[0] != b[0] for a, b in zip(runs, runs[1:], strict=False))


def test_linger_holds_a_batch_until_it_expires_or_flush(cluster):
    with producer(cluster, linger_ms=60000, delivery_timeout_ms=120000) as p:
        held = p.send("t", VALUE, partition=0)
        assert not held.done() and cluster.calls("Produce") == []
        p.flush(5)
        assert held.result().offset == 0
    with producer(cluster, linger_ms=20) as p:
        assert p.send("t", VALUE, partition=0).result(5).offset == 1  # No flush needed.


def test_many_batches_of_a_partition_go_in_one_request(cluster):
    with producer(cluster, batch_size=100) as p:  # Every record gets a batch of its own.
        cluster.produce_gate.clear()
        first = p.send("t", VALUE, partition=2)
        cluster.wait_for_calls("Produce", 1)
        rest = [p.send("t", VALUE, partition=2) for _ in range(20)]
        cluster.produce_gate.set()
        p.flush(5)
    assert offsets([first, *rest]) == [(2, i) for i in range(21)]
    (_, second), *more = cluster.calls("Produce")[1:]
    assert not more
    assert len(list(iter_batches(second.topics[0].partitions[0].records))) == 20


def test_concurrent_senders_keep_each_partitions_order(cluster):
    results: dict[int, list[Any]] = {}

    def run(thread: int, p: Producer) -> None:
        results[thread] = [p.send("t", b"%d" % i, key=b"thread-%d" % thread) for i in range(300)]

    with producer(cluster, linger_ms=2) as p:
        threads = [threading.Thread(target=run, args=(n, p)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        p.flush(10)
    for futures in results.values():
        delivered = offsets(futures)
        assert len({partition for partition, _ in delivered}) == 1
        assert [o for _, o in delivered] == sorted(o for _, o in delivered)


def test_callbacks_and_future_protocol(cluster):
    seen: list[tuple[int, Any]] = []
    done_callbacks: list[Any] = []
    with producer(cluster, linger_ms=5) as p:
        futures = [
            p.send("t", VALUE, partition=0, callback=lambda md, e: seen.append((md.offset, e)))
            for _ in range(10)
        ]
        futures[3].add_done_callback(done_callbacks.append)
        done, not_done = concurrent.futures.wait(futures, timeout=5)
    assert len(done) == 10 and not not_done
    assert seen == [(i, None) for i in range(10)]
    assert done_callbacks == [futures[3]]
    assert not futures[0].cancel() and not futures[0].cancelled()
    late: list[Any] = []
    futures[0].add_done_callback(late.append)  # Already done: runs at once.
    assert late == [futures[0]]


def test_a_delivered_batch_keeps_no_bytes_for_its_futures(cluster):
    with producer(cluster, linger_ms=5) as p:
        futures = [p.send("t", VALUE, partition=0) for _ in range(5)]
        p.flush(5)
    assert [f.result().offset for f in futures] == list(range(5))
    # The futures answer from the batch's outcome; the batch's bytes are gone.
    builder = futures[0]._batch.builder
    assert builder.size_bytes == 0 and builder.build() == b""


def test_acks_zero_completes_without_offsets(cluster):
    with producer(cluster, acks=0) as p:
        futures = [p.send("t", VALUE, partition=0) for _ in range(3)]
        p.flush(5)
    assert [f.result().offset for f in futures] == [-1, -1, -1]
    assert len(cluster.records("t", 0)) == 3
    assert cluster.calls("Produce")[0][1].acks == 0


# --------------------------------------------------------------------------- errors and retries


def test_retriable_errors_are_retried_in_order(cluster):
    cluster.fail_produce("t", 0, common_pb2.NOT_ENOUGH_REPLICAS, common_pb2.REQUEST_TIMED_OUT)
    with producer(cluster, batch_size=61 + 3 * RECORD_BYTES) as p:
        futures = [p.send("t", b"%03d" % i, partition=0) for i in range(30)]
        p.flush(5)
    assert offsets(futures) == [(0, i) for i in range(30)]
    assert [r.value for _, r in cluster.records("t", 0)] == [b"%03d" % i for i in range(30)]


def test_not_leader_refreshes_metadata_and_retries_at_the_new_leader(cluster):
    with producer(cluster) as p:
        assert p.send("t", VALUE, partition=0).result(5).offset == 0
        cluster.move_leader("t", 0, 2)  # Broker 1 led partition 0.
        moved = [p.send("t", VALUE, partition=0) for _ in range(5)]
        p.flush(5)
        cluster.fail_produce("t", 0, common_pb2.NOT_LEADER_OR_FOLLOWER)  # Without a new leader.
        metadata_calls = len(cluster.calls("Metadata"))
        after = p.send("t", VALUE, partition=0).result(5)
    assert offsets(moved) == [(0, i) for i in range(1, 6)] and after.offset == 6
    produce_brokers = [broker for broker, _ in cluster.calls("Produce")]
    assert produce_brokers[:2] == [1, 1] and set(produce_brokers[2:]) == {2}
    assert len(cluster.calls("Metadata")) > metadata_calls
    assert len(cluster.records("t", 0)) == 7


def test_a_non_retriable_error_fails_only_its_batch(cluster):
    cluster.fail_produce("t", 0, common_pb2.INVALID_RECORD)
    with producer(cluster) as p:
        failed = p.send("t", VALUE, partition=0)
        with pytest.raises(InvalidRecordError, match="INVALID_RECORD: t-0 at broker 1"):
            failed.result(5)
        assert p.send("t", VALUE, partition=0).result(5).offset == 0


def test_records_expire_after_the_delivery_timeout(cluster):
    with producer(cluster, request_timeout_ms=200, delivery_timeout_ms=400) as p:
        assert p.send("t", VALUE, partition=0).result(5).offset == 0
        cluster.down.add(1)
        lost = p.send("t", VALUE, partition=0)
        with pytest.raises(ClientTimeoutError, match=r"expired.*last error.*broker 1 is down"):
            lost.result(5)


def test_unknown_topic_times_out_in_send(cluster):
    with producer(cluster, max_block_ms=100) as p:
        with pytest.raises(ClientTimeoutError, match="'nope' not in the metadata.*UNKNOWN_TOPIC"):
            p.send("nope", VALUE)
        with pytest.raises(UnknownTopicError, match="partition 7 of 't' does not exist"):
            p.send("t", VALUE, partition=7)


def test_send_blocks_when_the_buffer_is_full_then_times_out(cluster):
    with producer(cluster, batch_size=1000, buffer_memory=3000, max_block_ms=100) as p:
        cluster.produce_gate.clear()
        held = [p.send("t", b"x" * 900, partition=0) for _ in range(3)]  # A batch each.
        with pytest.raises(ClientTimeoutError, match="no buffer space"):
            p.send("t", b"x" * 900, partition=0)
        cluster.produce_gate.set()
        p.flush(5)
        assert offsets(held) == [(0, 0), (0, 1), (0, 2)]
        assert p.send("t", b"x" * 900, partition=0).result(5).offset == 3  # Space again.


def test_flush_and_close_time_out_and_fail_what_was_not_delivered(cluster):
    p = Producer(cluster.bootstrap, **FAST)
    try:
        cluster.produce_gate.clear()
        stuck = p.send("t", VALUE, partition=0)
        with pytest.raises(ClientTimeoutError, match="flush: 1 record"):
            p.flush(0.05)
        p.close(timeout=0.05)
        with pytest.raises(ClientTimeoutError, match="closed before delivery"):
            stuck.result(5)
    finally:
        cluster.produce_gate.set()
        p.close(timeout=5)


def test_a_silent_broker_does_not_hold_up_a_metadata_refresh():
    """The broker that answered last is paused: the next one is asked after a short
    wait, so the sender thread (which refreshes) does not stall for seconds."""
    from client._brokers import Cluster

    with FakeCluster(brokers=2) as fake:
        fake.create_topic("t", 1, leaders=[2])
        silent, good = fake.addresses[1], fake.addresses[2]
        cluster = Cluster([silent, good], request_timeout_ms=10_000)
        try:
            cluster.add_topics(["t"])
            cluster.update()
            fake.hung.add(1)
            cluster._last_good = silent  # As if broker 1 had answered last.
            started = time.monotonic()
            view = cluster.update()
            took = time.monotonic() - started
            fake.released.set()
        finally:
            cluster.close()
        assert view.leader("t", 0) is not None and view.leader("t", 0).leader == 2
        assert took < 1.0, took
        assert cluster._last_good == good


def test_a_request_stuck_at_a_silent_leader_moves_to_the_new_one(cluster):
    """The leader goes silent (paused, or cut off from the client too) and another broker
    takes over: the producer does not wait for request_timeout_ms but finds the new
    leader, and the record is written once."""
    with producer(cluster, request_timeout_ms=30_000, delivery_timeout_ms=60_000) as p:
        assert p.send("t", VALUE, partition=0).result(5).offset == 0, "first"
        cluster.hung.add(1)  # Broker 1 leads partition 0; it answers nothing now.
        started = time.monotonic()
        stuck = p.send("t", VALUE, partition=0)
        cluster.wait_for_calls("Produce", 2)  # The request is at broker 1.
        cluster.move_leader("t", 0, 2)
        metadata = stuck.result(10)
        took = time.monotonic() - started
        cluster.released.set()
    assert took < 3.0, took
    assert metadata.offset == 1
    assert [broker for broker, _ in cluster.calls("Produce")][-1] == 2
