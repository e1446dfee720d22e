"""ReplicaManager's reaction to changes: the ISR thread looks only at the partitions
something happened to, and deletions go through whatever one partition does.

A metadata change or a follower's fetch marks the partitions it concerns; all of
them are looked at every quarter of replica.lag.time.max.ms and when the set of
brokers that may join an ISR changes. (Every metadata change used to look at every
partition the broker leads: with a thousand of them, most of a broker's CPU.)
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from raftka.v1 import common_pb2, controller_pb2

from broker import replica_manager
from broker.local_changes import LocalChanges
from broker.log_manager import LogManager
from broker.partition import Partition, PartitionSettings
from broker.record_batch import Record, encode_batch
from broker.replica_manager import BrokerSettings, ReplicaManager
from broker.storage.log import LogConfig, PartitionLog
from client.errors import RequestTimedOutError, UnknownOutcomeError
from quorum.config import NodeConfig
from quorum.image import PartitionRegistration


def joinable_partition(root: Path, topic: str) -> Partition:
    """A leader whose follower 2, outside the ISR, has caught up: an expansion is due."""
    log_ = PartitionLog(root / f"{topic}-0", LogConfig(segment_bytes=1_000_000))
    partition = Partition(topic, 0, f"id-{topic}", log_, 1, PartitionSettings())
    partition.become_leader(PartitionRegistration((1, 2), (1,), 1, 0, 0), partition.settings)
    read = partition.read_for_follower(2, 0, -1, 0, 0, 1 << 20, update_state=True)
    assert read.may_join_isr
    return partition


def broker(broker_id: int, fenced: bool = False) -> SimpleNamespace:
    return SimpleNamespace(broker_id=broker_id, fenced=fenced, in_controlled_shutdown=False)


def broker_settings(log_dir: Path) -> BrokerSettings:
    return BrokerSettings.from_config(
        NodeConfig(
            {
                "node.id": 1,
                "controller.quorum.voters": "9@127.0.0.1:1:2",
                "listeners": "127.0.0.1:0",
                "cluster.id": "c",
                "log.dirs": str(log_dir),
            }
        )
    )


class Manager:
    """A ReplicaManager reduced to its ISR pass, with a stand-in controller that
    records every AlterPartition and refuses each change as one that cannot be
    applied (so it is due again)."""

    def __init__(self, partitions: list[Partition]):
        rm = object.__new__(ReplicaManager)
        rm.broker_id = 1
        rm._broker_epoch = lambda: 7
        rm._partitions = {(p.topic, p.index): p for p in partitions}
        rm._isr_wake = threading.Event()
        rm._isr_due = set()
        rm._isr_due_lock = threading.Lock()
        rm._isr_eligible = None
        rm._unsettled = {}
        self.brokers = {1: broker(1), 2: broker(2)}
        rm._image = lambda: SimpleNamespace(brokers=self.brokers)
        self.requests: list[controller_pb2.AlterPartitionRequest] = []
        self.answer: Callable[[controller_pb2.AlterPartitionRequest], Any] = refuse_each
        rm._alter_partition = self.alter
        self.rm = rm

    def alter(self, request: controller_pb2.AlterPartitionRequest) -> Any:
        self.requests.append(request)
        return self.answer(request)

    @property
    def sent(self) -> list[str]:
        return [change.topic for request in self.requests for change in request.changes]


def refuse_each(
    request: controller_pb2.AlterPartitionRequest, code: int = common_pb2.INELIGIBLE_REPLICA
) -> Any:
    return controller_pb2.AlterPartitionResponse(
        results=[
            controller_pb2.IsrChangeResult(
                topic=change.topic,
                partition=change.partition,
                error=common_pb2.Error(code=code, message="refused"),
            )
            for change in request.changes
        ]
    )


def test_only_marked_partitions_are_looked_at_between_full_passes(tmp_path: Path) -> None:
    m = Manager([joinable_partition(tmp_path, t) for t in ("a", "b", "c")])
    m.rm._send_isr_changes(full=False)  # first pass: eligibility is new, so all
    assert sorted(m.sent) == ["a", "b", "c"]
    m.requests.clear()
    m.rm._send_isr_changes(full=False)
    assert m.sent == []  # nothing marked, nobody changed
    m.rm._check_isr([("b", 0), ("gone", 0)])
    assert m.rm._isr_wake.is_set()
    m.rm._send_isr_changes(full=False)
    assert m.sent == ["b"]
    m.requests.clear()
    m.rm._send_isr_changes(full=True)
    assert sorted(m.sent) == ["a", "b", "c"]


def test_a_change_in_who_may_join_looks_at_every_partition(tmp_path: Path) -> None:
    m = Manager([joinable_partition(tmp_path, t) for t in ("a", "b")])
    m.rm._send_isr_changes(full=False)
    m.requests.clear()
    m.brokers[3] = broker(3)  # a broker registered and was unfenced
    m.rm._send_isr_changes(full=False)
    assert sorted(m.sent) == ["a", "b"]


def test_a_fenced_follower_is_not_proposed(tmp_path: Path) -> None:
    m = Manager([joinable_partition(tmp_path, "a")])
    m.brokers[2] = broker(2, fenced=True)
    m.rm._send_isr_changes(full=True)
    assert m.sent == []


def test_a_deletion_that_fails_to_flush_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting topics closes their partitions without flushing them, so a log that
    cannot flush (a full disk, no descriptor left) neither stops the other deletions
    in the change nor stays: its files are closed and its directory goes."""
    settings = broker_settings(tmp_path)
    rm = ReplicaManager(
        1,
        settings,
        LogManager([tmp_path], settings.log_config),
        image=lambda: SimpleNamespace(brokers={}),
        broker_epoch=lambda: 1,
        alter_partition=lambda request: None,  # type: ignore[arg-type,return-value]
    )
    rm.logs.load()
    keys = [("a", 0), ("b", 0), ("c", 0)]
    for topic, index in keys:
        log_ = rm.logs.get_or_create(topic, index, f"id-{topic}")
        rm._partitions[(topic, index)] = Partition(
            topic, index, f"id-{topic}", log_, 1, PartitionSettings()
        )
    failing = rm._partitions[("a", 0)]

    def flush_fails() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(failing.log, "flush", flush_fails)
    rm.apply(LocalChanges(deletes=frozenset(keys)), SimpleNamespace(brokers={}))  # type: ignore[arg-type]
    assert rm.partitions() == {}
    assert rm.logs.known() == {}
    assert not any((tmp_path / f"{t}-{i}").exists() for t, i in keys)
    assert all(segment._closed for segment in failing.log.segments)


