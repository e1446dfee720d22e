"""Committed offsets of consumer groups: find a group's coordinator, commit, fetch,
list and delete groups.

The coordinator of a group is the broker that leads the group's partition of
``__consumer_offsets``; any broker says which one it is (FindCoordinator). A
coordinator that moved, is still loading, or whose topic is being created answers
with a retriable error, and the call finds the coordinator again and retries
until its deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import grpc
from raftka.v1 import broker_pb2, common_pb2

from client._brokers import Cluster, TopicPartition, rpc_error
from client.errors import ClientTimeoutError, RaftkaError, error_for

_BACKOFF_S = (0.02, 0.05, 0.1, 0.2, 0.5)


class OffsetAndMetadata(NamedTuple):
    offset: int
    metadata: str = ""
    leader_epoch: int = -1
    commit_timestamp_ms: int = -1


class GroupClient:
    """Talks to one group's coordinator. Thread-safe as the ``Cluster`` it uses."""

    def __init__(self, cluster: Cluster, group_id: str, *, timeout_s: float = 30.0):
        if not group_id:
            raise ValueError("group_id must be a non-empty string")
        self.cluster = cluster
        self.group_id = group_id
        self.timeout_s = timeout_s
        self._coordinator: str | None = None

    def coordinator(self, deadline: float | None = None) -> str:
        """The coordinator's address, asked of any broker (cached until it moves)."""
        if self._coordinator is not None:
            return self._coordinator
        deadline = deadline or time.monotonic() + self.timeout_s
        attempt = 0
        last: RaftkaError | None = None
        while time.monotonic() < deadline:
            for address in self.cluster.addresses():
                try:
                    answer = self.cluster.stub(address).FindCoordinator(
                        broker_pb2.FindCoordinatorRequest(key=self.group_id),
                        timeout=max(0.1, min(5.0, deadline - time.monotonic())),
                    )
                except grpc.RpcError as exc:
                    last = rpc_error(exc, f"FindCoordinator at {address}")
                    continue
                if answer.error.code == common_pb2.NONE:
                    self._coordinator = f"{answer.host}:{answer.port}"
                    return self._coordinator
                last = error_for(answer.error.code, answer.error.message)
                if not last.retriable:
                    raise last
                break
            time.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
            attempt += 1
        raise ClientTimeoutError(
            common_pb2.REQUEST_TIMED_OUT,
            f"no coordinator found for group {self.group_id!r}: {last}",
        )

    def forget_coordinator(self) -> None:
        """Look the coordinator up again before the next call (a call of ours failed)."""
        self._coordinator = None

    def call(self, method: str, request: object) -> object:
        """Send ``request`` to the coordinator; retries while it moves or loads, raises
        what retrying cannot cure."""
        return self._call(method, request)

    def _call(self, method: str, request: object) -> object:
        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        last: RaftkaError | None = None
        while time.monotonic() < deadline:
            address = self.coordinator(deadline)
            try:
                answer = getattr(self.cluster.stub(address), method)(
                    request, timeout=max(0.1, deadline - time.monotonic())
                )
            except grpc.RpcError as exc:
                last = rpc_error(exc, f"{method} at {address}")
                self._coordinator = None
            else:
                error = _first_error(answer)
                if error is None:
                    return answer
                last = error
                if not error.retriable:
                    raise error
                self._coordinator = None
            time.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
            attempt += 1
        raise ClientTimeoutError(common_pb2.REQUEST_TIMED_OUT, f"{method}: {last}")

    def commit(self, offsets: Mapping[TopicPartition, OffsetAndMetadata | int]) -> None:
        """Commit ``offsets`` (the next offset to read per partition) for the group."""
        by_topic: dict[str, list[broker_pb2.OffsetCommitPartition]] = {}
        for tp, value in sorted(offsets.items()):
            committed = value if isinstance(value, OffsetAndMetadata) else OffsetAndMetadata(value)
            by_topic.setdefault(tp.topic, []).append(
                broker_pb2.OffsetCommitPartition(
                    partition=tp.partition,
                    committed_offset=committed.offset,
                    committed_leader_epoch=committed.leader_epoch,
                    metadata=committed.metadata,
                )
            )
        if not by_topic:
            return
        self._call(
            "OffsetCommit",
            broker_pb2.OffsetCommitRequest(
                group_id=self.group_id,
                generation_id=-1,
                topics=[
                    broker_pb2.OffsetCommitTopic(topic=t, partitions=parts)
                    for t, parts in by_topic.items()
                ],
            ),
        )

    def fetch(
        self, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """Committed offsets of ``partitions`` (every one the group has when None);
        partitions without a commit are left out."""
        topics: dict[str, list[int]] = {}
        for tp in partitions or ():
            topics.setdefault(tp.topic, []).append(tp.partition)
        answer = self._call(
            "OffsetFetch",
            broker_pb2.OffsetFetchRequest(
                group_id=self.group_id,
                topics=[
                    broker_pb2.OffsetFetchTopic(topic=t, partitions=p) for t, p in topics.items()
                ],
            ),
        )
        assert isinstance(answer, broker_pb2.OffsetFetchResponse)
        found = {}
        for topic in answer.topics:
            for part in topic.partitions:
                if part.committed_offset >= 0:
                    found[TopicPartition(topic.topic, part.partition)] = OffsetAndMetadata(
                        part.committed_offset,
                        part.metadata,
                        part.committed_leader_epoch,
                        part.commit_timestamp_ms,
                    )
        return found

    def delete(self) -> None:
        """Delete the group's committed offsets (``GroupIdNotFoundError`` if it has none)."""
        self._call("DeleteGroups", broker_pb2.DeleteGroupsRequest(group_ids=[self.group_id]))


def list_groups(cluster: Cluster, timeout_s: float = 5.0) -> list[tuple[str, str]]:
    """(group id, state) of every group, asked of every broker (each knows its own)."""
    cluster.update(timeout_s)
    groups: dict[str, str] = {}
    for address in sorted(set(cluster.view.brokers.values())):
        try:
            answer = cluster.stub(address).ListGroups(
                broker_pb2.ListGroupsRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            continue
        for group in answer.groups:
            groups[group.group_id] = group.state
    return sorted(groups.items())


def _first_error(answer: object) -> RaftkaError | None:
    error = getattr(answer, "error", None)
    if error is not None and error.code != common_pb2.NONE:
        return error_for(error.code, error.message)
    for topic in getattr(answer, "topics", ()):
        for part in topic.partitions:
            if part.error.code != common_pb2.NONE:
                return error_for(
                    part.error.code, f"{topic.topic}-{part.partition}: {part.error.message}"
                )
    for result in getattr(answer, "results", ()):
        if result.error.code != common_pb2.NONE:
            return error_for(result.error.code, f"{result.group_id}: {result.error.message}")
    return None
