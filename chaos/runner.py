"""Run a chaos scenario against a local cluster of real processes and judge the history.

A run: start a cluster (controllers and brokers on loopback, each with its own data
dir and log), create a topic (3 partitions, replication factor 3,
``min.insync.replicas=2``), then for ``duration_s`` a producer sends unique values with
``acks=all`` (idempotent), a consumer reads every partition, and the nemesis applies the
scenario's faults (``chaos.nemesis``). A metadata workload creates topics and adds
partitions all along. Every operation is recorded with its start, end and outcome. Then
everything is healed, the run waits for the cluster to converge, reads every partition
back, stops the cluster and reads each replica's log from its files, and the checkers judge
the history (``chaos.checkers``, ``chaos.metadata_checks``, ``chaos.quorum_checks``). The
history is saved as JSON lines beside the verdict.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chaos import checkers, disk
from chaos.history import History, Op, Outcome, write_jsonl
from chaos.images import gather_images
from chaos.metadata_checks import CREATE, DELETE, GROW, check_metadata
from chaos.nemesis import SMALL_DISK_MB, Applied, Nemesis, Network, wait_converged
from chaos.quorum_checks import LogEntry, NodeImage, check_images, check_quorum
from chaos.report import write_report
from chaos.scenarios import SCENARIOS, Fault
from cli.localcluster import LocalCluster
from client import Admin, Consumer, Producer, TopicPartition
from client.errors import RaftkaError, TopicAlreadyExistsError, UnknownOutcomeError

TOPIC = "chaos"
PARTITIONS = 3
OVERRIDES = {
    "broker.session.timeout.ms": 3000,
    "broker.heartbeat.interval.ms": 250,
    "replica.lag.time.max.ms": 3000,
    "replica.fetch.wait.max.ms": 200,
    "group.min.session.timeout.ms": 1000,
    "group.initial.rebalance.delay.ms": 200,
}


@dataclass
class RunResult:
    scenario: str
    seed: int
    duration_s: float
    valid: bool
    verdict: dict[str, Any]
    faults: list[dict[str, Any]]
    unavailability: list[dict[str, Any]]
    metadata_unavailability: list[dict[str, Any]]
    sends: int
    acknowledged: int
    converged_s: float | None
    directory: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Recorder:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)


def run(
    scenario: str,
    *,
    duration_s: float = 30.0,
    seed: int = 0,
    directory: Path,
    controllers: int = 3,
    brokers: int = 3,
    rate: int = 300,
) -> RunResult:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; see `raftka chaos list`")
    make, _ = SCENARIOS[scenario]
    faults = make(random.Random(seed), duration_s)
    if any(f.kind == "fill-disk" for f in faults) and os.geteuid() != 0:
        raise PermissionError(
            f"{scenario} gives each broker a small disk of its own (a tmpfs mount): run it as root"
        )
    directory.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(directory / "cluster")
    cluster.create(controllers=controllers, brokers=brokers, overrides=OVERRIDES)
    network = Network(cluster) if any(f.kind.startswith("net-") for f in faults) else None
    small_disks = [
        cluster.directory / f"node-{n.id}" / "data"
        for n in cluster.nodes()
        if n.role == "broker" and any(f.kind == "fill-disk" for f in faults)
    ]
    mounted: list[Path] = []
    try:
        if network is not None:
            network.wire()
        for path in small_disks:
            disk.mount_tmpfs(path, SMALL_DISK_MB)
            mounted.append(path)
        cluster.start()
        cluster.wait_ready(timeout_s=90)
        outcome = _run_on(cluster, network, scenario, seed, duration_s, faults, directory, rate)
        cluster.stop(timeout_s=15)
        replicas = _read_replicas(cluster)
        return _judge(cluster, outcome, replicas)
    finally:
        for node in cluster.status():
            if node.state == "paused":
                cluster.resume(node.id)
        cluster.stop(timeout_s=15)
        if network is not None:
            network.close()
        for path in mounted:
            disk.unmount(path)


@dataclass
class _Outcome:
    """What a run gathered while the cluster was up."""

    scenario: str
    seed: int
    duration_s: float
    faults: list[Fault]
    directory: Path
    ops: list[Op]
    final: dict[int, list[tuple[int, str]]]
    topics: dict[str, int]
    voter_logs: dict[int, list[LogEntry]]
    images: tuple[dict[int, NodeImage], dict[int, NodeImage]]
    converged_s: float | None
    notes: list[str]
    group: bool


def _run_on(
    cluster: LocalCluster,
    network: Network | None,
    scenario: str,
    seed: int,
    duration_s: float,
    faults: list[Fault],
    directory: Path,
    rate: int,
) -> _Outcome:
    recorder = _Recorder()
    notes: list[str] = []
    with Admin(cluster.bootstrap, timeout_s=15) as admin:
        admin.create_topic(TOPIC, PARTITIONS, 3, {"min.insync.replicas": "2"})
        wait_converged(admin, TOPIC, 60)
        servers = ",".join(b.address for b in admin.describe_cluster().brokers)
        stop = threading.Event()
        producer_thread = threading.Thread(
            target=_produce, args=(servers, recorder, stop, rate), daemon=True
        )
        consumer_thread = threading.Thread(
            target=_consume, args=(servers, recorder, stop), daemon=True
        )
        admin_thread = threading.Thread(
            target=_admin_workload,
            args=(cluster.bootstrap, recorder, stop, random.Random(seed + 1)),
            daemon=True,
        )
        producer_thread.start()
        admin_thread.start()
        group = _GroupWorkload(servers, recorder, directory) if scenario == "group-churn" else None
        if group is None:
            consumer_thread.start()
        else:
            for _ in range(3):
                group.start_one()
        nemesis = Nemesis(cluster, admin, TOPIC, random.Random(seed), network)
        faults = _nemesis(nemesis, faults, recorder, duration_s, group)
        # Heal everything, then let the workload run on while the cluster converges.
        nemesis.heal_everything()
        healed_at = time.monotonic()
        converged_s = wait_converged(admin, TOPIC, 60)
        if converged_s is not None:
            converged_s = time.monotonic() - healed_at
        else:
            notes.append("the cluster did not converge within 60 s after healing")
        time.sleep(1.0)
        stop.set()
        producer_thread.join(timeout=150)
        admin_thread.join(timeout=30)
        if group is None:
            consumer_thread.join(timeout=30)
        else:
            _wait_group_caught_up(recorder, 30)
            group.stop()
        final = _read_final(servers)
        topics = {t.name: len(t.partitions) for t in admin.describe_topics()}
    return _Outcome(
        scenario,
        seed,
        duration_s,
        faults,
        directory,
        list(recorder.ops),
        final,
        topics,
        _voter_logs(cluster),
        gather_images(cluster, timeout_s=30),
        converged_s,
        notes,
        group is not None,
    )


def _judge(
    cluster: LocalCluster, run: _Outcome, replicas: dict[int, dict[int, list[tuple[int, str]]]]
) -> RunResult:
    notes = run.notes
    quorum = check_quorum(run.voter_logs)
    history = History(run.ops)
    verdict = checkers.check(history, run.final, replicas)
    metadata = check_metadata(history, run.topics)
    images = check_images(*run.images)
    if run.group:
        # At least once: every acknowledged record was processed by some member.
        unseen = checkers.unseen(history)
        if unseen.count:
            notes.append(f"{unseen.count} acknowledged records no member processed")
        times: dict[tuple[int, int], int] = {}
        for op in history.polls():
            for partition, offset, _ in op.records:
                times[(partition, offset)] = times.get((partition, offset), 0) + 1
        again = sum(1 for n in times.values() if n > 1)
        notes.append(
            f"group: {again} records processed more than once (uncommitted when a member died)"
        )
    gaps = checkers.unavailability(history)
    directory = run.directory
    write_jsonl(directory / "history.jsonl", history)
    sends = history.sends()
    result = RunResult(
        scenario=run.scenario,
        seed=run.seed,
        duration_s=run.duration_s,
        valid=verdict.valid
        and quorum.valid
        and metadata.valid
        and images.valid
        and not any("no member" in n for n in notes),
        verdict={
            **verdict.to_dict(),
            "quorum": quorum.to_dict(),
            "metadata": metadata.to_dict(),
            "images": images.to_dict(),
        },
        faults=[asdict(f) for f in run.faults],
        unavailability=[g.to_dict() for g in gaps],
        metadata_unavailability=[g.to_dict() for g in checkers.unavailability(history, of="admin")],
        sends=len(sends),
        acknowledged=sum(1 for op in sends if op.outcome == "ok"),
        converged_s=None if run.converged_s is None else round(run.converged_s, 3),
        directory=str(directory),
        notes=notes,
    )
    (directory / "verdict.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    write_report(history, result.to_dict(), directory)
    return result


_MEMBER = """
import sys
from client import Consumer
from client.errors import RaftkaError
consumer = Consumer(sys.argv[1], group_id=sys.argv[2], session_timeout_ms=3000,
                    heartbeat_interval_ms=300, auto_offset_reset="earliest",
                    enable_auto_commit=False)