def test_high_watermarks_are_checkpointed_only_when_one_moved(tmp_path: Path) -> None:
    """An idle broker with many partitions wrote every high watermark every interval."""
    partition = joinable_partition(tmp_path, "t")
    rm = Manager([partition]).rm
    rm._lock = threading.RLock()
    rm._checkpointed_hws = None
    written: list[dict[tuple[str, int], int]] = []
    failing = [False]

    def checkpoint(hws: dict[tuple[str, int], int]) -> None:
        if failing[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(dict(hws))

    rm.logs = SimpleNamespace(checkpoint_high_watermarks=checkpoint)
    rm._checkpoint_hws()
    rm._checkpoint_hws()
    assert written == [{("t", 0): partition.high_watermark}]
    partition.high_watermark += 1
    failing[0] = True
    rm._checkpoint_hws()  # Not written: tried again next time.
    failing[0] = False
    rm._checkpoint_hws()
    assert written[-1] == {("t", 0): partition.high_watermark} and len(written) == 2


def test_a_change_adding_many_followed_partitions_tells_their_fetcher_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each partition added to a fetcher ended its fetch in flight and made it build a
    request over every partition it had: a broker restarted with 100,000 replicas
    spent most of its time there while it opened its logs. One change, one notice."""
    from broker.fetcher import ReplicaFetcher
    from quorum import records as r
    from quorum.image import EMPTY_IMAGE, Endpoint
    from quorum.replay import replay_batch

    settings = broker_settings(tmp_path)
    records = [
        r.register_broker(b, f"inc{b}", [Endpoint("PLAINTEXT", "127.0.0.1", 1)], fenced=False)
        for b in (1, 2)
    ]
    records.append(r.topic("t", "id-t"))
    records += [r.partition("id-t", i, [2, 1], [2, 1], 2) for i in range(20)]
    image, _ = replay_batch(EMPTY_IMAGE, records, 0)
    rm = ReplicaManager(
        1,
        settings,
        LogManager([tmp_path], settings.log_config),
        image=lambda: image,
        broker_epoch=lambda: 1,
        alter_partition=lambda request: None,  # type: ignore[arg-type,return-value]
    )
    rm.logs.load()
    told: list[ReplicaFetcher] = []
    real_changed = ReplicaFetcher.changed

    def changed(self: ReplicaFetcher) -> None:
        told.append(self)
        real_changed(self)

    monkeypatch.setattr(ReplicaFetcher, "changed", changed)
    parts = dict(image.topic_by_name("t").partitions)
    try:
        rm.apply(
            LocalChanges(
                followers={("t", i): p for i, p in parts.items()}, topic_ids={"t": "id-t"}
            ),
            image,
        )
        assert len(told) == 1
        (fetcher,) = rm._fetchers.values()
        assert len(fetcher._entries) == 20
        rm.apply(LocalChanges(deletes=frozenset({("t", 0), ("t", 1)})), image)
        assert told == [fetcher, fetcher] and len(fetcher._entries) == 18
    finally:
        rm.stop()


def test_many_due_isr_changes_go_out_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted follower catches up on thousands of partitions at once: their
    expansions go out in as few AlterPartition requests as the bound per request
    allows, not one controller round trip each, and every one is sent."""
    monkeypatch.setattr(replica_manager, "ISR_CHANGES_PER_REQUEST", 16)
    topics = [f"t{i}" for i in range(40)]
    m = Manager([joinable_partition(tmp_path, t) for t in topics])
    m.rm._send_isr_changes(full=True)
    assert [len(request.changes) for request in m.requests] == [16, 16, 8]
    assert sorted(m.sent) == sorted(topics)
    assert {(r.broker_id, r.broker_epoch) for r in m.requests} == {(1, 7)}
    change = m.requests[0].changes[0]
    assert (list(change.new_isr), change.topic_id) == ([1, 2], f"id-{change.topic}")


def test_each_answer_settles_its_own_partition(tmp_path: Path) -> None:
    """Accepted changes take the committed ISR; one refused as not applicable goes
    back to the committed ISR and is due again; one left out of the answer is sent
    again as it was; whatever order the results come in."""
    parts = {t: joinable_partition(tmp_path, t) for t in ("a", "b", "c")}
    m = Manager(list(parts.values()))

    def answer(request: controller_pb2.AlterPartitionRequest) -> Any:
        by_topic = {change.topic: change for change in request.changes}
        return controller_pb2.AlterPartitionResponse(
            results=[
                controller_pb2.IsrChangeResult(
                    topic="b",
                    partition=0,
                    error=common_pb2.Error(code=common_pb2.INELIGIBLE_REPLICA),
                ),
                controller_pb2.IsrChangeResult(
                    topic="a",
                    partition=0,
                    leader=1,
                    leader_epoch=0,
                    partition_epoch=by_topic["a"].partition_epoch + 1,
                    isr=by_topic["a"].new_isr,
                ),
            ]  # and nothing about "c"
        )

    m.answer = answer
    m.rm._send_isr_changes(full=True)
    assert sorted(m.sent) == ["a", "b", "c"]
    a, b, c = parts["a"], parts["b"], parts["c"]
    assert (a.isr, a.partition_epoch, a.pending_isr) == ((1, 2), 1, None)
    assert (b.isr, b.pending_isr) == ((1,), None)
    assert (c.isr, c.pending_isr) == ((1,), (1, 2))  # still counted in the high watermark
    m.requests.clear()
    m.answer = refuse_each
    m.rm._send_isr_changes(full=True)
    assert sorted(m.sent) == ["b", "c"]  # "b" due again, "c" sent again; "a" is done


def test_a_request_refused_whole_is_sent_again(tmp_path: Path) -> None:
    """A stale broker epoch (the broker registered again meanwhile), a fenced broker:
    nothing in the request was applied, but an earlier send of it may have been. The
    first change goes last (a controller of the version before refuses a whole
    request for its first change alone)."""
    parts = [joinable_partition(tmp_path, t) for t in ("a", "b")]
    m = Manager(parts)
    m.answer = lambda request: controller_pb2.AlterPartitionResponse(
        error=common_pb2.Error(code=common_pb2.STALE_BROKER_EPOCH, message="old epoch")
    )
    m.rm._send_isr_changes(full=True)
    assert all(p.pending_isr == (1, 2) for p in parts)
    m.requests.clear()
    m.rm._broker_epoch = lambda: 8
    m.answer = refuse_each
    m.rm._send_isr_changes(full=False)
    assert m.sent == ["b", "a"]
    assert m.requests[0].broker_epoch == 8
    assert all(p.pending_isr is None for p in parts)


@pytest.mark.parametrize(
    "lost",
    [
        UnknownOutcomeError("the controller died mid-request"),
        RequestTimedOutError("no controller answered"),
        controller_pb2.AlterPartitionResponse(
            error=common_pb2.Error(code=common_pb2.UNKNOWN_OUTCOME, message="lost leadership")
        ),
    ],
)
def test_changes_of_unknown_outcome_are_sent_again_unchanged(tmp_path: Path, lost: Any) -> None:
    parts = [joinable_partition(tmp_path, t) for t in ("a", "b")]
    m = Manager(parts)

    def answer(request: controller_pb2.AlterPartitionRequest) -> Any:
        if isinstance(lost, Exception):
            raise lost
        return lost

    m.answer = answer
    m.rm._send_isr_changes(full=True)
    first = list(m.requests[0].changes)
    assert all(p.pending_isr == (1, 2) for p in parts)  # the ISR stays the maximal one
    assert set(m.rm._unsettled) == {("a", 0), ("b", 0)}
    m.requests.clear()
    m.answer = refuse_each
    m.rm._send_isr_changes(full=False)
    again = sorted(m.requests[0].changes, key=lambda c: c.topic)
    assert again == sorted(first, key=lambda c: c.topic)  # the same changes, as they were
    assert m.rm._unsettled == {}


def test_a_change_a_lost_answer_committed_stays_pending_until_the_metadata_says_so(
    tmp_path: Path,
) -> None:
    """The first send committed but its answer was lost; the second is refused for
    its now stale partition epoch. Going back to the old ISR then would let the high
    watermark (and acks=all) pass a follower that the committed ISR holds."""
    partition = joinable_partition(tmp_path, "a")
    m = Manager([partition])

    def lost(request: controller_pb2.AlterPartitionRequest) -> Any:
        raise UnknownOutcomeError("the answer was lost; the controller committed it")

    m.answer = lost
    m.rm._send_isr_changes(full=True)
    m.answer = lambda request: refuse_each(request, common_pb2.INVALID_UPDATE_VERSION)
    m.rm._send_isr_changes(full=False)
    assert len(m.requests) == 2
    assert partition.pending_isr == (1, 2)
    m.rm._send_isr_changes(full=True)
    assert len(m.requests) == 2, "waits for the metadata, not sent again"
    leo = partition.log.log_end_offset
    partition.append_as_leader(encode_batch([Record(None, b"v", (), 1_000)]), acks=1)
    assert partition.high_watermark == leo, "the follower counts while it may be in the ISR"
    partition.become_leader(PartitionRegistration((1, 2), (1, 2), 1, 0, 1), partition.settings)
    assert (partition.isr, partition.partition_epoch, partition.pending_isr) == ((1, 2), 1, None)


def test_a_request_too_large_for_the_controller_goes_in_halves(tmp_path: Path) -> None:
    parts = [joinable_partition(tmp_path, t) for t in ("a", "b", "c")]
    m = Manager(parts)

    def answer(request: controller_pb2.AlterPartitionRequest) -> Any:
        if len(request.changes) > 1:
            return controller_pb2.AlterPartitionResponse(
                error=common_pb2.Error(code=common_pb2.POLICY_VIOLATION, message="too many")
            )
        return refuse_each(request)

    m.answer = answer
    m.rm._send_isr_changes(full=True)
    assert [len(r.changes) for r in m.requests] == [3, 1, 2, 1, 1]
    assert sorted(c.topic for r in m.requests[1:] if len(r.changes) == 1 for c in r.changes) == [
        "a",
        "b",
        "c",
    ]
    assert all(p.pending_isr is None for p in parts)


def test_a_failing_request_does_not_strand_the_ones_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replica_manager, "ISR_CHANGES_PER_REQUEST", 1)
    parts = [joinable_partition(tmp_path, t) for t in ("a", "b")]
    m = Manager(parts)

    def answer(request: controller_pb2.AlterPartitionRequest) -> Any:
        if len(m.requests) == 1:
            raise RuntimeError("a bug")
        return refuse_each(request)

    m.answer = answer
    m.rm._send_isr_changes(full=True)
    assert len(m.requests) == 2
    assert set(m.rm._unsettled) == {(m.requests[0].changes[0].topic, 0)}


