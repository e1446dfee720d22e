"""The chaos suite's history model and checkers (pure; no cluster).

- A clean history is valid; each anomaly is found on a crafted history, and near misses are not
  (an unacknowledged value missing, an info send that appears, a consumer re-reading after a reset).
- Hypothesis: any history drawn from a correct in-memory log model is valid, and a single
  corruption of its final logs (drop an acknowledged record, duplicate one, swap two) is found.
- Ops round-trip through JSON lines.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaos.checkers import (
    DUPLICATE,
    EXAMPLES_MAX,
    INCONSISTENT_OFFSETS,
    LOST_WRITE,
    NONMONOTONIC_POLL,
    UNACKNOWLEDGED_PRESENT,
    UNSEEN,
    Unavailability,
    check,
    duplicate,
    inconsistent_offsets,
    lost_write,
    nonmonotonic_poll,
    unacknowledged_present,
    unavailability,
    unseen,
)
from chaos.history import (
    ALL_PARTITIONS,
    RESET,
    History,
    Op,
    Outcome,
    PolledRecord,
    op_from_json,
    op_to_json,
    read_jsonl,
    value_text,
    write_jsonl,
)

TOPIC = "chaos"
NEMESIS = 99
Logs = dict[int, list[tuple[int, str]]]


def send(
    value: str,
    partition: int = 0,
    offset: int | None = None,
    *,
    outcome: Outcome = "ok",
    process: int = 0,
    end_s: float = 1.0,
) -> Op:
    return Op(process, "send", end_s, end_s, outcome, TOPIC, partition, value, offset)


def poll(process: int, *records: PolledRecord, end_s: float = 1.0) -> Op:
    return Op(process, "poll", end_s, end_s, "ok", TOPIC, records=records)


def reset(process: int, partition: int = ALL_PARTITIONS) -> Op:
    return Op(process, "fault", 1.0, 1.0, "ok", TOPIC, partition, fault=RESET)


def fault(name: str, start_s: float, end_s: float) -> Op:
    return Op(NEMESIS, "fault", start_s, end_s, "info", fault=name)


def clean() -> tuple[History, Logs]:
    history = History(
        [
            send("a", 0, 0),
            send("b", 0, 1),
            send("c", 1, 0),
            send("d", 1, outcome="fail"),
            poll(10, (0, 0, "a"), (1, 0, "c")),
            poll(10, (0, 1, "b")),
        ]
    )
    return history, {0: [(0, "a"), (1, "b")], 1: [(0, "c")]}


def test_clean_history_is_valid() -> None:
    history, final = clean()
    verdict = check(history, final, replicas={1: final, 2: {0: [(0, "a")], 1: []}})
    assert verdict.valid and verdict.anomalies == {}
    assert verdict.stats["sends_ok"] == 3 and verdict.stats["sends_fail"] == 1
    assert verdict.stats["records_polled"] == 3 and verdict.stats["final_records"] == 3
    assert verdict.to_dict()["valid"] is True


def test_lost_write() -> None:
    history, final = clean()
    final[0].pop()
    verdict = check(history, final)
    assert not verdict.valid and set(verdict.anomalies) == {LOST_WRITE}
    [finding] = verdict.anomalies[LOST_WRITE].findings
    assert finding.locations == ((0, 1),) and finding.values == ("b",)


def test_unacknowledged_value_missing_is_not_lost() -> None:
    history, final = clean()
    history.append(send("e", 1, outcome="info"))
    verdict = check(history, final)
    assert verdict.valid and verdict.anomalies == {}


@pytest.mark.parametrize("outcome", ["info", "fail"])
def test_unacknowledged_value_present_is_reported_not_an_error(outcome: Outcome) -> None:
    history, final = clean()
    history.append(send("e", 1, outcome=outcome))
    final[1].append((1, "e"))
    verdict = check(history, final)
    assert verdict.valid and set(verdict.anomalies) == {UNACKNOWLEDGED_PRESENT}
    [finding] = unacknowledged_present(history, final).findings
    assert finding.locations == ((1, 1),) and outcome in finding.detail


def test_duplicate_in_final_log() -> None:
    history, final = clean()
    final[0].append((2, "a"))
    anomaly = duplicate(history, final)
    assert anomaly.count == 1 and anomaly.findings[0].locations == ((0, 0), (0, 2))
    assert not check(history, final).valid


def test_duplicate_across_polls() -> None:
    history, final = clean()
    history.append(poll(11, (0, 5, "a")))
    anomaly = duplicate(history, final)
    assert anomaly.count == 1 and anomaly.findings[0].values == ("a",)
    assert "poll by process 11" in anomaly.findings[0].detail


def test_inconsistent_offsets_between_polls() -> None:
    history, final = clean()
    history.append(poll(11, (0, 0, "a"), (0, 1, "x")))
    anomaly = inconsistent_offsets(history, final)
    [finding] = anomaly.findings
    assert finding.locations == ((0, 1),) and finding.values == ("b", "x")
    assert not check(history, final).valid


def test_acknowledged_value_at_another_offset() -> None:
    history, final = clean()
    final[0] = [(0, "a"), (2, "b")]  # nothing at offset 1, where "b" was acknowledged
    assert lost_write(history, final).count == 0
    [finding] = inconsistent_offsets(history, final).findings
    assert finding.locations == ((0, 1), (0, 2)) and finding.values == ("b",)


def test_acknowledged_offset_holding_another_value() -> None:
    history = History([send("a", 0, 0), send("b", 0, 1)])
    final = {0: [(0, "a"), (1, "x"), (2, "b")]}
    verdict = check(history, final)
    assert set(verdict.anomalies) >= {INCONSISTENT_OFFSETS}
    assert verdict.anomalies[INCONSISTENT_OFFSETS].findings[0].values == ("b", "x")


def test_replicas_that_disagree() -> None:
    history, final = clean()
    replicas = {1: final, 2: {0: [(0, "a"), (1, "z")]}}
    [finding] = inconsistent_offsets(history, final, replicas).findings
    assert finding.locations == ((0, 1),) and "replica 2" in finding.detail


def test_poll_going_back_is_nonmonotonic() -> None:
    history, final = clean()
    history.append(poll(10, (0, 1, "b")))
    [finding] = nonmonotonic_poll(history).findings
    assert finding.locations == ((0, 1),) and "earlier poll" in finding.detail
    assert set(check(history, final).anomalies) == {NONMONOTONIC_POLL}


def test_reordering_within_one_poll_is_nonmonotonic() -> None:
    history = History([poll(10, (0, 1, "b"), (1, 0, "c"), (0, 0, "a"))])
    [finding] = nonmonotonic_poll(history).findings
    assert finding.locations == ((0, 0),) and "same poll" in finding.detail


@pytest.mark.parametrize("partition", [0, ALL_PARTITIONS])
def test_reread_after_a_reset_is_not_nonmonotonic(partition: int) -> None:
    history, final = clean()
    history.extend([reset(10, partition), poll(10, (0, 0, "a"), (0, 1, "b"))])
    assert check(history, final).valid


def test_reset_of_another_partition_or_process_does_not_excuse() -> None:
    history, _ = clean()
    history.extend([reset(10, 1), reset(11), poll(10, (0, 0, "a"))])
    assert nonmonotonic_poll(history).count == 1


def test_acknowledged_never_polled_is_unseen_not_an_error() -> None:
    history, final = clean()
    history.append(send("e", 1, 1))
    final[1].append((1, "e"))
    verdict = check(history, final)
    assert verdict.valid and set(verdict.anomalies) == {UNSEEN}
    assert unseen(history).findings[0].values == ("e",)


def test_findings_are_bounded_but_counted() -> None:
    history = History(send(f"v{i}", 0, i) for i in range(30))
    anomaly = lost_write(history, {0: []})
    assert anomaly.count == 30 and len(anomaly.findings) == EXAMPLES_MAX


def test_unavailability_per_fault_window() -> None:
    acks = [send(f"v{i}", 0, i, end_s=t) for i, t in enumerate([1.0, 2.0, 6.0, 7.0, 12.0])]
    history = History(
        [
            *acks,
            send("late", 0, outcome="info", end_s=20.0),
            fault("kill-leader", 2.5, 5.0),
            fault("pause-broker", 1.5, 6.5),
            fault("partition-controller", 12.5, 13.0),
            reset(10),
        ]
    )
    assert unavailability(history) == [
        Unavailability("kill-leader", 2.5, 5.0, 3.5),
        Unavailability("pause-broker", 1.5, 6.5, 4.0),
        Unavailability("partition-controller", 12.5, 13.0, 7.5),
    ]
    only = unavailability(history, [op for op in history if op.fault == "kill-leader"])
    assert only[0].to_dict()["unavailable_s"] == 3.5


def test_op_rejects_unknown_kind_and_outcome() -> None:
    with pytest.raises(ValueError):
        Op(0, "produce", 0.0, 1.0, "ok")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Op(0, "send", 0.0, 1.0, "maybe", partition=0)  # type: ignore[arg-type]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    history, _ = clean()
    history.extend([fault("kill-leader", 1.0, 2.5), reset(10, 1)])
    history.append(Op(1, "send", 0.25, 0.5, "info", TOPIC, 2, b"\xff\x00bytes", detail="timeout"))
    path = tmp_path / "history.jsonl"
    write_jsonl(path, history)
    back = read_jsonl(path)
    assert isinstance(back, History) and back[:-1] == history[:-1]
    assert back[-1].value == value_text(b"\xff\x00bytes") and back[-1].detail == "timeout"
    assert back.sends()[-1].value == back[-1].value and len(back.faults()) == 2


# A correct in-memory model: per-partition logs, consumers with positions, resets and faults.

PARTITIONS = (0, 1, 2)
CONSUMERS = (10, 11)
STEPS = st.one_of(
    st.tuples(
        st.just("send"),
        st.sampled_from(PARTITIONS),
        st.sampled_from(["ok", "ok", "fail", "info"]),
        st.booleans(),  # whether an info send was written
    ),
    st.tuples(st.just("poll"), st.sampled_from(CONSUMERS), st.integers(1, 4)),
    st.tuples(
        st.just("reset"),
        st.sampled_from(CONSUMERS),
        st.sampled_from((*PARTITIONS, ALL_PARTITIONS)),
        st.integers(0, 5),
    ),
    st.tuples(st.just("fault"), st.sampled_from(["kill-leader", "pause"]), st.integers(0, 3)),
)


class _Model:
    """A correct single-topic log with consumers; `apply` records each step as an op."""

    def __init__(self) -> None:
        self.logs: dict[int, list[str]] = {p: [] for p in PARTITIONS}
        self.positions: dict[tuple[int, int], int] = {}
        self.history = History()
        self._clock = itertools.count()
        self._values = itertools.count()

    def apply(self, step: tuple) -> None:
        getattr(self, "_" + step[0])(*step[1:])

    def final(self) -> Logs:
        return {p: list(enumerate(values)) for p, values in self.logs.items()}

    def _times(self) -> tuple[float, float]:
        start_s = float(next(self._clock))
        return start_s, start_s + 0.5

    def _send(self, partition: int, outcome: Outcome, written: bool) -> None:
        value, log = f"v{next(self._values)}", self.logs[partition]
        offset = len(log) if outcome == "ok" else None
        if outcome == "ok" or (outcome == "info" and written):
            log.append(value)
        op = Op(0, "send", *self._times(), outcome, TOPIC, partition, value, offset)
        self.history.append(op)

    def _poll(self, process: int, max_records: int) -> None:
        records: list[PolledRecord] = []
        for partition, log in self.logs.items():
            position = self.positions.get((process, partition), 0)
            batch = log[position : position + max_records]
            records += [(partition, position + i, value) for i, value in enumerate(batch)]
            self.positions[process, partition] = position + len(batch)
        self.history.append(
            Op(process, "poll", *self._times(), "ok", TOPIC, records=tuple(records))
        )

    def _reset(self, process: int, partition: int, back: int) -> None:
        for p in PARTITIONS if partition == ALL_PARTITIONS else (partition,):
            position = self.positions.get((process, p), 0)
            self.positions[process, p] = max(0, position - back)
        op = Op(process, "fault", *self._times(), "ok", TOPIC, partition, fault=RESET)
        self.history.append(op)

    def _fault(self, name: str, length: int) -> None:
        start_s, _ = self._times()
        self.history.append(Op(NEMESIS, "fault", start_s, start_s + length, "info", fault=name))


@st.composite
def model_runs(draw: st.DrawFn) -> _Model:
    """A model run that starts with two acknowledged sends to partition 0."""
    model = _Model()
    steps = [("send", 0, "ok", True)] * 2 + draw(st.lists(STEPS, max_size=40))
    for step in steps:
        model.apply(step)
    return model


MODEL_SETTINGS = settings(max_examples=150, deadline=None)


@MODEL_SETTINGS
@given(model_runs(), st.data())
def test_any_correct_model_history_is_valid(model: _Model, data: st.DataObject) -> None:
    final = model.final()
    lagging = {
        p: records[: data.draw(st.integers(0, len(records)))] for p, records in final.items()
    }
    verdict = check(model.history, final, replicas={1: final, 2: lagging})
    assert verdict.valid, verdict.anomalies
    assert set(verdict.anomalies) <= {UNSEEN, UNACKNOWLEDGED_PRESENT}
    for op in model.history:
        assert op_from_json(op_to_json(op)) == op


def _acknowledged_offsets(model: _Model, partition: int) -> list[int]:
    return [
        op.offset
        for op in model.history.acknowledged_sends()
        if op.partition == partition and op.offset is not None
    ]


@MODEL_SETTINGS
@given(model_runs(), st.data())
def test_dropping_an_acknowledged_record_is_a_lost_write(
    model: _Model, data: st.DataObject
) -> None:
    final = model.final()
    acked = data.draw(st.sampled_from(model.history.acknowledged_sends()))
    assert acked.offset is not None
    del final[acked.partition][acked.offset]
    verdict = check(model.history, final)
    assert not verdict.valid and LOST_WRITE in verdict.anomalies


@MODEL_SETTINGS
@given(model_runs(), st.data())
def test_duplicating_a_record_is_a_duplicate(model: _Model, data: st.DataObject) -> None:
    final = model.final()
    partition = data.draw(st.sampled_from([p for p, records in final.items() if records]))
    _, value = data.draw(st.sampled_from(final[partition]))
    target = data.draw(st.sampled_from(PARTITIONS))
    final[target].append((len(final[target]), value))
    verdict = check(model.history, final)
    assert not verdict.valid and DUPLICATE in verdict.anomalies


@MODEL_SETTINGS
@given(model_runs(), st.data())
def test_swapping_two_offsets_is_inconsistent(model: _Model, data: st.DataObject) -> None:
    final = model.final()
    acked = _acknowledged_offsets(model, 0)
    first, second = data.draw(st.lists(st.sampled_from(acked), min_size=2, max_size=2, unique=True))
    log = final[0]
    log[first], log[second] = (first, log[second][1]), (second, log[first][1])
    verdict = check(model.history, final)
    assert not verdict.valid and INCONSISTENT_OFFSETS in verdict.anomalies
