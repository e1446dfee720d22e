"""Connections to brokers and the client's cache of cluster metadata.

The producer and consumer talk to partition leaders. ``Cluster`` knows them: it keeps
one gRPC channel per broker address and an immutable ``ClusterView`` (brokers, and for
each topic the leader and leader epoch of every partition), swapped whole on each
refresh, so readers on any thread see one consistent view without a lock.

A refresh asks ``Metadata`` of any broker that answers: the last one that did, then the
others the view knows, then the bootstrap addresses. It covers the topics the client has
shown interest in. Refreshes happen on demand (``request_update``, after an error that
means the view is stale), for a topic the view does not know yet, and every
``metadata_max_age_ms``. They are spaced by a backoff that starts at ``retry_backoff_ms``
and doubles up to ``retry_backoff_max_ms`` while no broker answers or partitions lack a
leader, so a client in trouble does not hammer the cluster.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc
from raftka.v1 import broker_pb2, broker_pb2_grpc, common_pb2

from client._streams import StreamError
from client.errors import (
    ClientTimeoutError,
    NetworkError,
    RaftkaError,
    RequestTimedOutError,
    error_for,
)

__all__ = [
    "Cluster",
    "ClusterView",
    "PartitionLeader",
    "TopicPartition",
    "parse_bootstrap",
    "rpc_error",
]

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


# The longest one broker is given to answer Metadata.
_METADATA_TRY_S = 3.0
# A broker that has not answered Metadata within this long is not waited for alone: the
# next one is asked too, and the first answer wins. A paused or cut-off broker (the one
# that answered last, often) then costs this much, not _METADATA_TRY_S, and the sender
# thread that refreshes metadata does not stall every partition behind it.
_METADATA_HEDGE_S = 0.15


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class PartitionLeader(NamedTuple):
    """A partition as the last metadata answer had it; ``leader`` is -1 when it has none."""

    leader: int
    leader_epoch: int
    error: int = common_pb2.NONE


@dataclass(frozen=True, slots=True)
class ClusterView:
    """One metadata answer: immutable, replaced whole by the next refresh."""

    brokers: Mapping[int, str] = field(default_factory=dict)
    topics: Mapping[str, tuple[PartitionLeader, ...]] = field(default_factory=dict)
    topic_errors: Mapping[str, int] = field(default_factory=dict)
    cluster_id: str = ""
    controller_id: int = -1
    created_s: float = 0.0

    def partitions(self, topic: str) -> tuple[PartitionLeader, ...] | None:
        return self.topics.get(topic)

    def leader(self, topic: str, partition: int) -> PartitionLeader | None:
        partitions = self.topics.get(topic)
        if partitions is None or not 0 <= partition < len(partitions):
            return None
        return partitions[partition]

    def leader_address(self, topic: str, partition: int) -> tuple[int, str] | None:
        """``(broker id, address)`` of the partition's leader, or None when unknown."""
        state = self.leader(topic, partition)
        if state is None or state.leader < 0:
            return None
        address = self.brokers.get(state.leader)
        return None if address is None else (state.leader, address)


def parse_bootstrap(bootstrap_servers: str | Sequence[str]) -> list[str]:
    """``"h1:p1,h2:p2"`` or ``["h1:p1", ...]`` -> a list of ``host:port`` strings."""
    items = (
        bootstrap_servers.split(",") if isinstance(bootstrap_servers, str) else bootstrap_servers
    )
    addresses = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"bootstrap address {item!r} is not a str")
        address = item.strip()
        if not address:
            continue
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bootstrap address {address!r} is not host:port")
        addresses.append(address)
    if not addresses:
        raise ValueError("no bootstrap address given (host:port,...)")
    return addresses


