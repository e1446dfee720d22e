"""The idempotent producer over real processes: retries after lost answers write nothing twice.

Response loss is injected in the client: the Produce request reaches the leader
and is appended, then the client is told the call failed (as when a
connection drops after the broker answered), so it retries the same bytes.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import grpc
import pytest
from conftest import running_cluster
from dataplane import batch, error_name, stub, wait_until
from raftka.v1 import broker_pb2

from broker.record_batch import Record, encode_batch
from client import Admin, Consumer, Producer, TopicPartition

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(
        tmp_path_factory.mktemp("idempotence"),
        controllers=3,
        brokers=3,
        overrides={"broker.session.timeout.ms": 3000, "broker.heartbeat.interval.ms": 250},
    ) as cluster:
        yield cluster


@pytest.fixture
def admin(cluster):
    with Admin(cluster.bootstrap, timeout_s=10.0) as admin:
        yield admin


def brokers(admin: Admin) -> str:
    return ",".join(b.address for b in admin.describe_cluster().brokers)


def create(cluster, admin: Admin, name: str, partitions: int = 1) -> None:
    admin.create_topic(name, partitions, 3, {"min.insync.replicas": "2"})
    for index in range(partitions):
        leader = wait_until(
            f"{name}-{index} to have a leader",
            lambda i=index: (p := admin.describe_topic(name).partitions[i]).leader > 0 and p.leader,
        )

        def leads(i: int = index, b: int = leader) -> bool:  # type: ignore[assignment]
            described = stub(cluster, b).DescribeBroker(
                broker_pb2.DescribeBrokerRequest(), timeout=5
            )
            return any(
                p.topic == name and p.partition == i and p.role == "leader"
                for p in described.partitions
            )

        wait_until(f"broker {leader} to lead {name}-{index}", leads)


def read_values(addresses: str, topic: str, partitions: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    with Consumer(addresses, auto_offset_reset="earliest") as consumer:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        ends = consumer.end_offsets(assigned)

        def read_to_the_end() -> bool:
            for records in consumer.poll(500).values():
                out.extend((r.partition, r.value or b"") for r in records)
            return all(consumer.position(tp) >= ends[tp] for tp in assigned)

        wait_until("every record read", read_to_the_end, timeout_s=60)
    return out


class _LoseFirstAnswer:
    """Wraps a broker stub: every ``every``-th Produce reaches the broker, but its answer
    is replaced by UNAVAILABLE, as if the connection dropped on the way back."""

    def __init__(self, real: Any, counter: Counter[str], lock: threading.Lock, every: int):
        self._real = real
        self._counter = counter
        self._lock = lock
        self._every = every

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if name == "ProduceStream":
            return lambda requests: _LossyStream(attribute(requests), self)
        if name != "Produce":
            return attribute
        outer = self

        class _Produce:
            def future(self, message: Any, timeout: float | None = None) -> Any:
                call = attribute.future(message, timeout=timeout)
                with outer._lock:
                    outer._counter["sent"] += 1
                    lose = outer._counter["sent"] % outer._every == 1
                if not lose:
                    return call
                call.result()  # The broker has appended; drop its answer.
                with outer._lock:
                    outer._counter["lost"] += 1
                return _Lost()

        return _Produce()


class _LossyStream:
    """A ProduceStream whose every ``every``-th answer is lost: the stream breaks
    (UNAVAILABLE) after the broker has appended."""

    def __init__(self, real: Any, outer: _LoseFirstAnswer):
        self._real = real
        self._outer = outer
        self._failed = False

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        response = next(self._real)
        outer = self._outer
        with outer._lock:
            outer._counter["sent"] += 1
            lose = outer._counter["sent"] % outer._every == 1
            if lose:
                outer._counter["lost"] += 1
        if lose:
            self._failed = True
            self._real.cancel()
            raise _Unavailable()
        return response

    def cancel(self) -> bool:
        return bool(self._real.cancel())

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE if self._failed else self._real.code()

    def trailing_metadata(self) -> Any:
        return self._real.trailing_metadata()


class _Lost:
    def result(self) -> Any:
        raise _Unavailable()

    def add_done_callback(self, fn: Any) -> None:
        fn(self)

    def cancel(self) -> bool:
        return False


class _Unavailable(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "injected: the answer was lost"

    def initial_metadata(self) -> Any:
        return None

    def trailing_metadata(self) -> Any:
        return None

    def time_remaining(self) -> float | None:
        return None

    def is_active(self) -> bool:
        return False

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def produce_with_lost_answers(addresses: str, topic: str, records: int, idempotent: bool):
    counter: Counter[str] = Counter()
    lock = threading.Lock()
    with Producer(
        addresses,
        acks="all",
        linger_ms=0,
        retry_backoff_ms=10,
        enable_idempotence=idempotent,
    ) as producer:
        real_stub = producer._cluster.stub
        producer._cluster.stub = lambda address: _LoseFirstAnswer(  # type: ignore[method-assign]
            real_stub(address), counter, lock, every=2
        )
        futures = []
        for i in range(records):
            futures.append(producer.send(topic, b"record-%04d" % i))
            producer.flush(timeout=30)  # One batch per request: every other answer is lost.
        offsets = [f.result(timeout=30).offset for f in futures]
    return offsets, counter


def test_a_hundred_retries_of_one_batch_append_it_once(cluster, admin):
    create(cluster, admin, "raw-retries")
    leader = admin.describe_topic("raw-retries").partitions[0].leader
    broker = stub(cluster, leader)
    data = encode_batch(
        [Record(None, b"once-%d" % i, (), 1_000) for i in range(3)],
        producer_id=123_456,
        producer_epoch=0,
        base_sequence=0,
    )
    request = broker_pb2.ProduceRequest(
        acks=-1,
        timeout_ms=10_000,
        topics=[
            broker_pb2.TopicProduceData(
                topic="raw-retries",
                partitions=[broker_pb2.PartitionProduceData(partition=0, records=data)],
            )
        ],
    )
    offsets = set()
    for _ in range(100):
        answer = broker.Produce(request, timeout=20).topics[0].partitions[0]
        assert error_name(answer) == "NONE", answer.error
        offsets.add(answer.base_offset)
    assert offsets == {0}
    # A batch that skips sequences is refused and appends nothing.
    gap = encode_batch(
        [Record(None, b"gap", (), 1_000)], producer_id=123_456, producer_epoch=0, base_sequence=9
    )
    request.topics[0].partitions[0].records = gap
    refused = broker.Produce(request, timeout=20).topics[0].partitions[0]
    assert error_name(refused) == "OUT_OF_ORDER_SEQUENCE_NUMBER"
    values = read_values(brokers(admin), "raw-retries", 1)
    assert [v for _, v in values] == [b"once-0", b"once-1", b"once-2"]
    plain = broker.Produce(
        broker_pb2.ProduceRequest(
            acks=-1,
            timeout_ms=10_000,
            topics=[
                broker_pb2.TopicProduceData(
                    topic="raw-retries",
                    partitions=[
                        broker_pb2.PartitionProduceData(partition=0, records=batch([b"x"]))
                    ],
                )
            ],
        ),
        timeout=20,
    )
    assert plain.topics[0].partitions[0].base_offset == 3


def test_lost_answers_leave_no_duplicates_with_idempotence(cluster, admin):
    create(cluster, admin, "lost-answers")
    offsets, counter = produce_with_lost_answers(brokers(admin), "lost-answers", 100, True)
    assert counter["lost"] >= 50  # The injection really dropped answers.
    values = [v for _, v in read_values(brokers(admin), "lost-answers", 1)]
    assert values == [b"record-%04d" % i for i in range(100)]
    assert offsets == list(range(100))


def test_without_idempotence_the_same_faults_duplicate(cluster, admin):
    # The control experiment: the injection does make duplicates when nothing stops them.
    create(cluster, admin, "lost-answers-plain")
    _, counter = produce_with_lost_answers(brokers(admin), "lost-answers-plain", 20, False)
    values = [v for _, v in read_values(brokers(admin), "lost-answers-plain", 1)]
    duplicated = [v for v, n in Counter(values).items() if n > 1]
    assert counter["lost"] >= 10 and len(duplicated) >= 10
