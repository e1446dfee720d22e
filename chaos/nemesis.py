"""The nemesis: applies a scenario's faults to a running ``LocalCluster`` and heals them.

Nodes are chosen when a fault starts, by what they are then: the leader of a partition,
the active controller, a follower. Each fault is applied, held for ``heal_after_s`` and
healed; ``apply`` returns what it did so the run's history can say it.

Network faults need every link between nodes to pass through a proxy the harness
controls (``Network``): each node dials, for every other node, a proxy port of its own
(``network.dial.overrides``), so a cut, a partition into two sides, a one-way cut or added
latency can be put on any set of links without root.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from chaos import disk
from chaos.netproxy import LinkTable, NetProxy
from chaos.scenarios import Fault
from cli.localcluster import LocalCluster, NodeStatus
from client import Admin

# A broker whose disk can fill gets a tmpfs of this size as its log dir.
SMALL_DISK_MB = 64


class Network:
    """A proxy on every link between two nodes; faults are set on ``table``."""

    def __init__(self, cluster: LocalCluster):
        self.table = LinkTable()
        self.proxy = NetProxy(self.table)
        self.cluster = cluster

    def wire(self) -> None:
        """Open a proxy for each link and point each node at its own proxies. Call before
        the nodes start (they read the overrides at start)."""
        nodes = self.cluster.status()
        for src in nodes:
            overrides: dict[str, str] = {}
            for dst in nodes:
                if dst.id == src.id:
                    continue
                # Controllers dial each other's Raft port; brokers dial controllers' and
                # other brokers' gRPC ports, and other brokers' replication ports.
                # Nobody dials a broker's Raft port (it has none).
                targets = []
                if src.role == "controller" and dst.raft_port is not None:
                    targets.append(dst.raft_port)
                if src.role == "broker":
                    targets.append(dst.rpc_port)
                    if dst.replication_port is not None:
                        targets.append(dst.replication_port)
                for port in targets:
                    local = self.proxy.add_link(src.id, dst.id, dst.host, port)
                    overrides[f"{dst.host}:{port}"] = f"127.0.0.1:{local}"
            self.cluster.update_config(
                src.id,
                {"network.dial.overrides": ",".join(f"{a}={b}" for a, b in overrides.items())},
            )

    def close(self) -> None:
        self.proxy.close()


@dataclass
class Applied:
    """What a fault did: the nodes it hit and how to undo it."""

    victims: list[int]
    detail: str = ""
    killed: list[int] = field(default_factory=list)
    paused: list[int] = field(default_factory=list)
    network: bool = False
    filler: disk.DiskFiller | None = None


class Nemesis:
    def __init__(
        self,
        cluster: LocalCluster,
        admin: Admin,
        topic: str,
        rng: random.Random,
        network: Network | None = None,
    ):
        self.cluster = cluster
        self.admin = admin
        self.topic = topic
        self.rng = rng
        self.network = network

    # -- choosing nodes ------------------------------------------------------

    def _nodes(self, role: str) -> list[NodeStatus]:
        return [n for n in self.cluster.status() if n.role == role]

    def _leader(self, partition: int) -> int:
        return self.admin.describe_topic(self.topic).partitions[partition].leader

    def _followers(self, partition: int) -> list[int]:
        info = self.admin.describe_topic(self.topic).partitions[partition]
        return [r for r in info.replicas if r != info.leader]

    def _active_controller(self) -> int:
        return self.admin.describe_quorum().leader_id

    def _log_dir(self, broker: int) -> Path:
        return self.cluster.directory / f"node-{broker}" / "data"

    # -- faults ----------------------------------------------------------------

    def apply(self, fault: Fault) -> Applied:
        kind = fault.kind
        if kind in ("kill-partition-leader", "pause-partition-leader"):
            leader = self._leader(fault.partition)
            if leader < 0:
                return Applied([], "no leader to hit")
            if kind.startswith("pause"):
                self.cluster.pause(leader)
                return Applied([leader], paused=[leader])
            self.cluster.kill(leader)
            return Applied([leader], killed=[leader])
        if kind in ("kill-active-controller", "kill-controllers", "kill-controller-majority"):
            return self._kill_controllers(fault)
        if kind == "rolling-restart":
            return self._rolling_restart()
        if kind.startswith("net-"):
            return self._network_fault(fault)
        if kind == "corrupt-follower-tail":
            return self._corrupt_follower(fault)
        if kind == "fill-disk":
            broker = self.rng.choice([n.id for n in self._nodes("broker")])
            filler = disk.DiskFiller(self._log_dir(broker))
            written = filler.fill()
            return Applied([broker], f"filled with {written} bytes", filler=filler)
        if kind == "power-loss-all-replicas":
            return self._power_loss(fault)
        raise ValueError(f"unknown fault kind {kind!r}")

    def heal(self, applied: Applied) -> None:
        for node in applied.paused:
            self.cluster.resume(node)
        if applied.killed:
            self.cluster.start(applied.killed)
        if applied.network and self.network is not None:
            self.network.table.heal()
        if applied.filler is not None:
            applied.filler.free()

    def heal_everything(self) -> None:
        for node in self.cluster.status():
            if node.state == "paused":
                self.cluster.resume(node.id)
        if self.network is not None:
            self.network.table.heal()
        for broker in self._nodes("broker"):
            disk.DiskFiller(self._log_dir(broker.id)).free()
        self.cluster.start()

    def _kill_controllers(self, fault: Fault) -> Applied:
        controllers = [n.id for n in self._nodes("controller")]
        active = self._active_controller()
        others = [c for c in controllers if c != active]
        self.rng.shuffle(others)
        if fault.kind == "kill-active-controller":
            victims = [active]
        elif fault.kind == "kill-controllers":
            minority = (len(controllers) - 1) // 2
            victims = [active, *others][: max(1, min(fault.count, minority))]
        else:  # A majority: metadata stops until they return.
            victims = [active, *others][: len(controllers) // 2 + 1]
        for victim in victims:
            self.cluster.kill(victim)
        return Applied(victims, killed=victims)

    def _rolling_restart(self) -> Applied:
        """Every node in turn, as an operator upgrades: SIGTERM (a broker shuts down in a
        controlled way), start it, and wait until the cluster is whole before the next.
        Controllers first, the active one last; then brokers."""
        active = self._active_controller()
        controllers = sorted(n.id for n in self._nodes("controller"))
        order = [c for c in controllers if c != active] + [active]
        order += sorted(n.id for n in self._nodes("broker"))
        for node in order:
            self.cluster.stop([node], timeout_s=30)
            self.cluster.start([node])
            wait_converged(self.admin, self.topic, 60)
        return Applied(order, "restarted one at a time")

    def _network_fault(self, fault: Fault) -> Applied:
        if self.network is None:
            raise ValueError(f"{fault.kind} needs the run's network of proxies")
        table = self.network.table
        everyone = {n.id for n in self.cluster.status()}
        if fault.kind == "net-isolate-active-controller":
            active = self._active_controller()
            table.partition({active}, everyone - {active})
            return Applied([active], "cut off from every other node", network=True)
        if fault.kind == "net-isolate-leader":
            # The leader of a partition and a minority of the controllers on one side
            # (with or without the active controller, by the seed); the rest on the other.
            leader = self._leader(fault.partition)
            controllers = sorted(n.id for n in self._nodes("controller"))
            active = self._active_controller()
            minority = (len(controllers) - 1) // 2
            others = [c for c in controllers if c != active]
            if fault.count > 1:  # The active controller is cut off too.
                side = {active, *others[: minority - 1]}
            else:
                side = set(others[:minority])
            side |= {leader} if leader >= 0 else set()
            table.partition(side, everyone - side)
            return Applied(
                sorted(side), f"minority side {sorted(side)} (leader {leader})", network=True
            )
        if fault.kind == "net-one-way-leader":
            # The leader hears everyone but nothing it sends arrives: its fetch answers,
            # heartbeats and AlterPartition requests all stall.
            leader = self._leader(fault.partition)
            if leader < 0:
                return Applied([], "no leader to hit")
            for other in everyone - {leader}:
                table.cut_one_way(leader, other)
            return Applied([leader], "nothing it sends arrives", network=True)
        if fault.kind == "net-latency":
            node = self.rng.choice(sorted(everyone))
            delay_s = fault.count / 1000.0
            for other in everyone - {node}:
                table.add_latency(node, other, delay_s)
                table.add_latency(other, node, delay_s)
            return Applied([node], f"{fault.count} ms each way on every link", network=True)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    def _corrupt_follower(self, fault: Fault) -> Applied:
        followers = self._followers(fault.partition)
        if not followers:
            return Applied([], "no follower")
        victim = self.rng.choice(followers)
        self.cluster.kill(victim)
        directory = disk.partition_dir(self._log_dir(victim), self.topic, fault.partition)
        note = disk.damage_tail(directory, self.rng)
        return Applied([victim], note, killed=[victim])

    def _power_loss(self, fault: Fault) -> Applied:
        """Kill every replica of the partition and cut each log back by the same records,
        as a power loss would on nodes that never fsynced: acknowledged records are lost."""
        replicas = self.admin.describe_topic(self.topic).partitions[fault.partition].replicas
        for broker in replicas:
            self.cluster.kill(broker)
        dirs = [disk.partition_dir(self._log_dir(b), self.topic, fault.partition) for b in replicas]
        end = min(disk.log_end_offset(d) for d in dirs)
        notes = [disk.cut_log(d, max(0, end - fault.count)) for d in dirs]
        return Applied(list(replicas), "; ".join(notes), killed=list(replicas))


def wait_converged(admin: Admin, topic: str, timeout_s: float) -> float | None:
    """Seconds until every partition has a leader and a full ISR and no broker is fenced."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            info = admin.describe_topic(topic)
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
