"""Idempotent producer state of one partition: Kafka's ProducerStateManager, pure.

Theory of operation. An idempotent producer stamps each batch with its producer
id, epoch and the sequence number of its first record; sequences count records
per (producer, partition) from 0 and wrap at 2^31. The partition leader keeps,
per producer, its epoch and the last ``MAX_BATCHES`` batches it appended
(first and last sequence, first and last offset). A batch is then:

- a *duplicate* when it matches one of those batches exactly: it is not
  appended again, and the producer is answered with the original offsets (a
  retry after a lost answer);
- *in sequence* when its first sequence follows the last one (or is 0 under
  a newer epoch): it is appended;
- *out of order* otherwise (a gap, or an old batch no longer remembered):
  refused with OUT_OF_ORDER_SEQUENCE_NUMBER, nothing appended;
- *fenced* when its epoch is older than the producer's: INVALID_PRODUCER_EPOCH.

A producer the partition knows nothing of is accepted at any sequence: its
state may have gone with old segments, or the leader moved to a replica that
rebuilt state from its own log. Followers apply the same state from the
batches they copy (``on_append``), and a log opened or cut rebuilds it from its
batch headers (``rebuild``), so a new leader answers duplicates as the old one
would have. Nothing here does I/O; offsets and headers come from the caller.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from broker.record_batch import BatchHeader

MAX_BATCHES = 5  # Kafka's max.in.flight.requests.per.connection limit for idempotence.
_SEQUENCE_WRAP = 1 << 31

DUPLICATE = "DUPLICATE"
OUT_OF_ORDER = "OUT_OF_ORDER_SEQUENCE_NUMBER"
FENCED = "INVALID_PRODUCER_EPOCH"


@dataclass(frozen=True, slots=True)
class BatchEntry:
    first_sequence: int
    last_sequence: int
    first_offset: int
    last_offset: int


@dataclass(slots=True)
class ProducerEntry:
    epoch: int
    batches: deque[BatchEntry] = field(default_factory=lambda: deque(maxlen=MAX_BATCHES))

    @property
    def last_sequence(self) -> int:
        return self.batches[-1].last_sequence if self.batches else -1


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with an incoming batch: append it, or answer without appending."""

    outcome: str | None  # None: append; DUPLICATE, OUT_OF_ORDER or FENCED otherwise.
    message: str = ""
    duplicate_of: BatchEntry | None = None


def last_sequence_of(header: BatchHeader) -> int:
    return (header.base_sequence + header.last_offset_delta) % _SEQUENCE_WRAP


def _next(sequence: int) -> int:
    return (sequence + 1) % _SEQUENCE_WRAP


class ProducerStateManager:
    def __init__(self) -> None:
        self._producers: dict[int, ProducerEntry] = {}

    def __len__(self) -> int:
        return len(self._producers)

    def entry(self, producer_id: int) -> ProducerEntry | None:
        return self._producers.get(producer_id)

    def check(self, header: BatchHeader) -> Verdict:
        """Judge a producer's batch before the leader appends it."""
        if header.producer_id < 0:
            return Verdict(None)
        entry = self._producers.get(header.producer_id)
        if entry is None:
            return Verdict(None)
        first = header.base_sequence
        last = last_sequence_of(header)
        if header.producer_epoch < entry.epoch:
            return Verdict(
                FENCED,
                f"producer {header.producer_id} epoch {header.producer_epoch} is older than "
                f"{entry.epoch}",
            )
        if header.producer_epoch > entry.epoch:
            if first == 0:
                return Verdict(None)
            return Verdict(
                OUT_OF_ORDER,
                f"producer {header.producer_id} starts epoch {header.producer_epoch} at "
                f"sequence {first}, not 0",
            )
        for batch in entry.batches:
            if batch.first_sequence == first and batch.last_sequence == last:
                return Verdict(DUPLICATE, duplicate_of=batch)
        expected = _next(entry.last_sequence)
        if first != expected:
            return Verdict(
                OUT_OF_ORDER,
                f"producer {header.producer_id} sent sequence {first}, expected {expected}",
            )
        return Verdict(None)

    def on_append(self, header: BatchHeader) -> None:
        """Record a batch appended at ``header.base_offset`` (leader or follower)."""
        if header.producer_id < 0 or header.base_sequence < 0:
            return
        entry = self._producers.get(header.producer_id)
        if entry is None or header.producer_epoch > entry.epoch:
            entry = ProducerEntry(header.producer_epoch)
            self._producers[header.producer_id] = entry
        elif header.producer_epoch < entry.epoch:
            return  # A stale epoch's batch (copied from a log): it changes nothing.
        entry.batches.append(
            BatchEntry(
                header.base_sequence,
                last_sequence_of(header),
                header.base_offset,
                header.base_offset + header.last_offset_delta,
            )
        )

    def rebuild(self, headers: Iterable[BatchHeader]) -> None:
        """Start over from the batch headers of a log, in offset order."""
        self._producers.clear()
        for header in headers:
            self.on_append(header)