def test_the_first_change_goes_in_the_one_change_form_too(tmp_path: Path) -> None:
    m = Manager([joinable_partition(tmp_path, t) for t in ("a", "b")])
    m.rm._send_isr_changes(full=True)
    (request,) = m.requests
    first = request.changes[0]
    assert (request.topic, request.partition, list(request.new_isr), request.topic_id) == (
        first.topic,
        first.partition,
        list(first.new_isr),
        first.topic_id,
    )
    assert (request.leader_epoch, request.partition_epoch) == (
        first.leader_epoch,
        first.partition_epoch,
    )


@pytest.mark.parametrize("accepted", [True, False])
def test_a_controller_of_the_version_before_settles_the_first_change(
    tmp_path: Path, accepted: bool
) -> None:
    """It reads only the one-change fields and answers in the one-change form: the
    first change is settled by that answer, the others are sent again."""
    parts = {t: joinable_partition(tmp_path, t) for t in ("a", "b", "c")}
    m = Manager(list(parts.values()))

    def older(request: controller_pb2.AlterPartitionRequest) -> Any:
        if not accepted:
            return controller_pb2.AlterPartitionResponse(
                error=common_pb2.Error(code=common_pb2.INELIGIBLE_REPLICA, message="fenced")
            )
        return controller_pb2.AlterPartitionResponse(
            leader=1,
            leader_epoch=request.leader_epoch,
            partition_epoch=request.partition_epoch + 1,
            isr=request.new_isr,
        )

    m.answer = older
    m.rm._send_isr_changes(full=True)
    # It reads only the first change; the others follow at once, one a request.
    assert [len(r.changes) for r in m.requests] == [3, 1, 1]
    assert sorted(r.topic for r in m.requests) == ["a", "b", "c"]
    for partition in parts.values():
        assert partition.pending_isr is None
        assert partition.isr == ((1, 2) if accepted else (1,))
