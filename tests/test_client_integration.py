"""The client library against real processes: 3 controllers, 3 brokers on loopback.

What a user of ``Producer`` and ``Consumer`` relies on, checked end to end: keyed
records land by murmur2 and in send order, nothing acknowledged is lost when a leader
is killed under load, seeks and offset lookups agree with what was produced, retention
moves the log start and the consumer follows it, every codec round-trips, and acks=1
and acks=0 deliver.

Every test creates its own topics and leaves every node running, so the order of the
tests does not matter. Timeouts are short (a 2 s broker session, 2 s replica lag, log
maintenance every 500 ms) so that failures are detected in seconds.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import running_cluster
from dataplane import address, stub, wait_until
from raftka.v1 import broker_pb2

from broker.record_batch import Compression, iter_batches
from cli import bench_data
from client import (
    Admin,
    Consumer,
    ConsumerRecord,
    OffsetAndTimestamp,
    OffsetOutOfRangeError,
    Producer,
    RecordMetadata,
    TopicInfo,
    TopicPartition,
)
from client.partitioner import partition_for_key

pytestmark = pytest.mark.integration

SESSION_MS = 2000
BROKERS = (100, 101, 102)
# Short client timeouts and backoffs, so that a retry after a failover comes quickly.
CONSUMER_OPTIONS: dict[str, Any] = {
    "fetch_max_wait_ms": 100,
    "retry_backoff_ms": 50,
    "request_timeout_ms": 10000,
}
PRODUCER_OPTIONS: dict[str, Any] = {
    "retry_backoff_ms": 50,
    "retry_backoff_max_ms": 500,
    "request_timeout_ms": 10000,
    "delivery_timeout_ms": 60000,
    "max_block_ms": 20000,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(
        tmp_path_factory.mktemp("client"),
        controllers=3,
        brokers=3,
        overrides={
            "broker.session.timeout.ms": SESSION_MS,
            "broker.heartbeat.interval.ms": 250,
            "replica.lag.time.max.ms": 2000,
            "replica.fetch.wait.max.ms": 200,
            "log.retention.check.interval.ms": 500,
        },
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def brokers(cluster) -> str:
    """The brokers' addresses, as a user gets them: from the cluster's description."""
    with Admin(cluster.bootstrap, timeout_s=10.0) as admin:
        described = admin.describe_cluster().brokers
    return ",".join(b.address for b in described)


@pytest.fixture
def admin(cluster):
    with Admin(cluster.bootstrap, timeout_s=10.0) as admin:
        yield admin
    # Bring back whatever a test killed, so the next one starts with every broker.
    cluster.start()
    cluster.wait_ready(timeout_s=60)


def create_topic(cluster, admin: Admin, name: str, partitions: int, **configs: str) -> None:
    """Create a topic (rf 3) and wait until every leader acts on it.

    The clients cope with a topic the brokers have not learnt yet (they retry
    UNKNOWN_TOPIC_OR_PARTITION), but acks=0 cannot: its errors are only logged.
    """
    admin.create_topic(name, partitions, 3, {k.replace("_", "."): v for k, v in configs.items()})

    def ready() -> TopicInfo | None:
        topic = admin.describe_topic(name)
        return topic if all(p.leader > 0 and len(p.isr) == 3 for p in topic.partitions) else None

    def leads(broker_id: int, partition: int) -> bool:
        described = stub(cluster, broker_id).DescribeBroker(
            broker_pb2.DescribeBrokerRequest(), timeout=5
        )
        return any(
            q.topic == name and q.partition == partition and q.role == "leader"
            for q in described.partitions
        )

    topic: TopicInfo = wait_until(f"{name} to have leaders and full ISRs", ready)  # type: ignore[assignment]
    for p in topic.partitions:
        wait_until(
            f"broker {p.leader} to lead {name}-{p.partition}",
            functools.partial(leads, p.leader, p.partition),
        )


@contextmanager
def consumer(brokers: str, **options: Any) -> Iterator[Consumer]:
    c = Consumer(brokers, **{**CONSUMER_OPTIONS, **options})
    try:
        yield c
    finally:
        c.close()


def read_until(
    c: Consumer, done: Callable[[list[ConsumerRecord]], object], what: str, timeout_s: float = 30.0
) -> list[ConsumerRecord]:
    """Poll until ``done(records so far)``; a bounded wait."""
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    while not done(records):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out reading {what}: {len(records)} record(s) so far")
        for batch in c.poll(timeout_ms=200).values():
            records += batch
    return records


def read_all(brokers: str, topic: str, partitions: Iterable[int]) -> list[ConsumerRecord]:
    """Every record of the partitions, from their log start to their high watermark."""
    tps = [TopicPartition(topic, p) for p in partitions]
    with consumer(brokers, auto_offset_reset="earliest") as c:
        c.assign(tps)
        ends = c.end_offsets(tps)
        c.seek_to_beginning()
        return read_until(
            c,
            lambda _: all(c.position(tp) >= ends[tp] for tp in tps),
            f"{topic} up to {ends}",
        )


def test_keyed_records_land_by_murmur2_in_send_order(cluster, admin, brokers):
    create_topic(cluster, admin, "keyed", 6, min_insync_replicas="2")
    sent: list[tuple[bytes, bytes]] = []
    with Producer(brokers, acks="all", **PRODUCER_OPTIONS) as producer:
        futures = []
        for i in range(20_000):
            key = f"k{i % 100}".encode()
            value = f"{key.decode()}-{i}".encode()
            futures.append(producer.send("keyed", value, key=key))
            sent.append((key, value))
        producer.flush(60)
        metadata: list[RecordMetadata] = [f.result(timeout=0) for f in futures]
    where = {value: (m.partition, m.offset) for (_, value), m in zip(sent, metadata, strict=True)}
    assert len(set(where.values())) == 20_000  # No two records share an offset.

    records = read_all(brokers, "keyed", range(6))
    assert len(records) == 20_000
    assert {r.value: (r.partition, r.offset) for r in records} == where
    by_partition: dict[int, list[ConsumerRecord]] = defaultdict(list)
    by_key: dict[bytes, list[ConsumerRecord]] = defaultdict(list)
    for r in records:
        by_partition[r.partition].append(r)
        by_key[r.key].append(r)  # type: ignore[index]
    for partition, rs in by_partition.items():
        assert [r.offset for r in rs] == list(range(len(rs))), f"partition {partition}"
    assert len(by_key) == 100
    for key, rs in by_key.items():
        assert {r.partition for r in rs} == {partition_for_key(key, 6)}, key
        assert [r.value for r in rs] == [v for k, v in sent if k == key], key


class _LoadGenerator:
    """Sends unique values round-robin over partitions until stopped; remembers where
    each acknowledged value landed and when each partition was acknowledged."""

    def __init__(self, producer: Producer, topic: str, partitions: int):
        self.producer = producer
        self.topic = topic
        self.partitions = partitions
        self.acked: dict[bytes, tuple[int, int]] = {}
        self.ack_times: dict[int, list[float]] = defaultdict(list)
        self.failed: list[BaseException] = []
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()

    def acks_since(self, partition: int, since: float) -> int:
        return sum(1 for t in list(self.ack_times[partition]) if t > since)

    def _delivered(self, value: bytes, metadata: RecordMetadata | None, error) -> None:
        if metadata is None:
            self.failed.append(error)
            return
        self.acked[value] = (metadata.partition, metadata.offset)
        self.ack_times[metadata.partition].append(time.monotonic())

    def _run(self) -> None:
        # About 2,000 records/s in groups of 20: load, not a flood that fills the
        # producer's buffer while a partition has no leader.
        while not self._stop.wait(0.01):
            for _ in range(20):
                value = f"v{self.sent}".encode()
                try:
                    self.producer.send(
                        self.topic,
                        value,
                        partition=self.sent % self.partitions,
                        callback=functools.partial(self._delivered, value),
                    )
                except Exception as e:  # Seen by the test's assertion on ``failed``.
                    self.failed.append(e)
                    return
                self.sent += 1


def test_leader_kill_under_load_loses_no_acknowledged_record(
    cluster, admin, brokers, record_property
):
    create_topic(cluster, admin, "failover", 3, min_insync_replicas="2")
    victim = admin.describe_topic("failover").partitions[0].leader
    with Producer(brokers, acks="all", linger_ms=5, **PRODUCER_OPTIONS) as producer:
        load = _LoadGenerator(producer, "failover", 3)
        load.start()
        try:
            started = time.monotonic()
            wait_until("acks on every partition", lambda: all(load.ack_times[p] for p in range(3)))
            cluster.kill(victim)
            killed_at = time.monotonic()
            wait_until(
                "partition 0 acknowledged by a new leader",
                lambda: load.acks_since(0, killed_at + 0.5) > 0,
                timeout_s=30,
            )
            # Keep the load on for about 3 s after the kill: it is the load's length,
            # not a wait for anything.
            time.sleep(max(0.0, killed_at + 3.0 - time.monotonic()))
            cluster.start([victim])
            wait_until(
                f"broker {victim} back in the ISR of every partition",
                lambda: all(victim in p.isr for p in admin.describe_topic("failover").partitions),
                timeout_s=30,
            )
        finally:
            load.stop()
        producer.flush(60)
    assert load.failed == []
    assert len(load.acked) == load.sent
    stamps = sorted(load.ack_times[0])
    gap_s = max(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    record_property("partition0_longest_gap_without_acks_s", round(gap_s, 3))
    print(
        f"\n{load.sent} records in {time.monotonic() - started:.1f} s; partition 0 went "
        f"{gap_s:.2f} s without an acknowledgement after its leader {victim} was killed"
    )
    assert gap_s < 15.0

    records = read_all(brokers, "failover", range(3))
    stored = {(r.partition, r.offset): r.value for r in records}
    missing = {v: at for v, at in load.acked.items() if stored.get(at) != v}
    assert missing == {}, f"{len(missing)} acknowledged record(s) not where acknowledged"
    # At least once: a record whose acknowledgement was lost in the kill may be stored twice.
    assert {r.value for r in records} == set(load.acked)
    print(f"{len(records) - len(load.acked)} duplicate(s) from retries")


def test_describe_broker_can_leave_out_its_partitions(cluster, admin, brokers):
    """What ``raftka bench scale`` polls: the metadata offset without 100,000 partitions."""
    create_topic(cluster, admin, "described", 3)
    full = stub(cluster, 100).DescribeBroker(broker_pb2.DescribeBrokerRequest(), timeout=5)
    short = stub(cluster, 100).DescribeBroker(
        broker_pb2.DescribeBrokerRequest(omit_partitions=True), timeout=5
    )
    assert any(p.topic == "described" for p in full.partitions)
    assert not short.partitions
    assert short.broker_id == 100 and short.metadata_offset >= full.metadata_offset > 0
    assert short.client_streams_limit == 64  # max.client.streams, within 128 rpc threads
    assert short.client_streams_refused == 0

    def streams_open() -> int:
        return (
            stub(cluster, 100)
            .DescribeBroker(broker_pb2.DescribeBrokerRequest(omit_partitions=True), timeout=5)
            .client_streams_open
        )

    with Consumer(brokers, **CONSUMER_OPTIONS) as consumer:
        consumer.assign([TopicPartition("described", p) for p in range(3)])
        consumer.poll(timeout_ms=300)  # A FetchStream to each leader, broker 100 one.
        wait_until("the consumer's stream on broker 100", lambda: streams_open() >= 1)
    # Every client of the tests so far is closed: each stream is given back.
    wait_until("the streams given back", lambda: streams_open() == 0)


def test_seek_and_offset_lookups(cluster, admin, brokers):
    create_topic(cluster, admin, "seek", 1)
    tp = TopicPartition("seek", 0)
    # Timestamps a second apart, recent enough that retention.ms keeps them.
    t0 = int(time.time() * 1000) - 60_000
    with Producer(brokers, **PRODUCER_OPTIONS) as producer:
        for i in range(10):
            producer.send("seek", f"old-{i}".encode(), timestamp_ms=t0 + i * 1000)
        producer.flush(30)

        with consumer(brokers) as c:
            c.assign([tp])
            assert c.beginning_offsets([tp]) == {tp: 0}
            assert c.end_offsets([tp]) == {tp: 10}
            assert c.offsets_for_times({tp: t0 + 3500}) == {tp: OffsetAndTimestamp(4, t0 + 4000)}
            assert c.offsets_for_times({tp: t0}) == {tp: OffsetAndTimestamp(0, t0)}
            assert c.offsets_for_times({tp: t0 + 9000}) == {tp: OffsetAndTimestamp(9, t0 + 9000)}
            assert c.offsets_for_times({tp: t0 + 9001}) == {tp: None}

            c.seek_to_end()
            assert c.position(tp) == 10
            assert c.poll(timeout_ms=300) == {}
            for i in range(5):
                producer.send("seek", f"new-{i}".encode())
            producer.flush(30)
            got = read_until(c, lambda rs: len(rs) >= 5, "the new records")
            assert [(r.offset, r.value) for r in got] == [
                (10 + i, f"new-{i}".encode()) for i in range(5)
            ]

            # offsets_for_times lands where a seek then reads the right record.
            (found,) = c.offsets_for_times({tp: t0 + 7000}).values()
            c.seek(tp, found.offset)
            (first, *_) = read_until(c, lambda rs: rs, "the record at t0 + 7 s")
            assert (first.offset, first.timestamp, first.value) == (7, t0 + 7000, b"old-7")
        assert consumer_end(brokers, tp) == 15

    with consumer(brokers, auto_offset_reset="none") as c:
        c.assign([tp])
        c.seek(tp, 1000)
        with pytest.raises(OffsetOutOfRangeError) as raised:
            read_until(c, lambda _: False, "an out-of-range error", timeout_s=15)
        assert raised.value.partitions == {tp: 1000}


def consumer_end(brokers: str, tp: TopicPartition) -> int:
    with consumer(brokers) as c:
        return c.end_offsets([tp])[tp]


def test_retention_moves_the_log_start_and_the_consumer_follows(cluster, admin, brokers):
    create_topic(cluster, admin, "retained", 1, segment_bytes="2000", retention_bytes="4000")
    tp = TopicPartition("retained", 0)
    value = b"x" * 100
    with Producer(brokers, batch_size=1000, **PRODUCER_OPTIONS) as producer:
        futures = [producer.send("retained", value + str(i).encode()) for i in range(200)]
        producer.flush(30)
    offsets = {f.result(timeout=0).offset: value + str(i).encode() for i, f in enumerate(futures)}
    assert sorted(offsets) == list(range(200))

    with consumer(brokers, auto_offset_reset="none") as c:
        c.assign([tp])
        start = wait_until(
            "retention to move the log start",
            lambda: c.beginning_offsets([tp])[tp],
            timeout_s=15,
        )
        assert 0 < start < 200  # type: ignore[operator]
        assert c.end_offsets([tp]) == {tp: 200}
        # Every replica applies retention on its own.
        wait_until(
            "every replica to move its log start",
            lambda: (
                len(logs := admin.describe_replica_logs()[("retained", 0)]) == 3
                and all(r.log_start_offset > 0 for r in logs)
            ),
            timeout_s=15,
        )
        c.seek(tp, 0)
        with pytest.raises(OffsetOutOfRangeError):
            read_until(c, lambda _: False, "an out-of-range error", timeout_s=15)

    with consumer(brokers, auto_offset_reset="earliest") as c:
        c.assign([tp])
        c.seek(tp, 0)
        start = c.beginning_offsets([tp])[tp]
        records = read_until(c, lambda rs: rs and rs[-1].offset == 199, "the retained records")
    assert [r.offset for r in records] == list(range(start, 200))
    assert [r.value for r in records] == [offsets[o] for o in range(start, 200)]


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_every_codec_round_trips(cluster, admin, brokers, codec):
    topic = f"codec-{codec}"
    create_topic(cluster, admin, topic, 1)
    sent = [
        (f"key-{i}".encode(), (f"{codec} value {i} " * (i % 7 + 1)).encode() + bytes([i % 256]))
        for i in range(300)
    ]
    sent.append((None, None))  # A null key and a tombstone.
    with Producer(brokers, compression_type=codec, **PRODUCER_OPTIONS) as producer:
        for key, value in sent:
            producer.send(topic, value, key=key, headers=[("codec", codec.encode())])
        producer.flush(30)
    records = read_all(brokers, topic, [0])
    assert [(r.key, r.value) for r in records] == sent
    assert all(r.headers == (("codec", codec.encode()),) for r in records)
    # The batches are stored as the producer compressed them.
    leader = admin.describe_topic(topic).partitions[0].leader
    answer = stub(cluster, leader).Fetch(
        broker_pb2.FetchRequest(
            replica_id=-1,
            max_bytes=10 * 1024 * 1024,
            topics=[
                broker_pb2.FetchTopic(
                    topic=topic,
                    partitions=[
                        broker_pb2.FetchPartition(
                            partition=0,
                            fetch_offset=0,
                            current_leader_epoch=-1,
                            last_fetched_epoch=-1,
                            partition_max_bytes=10 * 1024 * 1024,
                        )
                    ],
                )
            ],
        ),
        timeout=10,
    )
    data = answer.topics[0].partitions[0].records
    codecs = {header.compression for _, header in iter_batches(data)}
    assert codecs == {Compression[codec.upper()]}


def test_acks_one_and_zero_deliver(cluster, admin, brokers):
    create_topic(cluster, admin, "acks", 2)
    with Producer(brokers, acks=1, **PRODUCER_OPTIONS) as producer:
        one = [producer.send("acks", f"one-{i}".encode(), partition=i % 2) for i in range(100)]
        producer.flush(30)
    assert all(f.result(timeout=0).offset >= 0 for f in one)
    assert sorted(f.result().offset for f in one) == sorted(list(range(50)) * 2)
    with Producer(brokers, acks=0, **PRODUCER_OPTIONS) as producer:
        zero = [producer.send("acks", f"zero-{i}".encode(), partition=i % 2) for i in range(100)]
        producer.flush(30)
    assert [f.result(timeout=0).offset for f in zero] == [-1] * 100
    assert {f.result().partition for f in zero} == {0, 1}

    tps = [TopicPartition("acks", p) for p in (0, 1)]
    with consumer(brokers) as c:
        # acks=0 has no answer to wait for: wait for the records to be committed.
        wait_until(
            "the acks=0 records to be committed",
            lambda: c.end_offsets(tps) == {tp: 100 for tp in tps},
        )
    records = read_all(brokers, "acks", (0, 1))
    for p in (0, 1):
        values = [r.value for r in records if r.partition == p]
        assert values == [f"one-{i}".encode() for i in range(p, 100, 2)] + [
            f"zero-{i}".encode() for i in range(p, 100, 2)
        ]


def test_the_latency_bench_counts_only_the_records_after_its_warm_up(cluster, brokers):
    """``raftka bench latency``: every record sent after the warm-up is consumed and
    timed, the warm-up's are not; the figures are ordered. (No figure is asserted:
    speed is the benchmark's business, not a test's.)"""
    result = bench_data.run_latency_bench(
        cluster.bootstrap, brokers, rate=400, seconds=0.5, warmup_s=0.25, partitions=2
    )
    assert result["warmup_records"] == 100
    assert result["records"] == 200
    assert result["acked_records"] == 200  # The warm-up's acknowledgements are not timed.
    assert result["rate_achieved"] > 0
    figures = [result[k] for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms", "ack_p50_ms")]
    assert all(f is not None and f > 0 for f in figures)


def test_a_fetch_stream_answers_each_request_in_turn(cluster, admin, brokers):
    create_topic(cluster, admin, "stream", 1)
    with Producer(brokers, **PRODUCER_OPTIONS) as producer:
        for i in range(10):
            producer.send("stream", f"v{i}".encode(), partition=0)
        producer.flush(30)
    leader = admin.describe_topic("stream").partitions[0].leader

    def request(offset: int, max_wait_ms: int = 0) -> broker_pb2.FetchRequest:
        return broker_pb2.FetchRequest(
            replica_id=-1,
            max_wait_ms=max_wait_ms,
            min_bytes=1,
            max_bytes=1024 * 1024,
            topics=[
                broker_pb2.FetchTopic(
                    topic="stream",
                    partitions=[
                        broker_pb2.FetchPartition(
                            partition=0,
                            fetch_offset=offset,
                            current_leader_epoch=-1,
                            last_fetched_epoch=-1,
                            partition_max_bytes=1024 * 1024,
                        )
                    ],
                )
            ],
        )

    def offsets(answer: broker_pb2.FetchResponse) -> list[int]:
        data = answer.topics[0].partitions[0].records
        return [
            o
            for _, header in iter_batches(data)
            for o in range(header.base_offset, header.last_offset + 1)
        ]

    # Each request goes out once the previous one is answered, as a fetcher sends them.
    outgoing: queue.SimpleQueue[broker_pb2.FetchRequest | None] = queue.SimpleQueue()
    call = stub(cluster, leader).FetchStream(iter(outgoing.get, None), timeout=30)
    answers = []
    for sent in (request(0), request(5), request(10, max_wait_ms=200)):
        outgoing.put(sent)
        answers.append(next(call))
    outgoing.put(None)  # The end of the requests ends the stream.
    assert list(call) == []
    assert 0 in offsets(answers[0]) and 9 in offsets(answers[0])
    assert offsets(answers[1])[0] <= 5 <= offsets(answers[1])[-1]
    # At the log end the third long-polls and comes back empty with the high watermark.
    assert offsets(answers[2]) == []
    assert [a.topics[0].partitions[0].high_watermark for a in answers] == [10, 10, 10]


def test_the_clients_talk_to_the_leader_on_streams(cluster, admin, brokers):
    create_topic(cluster, admin, "streams", 1)
    leader = address(cluster, admin.describe_topic("streams").partitions[0].leader)
    with Producer(brokers, **PRODUCER_OPTIONS) as producer:
        for i in range(3):
            producer.send("streams", b"s%d" % i, partition=0).result(timeout=30)
        assert leader in list(producer._streams.streams())
    with consumer(brokers, auto_offset_reset="earliest") as c:
        c.assign([TopicPartition("streams", 0)])
        records = read_until(c, lambda rs: len(rs) >= 3, "streams")
        assert [r.value for r in records] == [b"s0", b"s1", b"s2"]
        assert [r.offset for r in records] == [0, 1, 2]
        assert leader in list(c._streams.streams())
