"""The broker's data plane: hosted partitions, produce, fetch, list offsets, ISR changes.

Metadata changes arrive as ``LocalChanges`` (on the metadata follower's
thread); requests arrive on gRPC threads and wait here when they must
(``acks=all`` for the in-sync replicas, long-poll fetch for data). Background
threads: the ISR manager (asks the controller to shrink or expand ISRs), the
high watermark checkpointer, and log maintenance (retention, compaction).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from raftka.v1 import broker_pb2, common_pb2, controller_pb2

from broker.fetch_session import FetchSession, Key
from broker.fetcher import FetcherSettings, ReplicaFetcher
from broker.local_changes import LocalChanges, TopicPartition
from broker.log_manager import LogManager
from broker.partition import (
    HIGH_WATERMARK,
    LEADER,
    STATE,
    AppendResult,
    IsrChange,
    Partition,
    PartitionError,
    PartitionSettings,
    Waiter,
    now_ms,
)
from broker.replication_link import REPLICATION_LISTENER
from broker.storage.log import LogConfig
from client.errors import RaftkaError
from quorum.config import NodeConfig
from quorum.image import NO_LEADER, MetadataImage, PartitionRegistration

log = logging.getLogger(__name__)

CONSUMER = -1
_MAX_WAIT_MS = 30_000
# ISR changes one AlterPartition request carries at most. A leader sends all it has
# pending together, as Kafka's does; the bound keeps each request's metadata batch
# moderate (a broker restarted with 30,000 replicas is due to rejoin them all at once).
ISR_CHANGES_PER_REQUEST = 1000
# How a leader takes a refused ISR change, as Kafka's Partition.handleAlterPartitionError.
# The controller checks a change's epochs first, so these refusals mean the epochs
# were the current ones: neither this send nor an earlier one of the same change was
# applied, and the leader goes back to its committed ISR.
_ISR_CHANGE_NOT_APPLIED = frozenset({common_pb2.INELIGIBLE_REPLICA, common_pb2.INVALID_REQUEST})
# These mean the leader's view is behind the controller's, perhaps because an earlier
# send whose answer was lost committed the change: it stays pending (the high
# watermark counts the maximal ISR) until the metadata brings the partition's state.
# Going back to the old ISR instead could acknowledge acks=all writes that a replica
# in the committed ISR does not have. Any other refusal is sent again.
_ISR_CHANGE_AWAITS_METADATA = frozenset(
    {
        common_pb2.FENCED_LEADER_EPOCH,
        common_pb2.INVALID_UPDATE_VERSION,
        common_pb2.NOT_LEADER_OR_FOLLOWER,
        common_pb2.UNKNOWN_TOPIC_OR_PARTITION,
        common_pb2.UNKNOWN_TOPIC_ID,
    }
)
# Refusals of one change that a controller of this version never gives a whole
# request (NOT_LEADER_OR_FOLLOWER it does: the broker is fenced).
_ONE_CHANGE_REFUSALS = (_ISR_CHANGE_NOT_APPLIED | _ISR_CHANGE_AWAITS_METADATA) - {
    common_pb2.NOT_LEADER_OR_FOLLOWER
}


def _error(code: str | int, message: str = "") -> common_pb2.Error:
    value = common_pb2.ErrorCode.Value(code) if isinstance(code, str) else code
    return common_pb2.Error(code=value, message=message)


_OK = common_pb2.Error()


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """The broker-level defaults the data plane reads, from a ``NodeConfig``."""

    log_config: LogConfig
    partition: PartitionSettings
    fetcher: FetcherSettings
    replica_lag_time_max_ms: int
    retention_ms: int
    retention_bytes: int
    retention_check_interval_ms: int
    hw_checkpoint_interval_ms: int
    cleanup_policy: str
    delete_retention_ms: int

    @classmethod
    def from_config(cls, config: NodeConfig) -> BrokerSettings:
        flush_messages = config["log.flush.interval.messages"]
        flush_ms = config["log.flush.interval.ms"]
        return cls(
            log_config=LogConfig(
                segment_bytes=config["log.segment.bytes"],
                segment_ms=config["log.roll.ms"],
                flush_messages=flush_messages or None,
                flush_ms=flush_ms or None,
            ),
            partition=PartitionSettings(
                min_insync_replicas=config["min.insync.replicas"],
                max_message_bytes=config["message.max.bytes"],
                log_append_time=config["log.message.timestamp.type"] == "LogAppendTime",
                unclean_leader_election=bool(config["unclean.leader.election.enable"]),
            ),
            fetcher=FetcherSettings(
                max_wait_ms=config["replica.fetch.wait.max.ms"],
                partition_max_bytes=config["replica.fetch.max.bytes"],
                response_max_bytes=config["replica.fetch.response.max.bytes"],
                backoff_ms=config["replica.fetch.backoff.ms"],
            ),
            replica_lag_time_max_ms=config["replica.lag.time.max.ms"],
            retention_ms=config["log.retention.ms"],
            retention_bytes=config["log.retention.bytes"],
            retention_check_interval_ms=config["log.retention.check.interval.ms"],
            hw_checkpoint_interval_ms=config["replica.high.watermark.checkpoint.interval.ms"],
            cleanup_policy=str(config["log.cleanup.policy"]),
            delete_retention_ms=config["log.cleaner.delete.retention.ms"],
        )


def log_config_for(configs: dict[str, str] | None, default: LogConfig) -> LogConfig:
    configs = configs or {}

    def number(name: str, fallback: int | None) -> int | None:
        value = configs.get(name)
        return fallback if value is None else int(value)

    return LogConfig(
        segment_bytes=number("segment.bytes", default.segment_bytes) or default.segment_bytes,
        segment_ms=number("segment.ms", default.segment_ms) or default.segment_ms,
        index_interval_bytes=default.index_interval_bytes,
        flush_messages=number("flush.messages", default.flush_messages),
        flush_ms=number("flush.ms", default.flush_ms),
    )


class ReplicaManager:
    def __init__(
        self,
        broker_id: int,
        settings: BrokerSettings,
        logs: LogManager,
        *,
        image: Callable[[], MetadataImage],
        broker_epoch: Callable[[], int],
        caught_up: Callable[[], bool] = lambda: True,
        alter_partition: Callable[
            [controller_pb2.AlterPartitionRequest], controller_pb2.AlterPartitionResponse
        ],
        dial: Callable[[str], str] = lambda address: address,
    ):
        self.broker_id = broker_id
        self.settings = settings
        self.logs = logs
        self._image = image
        self._broker_epoch = broker_epoch
        self.caught_up = caught_up
        self._alter_partition = alter_partition
        # The address to dial for a leader's advertised one (network.dial.overrides).
        self._dial = dial
        self._partitions: dict[TopicPartition, Partition] = {}
        self._lock = threading.RLock()
        self._fetchers: dict[tuple[int, str], ReplicaFetcher] = {}
        # Fetchers whose partitions the change being applied added or removed; told
        # once at its end.
        self._changed_fetchers: set[ReplicaFetcher] = set()
        self._following: dict[TopicPartition, tuple[int, str]] = {}
        self._stopped = threading.Event()
        self._isr_wake = threading.Event()
        # Leader partitions whose ISR may have to change, checked on the ISR
        # thread's next pass; all of them are checked every quarter of
        # replica.lag.time.max.ms (a follower falls behind by time alone) and
        # when the set of brokers that may join an ISR changes.
        self._isr_due: set[TopicPartition] = set()
        self._isr_due_lock = threading.Lock()
        self._isr_eligible: frozenset[int] | None = None
        self._threads: list[threading.Thread] = []
        # What the high-watermark checkpoint files hold, as last written.
        self._checkpointed_hws: dict[TopicPartition, int] | None = None
        self._unsettled: dict[TopicPartition, tuple[Partition, IsrChange]] = {}
        # Told (topic, partition) and the new role ("leader", "follower", "deleted")
        # after each change is applied, on the metadata thread: the group coordinator.
        self.role_listeners: list[Callable[[TopicPartition, str], None]] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.logs.load()
        for target, name in (
            (self._isr_loop, "isr"),
            (self._checkpoint_loop, "hw-checkpoint"),
            (self._maintenance_loop, "log-maintenance"),
        ):
            thread = threading.Thread(
                target=target, name=f"broker-{self.broker_id}-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopped.set()
        self._isr_wake.set()
        with self._lock:
            fetchers = list(self._fetchers.values())
            self._fetchers.clear()
        for fetcher in fetchers:
            fetcher.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        self._checkpoint_hws()
        with self._lock:
            for partition in self._partitions.values():
                try:
                    partition.close()
                except (OSError, ValueError) as e:
                    log.warning("closing %s: %s", partition, e)
            self._partitions.clear()
        self.logs.close()

    def partitions(self) -> dict[TopicPartition, Partition]:
        with self._lock:
            return dict(self._partitions)

    def get(self, topic: str, index: int) -> Partition | None:
        return self._partitions.get((topic, index))

    # ------------------------------------------------------------------ metadata

    def apply(self, changes: LocalChanges, image: MetadataImage) -> None:
        """Apply partition changes for this broker (on the metadata follower's thread)."""
        with self._lock:
            try:
                # One partition that fails (its disk, no file descriptor left) must not
                # stop the others' changes. A deleted log is not flushed first.
                for key in sorted(changes.deletes):
                    self._stop_following(key)
                    partition = self._partitions.pop(key, None)
                    if partition is not None:
                        try:
                            partition.close(flush=False)
                        except OSError as e:
                            log.warning("%s-%d: closing the log to delete it: %s", *key, e)
                    try:
                        self.logs.delete(*key)
                    except OSError as e:
                        log.error("%s-%d: cannot delete the log: %s", *key, e)
                for key, reg in sorted(changes.leaders.items()):
                    try:
                        self._lead(key, reg, changes.topic_ids[key[0]], image)
                    except (OSError, ValueError) as e:
                        log.error("%s-%d: cannot become leader: %s", *key, e)
                for key, reg in sorted(changes.followers.items()):
                    try:
                        self._follow_changed(key, reg, changes.topic_ids[key[0]], image)
                    except (OSError, ValueError) as e:
                        log.error("%s-%d: cannot become follower: %s", *key, e)
            finally:
                # Also after an unexpected error: what was added must be fetched.
                changed, self._changed_fetchers = self._changed_fetchers, set()
                for fetcher in changed:
                    fetcher.changed()
                self._drop_idle_fetchers()
        self._check_isr(changes.leaders)
        if self.role_listeners:
            roles = {key: "deleted" for key in changes.deletes}
            roles.update({key: "leader" for key in changes.leaders})
            roles.update({key: "follower" for key in changes.followers})
            for key, role in sorted(roles.items()):
                for listener in self.role_listeners:
                    try:
                        listener(key, role)
                    except Exception:
                        log.exception("%s-%d: a role listener failed", *key)

    def _lead(
        self, key: TopicPartition, reg: PartitionRegistration, topic_id: str, image: MetadataImage
    ) -> None:
        partition = self._partition(key, topic_id, image)
        if partition is None:
            return
        self._stop_following(key)
        if partition.become_leader(reg, self._partition_settings(image, key[0])):
            log.debug("%s-%d: leader at epoch %d", *key, reg.leader_epoch)

    def _follow_changed(
        self, key: TopicPartition, reg: PartitionRegistration, topic_id: str, image: MetadataImage
    ) -> None:
        partition = self._partition(key, topic_id, image)
        if partition is None:
            return
        changed = partition.become_follower(reg, self._partition_settings(image, key[0]))
        if changed or key not in self._following:
            self._follow(key, partition, reg, image)

    def _partition(
        self, key: TopicPartition, topic_id: str, image: MetadataImage
    ) -> Partition | None:
        partition = self._partitions.get(key)
        if partition is not None and partition.topic_id == topic_id:
            return partition
        if partition is not None:  # The topic was re-created under its name.
            self._stop_following(key)
            partition.close()
            self.logs.delete(*key)
        configs = dict(image.topic_configs(key[0]))
        try:
            partition_log = self.logs.get_or_create(
                key[0],
                key[1],
                topic_id,
                log_config_for(configs, self.settings.log_config),
            )
        except (OSError, ValueError) as e:
            log.error("%s-%d: cannot open the log: %s", *key, e)
            return None
        partition = Partition(
            key[0],
            key[1],
            topic_id,
            partition_log,
            self.broker_id,
            self._partition_settings(image, key[0]),
            replica_lag_time_max_ms=self.settings.replica_lag_time_max_ms,
        )
        saved = self.logs.saved_high_watermark(key)
        partition.high_watermark = min(saved, partition_log.log_end_offset)
        self._partitions[key] = partition
        return partition

    def _partition_settings(self, image: MetadataImage, topic: str) -> PartitionSettings:
        return PartitionSettings.from_configs(image.topic_configs(topic), self.settings.partition)

    def _follow(
        self,
        key: TopicPartition,
        partition: Partition,
        reg: PartitionRegistration,
        image: MetadataImage,
    ) -> None:
        self._stop_following(key)
        if reg.leader == NO_LEADER or reg.leader == self.broker_id:
            return
        broker = image.brokers.get(reg.leader)
        if broker is None:
            log.warning("%s-%d: leader %d is not registered", *key, reg.leader)
            return
        # Its replication listener when it has one (broker/replication_link.py).
        endpoint = broker.endpoint(REPLICATION_LISTENER)
        link = endpoint is not None
        endpoint = endpoint or broker.endpoint()
        if endpoint is None:
            log.warning("%s-%d: leader %d has no listener", *key, reg.leader)
            return
        source = (reg.leader, self._dial(f"{endpoint.host}:{endpoint.port}"))
        fetcher = self._fetchers.get(source)
        if fetcher is None:
            fetcher = ReplicaFetcher(
                self.broker_id,
                self._broker_epoch,
                source[0],
                source[1],
                self.settings.fetcher,
                link=link,
            )
            fetcher.start()
            self._fetchers[source] = fetcher
        fetcher.add(partition, reg.leader_epoch, notify=False)
        self._changed_fetchers.add(fetcher)
        self._following[key] = source

    def _stop_following(self, key: TopicPartition) -> None:
        source = self._following.pop(key, None)
        if source is not None:
            fetcher = self._fetchers.get(source)
            if fetcher is not None and fetcher.remove(key, notify=False):
                self._changed_fetchers.add(fetcher)

    def _drop_idle_fetchers(self) -> None:
        for source, fetcher in list(self._fetchers.items()):
            if fetcher.is_empty():
                del self._fetchers[source]
                threading.Thread(target=fetcher.stop, daemon=True).start()

    # ------------------------------------------------------------------ produce

    def produce(self, request: broker_pb2.ProduceRequest) -> broker_pb2.ProduceResponse:
        acks = request.acks
        if acks not in (-1, 0, 1):
            error = _error("INVALID_REQUIRED_ACKS", f"acks must be -1 (all), 0 or 1, not {acks}")
            return _produce_errors(request, error)
        appended: list[tuple[broker_pb2.PartitionProduceResponse, Partition, AppendResult]] = []
        response = broker_pb2.ProduceResponse()
        for topic_data in request.topics:
            topic_response = response.topics.add(topic=topic_data.topic)
            for part in topic_data.partitions:
                answer = topic_response.partitions.add(
                    partition=part.partition, base_offset=-1, log_append_time_ms=-1
                )
                partition = self._partitions.get((topic_data.topic, part.partition))
                if partition is None:
                    self._set_unknown(answer, topic_data.topic, part.partition)
                    continue
                try:
                    result = partition.append_as_leader(part.records, acks)
                except PartitionError as e:
                    _fill_error(answer, e)
                    continue
                answer.base_offset = result.base_offset
                answer.log_append_time_ms = result.log_append_time_ms
                answer.log_start_offset = partition.log.log_start_offset
                appended.append((answer, partition, result))
        if acks == -1 and appended:
            self._await_replication(appended, request.timeout_ms)
        return response

    def _await_replication(
        self,
        appended: list[tuple[broker_pb2.PartitionProduceResponse, Partition, AppendResult]],
        timeout_ms: int,
    ) -> None:
        deadline = time.monotonic() + max(timeout_ms, 0) / 1000
        waiter = Waiter(HIGH_WATERMARK | STATE)
        waiting = list(appended)
        for _, partition, _ in waiting:
            partition.add_waiter(waiter)
        try:
            while waiting:
                waiter.take()
                still = []
                for item in waiting:
                    answer, partition, result = item
                    outcome = partition.acks_reached(result.last_offset, result.leader_epoch)
                    if outcome is None:
                        still.append(item)
                    elif outcome != "NONE":
                        answer.error.CopyFrom(_error(outcome, _ACK_MESSAGES[outcome]))
                        answer.base_offset = -1
                waiting = still
                remaining = deadline - time.monotonic()
                if not waiting:
                    break
                if remaining <= 0:
                    for answer, partition, result in waiting:
                        answer.error.CopyFrom(
                            _error(
                                "REQUEST_TIMED_OUT",
                                f"the in-sync replicas of {partition.topic}-{partition.index} "
                                f"did not reach offset {result.last_offset} within {timeout_ms} ms",
                            )
                        )
                        answer.base_offset = -1
                    break
                waiter.wait(remaining)
        finally:
            for _, partition, _ in appended:
                partition.remove_waiter(waiter)

    def _set_unknown(
        self,
        answer: broker_pb2.PartitionProduceResponse
        | broker_pb2.FetchPartitionResponse
        | broker_pb2.ListOffsetsPartitionResponse,
        topic: str,
        index: int,
    ) -> None:
        image = self._image()
        t = image.topic_by_name(topic)
        reg = None if t is None else t.partitions.get(index)
        if reg is None:
            answer.error.CopyFrom(
                _error("UNKNOWN_TOPIC_OR_PARTITION", f"this broker does not know {topic}-{index}")
            )
        else:
            answer.error.CopyFrom(
                _error(
                    "NOT_LEADER_OR_FOLLOWER",
                    f"broker {self.broker_id} does not host {topic}-{index} (leader {reg.leader})",
                )
            )
            if hasattr(answer, "current_leader"):
                answer.current_leader.leader_id = reg.leader
                answer.current_leader.leader_epoch = reg.leader_epoch

    # ------------------------------------------------------------------ fetch

    def fetch(self, request: broker_pb2.FetchRequest) -> broker_pb2.FetchResponse:
        if request.incremental:
            return broker_pb2.FetchResponse(
                error=_error("INVALID_REQUEST", "an incremental fetch needs a FetchStream session")
            )
        replica_id = request.replica_id
        if replica_id != CONSUMER:
            refusal = self._check_replica(replica_id, request.replica_epoch)
            if refusal is not None:
                return broker_pb2.FetchResponse(error=refusal)
        # A long poll holds a server thread: bounded whatever the client asks.
        deadline = time.monotonic() + min(max(request.max_wait_ms, 0), _MAX_WAIT_MS) / 1000
        max_bytes = request.max_bytes if request.max_bytes > 0 else 50 * 1024 * 1024
        targets: list[
            tuple[broker_pb2.FetchPartitionResponse, Partition | None, broker_pb2.FetchPartition]
        ] = []
        response = broker_pb2.FetchResponse()
        for topic in request.topics:
            topic_response = response.topics.add(topic=topic.topic)
            for part in topic.partitions:
                answer = topic_response.partitions.add(partition=part.partition)
                partition = self._partitions.get((topic.topic, part.partition))
                if partition is None:
                    self._set_unknown(answer, topic.topic, part.partition)
                elif topic.topic_id and topic.topic_id != partition.topic_id:
                    answer.error.CopyFrom(
                        _error(
                            "UNKNOWN_TOPIC_ID", f"{topic.topic} is not topic id {topic.topic_id}"
                        )
                    )
                    partition = None
                targets.append((answer, partition, part))
        # A consumer reads up to the high watermark: an append alone shows it nothing.
        waiter = Waiter(HIGH_WATERMARK | STATE) if replica_id == CONSUMER else Waiter()
        live = [p for _, p, _ in targets if p is not None]
        for partition in live:
            partition.add_waiter(waiter)
        min_bytes = max(request.min_bytes, 1)
        try:
            total, stop = self._read_all(targets, replica_id, max_bytes, first=True)
            while not stop and total < min_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not waiter.wait(remaining):
                    break
                # Read again only what changed since (an append, a moved high
                # watermark, a role change), not every partition asked for.
                changed = waiter.take()
                again = [t for t in targets if t[1] in changed]
                used = total - sum(len(answer.records) for answer, _, _ in again)
                total, stop = self._read_all(again, replica_id, max_bytes, first=False, used=used)
        finally:
            for partition in live:
                partition.remove_waiter(waiter)
        return response

    def new_fetch_session(self) -> FetchSession:
        """State for one FetchStream; ``close()`` it when the stream ends."""
        return FetchSession(self.settings.replica_lag_time_max_ms / 4000)

    def fetch_in_session(
        self, session: FetchSession, request: broker_pb2.FetchRequest
    ) -> broker_pb2.FetchResponse:
        """A fetch on a FetchStream: a follower's reads only what changed (KIP-227,
        see broker/fetch_session.py); a consumer's is a plain fetch."""
        if request.replica_id == CONSUMER and not request.incremental:
            return self.fetch(request)
        if request.incremental and (
            request.replica_id == CONSUMER
            or not session.started
            or request.replica_id != session.replica_id
        ):
            session.reset()
            return broker_pb2.FetchResponse(
                error=_error(
                    "INVALID_REQUEST",
                    "an incremental fetch needs a full one from the same follower before it",
                )
            )
        refusal = self._check_replica(request.replica_id, request.replica_epoch)
        if refusal is not None:
            session.reset()
            return broker_pb2.FetchResponse(error=refusal)
        deadline = time.monotonic() + min(max(request.max_wait_ms, 0), _MAX_WAIT_MS) / 1000
        max_bytes = request.max_bytes if request.max_bytes > 0 else 50 * 1024 * 1024
        min_bytes = max(request.min_bytes, 1)
        listed = session.take_request(request)
        changed = session.changed()
        # Partitions left unread for lack of room last time go first, so that none
        # starves behind partitions with more to send.
        pending = [key for key in session.take_pending() if key in session.asked]
        if session.full_pass_due(time.monotonic()):
            rest = set(pending)
            work = pending + [key for key in session.asked if key not in rest]
        else:
            unhosted = sorted(key for key in session.unhosted if key in session.asked)
            work = list(dict.fromkeys([*pending, *listed, *unhosted, *sorted(changed)]))
        answers: dict[Key, broker_pb2.FetchPartitionResponse] = {}
        total, stop = self._read_session(session, work, answers, max_bytes, first=True, used=0)
        while not stop and total < min_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            woken = session.waiter.wait(remaining)
            # Also when the wait ran out: a high watermark that moved meanwhile
            # (noted, not woken for) goes in this answer.
            again = sorted(session.changed())
            if again:
                used = total - sum(len(answers[k].records) for k in again if k in answers)
                total, stop = self._read_session(
                    session, again, answers, max_bytes, first=False, used=used
                )
            if not woken:
                break
        listed_keys = set(listed)
        by_topic: dict[str, list[broker_pb2.FetchPartitionResponse]] = {}
        for key, answer in answers.items():
            if key in session.pending:
                continue  # Not read: it is read first next time, and told then.
            if session.should_tell(key, answer, key in listed_keys):
                by_topic.setdefault(key[0], []).append(answer)
        response = broker_pb2.FetchResponse(in_session=True)
        for topic, parts in by_topic.items():
            response.topics.add(topic=topic).partitions.extend(parts)
        return response

    def _read_session(
        self,
        session: FetchSession,
        keys: list[Key],
        answers: dict[Key, broker_pb2.FetchPartitionResponse],
        max_bytes: int,
        first: bool,
        used: int,
    ) -> tuple[int, bool]:
        """Read these partitions of the session into ``answers``; as ``_read_all``."""
        targets = []
        for key in keys:
            topic_id, part = session.asked[key]
            answer = broker_pb2.FetchPartitionResponse(partition=key[1])
            partition = self._partitions.get(key)
            if partition is None:
                self._set_unknown(answer, *key)
            elif topic_id and topic_id != partition.topic_id:
                answer.error.CopyFrom(
                    _error("UNKNOWN_TOPIC_ID", f"{key[0]} is not topic id {topic_id}")
                )
                partition = None
            session.watch(key, partition)
            answers[key] = answer
            session.pending.discard(key)
            targets.append((answer, partition, part))
        assert session.replica_id is not None
        skipped: list[broker_pb2.FetchPartitionResponse] = []
        result = self._read_all(
            targets, session.replica_id, max_bytes, first=first, used=used, skipped=skipped
        )
        if skipped:
            unread = {id(answer) for answer in skipped}
            session.pending.update(key for key in keys if id(answers[key]) in unread)
        return result

    def _read_all(
        self,
        targets: list[
            tuple[broker_pb2.FetchPartitionResponse, Partition | None, broker_pb2.FetchPartition]
        ],
        replica_id: int,
        max_bytes: int,
        first: bool,
        used: int = 0,
        skipped: list[broker_pb2.FetchPartitionResponse] | None = None,
    ) -> tuple[int, bool]:
        """Read these partitions once; (bytes in the answer, whether to answer now
        regardless). ``used``: bytes already in the answer from other partitions;
        ``skipped`` collects the answers of partitions left unread for lack of room."""
        total = used
        stop = False
        for answer, partition, part in targets:
            if partition is None:
                stop = True
                continue
            budget = min(part.partition_max_bytes or max_bytes, max_bytes - total)
            if budget <= 0 and total > 0:
                answer.records = b""
                if skipped is not None:
                    skipped.append(answer)
                continue
            budget = max(budget, 1)
            try:
                if replica_id == CONSUMER:
                    data, hw, log_start, leo = partition.read_for_consumer(
                        part.fetch_offset, part.current_leader_epoch, budget
                    )
                    answer.records = data
                    answer.high_watermark = hw
                    answer.log_start_offset = log_start
                    answer.log_end_offset = leo
                else:
                    read = partition.read_for_follower(
                        replica_id,
                        part.fetch_offset,
                        part.last_fetched_epoch,
                        part.current_leader_epoch,
                        part.log_start_offset,
                        budget,
                        update_state=first,
                    )
                    answer.records = read.records
                    answer.high_watermark = read.high_watermark
                    answer.log_start_offset = read.log_start_offset
                    answer.log_end_offset = read.log_end_offset
                    if read.diverging is not None:
                        answer.diverging_epoch.epoch = read.diverging[0]
                        answer.diverging_epoch.end_offset = read.diverging[1]
                        stop = True
                    if read.may_join_isr:
                        self._check_isr(((partition.topic, partition.index),))
                answer.ClearField("error")
                total += len(answer.records)
            except PartitionError as e:
                _fill_error(answer, e)
                answer.log_start_offset = partition.log.log_start_offset
                answer.log_end_offset = partition.log.log_end_offset
                answer.high_watermark = partition.high_watermark
                stop = True
            except OSError as e:
                answer.error.CopyFrom(
                    _error("KAFKA_STORAGE_ERROR", f"{partition.topic}-{partition.index}: {e}")
                )
                stop = True
        return total, stop

    def _check_replica(self, replica_id: int, replica_epoch: int) -> common_pb2.Error | None:
        broker = self._image().brokers.get(replica_id)
        if broker is None:
            return _error("BROKER_ID_NOT_REGISTERED", f"broker {replica_id} is not registered")
        if replica_epoch >= 0 and replica_epoch < broker.broker_epoch:
            return _error(
                "STALE_BROKER_EPOCH",
                f"broker {replica_id} fetches as epoch {replica_epoch}, "
                f"registered as {broker.broker_epoch}",
            )
        return None

    # ------------------------------------------------------------------ list offsets

    def list_offsets(
        self, request: broker_pb2.ListOffsetsRequest
    ) -> broker_pb2.ListOffsetsResponse:
        response = broker_pb2.ListOffsetsResponse()
        for topic in request.topics:
            topic_response = response.topics.add(topic=topic.topic)
            for part in topic.partitions:
                answer = topic_response.partitions.add(
                    partition=part.partition, timestamp=-1, offset=-1
                )
                partition = self._partitions.get((topic.topic, part.partition))
                if partition is None:
                    self._set_unknown(answer, topic.topic, part.partition)
                    continue
                try:
                    stamp, offset, epoch = partition.list_offset(
                        part.timestamp, part.current_leader_epoch, request.replica_id != CONSUMER
                    )
                except PartitionError as e:
                    _fill_error(answer, e)
                    continue
                answer.timestamp = stamp
                answer.offset = offset
                answer.leader_epoch = epoch
        return response

    # ------------------------------------------------------------------ ISR

    def _check_isr(self, keys: Iterable[TopicPartition]) -> None:
        """Have the ISR thread look at these partitions now (from any thread)."""
        with self._isr_due_lock:
            self._isr_due.update(keys)
        self._isr_wake.set()

    def _isr_loop(self) -> None:
        interval = max(self.settings.replica_lag_time_max_ms / 4000, 0.05)
        next_full = time.monotonic()
        while not self._stopped.is_set():
            wait = max(0.0, next_full - time.monotonic())
            self._isr_wake.wait(min(wait, 0.5) if self._unsettled else wait)
            self._isr_wake.clear()
            if self._stopped.is_set():
                return
            full = time.monotonic() >= next_full
            if full:
                next_full = time.monotonic() + interval
            try:
                self._send_isr_changes(full)
            except Exception:
                log.exception("ISR manager failed; retrying")
                self._stopped.wait(0.5)

    def _send_isr_changes(self, full: bool = True) -> None:
        """Ask for the ISR changes that are due: on the partitions marked by
        ``_check_isr``, or on every partition this broker leads when ``full``.

        A metadata change or a follower's fetch concerns a few partitions, so
        only those are looked at; looking at all of them on every change cost
        a broker leading a thousand partitions milliseconds of CPU per change.
        """
        with self._isr_due_lock:
            due, self._isr_due = self._isr_due, set()
        image = self._image()
        eligible = frozenset(
            b.broker_id
            for b in image.brokers.values()
            if not b.fenced and not b.in_controlled_shutdown
        )
        if eligible != self._isr_eligible:
            # A broker was unfenced (it may join ISRs) or left: look at all.
            self._isr_eligible = eligible
            full = True
        now = now_ms()
        # Changes whose outcome is unknown go again first, unchanged: the controller
        # may have committed them, and until it is known the ISR stays the maximal one.
        sending: list[tuple[Partition, IsrChange]] = []
        for key, (partition, change) in list(self._unsettled.items()):
            del self._unsettled[key]
            if partition.pending_isr == change.new_isr and partition.role == LEADER:
                sending.append((partition, change))
        if full:
            candidates = list(self._partitions.values())
        else:
            candidates = [p for p in map(self._partitions.get, sorted(due)) if p is not None]
        for partition in candidates:
            if partition.role != LEADER:
                continue
            due_change = partition.isr_change_due(now, eligible)
            if due_change is not None:
                sending.append((partition, due_change))
        self._send_isr_change_all(sending)

    def _send_isr_change_all(self, due: list[tuple[Partition, IsrChange]]) -> None:
        """Send the changes in as few requests as ``ISR_CHANGES_PER_REQUEST`` allows.
        One request per change, even 16 in flight at a time, took a broker restarted
        with 10,000 replicas 10-12 s to be back in all its ISRs."""
        for start in range(0, len(due), ISR_CHANGES_PER_REQUEST):
            items = due[start : start + ISR_CHANGES_PER_REQUEST]
            try:
                self._alter_isrs(items)
            except Exception:  # the changes stay pending: sent again, not stranded
                log.exception("sending %d ISR changes failed; sending them again", len(items))
                self._send_again(items)

    def _alter_isrs(self, items: list[tuple[Partition, IsrChange]]) -> None:
        changes = [
            controller_pb2.IsrChange(
                topic=change.topic,
                topic_id=change.topic_id,
                partition=change.partition,
                leader_epoch=change.leader_epoch,
                partition_epoch=change.partition_epoch,
                new_isr=list(change.new_isr),
            )
            for _, change in items
        ]
        first = changes[0]
        request = controller_pb2.AlterPartitionRequest(
            broker_id=self.broker_id,
            broker_epoch=self._broker_epoch(),
            changes=changes,
            # The first change in the one-change form too: a controller of the version
            # before (during a rolling upgrade) reads only that, and answers it.
            topic=first.topic,
            topic_id=first.topic_id,
            partition=first.partition,
            leader_epoch=first.leader_epoch,
            partition_epoch=first.partition_epoch,
            new_isr=first.new_isr,
        )
        for partition, change in items:
            log.info(
                "%s-%d: asking the controller for ISR %s (was %s)",
                change.topic,
                change.partition,
                list(change.new_isr),
                list(partition.isr),
            )
        try:
            answer = self._alter_partition(request)
        except (RaftkaError, grpc.RpcError) as e:
            # Timed out, no controller, the outcome unknown: perhaps committed.
            log.info("%d ISR changes not answered: %s", len(items), e)
            self._send_again(items)
            return
        code = answer.error.code
        if code == common_pb2.POLICY_VIOLATION and len(items) > 1:
            # More records than the controller takes in one request
            # (controller.max.records.per.request): in halves.
            half = len(items) // 2
            self._alter_isrs(items[:half])
            self._alter_isrs(items[half:])
            return
        if not answer.results and (code == common_pb2.NONE or code in _ONE_CHANGE_REFUSALS):
            # A controller of the version before answered the first change only, in
            # the one-change form (this version's refuses a request whole only with
            # other codes, and answers each change it looked at).
            partition, change = items[0]
            if code == common_pb2.NONE:
                partition.isr_change_done(change, tuple(answer.isr), answer.partition_epoch)
            else:
                self._isr_change_refused(partition, change, answer.error)
            for item in items[1:]:  # One a request, as that version's brokers sent them.
                self._alter_isrs([item])
            return
        if code != common_pb2.NONE:
            # Refused whole (a stale broker epoch, a fenced broker, ...): nothing in
            # it was applied, but an earlier send of the same changes may have been.
            # The first goes last: a controller of the version before refuses a whole
            # request for its first change alone, which must not hold the others back.
            log.info("%d ISR changes refused: %s", len(items), answer.error.message)
            self._send_again(items[1:] + items[:1])
            return
        results = {(result.topic, result.partition): result for result in answer.results}
        for partition, change in items:
            result = results.get((change.topic, change.partition))
            if result is None:
                log.warning("%s-%d: no answer to its ISR change", change.topic, change.partition)
                self._send_again([(partition, change)])
            elif result.error.code == common_pb2.NONE:
                partition.isr_change_done(change, tuple(result.isr), result.partition_epoch)
            else:
                self._isr_change_refused(partition, change, result.error)

    def _send_again(self, items: list[tuple[Partition, IsrChange]]) -> None:
        """Keep the changes pending (the high watermark goes on counting the maximal
        ISR) and send them again, unchanged, on the ISR thread's next pass."""
        for partition, change in items:
            self._unsettled[(change.topic, change.partition)] = (partition, change)

    def _isr_change_refused(
        self, partition: Partition, change: IsrChange, why: common_pb2.Error
    ) -> None:
        log.info("%s-%d: ISR change refused: %s", change.topic, change.partition, why.message)
        if why.code in _ISR_CHANGE_NOT_APPLIED:
            partition.isr_change_done(change, None, -1)
        elif why.code not in _ISR_CHANGE_AWAITS_METADATA:
            self._send_again([(partition, change)])
        # Else it stays pending until the metadata brings the partition's state.

    # ------------------------------------------------------------------ background

    def high_watermarks(self) -> dict[TopicPartition, int]:
        return {key: p.high_watermark for key, p in self.partitions().items() if not p.closed}

    def _checkpoint_hws(self) -> None:
        hws = self.high_watermarks()
        if hws == self._checkpointed_hws:
            return  # The files already say so (each is rewritten whole).
        try:
            self.logs.checkpoint_high_watermarks(hws)
        except OSError as e:
            log.warning("cannot checkpoint high watermarks: %s", e)
            return
        self._checkpointed_hws = hws

    def _checkpoint_loop(self) -> None:
        interval = self.settings.hw_checkpoint_interval_ms / 1000
        while not self._stopped.wait(interval):
            self._checkpoint_hws()

    def _maintenance_loop(self) -> None:
        interval = self.settings.retention_check_interval_ms / 1000
        strays_checked = False
        next_run = time.monotonic() + interval
        while True:
            # Until strays were looked for (once caught up), wake every second.
            wait = max(0.0, next_run - time.monotonic())
            if self._stopped.wait(wait if strays_checked else min(1.0, wait)):
                return
            try:
                if not strays_checked and self.caught_up():
                    self.delete_stray_logs()
                    strays_checked = True
                if time.monotonic() >= next_run:
                    next_run = time.monotonic() + interval
                    self.run_log_maintenance(now_ms())
            except Exception:
                log.exception("log maintenance failed")

    def delete_stray_logs(self) -> list[TopicPartition]:
        """Delete logs on disk that the metadata no longer gives this broker: the topic is
        gone or re-created (another id), or the broker left the replicas, while it was
        down. Only once the broker has caught up with the metadata (``caught_up``), so a
        log is never judged on a partial image. Returns what was deleted."""
        if not self.caught_up():
            return []
        image = self._image()
        deleted = []
        with self._lock:
            hosted = set(self._partitions)
            for key, topic_id in sorted(self.logs.known().items()):
                if key in hosted:
                    continue
                topic = image.topic_by_name(key[0])
                reg = None if topic is None else topic.partitions.get(key[1])
                current = (
                    topic is not None
                    and topic_id in (None, topic.topic_id)
                    and reg is not None
                    and self.broker_id in reg.replicas
                )
                if current:
                    continue  # It will be opened when its registration is applied.
                log.info("%s-%d: deleting a stray log (not assigned to this broker)", *key)
                self.logs.delete(*key)
                deleted.append(key)
        return deleted

    def run_log_maintenance(self, now: int) -> None:
        """Apply retention (and compaction) to every hosted partition once, and delete
        stray logs."""
        self.delete_stray_logs()
        image = self._image()
        for key, partition in self.partitions().items():
            configs = image.topic_configs(key[0])
            policy = configs.get("cleanup.policy", self.settings.cleanup_policy)
            retention_ms = int(configs.get("retention.ms", self.settings.retention_ms))
            retention_bytes = int(configs.get("retention.bytes", self.settings.retention_bytes))
            if "delete" in policy:
                partition.apply_retention(now, retention_ms, retention_bytes)
            if "compact" in policy:
                delete_retention_ms = int(
                    configs.get("delete.retention.ms", self.settings.delete_retention_ms)
                )
                partition.compact(now, delete_retention_ms)

    # ------------------------------------------------------------------ describe

    def describe(self) -> list[broker_pb2.LocalPartition]:
        out = []
        for (topic, index), partition in sorted(self.partitions().items()):
            snap = partition.snapshot()
            out.append(
                broker_pb2.LocalPartition(
                    topic=topic,
                    partition=index,
                    role=snap.role,
                    leader=snap.leader,
                    leader_epoch=snap.leader_epoch,
                    log_start_offset=snap.log_start_offset,
                    log_end_offset=snap.log_end_offset,
                    high_watermark=snap.high_watermark,
                    isr=list(snap.isr),
                    size_bytes=snap.size_bytes,
                )
            )
        return out


_ACK_MESSAGES = {
    "NOT_LEADER_OR_FOLLOWER": "leadership moved before the in-sync replicas had the records; "
    "they may or may not survive",
    "NOT_ENOUGH_REPLICAS_AFTER_APPEND": "appended, but the ISR shrank below min.insync.replicas",
}


def _fill_error(answer: object, e: PartitionError) -> None:
    answer.error.CopyFrom(_error(e.code, e.message))  # type: ignore[attr-defined]
    if e.leader != NO_LEADER and hasattr(answer, "current_leader"):
        answer.current_leader.leader_id = e.leader  # type: ignore[attr-defined]
        answer.current_leader.leader_epoch = e.leader_epoch  # type: ignore[attr-defined]


def _produce_errors(
    request: broker_pb2.ProduceRequest, error: common_pb2.Error
) -> broker_pb2.ProduceResponse:
    response = broker_pb2.ProduceResponse()
    for topic in request.topics:
        t = response.topics.add(topic=topic.topic)
        for part in topic.partitions:
            t.partitions.add(
                partition=part.partition, error=error, base_offset=-1, log_append_time_ms=-1
            )
    return response