def rpc_error(exc: grpc.RpcError, what: str) -> RaftkaError:
    """The client error for a failed gRPC call; retriable when the broker may be fine later."""
    has_status = isinstance(exc, grpc.Call | StreamError)
    code = exc.code() if has_status else None
    details = exc.details() if has_status else str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, None):
        return NetworkError(f"{what}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RequestTimedOutError(common_pb2.REQUEST_TIMED_OUT, f"{what}: no answer in time")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return RaftkaError(common_pb2.UNSUPPORTED_VERSION, f"{what}: not implemented by the broker")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error_for(common_pb2.MESSAGE_TOO_LARGE, f"{what}: {details}")
    return RaftkaError(common_pb2.UNKNOWN_SERVER_ERROR, f"{what}: {code.name}: {details}")


class Cluster:
    """Channels to brokers and the metadata view; thread-safe.

    ``request_timeout_ms`` bounds each Metadata call. Close it when done: that closes
    every channel.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        request_timeout_ms: int = 30000,
        retry_backoff_ms: int = 100,
        retry_backoff_max_ms: int = 1000,
        metadata_max_age_ms: int = 300000,
    ):
        self.bootstrap = parse_bootstrap(bootstrap_servers)
        self.view = ClusterView()
        self._request_timeout_s = request_timeout_ms / 1000
        self._backoff_min_s = retry_backoff_ms / 1000
        self._backoff_max_s = max(retry_backoff_max_ms, retry_backoff_ms) / 1000
        self._max_age_s = metadata_max_age_ms / 1000
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._stubs: dict[str, broker_pb2_grpc.BrokerStub] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._topics: set[str] = set()
        self._stale = True
        self._backoff_s = self._backoff_min_s
        self._next_refresh_s = 0.0
        self._last_good: str | None = None
        self._avoid: str | None = None
        self._closed = False

    # -- connections -------------------------------------------------------

    def stub(self, address: str) -> broker_pb2_grpc.BrokerStub:
        """The Broker stub for ``address``, over a channel opened on first use."""
        stub = self._stubs.get(address)
        if stub is not None:
            return stub
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            stub = self._stubs.get(address)
            if stub is None:
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._channels[address] = channel
                stub = self._stubs[address] = broker_pb2_grpc.BrokerStub(channel)
            return stub

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels = list(self._channels.values())
            self._channels.clear()
            self._stubs.clear()
        for channel in channels:
            channel.close()

    # -- metadata ----------------------------------------------------------

    def add_topics(self, topics: Iterable[str]) -> None:
        """Cover ``topics`` from the next refresh on (which is then due at once)."""
        with self._lock:
            new = set(topics) - self._topics
            if new:
                self._topics |= new
                self._stale = True
                self._next_refresh_s = 0.0

    def request_update(self, avoid: str | None = None) -> None:
        """Mark the view stale: the next ``maybe_update`` refreshes, after the backoff.

        ``avoid``: a broker to ask last (one that is not answering the caller, or may
        be a deposed leader cut off from the controllers, whose view is stale)."""
        self._avoid = avoid
        self._stale = True

    def update_due(self) -> bool:
        if not self._topics:
            return False
        now = time.monotonic()
        if now < self._next_refresh_s:
            return False
        return self._stale or now - self.view.created_s >= self._max_age_s

    def maybe_update(self) -> bool:
        """Refresh if the view is stale or old and the backoff allows; never raises.

        Returns True when a refresh was made and answered.
        """
        if not self.update_due():
            return False
        try:
            self.update()
        except RaftkaError as e:
            log.debug("metadata refresh failed: %s", e)
            return False
        return True

    def update(self, timeout_s: float | None = None) -> ClusterView:
        """Refresh now (whatever the backoff) and return the new view.

        Raises ``NetworkError`` when no broker answers within ``timeout_s`` (default:
        ``request_timeout_ms``).
        """
        with self._refresh_lock:
            started = time.monotonic()
            deadline = started + (self._request_timeout_s if timeout_s is None else timeout_s)
            with self._lock:
                topics = sorted(self._topics)
            self._stale = False
            try:
                response = self._ask_any(broker_pb2.MetadataRequest(topics=topics), deadline)
            except RaftkaError:
                self._stale = True
                self._back_off(started, failed=True)
                raise
            view = _view_from(response, time.monotonic())
            self.view = view
            self._back_off(started, failed=not _complete(view, topics))
            return view

    def _back_off(self, now: float, *, failed: bool) -> None:
        if failed:
            self._stale = True
            self._next_refresh_s = now + self._backoff_s * random.uniform(0.8, 1.2)
            self._backoff_s = min(self._backoff_s * 2, self._backoff_max_s)
        else:
            self._backoff_s = self._backoff_min_s
            self._next_refresh_s = now + self._backoff_min_s

    def addresses(self) -> list[str]:
        """Broker addresses to try, the last one that answered first."""
        return self._candidates()

    def _candidates(self) -> list[str]:
        known = list(self.view.brokers.values())
        random.shuffle(known)
        ordered = ([self._last_good] if self._last_good else []) + known + self.bootstrap
        ordered = list(dict.fromkeys(ordered))
        avoid = self._avoid
        if avoid in ordered and len(ordered) > 1:
            ordered.remove(avoid)
            ordered.append(avoid)
        return ordered

    def _ask_any(
        self, request: broker_pb2.MetadataRequest, deadline: float
    ) -> broker_pb2.MetadataResponse:
        """The first Metadata answer: brokers are asked in turn, the next one whenever
        the ones asked so far are silent for ``_METADATA_HEDGE_S`` or have failed."""
        candidates = self._candidates()
        answers: queue.SimpleQueue[tuple[str, grpc.Future]] = queue.SimpleQueue()
        asked: list[grpc.Future] = []
        waiting = 0
        last: RaftkaError | None = None
        next_ask = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                if candidates and (now >= next_ask or not waiting):
                    address = candidates.pop(0)
                    # Capped per broker, so that one that hangs does not use up the deadline.
                    call = self.stub(address).Metadata.future(
                        request, timeout=min(deadline - now, _METADATA_TRY_S)
                    )
                    call.add_done_callback(lambda c, a=address: answers.put((a, c)))
                    asked.append(call)
                    waiting += 1
                    next_ask = now + _METADATA_HEDGE_S
                if not waiting:
                    break
                until = min(next_ask, deadline) if candidates else deadline
                try:
                    address, call = answers.get(timeout=max(until - time.monotonic(), 0.0))
                except queue.Empty:
                    continue
                waiting -= 1
                try:
                    response = call.result()
                except grpc.RpcError as exc:
                    last = rpc_error(exc, f"Metadata from {address}")
                    next_ask = time.monotonic()  # Ask the next one at once.
                    continue
                self._last_good = address
                return response
        finally:
            for call in asked:
                call.cancel()
        raise last or NetworkError("no broker answered Metadata in time")

    def wait_for_topic(self, topic: str, timeout_s: float) -> tuple[PartitionLeader, ...]:
        """The topic's partitions, refreshing (with backoff) until the view has them.

        Raises ``ClientTimeoutError`` after ``timeout_s``; its message says whether the
        brokers answered that the topic does not exist or could not be reached.
        """
        self.add_topics([topic])
        deadline = time.monotonic() + timeout_s
        last_error = ""
        while True:
            partitions = self.view.partitions(topic)
            if partitions:
                return partitions
            now = time.monotonic()
            if now >= deadline:
                break
            wait_s = self._next_refresh_s - now
            if wait_s > 0:
                # A backoff between refreshes, not a wait for another thread.
                time.sleep(min(wait_s, deadline - now))
                continue
            try:
                self.update(timeout_s=max(deadline - time.monotonic(), 0.001))
            except RaftkaError as e:
                last_error = str(e)
            else:
                code = self.view.topic_errors.get(topic, common_pb2.NONE)
                if code != common_pb2.NONE:
                    last_error = str(error_for(code, f"topic {topic!r}"))
        reason = f": {last_error}" if last_error else ""
        raise ClientTimeoutError(
            common_pb2.REQUEST_TIMED_OUT,
            f"topic {topic!r} not in the metadata after {timeout_s * 1000:.0f} ms{reason}",
        )

    def note_leader(self, topic: str, partition: int, leader: int, leader_epoch: int) -> bool:
        """Take a leader named by a broker's answer (``current_leader``) when it is newer
        than the view's and its address is known; otherwise ask for a refresh.

        Returns True when the view now has that leader.
        """
        with self._lock:
            view = self.view
            partitions = view.topics.get(topic)
            if (
                partitions is None
                or not 0 <= partition < len(partitions)
                or leader not in view.brokers
                or leader_epoch <= partitions[partition].leader_epoch
            ):
                self._stale = True
                return False
            patched = list(partitions)
            patched[partition] = PartitionLeader(leader, leader_epoch)
            topics = dict(view.topics)
            topics[topic] = tuple(patched)
            self.view = ClusterView(
                view.brokers,
                topics,
                view.topic_errors,
                view.cluster_id,
                view.controller_id,
                view.created_s,
            )
            return True


def _view_from(response: broker_pb2.MetadataResponse, now_s: float) -> ClusterView:
    brokers = {b.broker_id: f"{b.host}:{b.port}" for b in response.brokers}
    topics: dict[str, tuple[PartitionLeader, ...]] = {}
    topic_errors: dict[str, int] = {}
    for topic in response.topics:
        code = topic.error.code
        if code != common_pb2.NONE:
            topic_errors[topic.name] = code
            continue
        by_index = {p.partition: p for p in topic.partitions}
        count = max(by_index, default=-1) + 1
        topics[topic.name] = tuple(
            PartitionLeader(p.leader, p.leader_epoch, p.error.code)
            if (p := by_index.get(i)) is not None
            else PartitionLeader(-1, -1, common_pb2.LEADER_NOT_AVAILABLE)
            for i in range(count)
        )
    return ClusterView(
        brokers, topics, topic_errors, response.cluster_id, response.controller_id, now_s
    )


def _complete(view: ClusterView, topics: Iterable[str]) -> bool:
    """Whether every wanted topic is known and every partition has a reachable leader."""
    for topic in topics:
        partitions = view.topics.get(topic)
        if not partitions:
            return False
        if any(p.leader < 0 or p.leader not in view.brokers for p in partitions):
            return False
    return True
