"""Checkers for a queue history, named as in Jepsen's Kafka checker.

Theory of operation. A run yields a `History` (see `chaos.history`) and, after healing, the
final log of every partition read back from the cluster (`final`), and optionally each replica's
copy (`replicas`). Every checker is a pure function of these and returns an `Anomaly`: its name,
how many instances were found, and the first `EXAMPLES_MAX` of them as `Finding`s.

Values name sends: a workload sends each value once. Values are compared as text
(`chaos.history.value_text`); sends without a value take part in offset checks only. The final
logs must be complete (no retention or compaction during the run), since a record missing from
them counts as lost.

Errors (they make a `Verdict` invalid):
- lost-write: an acknowledged value that is nowhere in the final logs.
- duplicate: a value at more than one (partition, offset), over the final logs and all polls.
- inconsistent-offsets: one (partition, offset) holding different values across acknowledged
  sends, polls, the final logs and replicas; or an acknowledged value that the final logs hold
  only at other offsets than the one acknowledged.
- nonmonotonic-poll: a consumer received an offset at or below one it already received on that
  partition since its last `RESET` (a regression across polls, or a reordering within one).
- committed-reprocessed: a record of a consumer group processed again although a commit past
  it had succeeded more than `COMMIT_SLACK_S` before: a committed offset was lost or went
  backwards. (At least once allows reprocessing only what was not yet committed.)

Reported, not errors:
- unseen: an acknowledged value that no poll returned (an error only if also lost).
- unacknowledged-present: a send with outcome fail or info whose value is in the final logs;
  Kafka may write a record whose acknowledgement the client never got.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from chaos.history import ALL_PARTITIONS, RESET, Op, PolledRecord, Value, value_text

EXAMPLES_MAX = 20
"""Findings kept per anomaly; `Anomaly.count` still counts them all."""

LOST_WRITE = "lost-write"
DUPLICATE = "duplicate"
INCONSISTENT_OFFSETS = "inconsistent-offsets"
NONMONOTONIC_POLL = "nonmonotonic-poll"
UNSEEN = "unseen"
UNACKNOWLEDGED_PRESENT = "unacknowledged-present"
COMMITTED_REPROCESSED = "committed-reprocessed"
ERRORS: frozenset[str] = frozenset(
    {LOST_WRITE, DUPLICATE, INCONSISTENT_OFFSETS, NONMONOTONIC_POLL, COMMITTED_REPROCESSED}
)
COMMIT_SLACK_S = 1.0
"""Members report polls and commits over separate pipes read by separate threads: events
this close together may be recorded out of their real order."""

Location = tuple[int, int]
"""(partition, offset)."""
PartitionLogs = Mapping[int, Sequence[tuple[int, Value]]]
"""partition -> [(offset, value), ...], as read back after healing."""
ReplicaLogs = Mapping[int, PartitionLogs]
"""replica (broker) id -> its partition logs."""
_Text = str | None


@dataclass(frozen=True)
class Finding:
    """One instance of an anomaly: the locations involved, the values there, and why."""

    locations: tuple[Location, ...]
    values: tuple[_Text, ...]
    detail: str


@dataclass(frozen=True)
class Anomaly:
    """All instances of one anomaly; `findings` holds at most `EXAMPLES_MAX` of `count`."""

    name: str
    count: int
    findings: tuple[Finding, ...]


@dataclass(frozen=True)
class Verdict:
    """The outcome of `check`: valid unless an anomaly in `ERRORS` was found.

    `anomalies` holds only anomalies with at least one instance, keyed by name.
    """

    valid: bool
    anomalies: dict[str, Anomaly]
    stats: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: nested dicts, lists and tuples."""
        return asdict(self)


class Unavailability(NamedTuple):
    """The longest stretch without an acknowledged send that began during one fault."""

    fault: str
    start_s: float
    end_s: float
    unavailable_s: float

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return dict(self._asdict())