consumer.subscribe([sys.argv[3]])
while True:
    fetched = consumer.poll(200)
    lines = [f"{r.partition} {r.offset} {(r.value or b'').decode()}"
             for batch in fetched.values() for r in batch]
    if lines:
        print("\\n".join(lines), flush=True)  # processed ...
        try:
            consumer.commit()  # ... then committed: at least once
        except RaftkaError:
            continue  # a rebalance took the partitions: their next owner reads them again
        done = {r.partition: r.offset + 1 for batch in fetched.values() for r in batch}
        print("\\n".join(f"c {p} {o}" for p, o in done.items()), flush=True)
"""


class _GroupWorkload:
    """Consumer group members as separate processes, so one can be killed (kill -9)."""

    def __init__(
        self, servers: str, recorder: _Recorder, directory: Path, group: str = "chaos-group"
    ):
        self.directory = directory
        self.servers = servers
        self.recorder = recorder
        self.group = group
        self.members: dict[int, subprocess.Popen[str]] = {}
        self._next = 10
        self._lock = threading.Lock()

    def start_one(self) -> int:
        with self._lock:
            process_id = self._next
            self._next += 1
        with open(self.directory / f"member-{process_id}.log", "w") as errors:
            child = subprocess.Popen(
                [sys.executable, "-c", _MEMBER, self.servers, self.group, TOPIC],
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
        with self._lock:
            self.members[process_id] = child
        threading.Thread(target=self._read, args=(process_id, child), daemon=True).start()
        return process_id

    def _read(self, process_id: int, child: subprocess.Popen[str]) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            parts = line.rstrip("\n").split(" ", 2)
            if len(parts) != 3:
                continue
            now = self.recorder.now()
            if parts[0] == "c":  # A commit that succeeded: partition, next offset.
                partition, offset = int(parts[1]), int(parts[2])
                self.recorder.add(
                    Op(process_id, "commit", now, now, "ok", TOPIC, partition, offset=offset)
                )
                continue
            record = (int(parts[0]), int(parts[1]), parts[2])
            self.recorder.add(Op(process_id, "poll", now, now, "ok", TOPIC, -1, records=(record,)))

    def kill_one(self, rng: random.Random) -> int:
        with self._lock:
            process_id = rng.choice(sorted(self.members))
            child = self.members.pop(process_id)
        child.kill()
        child.wait(timeout=10)
        return process_id

    def stop(self) -> None:
        with self._lock:
            children = list(self.members.values())
            self.members.clear()
        for child in children:
            child.kill()
            child.wait(timeout=10)


def _produce(servers: str, recorder: _Recorder, stop: threading.Event, rate: int) -> None:
    interval = 1.0 / rate
    with Producer(servers, acks="all", linger_ms=1, delivery_timeout_ms=60000) as producer:
        n = 0
        next_due = time.monotonic()
        while not stop.is_set():
            value = f"v{n}"
            partition = n % PARTITIONS
            start = recorder.now()

            def done(metadata: Any, error: BaseException | None, v=value, p=partition, s=start):
                end = recorder.now()
                if error is None:
                    recorder.add(Op(0, "send", s, end, "ok", TOPIC, p, v, metadata.offset))
                else:  # A timeout or a lost answer: it may or may not be in the log.
                    recorder.add(
                        Op(0, "send", s, end, "info", TOPIC, p, v, None, detail=str(error))
                    )

            producer.send(TOPIC, value.encode(), partition=partition, callback=done)
            n += 1
            next_due += interval
            delay = next_due - time.monotonic()
            if delay > 0:
                stop.wait(delay)
        producer.flush(timeout=120)


def _consume(servers: str, recorder: _Recorder, stop: threading.Event) -> None:
    with Consumer(servers, auto_offset_reset="earliest", fetch_max_wait_ms=200) as consumer:
        consumer.assign([TopicPartition(TOPIC, p) for p in range(PARTITIONS)])
        while not stop.is_set():
            start = recorder.now()
            try:
                fetched = consumer.poll(timeout_ms=200)
            except Exception as e:  # Recorded, and the consumer carries on.
                recorder.add(Op(1, "poll", start, recorder.now(), "fail", TOPIC, -1, detail=str(e)))
                continue
            records = tuple(
                (r.partition, r.offset, (r.value or b"").decode())
                for batch in fetched.values()
                for r in batch
            )
            if records:
                recorder.add(Op(1, "poll", start, recorder.now(), "ok", TOPIC, -1, records=records))


def _nemesis(
    nemesis: Nemesis,
    faults: list[Fault],
    recorder: _Recorder,
    duration_s: float,
    group: _GroupWorkload | None = None,
) -> list[Fault]:
    """Apply the faults on schedule; returns those applied (a late one is dropped)."""
    began = time.monotonic()
    applied_faults: list[Fault] = []
    for fault in faults:
        delay = began + fault.at_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if time.monotonic() - began + fault.heal_after_s > duration_s - 2.0:
            break  # Faults that take longer than planned (a rolling restart) ran late.
        start = recorder.now()
        applied_faults.append(fault)
        if fault.kind == "kill-group-member":
            assert group is not None
            applied = Applied([group.kill_one(nemesis.rng)])
            time.sleep(fault.heal_after_s)
            group.start_one()
        else:
            try:
                applied = nemesis.apply(fault)
            except RaftkaError as e:  # The node to hit could not be found: no fault.
                applied = Applied([], f"not applied: {e}")
            time.sleep(fault.heal_after_s)
            nemesis.heal(applied)
        recorder.add(
            Op(
                2,
                "fault",
                start,
                recorder.now(),
                "ok",
                TOPIC,
                fault.partition,
                fault=fault.kind,
                detail=f"nodes {applied.victims}"
                + (f": {applied.detail}" if applied.detail else ""),
            )
        )
    rest = began + duration_s - time.monotonic()
    if rest > 0:
        time.sleep(rest)
    return applied_faults


def _admin_workload(
    bootstrap: str, recorder: _Recorder, stop: threading.Event, rng: random.Random
) -> None:
    """Topics created, grown and deleted, one operation every 0.25-0.5 s, while faults
    happen; also the probe for metadata unavailability."""
    live: dict[str, int] = {}  # Topics to operate on, with the partition count asked last.
    n = 0
    # A short timeout: an operation stuck on a dead controller would blind the probe.
    with Admin(bootstrap, timeout_s=2) as admin:
        while not stop.wait(rng.uniform(0.25, 0.5)):
            if len(live) > 12:
                topic = min(live, key=lambda t: int(t.split("-")[1]))
                action, count = DELETE, 0
            elif live and rng.random() < 0.4:
                topic = rng.choice(sorted(live))
                action, count = GROW, live[topic] + 1
            else:
                topic, action, count = f"meta-{n}", CREATE, 1
                n += 1
            start = recorder.now()
            outcome: Outcome
            try:
                if action == CREATE:
                    admin.create_topic(topic, count, 2)
                elif action == DELETE:
                    admin.delete_topic(topic)
                else:
                    error = admin.create_partitions({topic: count}).get(topic)
                    if error is not None:
                        raise error
                outcome, detail = "ok", ""
            except TopicAlreadyExistsError as e:
                # The client retried a creation whose first answer was lost: it exists.
                outcome, detail = "ok", str(e)
            except RaftkaError as e:
                # A refused creation did not happen. A refused increase or deletion may be
                # the retry of one that did ("already has N partitions", "unknown topic").
                definite = action == CREATE and not e.retriable
                definite = definite and not isinstance(e, UnknownOutcomeError)
                outcome, detail = ("fail" if definite else "info"), f"{type(e).__name__}: {e}"
            except Exception as e:  # A transport error: the request may have been applied.
                outcome, detail = "info", f"{type(e).__name__}: {e}"
            if action == DELETE:
                live.pop(topic)  # Gone, or maybe gone later: never touched again.
            elif outcome != "fail":
                live[topic] = max(live.get(topic, 0), count)
            text = f"{action}: {detail}" if detail else action
            recorder.add(
                Op(3, "admin", start, recorder.now(), outcome, topic, offset=count, detail=text)
            )


def _read_final(servers: str) -> dict[int, list[tuple[int, str]]]:
    final: dict[int, list[tuple[int, str]]] = {p: [] for p in range(PARTITIONS)}
    with Consumer(servers, auto_offset_reset="earliest", max_poll_records=10_000) as consumer:
        assigned = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        ends = consumer.end_offsets(assigned)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
            consumer.position(tp) < ends[tp] for tp in assigned
        ):
            for tp, batch in consumer.poll(timeout_ms=500).items():
                final[tp.partition].extend((r.offset, (r.value or b"").decode()) for r in batch)
    return final


def _read_replicas(cluster: LocalCluster) -> dict[int, dict[int, list[tuple[int, str]]]]:
    """Each broker's copy of every partition, read from its files (the cluster is stopped)."""
    replicas: dict[int, dict[int, list[tuple[int, str]]]] = {}
    for node in cluster.nodes():
        if node.role != "broker":
            continue
        log_dir = cluster.directory / f"node-{node.id}" / "data"
        replicas[node.id] = {
            p: disk.read_replica_log(disk.partition_dir(log_dir, TOPIC, p))
            for p in range(PARTITIONS)
            if disk.partition_dir(log_dir, TOPIC, p).is_dir()
        }
    return replicas


