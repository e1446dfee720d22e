"""Followers pull from leaders: one fetcher thread per leader broker.

A fetcher keeps one long-poll fetch in flight to its leader covering every
partition this broker follows there, with the follower's log end offset as
the fetch offset (which is also how the leader learns what the follower has)
and the epoch of its last batch, so the leader can answer a divergence
(KIP-320): the follower then cuts its log and fetches again.

The fetches go over one session: a request, its answer, the next request. The
session is a replication link (plain TCP, broker/replication_link.py) when the
leader advertises a replication listener, else a FetchStream (a message on an
open stream costs about half what a unary call does here: no call set-up, no
thread started for the call). A follower's next fetch is on the path of every
acks=all produce. When the set of
partitions changes, the session is cancelled and a new one opened at once, so
a new follower starts replicating without waiting out a long poll. A session
lasts at most ``_SESSION_S``: the bound on a fetch that never gets an answer
(a leader that went silent is normally noticed sooner, by the metadata that
moves its partitions away).

The stream is also a fetch session (KIP-227, broker/fetch_session.py): its
first request lists every partition; later ones list only those whose
position moved since they were last sent, and the answer holds only the
partitions with something new. A request goes out full again whenever the set
of partitions it covers changes (one enters or leaves a back-off) or the
leader refused the last one as a whole.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
from raftka.v1 import broker_pb2, broker_pb2_grpc, common_pb2

from broker.partition import Partition, PartitionError
from broker.replication_link import LinkSession, SessionError

log = logging.getLogger(__name__)

GRPC_MESSAGE_BYTES = 128 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES),
    ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES),
]

# The longest back-off of a partition that keeps failing (Kafka's replica.fetch.backoff.ms).
_MAX_BACKOFF_MS = 1000

_BACKOFF_CODES = {
    common_pb2.NOT_LEADER_OR_FOLLOWER,
    common_pb2.FENCED_LEADER_EPOCH,
    common_pb2.UNKNOWN_LEADER_EPOCH,
    common_pb2.UNKNOWN_TOPIC_OR_PARTITION,
    common_pb2.UNKNOWN_TOPIC_ID,
    common_pb2.KAFKA_STORAGE_ERROR,
}


# The longest a fetch session stays open; it is then opened again (no back-off).
_SESSION_S = 60.0
# How often a session's request reads every partition's position, not only those
# the last answer held (between scans only retention moves a position: a log start).
_POSITION_SCAN_S = 5.0


class _StreamExchange:
    """A FetchStream to the leader: a request goes out, then its answer comes back."""

    def __init__(self, stub: broker_pb2_grpc.BrokerStub, lifetime_s: float):
        self._requests: queue.SimpleQueue[broker_pb2.FetchRequest | None] = queue.SimpleQueue()
        # The request iterator ends at None (put by close), which ends gRPC's thread
        # that feeds the stream from it.
        self._call = stub.FetchStream(iter(self._requests.get, None), timeout=lifetime_s)

    def exchange(self, request: broker_pb2.FetchRequest) -> broker_pb2.FetchResponse:
        self._requests.put(request)
        try:
            return next(self._call)
        except StopIteration:
            raise SessionError("the leader ended the fetch session") from None
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            raise SessionError(
                str(code), expired=code == grpc.StatusCode.DEADLINE_EXCEEDED
            ) from None

    def close(self) -> None:
        self._call.cancel()
        self._requests.put(None)


class _Exchange(Protocol):
    def exchange(self, request: broker_pb2.FetchRequest) -> broker_pb2.FetchResponse: ...

    def close(self) -> None: ...


class _FetchSession:
    """One fetch session with the leader, over a FetchStream or a replication link,
    and what its requests told the leader."""

    def __init__(self, transport: _Exchange):
        self._transport = transport
        self.closed = False
        # What each partition's last request on this session said (leader epoch, fetch
        # offset, last fetched epoch, log start); None before the first, full, request.
        self.sent: dict[tuple[str, int], tuple[int, int, int, int]] | None = None
        # The partitions whose position may have moved since the last request (those
        # the last answer held), and when every position is next read regardless.
        self.touched: set[tuple[str, int]] = set()
        # Partitions whose last answer was an error or could not be appended: the next
        # request lists them although their position did not move, so that the leader
        # reads them again (it may hold no waiter that a change would wake).
        self.relist: set[tuple[str, int]] = set()
        self.next_scan = 0.0

    def exchange(self, request: broker_pb2.FetchRequest) -> broker_pb2.FetchResponse:
        """Send ``request`` and wait for its answer. Raises ``SessionError`` when the
        session fails, is closed or ended by the leader."""
        return self._transport.exchange(request)

    def close(self) -> None:
        """Cancel the session (an ``exchange`` waiting on it raises); any thread."""
        self.closed = True
        self._transport.close()


@dataclass(frozen=True, slots=True)
class FetcherSettings:
    max_wait_ms: int = 500
    partition_max_bytes: int = 1048576
    response_max_bytes: int = 10485760
    backoff_ms: int = 100


@dataclass(slots=True)
class _Entry:
    partition: Partition
    leader_epoch: int
    delayed_until: float = 0.0
    failures: int = 0  # Error answers in a row: each doubles the back-off.


class ReplicaFetcher:
    """Replicates the partitions this broker follows from one leader broker."""

    def __init__(
        self,
        broker_id: int,
        broker_epoch: Callable[[], int],
        source_id: int,
        address: str,
        settings: FetcherSettings,
        *,
        link: bool = False,
    ):
        """``address`` is the leader's replication listener with ``link``, else its
        gRPC listener."""
        self.broker_id = broker_id
        self.source_id = source_id
        self.address = address
        self.settings = settings
        self._broker_epoch = broker_epoch
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        # Bumped whenever the partition set changes; a fetch in flight for an older
        # set is cancelled and sent again.
        self._generation = 0
        self._stopped = threading.Event()
        self._session: _FetchSession | None = None  # Replaced when the generation changes.
        self._channel: grpc.Channel | None = None
        self._stub: broker_pb2_grpc.BrokerStub | None = None
        if not link:
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._stub = broker_pb2_grpc.BrokerStub(self._channel)
        self._thread = threading.Thread(
            target=self._run, name=f"fetcher-{broker_id}-from-{source_id}", daemon=True
        )
        self.fetches = 0
        self._last_rpc_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()
        self._wake.set()
        self._thread.join(timeout=10)
        if self._channel is not None:
            self._channel.close()

    def add(self, partition: Partition, leader_epoch: int, *, notify: bool = True) -> None:
        """Fetch ``partition`` too. With ``notify=False`` the fetch in flight is not
        ended (the next one asks for the set as it then is) until ``changed()``: a
        broker adding 100,000 partitions one by one closed the session and built a
        request over all of them after each one; now at most once per fetch."""
        with self._lock:
            self._entries[(partition.topic, partition.index)] = _Entry(partition, leader_epoch)
        if notify:
            self.changed()

    def remove(self, key: tuple[str, int], *, notify: bool = True) -> bool:
        with self._lock:
            removed = self._entries.pop(key, None) is not None
        if removed and notify:
            self.changed()
        return removed

    def changed(self) -> None:
        """The partition set changed: end the fetch in flight, which asks for the old one."""
        with self._lock:
            session = self._new_generation()
        if session is not None:
            session.close()
        self._wake.set()

    def _new_generation(self) -> _FetchSession | None:
        """Under the lock: a new partition set; returns the session to close (its
        fetch in flight asks for the old set)."""
        self._generation += 1
        session, self._session = self._session, None
        return session

    def is_empty(self) -> bool:
        with self._lock:
            return not self._entries

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._fetch_once()
            except Exception:  # The loop must survive anything one answer brings.
                log.exception("fetcher %d<-%d failed; backing off", self.broker_id, self.source_id)
                self._stopped.wait(self.settings.backoff_ms / 1000)

    def _fetch_once(self) -> None:
        self._wake.clear()
        now = time.monotonic()
        with self._lock:
            generation = self._generation
            # One pass (a fetcher may follow tens of thousands of partitions): those
            # to fetch now, and when the first backed-off one is due.
            entries: dict[tuple[str, int], _Entry] = {}
            next_due: float | None = None
            for key, entry in self._entries.items():
                if entry.delayed_until <= now:
                    entries[key] = entry
                elif next_due is None or entry.delayed_until < next_due:
                    next_due = entry.delayed_until
        if not entries:
            wait = 1.0 if next_due is None else max(0.0, next_due - now)
            self._wake.wait(min(wait, 1.0))
            return
        with self._lock:
            # Checked under the lock that add/remove take: a change from here on
            # closes the session this fetch goes out on.
            if self._generation != generation or self._stopped.is_set():
                return
            session = self._session
            if session is None:
                session = self._session = self._open_session()
        request, sent = self._build_request(entries, session)
        if next_due is not None:
            # The leader holds this fetch until there is data or max_wait_ms: no longer
            # than a backed-off partition's wait, which then goes in the next request
            # (a new topic's partition the leader did not host yet, say).
            until_due_ms = max(1, math.ceil((next_due - time.monotonic()) * 1000))
            request.max_wait_ms = min(request.max_wait_ms, until_due_ms)
        try:
            response = session.exchange(request)
        except SessionError as e:
            with self._lock:
                if self._session is session:
                    self._session = None
            closed_here = session.closed
            session.close()
            if closed_here or e.expired:
                return  # A new partition set, a stop, or the session's lifetime.
            if str(e) != self._last_rpc_error:
                log.info("fetch from broker %d failed: %s", self.source_id, e)
            self._last_rpc_error = str(e)
            self._stopped.wait(self.settings.backoff_ms / 1000)
            return
        self._last_rpc_error = None
        self.fetches += 1
        if response.error.code != common_pb2.NONE or not response.in_session:
            session.sent = None  # No session on the leader's side: every request is full.
        session.touched.update(
            (t.topic, p.partition) for t in response.topics for p in t.partitions
        )
        try:
            self._handle(response, sent)
        except BaseException:
            session.sent = None  # The leader counts this answer as told: start afresh.
            raise

    def _open_session(self) -> _FetchSession:
        if self._stub is None:
            return _FetchSession(LinkSession(self.address, _SESSION_S))
        return _FetchSession(_StreamExchange(self._stub, _SESSION_S))

    def _build_request(
        self, entries: dict[tuple[str, int], _Entry], session: _FetchSession
    ) -> tuple[broker_pb2.FetchRequest, dict[tuple[str, int], _Entry]]:
        """The next request on ``session``: full when the set of partitions differs
        from its last request's, else incremental, listing only the partitions
        whose position moved (the leader fetches the others where they were)."""
        previous = session.sent
        full = previous is None or previous.keys() != entries.keys()
        now = time.monotonic()
        if full or previous is None or now >= session.next_scan:
            # Every position: a partition's log start also moves by retention.
            session.next_scan = now + _POSITION_SCAN_S
            positions = {
                key: (entry.leader_epoch, *entry.partition.fetch_position())
                for key, entry in entries.items()
            }
            if full or previous is None:
                moved = list(positions)
            else:
                moved = [key for key, at in positions.items() if previous[key] != at]
        else:
            # Only this fetcher's appends and truncations move a position between
            # scans, and it made them from the partitions in the last answer.
            positions = previous  # Kept nowhere else: updated in place.
            moved = []
            for key in session.touched:
                entry = entries.get(key)
                if entry is None:
                    continue
                position = (entry.leader_epoch, *entry.partition.fetch_position())
                if positions[key] != position:
                    positions[key] = position
                    moved.append(key)
        session.touched = set()
        if session.relist:
            listed = set(moved)
            moved.extend(key for key in session.relist if key in entries and key not in listed)
            session.relist = set()
        by_topic: dict[str, list[broker_pb2.FetchPartition]] = {}
        topic_ids: dict[str, str] = {}
        for key in sorted(moved):
            position = positions[key]
            leader_epoch, offset, last_epoch, log_start = position
            topic, index = key
            by_topic.setdefault(topic, []).append(
                broker_pb2.FetchPartition(
                    partition=index,
                    current_leader_epoch=leader_epoch,
                    fetch_offset=offset,
                    last_fetched_epoch=last_epoch,
                    log_start_offset=log_start,
                    partition_max_bytes=self.settings.partition_max_bytes,
                )
            )
            topic_ids[topic] = entries[key].partition.topic_id
        session.sent = positions
        request = broker_pb2.FetchRequest(
            replica_id=self.broker_id,
            replica_epoch=self._broker_epoch(),
            max_wait_ms=self.settings.max_wait_ms,
            min_bytes=1,
            max_bytes=self.settings.response_max_bytes,
            topics=[
                broker_pb2.FetchTopic(topic=t, topic_id=topic_ids[t], partitions=parts)
                for t, parts in by_topic.items()
            ],
            incremental=not full,
        )
        return request, entries

    def _handle(
        self, response: broker_pb2.FetchResponse, sent: dict[tuple[str, int], _Entry]
    ) -> None:
        if response.error.code != common_pb2.NONE:
            log.info("fetch from broker %d refused: %s", self.source_id, response.error.message)
            self._delay(sent, self.settings.backoff_ms)
            return
        for topic in response.topics:
            for part in topic.partitions:
                key = (topic.topic, part.partition)
                entry = sent.get(key)
                if entry is None:
                    continue
                with self._lock:
                    if self._entries.get(key) is not entry:
                        continue  # Removed or replaced while the fetch was out.
                try:
                    self._handle_partition(entry, part)
                except (PartitionError, ValueError, OSError) as e:
                    log.warning(
                        "%s-%d: cannot take what broker %d sent: %s",
                        *key,
                        self.source_id,
                        e,
                    )
                    self._delay({key: entry}, self.settings.backoff_ms)

    def _handle_partition(self, entry: _Entry, part: broker_pb2.FetchPartitionResponse) -> None:
        partition = entry.partition
        code = part.error.code
        if code == common_pb2.NONE:
            if part.HasField("diverging_epoch"):
                partition.truncate_for_divergence(
                    entry.leader_epoch, part.diverging_epoch.epoch, part.diverging_epoch.end_offset
                )
                return
            partition.append_as_follower(
                part.records, entry.leader_epoch, part.high_watermark, part.log_start_offset
            )
            entry.failures = 0
        elif code == common_pb2.OFFSET_OUT_OF_RANGE:
            partition.reset_to_leader_range(
                entry.leader_epoch, part.log_start_offset, part.log_end_offset
            )
        elif code in _BACKOFF_CODES:
            log.debug(
                "%s-%d: broker %d answers %s",
                partition.topic,
                partition.index,
                self.source_id,
                common_pb2.ErrorCode.Name(code),
            )
            self._delay({(partition.topic, partition.index): entry}, self.settings.backoff_ms)
        else:
            log.warning(
                "%s-%d: fetch from broker %d: %s %s",
                partition.topic,
                partition.index,
                self.source_id,
                common_pb2.ErrorCode.Name(code),
                part.error.message,
            )
            self._delay({(partition.topic, partition.index): entry}, self.settings.backoff_ms)

    def _delay(self, entries: dict[tuple[str, int], _Entry], ms: int) -> None:
        """Back these partitions off: ``ms`` after a first error, doubling with each
        error in a row up to ``_MAX_BACKOFF_MS``, so that a partition that keeps
        failing does not make every other request a full one (its request without it
        and the next with it differ in their partition sets)."""
        now = time.monotonic()
        with self._lock:
            for entry in entries.values():
                entry.failures += 1
                backoff_ms = min(ms * 2 ** min(entry.failures - 1, 16), _MAX_BACKOFF_MS)
                entry.delayed_until = now + max(ms, backoff_ms) / 1000
            if self._session is not None:
                self._session.relist.update(entries)