def check(
    history: Sequence[Op], final: PartitionLogs, replicas: ReplicaLogs | None = None
) -> Verdict:
    """Run every checker over one run's history and final logs."""
    results = (
        lost_write(history, final),
        duplicate(history, final),
        inconsistent_offsets(history, final, replicas),
        nonmonotonic_poll(history),
        committed_reprocessed(history),
        unseen(history),
        unacknowledged_present(history, final),
    )
    anomalies = {anomaly.name: anomaly for anomaly in results if anomaly.count}
    return Verdict(
        valid=not ERRORS & anomalies.keys(),
        anomalies=anomalies,
        stats=_stats(history, final, replicas),
    )


def lost_write(history: Sequence[Op], final: PartitionLogs) -> Anomaly:
    """Acknowledged sends whose value is nowhere in the final logs."""
    present = _locations_by_value(_log_records(final))
    findings = [
        Finding(
            _send_location(op),
            (value,),
            f"acknowledged to process {op.process}, not in the final log",
        )
        for op, value in _valued_sends(history, acknowledged=True)
        if value not in present
    ]
    return _anomaly(LOST_WRITE, findings)


def duplicate(history: Sequence[Op], final: PartitionLogs) -> Anomaly:
    """Values found at more than one (partition, offset) in the final logs and polls together."""
    sources: defaultdict[str, defaultdict[Location, set[str]]] = defaultdict(
        lambda: defaultdict(set)
    )
    for partition, offset, value in _log_records(final):
        if value is not None:
            sources[value][partition, offset].add("final log")
    for op, (partition, offset, value) in _polled_records(history):
        sources[value][partition, offset].add(f"poll by process {op.process}")
    findings = [
        Finding(tuple(sorted(where)), (value,), _describe_sources(where))
        for value, where in sorted(sources.items())
        if len(where) > 1
    ]
    return _anomaly(DUPLICATE, findings)


def inconsistent_offsets(
    history: Sequence[Op], final: PartitionLogs, replicas: ReplicaLogs | None = None
) -> Anomaly:
    """Offsets holding different values depending on who tells, and acknowledged values moved."""
    seen: defaultdict[Location, defaultdict[_Text, set[str]]] = defaultdict(
        lambda: defaultdict(set)
    )
    for location, value, source in _offset_claims(history, final, replicas):
        seen[location][value].add(source)
    conflicts = [
        Finding((location,), _sorted_texts(by_value), _describe_values(by_value))
        for location, by_value in sorted(seen.items())
        if len(by_value) > 1
    ]
    return _anomaly(INCONSISTENT_OFFSETS, conflicts + _moved_acknowledged(history, final))


def nonmonotonic_poll(history: Sequence[Op]) -> Anomaly:
    """Records a consumer received at or below an offset it had already received.

    The rule: for each process and partition, every polled offset must exceed the highest offset
    that process received on that partition since its last `RESET` fault op (for that partition
    or for `ALL_PARTITIONS`). Ops of one process are taken in history order. This catches both a
    regression across polls and a reordering or repeat within one poll.
    """
    highest: dict[tuple[int, int], int] = {}
    findings: list[Finding] = []
    for index, op in enumerate(history):
        if op.kind == "fault" and op.fault == RESET:
            _forget_positions(highest, op)
        elif op.kind == "poll":
            findings.extend(_poll_regressions(index, op, highest))
    return _anomaly(NONMONOTONIC_POLL, findings)


def committed_reprocessed(history: Sequence[Op], slack_s: float = COMMIT_SLACK_S) -> Anomaly:
    """Records polled again after a commit past them had succeeded (see the module doc)."""
    # partition -> [(time the commit was known to have succeeded, offset committed)]
    commits: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for op in history:
        if op.kind == "commit" and op.outcome == "ok" and op.offset is not None:
            commits[op.partition].append((op.end_s, op.offset))
    # The highest offset committed by each time, per partition.
    highest: dict[int, tuple[list[float], list[int]]] = {}
    for partition, entries in commits.items():
        entries.sort()
        times, tops, top = [], [], -1
        for at, offset in entries:
            top = max(top, offset)
            times.append(at)
            tops.append(top)
        highest[partition] = (times, tops)
    seen: set[Location] = set()
    findings = []
    for op, (partition, offset, value) in _polled_records(history):
        location = (partition, offset)
        if location in seen and partition in highest:
            times, tops = highest[partition]
            before = bisect_left(times, op.start_s - slack_s)
            if before and tops[before - 1] > offset:
                findings.append(
                    Finding(
                        (location,),
                        (value,),
                        f"processed again at {op.start_s:.3f} s by process {op.process} after "
                        f"offset {tops[before - 1]} was committed",
                    )
                )
        seen.add(location)
    return _anomaly(COMMITTED_REPROCESSED, findings)


