"""The history a chaos workload records: one frozen `Op` per send, poll or fault.

Theory of operation. Workload processes (producers, consumers, the nemesis) are sequential: each
appends its operations to one shared `History` in the order they happened, so the operations of
one process appear in history order. An operation's outcome uses Jepsen's terms: "ok" means it
happened, "fail" means the client was told it did not, and "info" means nobody knows (a timeout,
a broken connection). A history covers one topic; the workload sends each value once, so a value
names the send that wrote it.

- send: `partition` and `value` are what was produced; `offset` is the acknowledged offset
  (outcome "ok"), otherwise None.
- poll: `records` are the (partition, offset, value) triples returned, in the order returned.
- commit: a group member committed: `partition` and `offset` (the next offset to read) are
  what it committed, recorded once the commit succeeded.
- admin: a metadata operation: `topic` is the topic, `detail` starts with the action
  ("create-topic", "create-partitions"; an error may follow a colon) and `offset` is the
  partition count asked for.
- fault: `fault` names it ("kill-leader", "partition-network", ..., or `RESET`); `start_s` and
  `end_s` bound the window during which it was in force.

A consumer that seeks, resets its position or rejoins its group records a fault op named `RESET`
with its own process id; `partition` is the partition reset, or `ALL_PARTITIONS`. Checkers then
allow that process to read the partition again from anywhere.

The only I/O here is the JSON-lines pair `write_jsonl` / `read_jsonl`; values are stored as text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal, get_args

OpKind = Literal["send", "poll", "fault", "commit", "admin"]
Outcome = Literal["ok", "fail", "info"]
Value = bytes | str | None
PolledRecord = tuple[int, int, str]

KINDS: frozenset[str] = frozenset(get_args(OpKind))
OUTCOMES: frozenset[str] = frozenset(get_args(Outcome))

RESET = "reset"
"""The fault name a consumer records when it seeks or resets its position."""

ALL_PARTITIONS = -1
"""The partition of an op that concerns no single partition (a poll, a reset of all partitions)."""


def value_text(value: Value) -> str | None:
    """A value as text, the form checkers compare and JSON stores.

    Bytes decode as UTF-8 with surrogateescape, so distinct byte strings stay distinct.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


@dataclass(frozen=True)
class Op:
    """One operation by one workload process, with its wall-clock window in seconds."""

    process: int
    kind: OpKind
    start_s: float
    end_s: float
    outcome: Outcome
    topic: str = ""
    partition: int = ALL_PARTITIONS
    value: Value = None
    offset: int | None = None
    records: tuple[PolledRecord, ...] = ()
    fault: str | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        # Checks at the point where data enters: checkers rely on these without re-checking.
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, not {self.kind!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {self.outcome!r}")
        if self.end_s < self.start_s:
            raise ValueError(f"op ends ({self.end_s}) before it starts ({self.start_s})")
        if self.kind == "send" and self.partition < 0:
            raise ValueError("a send names its partition")
        if self.kind in ("send", "commit") and self.offset is not None and self.outcome != "ok":
            raise ValueError("only an acknowledged (ok) send has an offset")

    @property
    def acknowledged(self) -> bool:
        """True for a send the broker acknowledged."""
        return self.kind == "send" and self.outcome == "ok"


class History(list[Op]):
    """The operations of one run, in the order they were recorded."""

    def sends(self) -> list[Op]:
        """All send ops, whatever their outcome."""
        return [op for op in self if op.kind == "send"]

    def acknowledged_sends(self) -> list[Op]:
        """Send ops with outcome ok."""
        return [op for op in self if op.acknowledged]

    def polls(self) -> list[Op]:
        """All poll ops; records of any of them count as observed."""
        return [op for op in self if op.kind == "poll"]

    def commits(self) -> list[Op]:
        """Commits that succeeded."""
        return [op for op in self if op.kind == "commit" and op.outcome == "ok"]

    def admin_ops(self) -> list[Op]:
        """Metadata operations, whatever their outcome."""
        return [op for op in self if op.kind == "admin"]

    def faults(self) -> list[Op]:
        """All fault ops, consumer resets included."""
        return [op for op in self if op.kind == "fault"]


def op_to_json(op: Op) -> str:
    """One op as one line of JSON (without the newline); values become text."""
    fields = asdict(op)
    fields["value"] = value_text(op.value)
    return json.dumps(fields)


def op_from_json(line: str) -> Op:
    """The op that `op_to_json` wrote; unknown or missing fields raise."""
    fields = json.loads(line)
    fields["records"] = tuple(
        (int(partition), int(offset), str(value)) for partition, offset, value in fields["records"]
    )
    return Op(**fields)


def write_jsonl(path: str | os.PathLike[str], ops: Iterable[Op]) -> None:
    """Write ops to path, one JSON object a line, replacing the file."""
    with open(path, "w", encoding="utf-8") as out:
        for op in ops:
            out.write(op_to_json(op) + "\n")


def read_jsonl(path: str | os.PathLike[str]) -> History:
    """Read a history written by `write_jsonl`; blank lines are skipped."""
    with open(path, encoding="utf-8") as source:
        return History(op_from_json(line) for line in source if line.strip())
