"""Quorum checkers, pure: over the metadata log as each controller holds it.

Input: per voter, its retained committed entries as ``LogEntry`` tuples (offset,
controller epoch, the record's bytes, and for epoch claims the claimed epoch and
controller id). Checks:

- ``log-divergence``: two voters hold different records (or epochs) at one offset:
  the committed log must be a common prefix across voters;
- ``epoch-regression``: a voter's log where the controller epoch of a later entry is
  lower than an earlier one's (controller epochs only rise);
- ``split-brain``: one controller epoch claimed by two different controllers (at most
  one active controller per epoch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class LogEntry(NamedTuple):
    offset: int
    controller_epoch: int
    record: bytes
    claimed_epoch: int = -1  # For a ControllerEpochRecord: the epoch it claims.
    claimed_by: int = -1  # ... and the controller that claims it.


@dataclass(frozen=True)
class QuorumVerdict:
    valid: bool
    anomalies: dict[str, list[str]] = field(default_factory=dict)
    compared_offsets: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "valid": self.valid,
            "anomalies": self.anomalies,
            "compared_offsets": self.compared_offsets,
        }


def check_quorum(logs: Mapping[int, Sequence[LogEntry]], limit: int = 20) -> QuorumVerdict:
    anomalies: dict[str, list[str]] = {}

    def report(name: str, text: str) -> None:
        found = anomalies.setdefault(name, [])
        if len(found) < limit:
            found.append(text)

    by_offset: dict[int, dict[int, LogEntry]] = {}
    for voter, entries in logs.items():
        previous_epoch = -1
        for entry in entries:
            by_offset.setdefault(entry.offset, {})[voter] = entry
            if entry.controller_epoch < previous_epoch:
                report(
                    "epoch-regression",
                    f"voter {voter}: offset {entry.offset} has epoch {entry.controller_epoch} "
                    f"after {previous_epoch}",
                )
            previous_epoch = max(previous_epoch, entry.controller_epoch)
    compared = 0
    for offset, held in sorted(by_offset.items()):
        if len(held) < 2:
            continue
        compared += 1
        distinct = {(e.controller_epoch, e.record) for e in held.values()}
        if len(distinct) > 1:
            report("log-divergence", f"offset {offset}: voters {sorted(held)} disagree")
    claims: dict[int, set[int]] = {}
    for held in by_offset.values():
        for entry in held.values():
            if entry.claimed_epoch >= 0:
                claims.setdefault(entry.claimed_epoch, set()).add(entry.claimed_by)
    for epoch, claimants in sorted(claims.items()):
        if len(claimants) > 1:
            report("split-brain", f"epoch {epoch} claimed by controllers {sorted(claimants)}")
    return QuorumVerdict(not anomalies, anomalies, compared)
