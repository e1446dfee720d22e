"""The replicated state machine of the metadata log, without any Raft in it.

``MetadataState`` is what every voter holds: the image, the next metadata
offset, and a bounded tail of committed records that followers fetch by
offset. ``apply_batch`` is the one transition, run for every committed Raft
entry in log order on every voter. It is deterministic and never raises.

Offsets are ours, not Raft's: each record of an accepted batch gets
``next_offset``, ``next_offset + 1``, ... A batch is refused whole (and uses
no offsets) when:

- it was decided under a controller epoch that is not the current one, so a
  deposed controller's late proposals cannot commit; or
- its ``expected_base_offset`` is not ``next_offset``: the controller decided it
  on a state that included a batch that never committed.

A batch that claims a new epoch (``expected_base_offset == -1``) must hold one
``ControllerEpochRecord`` with an epoch above the current one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from raftka.v1 import metadata_pb2 as pb

from quorum.image import EMPTY_IMAGE, MetadataImage
from quorum.records import BatchDecodeError, decode_batch, kind
from quorum.replay import replay_batch

log = logging.getLogger(__name__)

DEFAULT_TAIL_RECORDS = 50_000


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What became of one proposed batch, as seen by every voter."""

    accepted: bool
    base_offset: int = -1
    # Offset of the last record; -1 when the batch was refused or empty.
    last_offset: int = -1
    reason: str = ""
    # Reasons for records that were replayed as no-ops, by offset.
    no_ops: tuple[tuple[int, str], ...] = ()


@dataclass(slots=True)
class MetadataState:
    """Mutable holder of the replicated state; only the Raft apply thread writes it.

    ``tail`` only ever grows by appends, and trimming replaces the list, so a
    reader that took ``(tail, log_start_offset, next_offset)`` together keeps a
    consistent view without a lock. Its items are serialized
    ``MetadataLogEntry`` messages: bytes are not tracked by the garbage
    collector, so a tail of 100,000 records adds nothing to GC pauses, and
    fetch responses are built from them without re-encoding.
    """

    image: MetadataImage = EMPTY_IMAGE
    next_offset: int = 0
    log_start_offset: int = 0
    tail: list[bytes] = field(default_factory=list)
    tail_max_records: int = DEFAULT_TAIL_RECORDS
    # Local, never persisted: what the active controller knows replay will
    # give for the batches it proposed (see ``expect``).
    _expected: dict[int, tuple[bytes, MetadataImage, MetadataImage]] = field(default_factory=dict)

    def expect(
        self, base_offset: int, payload: bytes, before: MetadataImage, after: MetadataImage
    ) -> None:
        """The proposer already replayed ``payload`` on ``before`` to get ``after``.

        When that exact payload commits at ``base_offset`` onto that very image
        object, replay is deterministic, so ``after`` is the result and the
        leader need not replay the batch a second time.
        """
        if len(self._expected) >= 64:
            self._expected.clear()
        self._expected[base_offset] = (payload, before, after)

    def forget_expectations(self) -> None:
        self._expected.clear()

    def apply_payload(self, payload: bytes) -> BatchResult:
        try:
            batch = decode_batch(payload)
        except BatchDecodeError as exc:
            return BatchResult(False, reason=str(exc))
        expected = self._expected.pop(self.next_offset, None)
        known = None
        if expected is not None and expected[1] is self.image and expected[0] == payload:
            known = expected[2]
        return self.apply_batch(batch, known)

    def apply_batch(
        self, batch: pb.MetadataBatch, known_image: MetadataImage | None = None
    ) -> BatchResult:
        refusal = self._refusal(batch)
        if refusal:
            return BatchResult(False, reason=refusal)
        base = self.next_offset
        no_ops: list[tuple[int, str]]
        if known_image is not None:
            image, no_ops = known_image, []
        else:
            image, no_ops = replay_batch(self.image, batch.records, base)
        entries = [
            pb.MetadataLogEntry(
                offset=base + i,
                controller_epoch=batch.controller_epoch,
                append_time_ms=batch.append_time_ms,
                record=record,
            ).SerializeToString()
            for i, record in enumerate(batch.records)
        ]
        self.image = image
        self.tail.extend(entries)
        self.next_offset = base + len(entries)
        self._trim()
        last = self.next_offset - 1 if entries else -1
        return BatchResult(True, base, last, no_ops=tuple(no_ops))

    def _refusal(self, batch: pb.MetadataBatch) -> str:
        current = self.image.controller_epoch
        if batch.expected_base_offset == -1:
            records = batch.records
            if len(records) != 1 or kind(records[0]) != "controller_epoch":
                return "an epoch claim must hold exactly one controller_epoch record"
            claimed = records[0].controller_epoch.controller_epoch
            if claimed != batch.controller_epoch or claimed <= current:
                return f"controller epoch {claimed} is not above {current}"
            return ""
        if batch.controller_epoch != current:
            return f"stale controller epoch {batch.controller_epoch} (current {current})"
        if batch.expected_base_offset != self.next_offset:
            return (
                f"batch expected base offset {batch.expected_base_offset}, "
                f"log is at {self.next_offset}"
            )
        return ""

    def _trim(self) -> None:
        # Deterministic on every voter: trim to tail_max once the tail holds
        # twice that, so trimming is amortised and never per record.
        if len(self.tail) > 2 * self.tail_max_records:
            drop = len(self.tail) - self.tail_max_records
            self.tail = self.tail[drop:]
            self.log_start_offset += drop

    def entries(self) -> list[pb.MetadataLogEntry]:
        """The retained tail, decoded (for inspection and tests)."""
        return decode_entries(self.tail)


def decode_entries(blobs: list[bytes]) -> list[pb.MetadataLogEntry]:
    return [pb.MetadataLogEntry.FromString(blob) for blob in blobs]


def frame(field_number: int, blobs: list[bytes]) -> bytes:
    """``blobs`` encoded as a repeated message field: parsing the result into a
    message whose field ``field_number`` is ``repeated MetadataLogEntry`` gives
    the entries without encoding each one again."""
    tag = _varint((field_number << 3) | 2)
    return b"".join(tag + _varint(len(blob)) + blob for blob in blobs)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
