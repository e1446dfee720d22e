"""Metadata checkers, pure: the admin operations of a run against the topics at the end.

The metadata workload creates topics, adds partitions and deletes topics while controllers
fail; each operation is recorded as an ``admin`` op (see ``chaos.history``) with outcome ok
(the controller committed it), fail (it was refused: it did not happen) or info (nobody
knows: it may have happened, now or later). ``final`` maps every topic that exists after
healing to its partition count.

The workload is one sequential process, and after an operation on a topic whose outcome is
unknown it issues only operations whose late arrival cannot reorder with it (it never
touches a topic again after an unknown deletion). So each topic's possible final partition
counts (0: absent) follow from its operations in order: an acknowledged one sets the
count, an unknown one adds a possibility, a refused one changes nothing.

- ``metadata-lost``: the final count is below every possible one: an acknowledged
  creation or increase is missing, or a topic is gone that was never deleted;
- ``metadata-phantom``: the final count is above every possible one: a refused creation
  that exists, more partitions than asked for, a deleted topic that is back;
- ``metadata-unknown`` (reported, not an error): operations whose outcome nobody knows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from chaos.history import Op

CREATE = "create-topic"
GROW = "create-partitions"
DELETE = "delete-topic"
ERRORS = frozenset({"metadata-lost", "metadata-phantom"})


@dataclass(frozen=True)
class MetadataVerdict:
    valid: bool
    anomalies: dict[str, list[str]] = field(default_factory=dict)
    operations: int = 0
    acknowledged: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "valid": self.valid,
            "anomalies": self.anomalies,
            "operations": self.operations,
            "acknowledged": self.acknowledged,
        }


def action(op: Op) -> str:
    """The action of an admin op: its detail up to the first colon."""
    return op.detail.split(":", 1)[0]


def possible_counts(ops: Sequence[Op]) -> set[int]:
    """The partition counts (0: absent) one topic may have after its ``ops``, in order."""
    counts = {0}
    for op in ops:
        after = 0 if action(op) == DELETE else (op.offset or 0)
        if op.outcome == "ok":
            counts = {after}
        elif op.outcome == "info":
            counts.add(after)
    return counts


def check_metadata(
    history: Sequence[Op], final: Mapping[str, int], limit: int = 20
) -> MetadataVerdict:
    anomalies: dict[str, list[str]] = {}

    def report(name: str, text: str) -> None:
        found = anomalies.setdefault(name, [])
        if len(found) < limit:
            found.append(text)

    ops = [op for op in history if op.kind == "admin"]
    by_topic: dict[str, list[Op]] = {}
    for op in ops:
        by_topic.setdefault(op.topic, []).append(op)
        if op.outcome == "info":
            report("metadata-unknown", f"{op.topic}: {op.detail} ({op.offset} partitions)")
    for topic, topic_ops in sorted(by_topic.items()):
        count = final.get(topic, 0)
        possible = possible_counts(topic_ops)
        if count in possible:
            continue
        story = ", ".join(f"{action(op)} {op.offset} {op.outcome}" for op in topic_ops)
        name = "metadata-lost" if count < min(possible) else "metadata-phantom"
        report(
            name, f"{topic}: {count} partitions at the end, expected {sorted(possible)} ({story})"
        )
    return MetadataVerdict(
        valid=not ERRORS & anomalies.keys(),
        anomalies=anomalies,
        operations=len(ops),
        acknowledged=sum(1 for op in ops if op.outcome == "ok"),
    )