def unseen(history: Sequence[Op]) -> Anomaly:
    """Acknowledged values that no poll returned (`lost_write` says whether they survived)."""
    polled = {value for _, (_, _, value) in _polled_records(history)}
    findings = [
        Finding(_send_location(op), (value,), f"acknowledged to process {op.process}, never polled")
        for op, value in _valued_sends(history, acknowledged=True)
        if value not in polled
    ]
    return _anomaly(UNSEEN, findings)


def unacknowledged_present(history: Sequence[Op], final: PartitionLogs) -> Anomaly:
    """Sends with outcome fail or info whose value is in the final logs nevertheless."""
    present = _locations_by_value(_log_records(final))
    findings = [
        Finding(
            tuple(sorted(present[value])),
            (value,),
            f"{op.outcome} send by process {op.process} to partition {op.partition}",
        )
        for op, value in _valued_sends(history, acknowledged=False)
        if value in present
    ]
    return _anomaly(UNACKNOWLEDGED_PRESENT, findings)


def unavailability(
    history: Sequence[Op], faults: Iterable[Op] | None = None, of: str = "send"
) -> list[Unavailability]:
    """For each fault, the longest time without an acknowledged send that began in its window.

    With ``of="admin"`` the same over successful metadata operations instead of sends: the
    metadata unavailability (its resolution is the admin workload's pace).

    A send counts when its acknowledgement arrived (`end_s`). The stretches considered run from
    the fault's start to the first acknowledgement, then between acknowledgements, up to the first
    acknowledgement after the fault's end; without one, the last stretch runs to the end of the
    history. `faults` defaults to the history's fault ops other than consumer resets.
    """
    acks_s = sorted(op.end_s for op in history if op.kind == of and op.outcome == "ok")
    history_end_s = max((op.end_s for op in history), default=0.0)
    if faults is None:
        faults = [op for op in history if op.kind == "fault" and op.fault != RESET]
    return [
        Unavailability(
            op.fault or "",
            op.start_s,
            op.end_s,
            _longest_gap_s(acks_s, op.start_s, op.end_s, history_end_s),
        )
        for op in faults
    ]


def _anomaly(name: str, findings: Sequence[Finding]) -> Anomaly:
    return Anomaly(name, len(findings), tuple(findings[:EXAMPLES_MAX]))


def _log_records(logs: PartitionLogs) -> Iterator[tuple[int, int, _Text]]:
    """(partition, offset, value as text) for every record, partition by partition."""
    for partition, records in sorted(logs.items()):
        for offset, value in records:
            yield partition, offset, value_text(value)


def _polled_records(history: Iterable[Op]) -> Iterator[tuple[Op, PolledRecord]]:
    for op in history:
        if op.kind == "poll":
            for record in op.records:
                yield op, record


def _valued_sends(history: Iterable[Op], *, acknowledged: bool) -> Iterator[tuple[Op, str]]:
    """Sends with a value, acknowledged or not, with their value as text."""
    for op in history:
        value = value_text(op.value)
        if op.kind == "send" and op.acknowledged == acknowledged and value is not None:
            yield op, value


def _locations_by_value(records: Iterable[tuple[int, int, _Text]]) -> dict[str, set[Location]]:
    where: defaultdict[str, set[Location]] = defaultdict(set)
    for partition, offset, value in records:
        if value is not None:
            where[value].add((partition, offset))
    return where


def _send_location(op: Op) -> tuple[Location, ...]:
    return () if op.offset is None else ((op.partition, op.offset),)


