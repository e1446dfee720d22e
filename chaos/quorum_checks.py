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

And over the metadata images at the end (``check_images``): per node, its applied
metadata offset and the digest of its image there (``quorum.snapshot.image_digest``):

- ``image-divergence``: two nodes (controllers or brokers) at the same offset hold
  images with different digests; every image is replayed from the same records, so
  they must be equal;
- ``image-behind``: after the cluster has been quiet, a node that has not reached the
  controllers' offset (the highest a controller has applied);
- ``image-ahead``: after the cluster has been quiet, a broker past every controller's
  offset: it applied records that no running controller holds.
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


# Per node: (applied metadata offset, image digest at that offset).
NodeImage = tuple[int, str]


@dataclass(frozen=True)
class ImageVerdict:
    valid: bool
    anomalies: dict[str, list[str]] = field(default_factory=dict)
    # The highest offset a controller has applied; -1 without controllers.
    offset: int = -1
    controllers: int = 0
    brokers: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "valid": self.valid,
            "anomalies": self.anomalies,
            "offset": self.offset,
            "controllers": self.controllers,
            "brokers": self.brokers,
        }


def check_images(
    controllers: Mapping[int, NodeImage],
    brokers: Mapping[int, NodeImage],
    *,
    quiet: bool = True,
    limit: int = 20,
) -> ImageVerdict:
    """Every image at one offset is the same image; with ``quiet`` (no metadata was
    written while the images were gathered), every node is at the controllers' offset."""
    anomalies: dict[str, list[str]] = {}

    def report(name: str, text: str) -> None:
        found = anomalies.setdefault(name, [])
        if len(found) < limit:
            found.append(text)

    nodes = [("controller", node, image) for node, image in sorted(controllers.items())]
    nodes += [("broker", node, image) for node, image in sorted(brokers.items())]
    by_offset: dict[int, dict[str, list[str]]] = {}
    for role, node, (offset, digest) in nodes:
        by_offset.setdefault(offset, {}).setdefault(digest, []).append(f"{role} {node}")
    for offset, digests in sorted(by_offset.items()):
        if len(digests) > 1:
            held = "; ".join(
                f"{', '.join(names)} {'have' if len(names) > 1 else 'has'} {digest[:12] or '?'}"
                for digest, names in sorted(digests.items(), key=lambda item: item[1])
            )
            report("image-divergence", f"offset {offset}: {held}")
    target = max((offset for offset, _ in controllers.values()), default=-1)
    if quiet and controllers:
        for role, node, (offset, _) in nodes:
            if offset < target:
                report(
                    "image-behind",
                    f"{role} {node} at offset {offset}, the controllers reached {target}",
                )
            elif offset > target:
                report(
                    "image-ahead",
                    f"{role} {node} at offset {offset}, past every controller ({target})",
                )
    return ImageVerdict(not anomalies, anomalies, target, len(controllers), len(brokers))
