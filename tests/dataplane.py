"""Raw data-plane calls for integration tests: produce and fetch through the
Broker service directly, so that broker tests do not depend on the client
library's batching and retries."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import grpc
from raftka.v1 import broker_pb2, broker_pb2_grpc, common_pb2

from broker.record_batch import Record, decode_records, encode_batch, iter_batches
from cli.localcluster import LocalCluster
from client.errors import RaftkaError


class NotReady(Exception):
    """A call answered with an error that a retry may clear (leadership moving)."""


def wait_until(what: str, check: Callable[[], object], timeout_s: float = 20.0) -> object:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (RaftkaError, grpc.RpcError, NotReady) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def address(cluster: LocalCluster, broker_id: int) -> str:
    node = next(n for n in cluster.status() if n.id == broker_id)
    return f"{node.host}:{node.rpc_port}"


def stub(cluster: LocalCluster, broker_id: int) -> broker_pb2_grpc.BrokerStub:
    return broker_pb2_grpc.BrokerStub(grpc.insecure_channel(address(cluster, broker_id)))


def batch(values: Sequence[bytes], timestamp_ms: int | None = None) -> bytes:
    stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return encode_batch([Record(None, v, (), stamp) for v in values])


def produce(
    broker: broker_pb2_grpc.BrokerStub,
    topic: str,
    partition: int,
    values: Sequence[bytes],
    *,
    acks: int = -1,
    timeout_ms: int = 10000,
) -> broker_pb2.PartitionProduceResponse:
    request = broker_pb2.ProduceRequest(
        acks=acks,
        timeout_ms=timeout_ms,
        topics=[
            broker_pb2.TopicProduceData(
                topic=topic,
                partitions=[
                    broker_pb2.PartitionProduceData(partition=partition, records=batch(values))
                ],
            )
        ],
    )
    response = broker.Produce(request, timeout=timeout_ms / 1000 + 10)
    return response.topics[0].partitions[0]


def fetch(
    broker: broker_pb2_grpc.BrokerStub,
    topic: str,
    partition: int,
    offset: int,
    *,
    max_wait_ms: int = 0,
    max_bytes: int = 10 * 1024 * 1024,
) -> broker_pb2.FetchPartitionResponse:
    request = broker_pb2.FetchRequest(
        replica_id=-1,
        max_wait_ms=max_wait_ms,
        min_bytes=1,
        max_bytes=max_bytes,
        topics=[
            broker_pb2.FetchTopic(
                topic=topic,
                partitions=[
                    broker_pb2.FetchPartition(
                        partition=partition,
                        fetch_offset=offset,
                        current_leader_epoch=-1,
                        last_fetched_epoch=-1,
                        partition_max_bytes=max_bytes,
                    )
                ],
            )
        ],
    )
    return broker.Fetch(request, timeout=max_wait_ms / 1000 + 10).topics[0].partitions[0]


def read_all(
    broker: broker_pb2_grpc.BrokerStub, topic: str, partition: int, start: int = 0
) -> list[tuple[int, bytes]]:
    """(offset, value) of every record from ``start`` up to the high watermark."""
    out: list[tuple[int, bytes]] = []
    offset = start
    while True:
        answer = fetch(broker, topic, partition, offset)
        if answer.error.code != common_pb2.NONE:
            raise NotReady(f"fetch {topic}-{partition}@{offset}: {answer.error}")
        if not answer.records:
            return out
        for position, header in iter_batches(answer.records):
            whole = answer.records[position : position + header.size_bytes]
            for record in decode_records(whole):
                record_offset = header.base_offset + record.offset_delta
                if record_offset >= offset:
                    out.append((record_offset, record.value or b""))
            offset = header.next_offset


def error_name(answer: object) -> str:
    return common_pb2.ErrorCode.Name(answer.error.code)  # type: ignore[attr-defined]