def _offset_claims(
    history: Sequence[Op], final: PartitionLogs, replicas: ReplicaLogs | None
) -> Iterator[tuple[Location, _Text, str]]:
    """Every claim that a (partition, offset) holds a value, with who makes it."""
    for op in history:
        if op.acknowledged and op.offset is not None:
            yield (op.partition, op.offset), value_text(op.value), f"ack to process {op.process}"
    for op, (partition, offset, value) in _polled_records(history):
        yield (partition, offset), value, f"poll by process {op.process}"
    for partition, offset, text in _log_records(final):
        yield (partition, offset), text, "final log"
    for replica, logs in sorted((replicas or {}).items()):
        for partition, offset, text in _log_records(logs):
            yield (partition, offset), text, f"replica {replica}"


def _moved_acknowledged(history: Sequence[Op], final: PartitionLogs) -> list[Finding]:
    """Acknowledged values that the final logs hold, but not at the acknowledged offset.

    Only where the final logs have nothing at that offset: a different value there is already a
    conflict at that offset.
    """
    occupied = {(partition, offset) for partition, offset, _ in _log_records(final)}
    present = _locations_by_value(_log_records(final))
    findings = []
    for op, value in _valued_sends(history, acknowledged=True):
        acked = _send_location(op)
        if acked and acked[0] not in occupied and value in present:
            elsewhere = tuple(sorted(present[value]))
            detail = (
                f"acknowledged to process {op.process} at {acked[0]}, final log has {elsewhere}"
            )
            findings.append(Finding(acked + elsewhere, (value,), detail))
    return findings


def _forget_positions(highest: dict[tuple[int, int], int], reset: Op) -> None:
    """Drop what a resetting process received on the partition reset (or all of them)."""
    for process, partition in list(highest):
        if process == reset.process and reset.partition in (partition, ALL_PARTITIONS):
            del highest[process, partition]


def _poll_regressions(index: int, op: Op, highest: dict[tuple[int, int], int]) -> list[Finding]:
    """Check one poll against, and then advance, its process's highest offsets received."""
    findings = []
    in_this_poll: set[int] = set()
    for partition, offset, value in op.records:
        key = (op.process, partition)
        previous = highest.get(key)
        if previous is not None and offset <= previous:
            where = (
                "earlier in the same poll" if partition in in_this_poll else "in an earlier poll"
            )
            detail = f"process {op.process}, op {index}: offset {offset} after {previous} {where}"
            findings.append(Finding(((partition, offset),), (value,), detail))
        highest[key] = offset if previous is None else max(previous, offset)
        in_this_poll.add(partition)
    return findings


def _longest_gap_s(
    acks_s: Sequence[float], start_s: float, end_s: float, history_end_s: float
) -> float:
    points = [start_s]
    for ack_s in acks_s[bisect_left(acks_s, start_s) :]:
        points.append(ack_s)
        if ack_s > end_s:
            break
    else:
        points.append(max(history_end_s, start_s))
    return max(later - earlier for earlier, later in zip(points, points[1:], strict=False))


def _sorted_texts(values: Iterable[_Text]) -> tuple[_Text, ...]:
    return tuple(sorted(values, key=lambda value: (value is not None, value or "")))


def _describe_values(by_value: Mapping[_Text, set[str]]) -> str:
    return "; ".join(
        f"{value!r} from {', '.join(sorted(by_value[value]))}" for value in _sorted_texts(by_value)
    )


def _describe_sources(where: Mapping[Location, set[str]]) -> str:
    return "; ".join(
        f"at {location} in {', '.join(sorted(where[location]))}" for location in sorted(where)
    )


def _stats(
    history: Sequence[Op], final: PartitionLogs, replicas: ReplicaLogs | None
) -> dict[str, int]:
    outcomes = Counter(op.outcome for op in history if op.kind == "send")
    return {
        "sends": sum(outcomes.values()),
        "sends_ok": outcomes["ok"],
        "sends_fail": outcomes["fail"],
        "sends_info": outcomes["info"],
        "polls": sum(1 for op in history if op.kind == "poll"),
        "records_polled": sum(1 for _ in _polled_records(history)),
        "final_records": sum(len(records) for records in final.values()),
        "faults": sum(1 for op in history if op.kind == "fault"),
        "replicas": len(replicas or {}),
    }
