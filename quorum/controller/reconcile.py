"""Broker transitions too large for one batch, finished a slice at a time.

A broker that is fenced, shuts down or registers again leaves every ISR and
leadership, and a broker that is unfenced leads the leaderless partitions it
can. Up to ``slice_records`` partitions that is done in the batch of the state
change itself (``brokers.py``), so no broker ever sees it half done. Past that,
one batch would hold every voter's Raft thread for longer than an election
timeout (100,000 partitions: about 1 s to decide and 1 s to replay), so the
state change commits alone and the ``Reconciler`` writes the partition changes
after it, at most ``slice_records`` per controller tick, each worked out on the
speculative image of the moment. Kafka writes such changes in one go; its
KIP-868 metadata transactions are its answer to batches this large.

Why this is safe in between:

- The state record comes first. A fenced or shutting-down broker is not active,
  so no election picks it and no AlterPartition adds it to an ISR (the ISR
  index of an inactive broker only shrinks); the partitions it still leads
  until their slice commits are led exactly as before the change.
- A broker is not unfenced while it still has ISR memberships to leave
  (``settling``): a restarted broker must not be counted in sync for data it
  may no longer have.
- Every slice is a set of ordinary partition changes, valid on its own. A
  slice that does not commit makes the controller resynchronise and ``reset``,
  which finds the remaining work in the committed image: any inactive broker
  still in an ISR, and the leaderless partitions. A new active controller does
  the same, so a failover never leaves a transition half done.

Pure apart from its own small state; the runtime calls it on the log thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from raftka.v1 import metadata_pb2 as pb

from quorum.controller.leadership import active_ids, elect, unclean_enabled, without
from quorum.image import MetadataImage

Key = tuple[str, int]

# A scan sorts its keys when there are at most this many, so that runs (the
# controller simulation, tests, small clusters) repeat exactly; map order
# depends on the process's string hashing. Sorting 100,000 keys would hold the
# controller thread for 60-180 ms, so larger scans take map order.
SORT_KEYS_UP_TO = 10_000


def _scan_order(keys: list[Key]) -> list[Key]:
    if len(keys) <= SORT_KEYS_UP_TO:
        keys.sort()
    return keys


@dataclass(slots=True)
class _Scan:
    """A pass over the keys an index held when the pass began."""

    keys: list[Key]
    position: int = 0
    # Leaving: a first pass over the partitions the broker leads, so that
    # leaderships (what clients wait for) move before plain ISR removals.
    leaders_only: bool = False


class Reconciler:
    def __init__(self, slice_records: int = 1000, scan_budget: int = 20_000) -> None:
        if slice_records < 1 or scan_budget < 1:
            raise ValueError("slice_records and scan_budget must be positive")
        self.slice_records = slice_records
        self.scan_budget = scan_budget
        self._leaving: dict[int, _Scan | None] = {}
        self._electing: _Scan | None = None
        self._elect_due = False

    # -- what is left to do ------------------------------------------------------

    def reset(self, image: MetadataImage) -> None:
        """Forget what was under way and find the work left in ``image``."""
        self._leaving = {
            broker_id: None
            for broker_id in image.isr_index.keys()
            if not _is_active(image, broker_id)
        }
        self._electing = None
        self._elect_due = bool(image.leaderless)

    def leave(self, broker_id: int) -> None:
        """``broker_id`` became inactive with more ISR memberships than one batch
        takes out; a pass over them starts (again)."""
        self._leaving[broker_id] = None

    def elect(self) -> None:
        """A broker became active: a pass over the leaderless partitions starts (again)."""
        self._electing = None
        self._elect_due = True

    @property
    def settling(self) -> frozenset[int]:
        """Brokers that still have ISR memberships or leaderships to leave."""
        return frozenset(self._leaving)

    @property
    def idle(self) -> bool:
        return not self._leaving and not self._elect_due

    # -- one slice ----------------------------------------------------------------

    def step(self, image: MetadataImage) -> list[pb.MetadataRecord]:
        """The next slice of partition changes, worked out on ``image``.

        One slice concerns one broker's departure, or elections: records for
        two brokers in one slice could both change one partition from the
        same starting point, and the second would undo the first.
        """
        budget = self.scan_budget
        for broker_id in sorted(self._leaving):
            records, budget, done = self._leave_step(image, broker_id, budget)
            if done:
                del self._leaving[broker_id]
            if records or budget <= 0:
                return records
        if self._elect_due:
            records, done = self._elect_step(image, budget)
            if done:
                self._elect_due = False
                self._electing = None
            return records
        return []

    def _leave_step(
        self, image: MetadataImage, broker_id: int, budget: int
    ) -> tuple[list[pb.MetadataRecord], int, bool]:
        if _is_active(image, broker_id):
            return [], budget, True  # Nothing to leave (it came back through a snapshot).
        scan = self._leaving.get(broker_id)
        if scan is None:
            keys = _scan_order(list(image.isr_index.get(broker_id, {}).keys()))
            scan = _Scan(keys, leaders_only=image.leads(broker_id))
            self._leaving[broker_id] = scan
        active = active_ids(image) - {broker_id}
        unclean: dict[str, bool] = {}
        records: list[pb.MetadataRecord] = []
        while len(records) < self.slice_records:
            if scan.position >= len(scan.keys):
                if not scan.leaders_only:
                    return records, budget, True
                scan.leaders_only, scan.position = False, 0
                if records:
                    # The second pass must see these changes, or it would write a
                    # second change of the same partitions from their old state.
                    return records, budget, False
            if budget <= 0:
                break
            topic_id, index = scan.keys[scan.position]
            scan.position += 1
            budget -= 1
            topic = image.topics.get(topic_id)
            part = None if topic is None else topic.partitions.get(index)
            if topic is None or part is None or broker_id not in part.isr:
                continue
            if scan.leaders_only and part.leader != broker_id:
                continue
            if topic_id not in unclean:
                unclean[topic_id] = unclean_enabled(image, topic.name)
            change = without(topic_id, index, part, broker_id, active, unclean[topic_id])
            if change is not None:
                records.append(change)
        return records, budget, False

    def _elect_step(
        self, image: MetadataImage, budget: int
    ) -> tuple[list[pb.MetadataRecord], bool]:
        if self._electing is None:
            self._electing = _Scan(_scan_order(list(image.leaderless.keys())))
        scan = self._electing
        active = active_ids(image)
        unclean: dict[str, bool] = {}
        records: list[pb.MetadataRecord] = []
        while len(records) < self.slice_records and budget > 0:
            if scan.position >= len(scan.keys):
                return records, True
            topic_id, index = scan.keys[scan.position]
            scan.position += 1
            budget -= 1
            topic = image.topics.get(topic_id)
            part = None if topic is None else topic.partitions.get(index)
            if topic is None or part is None:
                continue
            if topic_id not in unclean:
                unclean[topic_id] = unclean_enabled(image, topic.name)
            change = elect(topic_id, index, part, active, unclean[topic_id])
            if change is not None:
                records.append(change)
        return records, scan.position >= len(scan.keys)


def _is_active(image: MetadataImage, broker_id: int) -> bool:
    broker = image.brokers.get(broker_id)
    return broker is not None and not broker.fenced and not broker.in_controlled_shutdown
