"""A follower's fetch session on the leader (KIP-227), one per FetchStream.

Without a session every fetch lists every partition the follower replicates
from this leader, and the leader reads and answers each one, so an idle topic
costs every round trip of every busy one: with 120 idle partitions on the
local cluster, end-to-end p50 went from 7 to 9 ms. In a session the first
request is full; later ones (``incremental``) list only the partitions whose
fetch position changed, and the answer holds only the partitions with
something to say. What the leader keeps per session:

- ``asked``: each partition's last fetch fields (an unlisted partition is
  fetched again at them);
- ``told``: the high watermark, log start and log end offset last answered,
  so an unchanged partition is left out;
- one ``Waiter`` registered on every partition of the session for its whole
  life, which collects the partitions that changed (an append, a moved high
  watermark, a role change) between and during fetches.

A fetch reads the partitions listed or changed, and those this broker did not
host when last read (``unhosted``: a follower may ask about a new topic before
its leader has applied it, and nothing can wake the session for a partition that
does not exist yet). A partition that neither
moved nor was asked about is not touched, except in a full pass every
``full_pass_s`` (a quarter of ``replica.lag.time.max.ms``, 7.5 s by default) that
reads them all, so that an idle follower's caught-up time stays fresh and it
keeps its place in the ISR, and so that a partition replaced under the
session is found (a replaced partition's position moves, so its follower lists
it sooner). A pass costs each partition of the session a read: once a second,
as it was, that kept a broker leading 33,000 idle partitions on two followers
busy most of a core. A request that is not incremental starts the session over.
This module holds the bookkeeping; ``ReplicaManager.fetch_in_session`` reads.
"""

from __future__ import annotations

from raftka.v1 import broker_pb2

from broker.partition import HIGH_WATERMARK, NEW_DATA, STATE, Partition, Waiter

Key = tuple[str, int]


class FetchSession:
    """Not thread-safe: one stream's requests come one at a time."""

    def __init__(self, full_pass_s: float):
        self.full_pass_s = full_pass_s
        self.replica_id: int | None = None
        self.asked: dict[Key, tuple[str, broker_pb2.FetchPartition]] = {}
        self.told: dict[Key, tuple[int, int, int]] = {}
        self.partitions: dict[Key, Partition] = {}
        # Partitions a fetch left unread for lack of room: the next one reads them first.
        self.pending: set[Key] = set()
        # Partitions asked about that this broker did not host (or under another topic
        # id) at their last read. No waiter can be on them, so every fetch reads them
        # again until they are hosted; else a follower that asked before this broker
        # applied a new topic would not replicate it until the next full pass.
        self.unhosted: set[Key] = set()
        # Woken by new data (or a role change); a moved high watermark is only
        # noted, and told with the next answer.
        self.waiter = Waiter(NEW_DATA | STATE, notes=HIGH_WATERMARK)
        self._next_full_pass = 0.0

    @property
    def started(self) -> bool:
        return self.replica_id is not None

    def reset(self) -> None:
        for partition in self.partitions.values():
            partition.remove_waiter(self.waiter)
        self.replica_id = None
        self.asked.clear()
        self.told.clear()
        self.partitions.clear()
        self.pending.clear()
        self.unhosted.clear()
        self.waiter.take()
        self._next_full_pass = 0.0

    close = reset

    def take_request(self, request: broker_pb2.FetchRequest) -> list[Key]:
        """Record the partitions ``request`` lists; return their keys, in order."""
        if not request.incremental:
            self.reset()
            self.replica_id = request.replica_id
        listed: list[Key] = []
        for topic in request.topics:
            for part in topic.partitions:
                key = (topic.topic, part.partition)
                self.asked[key] = (topic.topic_id, part)
                listed.append(key)
        return listed

    def take_pending(self) -> list[Key]:
        """The partitions left unread last time, in order; the set is emptied."""
        pending = sorted(self.pending)
        self.pending.clear()
        return pending

    def full_pass_due(self, now: float) -> bool:
        """Whether this fetch reads every partition; if so the next one is due later."""
        if now < self._next_full_pass:
            return False
        self._next_full_pass = now + self.full_pass_s
        return True

    def changed(self) -> set[Key]:
        """The session's partitions marked by the waiter since the last call."""
        keys = {(p.topic, p.index) for p in self.waiter.take()}
        return {key for key in keys if key in self.asked}

    def watch(self, key: Key, partition: Partition | None) -> None:
        """Keep the waiter on the partition now hosted under ``key`` (None: not
        hosted, so read again on every fetch)."""
        if partition is None:
            self.unhosted.add(key)
        else:
            self.unhosted.discard(key)
        old = self.partitions.get(key)
        if old is partition:
            return
        if old is not None:
            old.remove_waiter(self.waiter)
            del self.partitions[key]
        if partition is not None:
            partition.add_waiter(self.waiter)
            self.partitions[key] = partition

    def should_tell(
        self, key: Key, answer: broker_pb2.FetchPartitionResponse, listed: bool
    ) -> bool:
        """Whether ``answer`` goes in the response; remembers what was told."""
        if answer.HasField("error") or answer.HasField("diverging_epoch"):
            self.told.pop(key, None)  # Told again in full once it recovers.
            return True
        offsets = (answer.high_watermark, answer.log_start_offset, answer.log_end_offset)
        if listed or answer.records or self.told.get(key) != offsets:
            self.told[key] = offsets
            return True
        return False
