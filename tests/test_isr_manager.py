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
from pathlib import Path
from types import SimpleNamespace

import pytest

from broker.local_changes import LocalChanges
from broker.log_manager import LogManager
from broker.partition import IsrChange, Partition, PartitionSettings
from broker.replica_manager import BrokerSettings, ReplicaManager
from broker.storage.log import LogConfig, PartitionLog
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
    """A ReplicaManager reduced to its ISR pass; sent changes are recorded."""

    def __init__(self, partitions: list[Partition]):
        rm = object.__new__(ReplicaManager)
        rm._partitions = {(p.topic, p.index): p for p in partitions}
        rm._isr_wake = threading.Event()
        rm._isr_due = set()
        rm._isr_due_lock = threading.Lock()
        rm._isr_eligible = None
        rm._unsettled = {}
        self.brokers = {1: broker(1), 2: broker(2)}
        rm._image = lambda: SimpleNamespace(brokers=self.brokers)
        self.sent: list[str] = []

        def send(partition: Partition, change: IsrChange) -> None:
            self.sent.append(change.topic)
            partition.isr_change_done(change, None, -1)  # refused: due again later

        rm._send_isr_change = send
        self.rm = rm


def test_only_marked_partitions_are_looked_at_between_full_passes(tmp_path: Path) -> None:
    m = Manager([joinable_partition(tmp_path, t) for t in ("a", "b", "c")])
    m.rm._send_isr_changes(full=False)  # first pass: eligibility is new, so all
    assert sorted(m.sent) == ["a", "b", "c"]
    m.sent.clear()
    m.rm._send_isr_changes(full=False)
    assert m.sent == []  # nothing marked, nobody changed
    m.rm._check_isr([("b", 0), ("gone", 0)])
    assert m.rm._isr_wake.is_set()
    m.rm._send_isr_changes(full=False)
    assert m.sent == ["b"]
    m.sent.clear()
    m.rm._send_isr_changes(full=True)
    assert sorted(m.sent) == ["a", "b", "c"]


def test_a_change_in_who_may_join_looks_at_every_partition(tmp_path: Path) -> None:
    m = Manager([joinable_partition(tmp_path, t) for t in ("a", "b")])
    m.rm._send_isr_changes(full=False)
    m.sent.clear()
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


def test_many_due_isr_changes_go_out_together(tmp_path: Path) -> None:
    """A restarted follower catches up on thousands of partitions at once: their
    expansions are sent several at a time, not one controller round trip after
    another, and every one is sent."""
    from broker.replica_manager import ISR_CHANGES_IN_FLIGHT

    topics = [f"t{i}" for i in range(40)]
    m = Manager([joinable_partition(tmp_path, t) for t in topics])
    in_flight = [0]
    most = [0]
    lock = threading.Lock()
    ready = threading.Barrier(2, timeout=5)  # two calls at once, or the test fails
    sent: list[str] = []

    def send(partition: Partition, change: IsrChange) -> None:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            sent.append(change.topic)
        if len(sent) <= 2:
            ready.wait()
        with lock:
            in_flight[0] -= 1
        partition.isr_change_done(change, None, -1)

    m.rm._send_isr_change = send
    m.rm._send_isr_changes(full=True)
    assert sorted(sent) == sorted(topics)
    assert 2 <= most[0] <= ISR_CHANGES_IN_FLIGHT