def _voter_logs(cluster: LocalCluster) -> dict[int, list[LogEntry]]:
    """Each controller's retained committed metadata log, read from that controller."""
    import grpc
    from raftka.v1 import controller_pb2, controller_pb2_grpc

    logs: dict[int, list[LogEntry]] = {}
    for node in cluster.status():
        if node.role != "controller" or not node.running:
            continue
        entries: list[LogEntry] = []
        with grpc.insecure_channel(f"{node.host}:{node.rpc_port}") as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            offset = 0
            for _ in range(1000):
                try:
                    answer = stub.ReadMetadataLog(
                        controller_pb2.ReadMetadataLogRequest(offset=offset, max_records=1000),
                        timeout=10,
                    )
                except grpc.RpcError:
                    break
                if answer.error.code and offset < answer.log_start_offset:
                    offset = answer.log_start_offset  # Trimmed: start at what is kept.
                    continue
                if not answer.entries:
                    break
                for entry in answer.entries:
                    record = entry.record
                    claim = record.controller_epoch if record.HasField("controller_epoch") else None
                    entries.append(
                        LogEntry(
                            entry.offset,
                            entry.controller_epoch,
                            record.SerializeToString(),
                            -1 if claim is None else claim.controller_epoch,
                            -1 if claim is None else claim.controller_id,
                        )
                    )
                offset = answer.entries[-1].offset + 1
        logs[node.id] = entries
    return logs


def _wait_group_caught_up(recorder: _Recorder, timeout_s: float) -> None:
    """Until every acknowledged send has been polled by some member (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with recorder.lock:
            acked = {
                (op.partition, op.offset)
                for op in recorder.ops
                if op.kind == "send" and op.outcome == "ok"
            }
            seen = {(p, o) for op in recorder.ops if op.kind == "poll" for p, o, _ in op.records}
        if acked <= seen:
            return
        time.sleep(0.2)
