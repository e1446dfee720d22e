"""Run a chaos scenario against a local cluster of real processes and judge the history.

A run: start a cluster (controllers and brokers on loopback, each with its own data
dir and log), create a topic (3 partitions, replication factor 3,
``min.insync.replicas=2``), then for ``duration_s`` a producer sends unique values with
``acks=all`` (idempotent), a consumer reads every partition, and the nemesis applies the
scenario's faults. Every operation is recorded with its start, end and outcome. Then
everything is healed, the run waits for the cluster to converge, reads every partition
back, and the checkers judge the history (``chaos.checkers``). The history is saved as
JSON lines beside the verdict.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chaos import checkers
from chaos.history import History, Op, write_jsonl
from chaos.quorum_checks import LogEntry, check_quorum
from chaos.report import write_report
from chaos.scenarios import SCENARIOS, Fault
from cli.localcluster import LocalCluster
from client import Admin, Consumer, Producer, TopicPartition

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
    directory.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(directory / "cluster")
    cluster.create(controllers=controllers, brokers=brokers, overrides=OVERRIDES)
    try:
        cluster.start()
        cluster.wait_ready(timeout_s=90)
        return _run_on(cluster, scenario, seed, duration_s, faults, directory, rate)
    finally:
        for node in cluster.status():
            if node.state == "paused":
                cluster.resume(node.id)
        cluster.stop(timeout_s=15)


def _run_on(
    cluster: LocalCluster,
    scenario: str,
    seed: int,
    duration_s: float,
    faults: list[Fault],
    directory: Path,
    rate: int,
) -> RunResult:
    recorder = _Recorder()
    notes: list[str] = []
    with Admin(cluster.bootstrap, timeout_s=15) as admin:
        admin.create_topic(TOPIC, PARTITIONS, 3, {"min.insync.replicas": "2"})
        _wait_converged(admin, 60)
        servers = ",".join(b.address for b in admin.describe_cluster().brokers)
        stop = threading.Event()
        producer_thread = threading.Thread(
            target=_produce, args=(servers, recorder, stop, rate), daemon=True
        )
        consumer_thread = threading.Thread(
            target=_consume, args=(servers, recorder, stop), daemon=True
        )
        producer_thread.start()
        group = _GroupWorkload(servers, recorder, directory) if scenario == "group-churn" else None
        if group is None:
            consumer_thread.start()
        else:
            for _ in range(3):
                group.start_one()
        _nemesis(cluster, admin, faults, recorder, duration_s, group, random.Random(seed))
        # Heal everything, then let the workload run on while the cluster converges.
        for node in cluster.status():
            if node.state == "paused":
                cluster.resume(node.id)
        cluster.start()
        healed_at = time.monotonic()
        converged_s = _wait_converged(admin, 60)
        if converged_s is not None:
            converged_s = time.monotonic() - healed_at
        else:
            notes.append("the cluster did not converge within 60 s after healing")
        time.sleep(1.0)
        stop.set()
        producer_thread.join(timeout=150)
        if group is None:
            consumer_thread.join(timeout=30)
        else:
            _wait_group_caught_up(recorder, 30)
            group.stop()
        final = _read_final(servers)
    quorum = check_quorum(_voter_logs(cluster))
    history = History(recorder.ops)
    verdict = checkers.check(history, final)
    if group is not None:
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
    write_jsonl(directory / "history.jsonl", recorder.ops)
    sends = history.sends()
    result = RunResult(
        scenario=scenario,
        seed=seed,
        duration_s=duration_s,
        valid=verdict.valid and quorum.valid and not any("no member" in n for n in notes),
        verdict={**verdict.to_dict(), "quorum": quorum.to_dict()},
        faults=[asdict(f) for f in faults],
        unavailability=[g.to_dict() for g in gaps],
        sends=len(sends),
        acknowledged=sum(1 for op in sends if op.outcome == "ok"),
        converged_s=None if converged_s is None else round(converged_s, 3),
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
            pass  # a rebalance took the partitions: their next owner reads them again
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
    cluster: LocalCluster,
    admin: Admin,
    faults: list[Fault],
    recorder: _Recorder,
    duration_s: float,
    group: _GroupWorkload | None = None,
    rng: random.Random | None = None,
) -> None:
    began = time.monotonic()
    for fault in faults:
        delay = began + fault.at_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        start = recorder.now()
        if fault.kind == "kill-group-member":
            assert group is not None and rng is not None
            victims = [group.kill_one(rng)]
            time.sleep(fault.heal_after_s)
            group.start_one()
        else:
            victims = _apply(cluster, admin, fault)
            time.sleep(fault.heal_after_s)
        for victim in victims if fault.kind != "kill-group-member" else []:
            if fault.kind.startswith("pause"):
                cluster.resume(victim)
            else:
                cluster.start([victim])
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
                detail=f"nodes {victims}",
            )
        )
    rest = began + duration_s - time.monotonic()
    if rest > 0:
        time.sleep(rest)


def _apply(cluster: LocalCluster, admin: Admin, fault: Fault) -> list[int]:
    if fault.kind in ("kill-partition-leader", "pause-partition-leader"):
        leader = admin.describe_topic(TOPIC).partitions[fault.partition].leader
        if leader < 0:
            return []
        if fault.kind.startswith("pause"):
            cluster.pause(leader)
        else:
            cluster.kill(leader)
        return [leader]
    controllers = [n.id for n in cluster.status() if n.role == "controller"]
    active = admin.describe_quorum().leader_id
    if fault.kind == "kill-active-controller":
        victims = [active]
    else:
        minority = (len(controllers) - 1) // 2
        others = [c for c in controllers if c != active]
        victims = [active, *others][: max(1, min(fault.count, minority))]
    for victim in victims:
        cluster.kill(victim)
    return victims


def _wait_converged(admin: Admin, timeout_s: float) -> float | None:
    """Seconds until every partition has a leader and a full ISR and no broker is fenced."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            info = admin.describe_topic(TOPIC)
            fenced = any(b.fenced for b in admin.describe_cluster().brokers)
        except Exception:
            time.sleep(0.2)
            continue
        if not fenced and all(
            p.leader >= 0 and len(p.isr) == len(p.replicas) for p in info.partitions
        ):
            return time.monotonic() - start
        time.sleep(0.2)
    return None


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
