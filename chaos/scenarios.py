"""Fault schedules (the nemesis), by name. A schedule is drawn from a seed, so the same
seed gives the same faults at the same times; the nodes they hit are chosen by role
("the leader of partition p", "the active controller") when the fault starts.

Each fault is a ``Fault``: when it starts (seconds into the run), what it does, and how
long until it heals. The runner applies them to a ``LocalCluster``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Fault:
    at_s: float
    kind: str  # see chaos.nemesis.Nemesis.apply
    heal_after_s: float
    # kill-controllers: how many at once; net-isolate-leader: 2 puts the active controller
    # on the leader's side; net-latency: milliseconds; power-loss-all-replicas: records lost.
    count: int = 1
    partition: int = 0


Scenario = Callable[[random.Random, float], list[Fault]]


def _every(rng: random.Random, duration_s: float, make: Callable[[float], Fault]) -> list[Fault]:
    """Faults from 2 s in, one after another with 2-4 s of calm between them."""
    faults: list[Fault] = []
    at = 2.0
    while True:
        fault = make(at)
        if fault.at_s + fault.heal_after_s > duration_s - 2.0:
            return faults
        faults.append(fault)
        at = fault.at_s + fault.heal_after_s + rng.uniform(2.0, 4.0)


def leader_broker_kill(rng: random.Random, duration_s: float) -> list[Fault]:
    return _every(
        rng,
        duration_s,
        lambda at: Fault(
            at, "kill-partition-leader", rng.uniform(1.0, 3.0), partition=rng.randrange(3)
        ),
    )


def active_controller_kill(rng: random.Random, duration_s: float) -> list[Fault]:
    return _every(
        rng, duration_s, lambda at: Fault(at, "kill-active-controller", rng.uniform(1.0, 3.0))
    )


def controller_minority_kill(rng: random.Random, duration_s: float) -> list[Fault]:
    """With 3 controllers one, with 5 two (the runner caps at the minority)."""
    return _every(
        rng, duration_s, lambda at: Fault(at, "kill-controllers", rng.uniform(2.0, 4.0), count=2)
    )


def broker_pause(rng: random.Random, duration_s: float) -> list[Fault]:
    """A partition leader paused longer than the broker session timeout, then resumed."""
    return _every(
        rng,
        duration_s,
        lambda at: Fault(
            at, "pause-partition-leader", rng.uniform(3.5, 5.0), partition=rng.randrange(3)
        ),
    )


def controller_majority_kill(rng: random.Random, duration_s: float) -> list[Fault]:
    """A majority of the controllers down: metadata stops, produce and fetch go on."""
    return _every(
        rng, duration_s, lambda at: Fault(at, "kill-controller-majority", rng.uniform(2.0, 4.0))
    )


def rolling_restart(rng: random.Random, duration_s: float) -> list[Fault]:
    """Every node restarted in turn (SIGTERM, start, wait until whole), as in an upgrade.
    A round takes as long as it takes; the next starts 2-4 s after it ends."""
    return _every(rng, duration_s, lambda at: Fault(at, "rolling-restart", 0.0))


def network_isolate_controller(rng: random.Random, duration_s: float) -> list[Fault]:
    return _every(
        rng,
        duration_s,
        lambda at: Fault(at, "net-isolate-active-controller", rng.uniform(2.0, 4.0)),
    )


def network_isolate_leader(rng: random.Random, duration_s: float) -> list[Fault]:
    """Longer than the broker session timeout, so the majority side fences the leader."""
    return _every(
        rng,
        duration_s,
        lambda at: Fault(
            at,
            "net-isolate-leader",
            rng.uniform(4.0, 6.0),
            count=rng.choice([1, 2]),
            partition=rng.randrange(3),
        ),
    )


def network_flaky(rng: random.Random, duration_s: float) -> list[Fault]:
    """A one-way cut of a partition leader, or 50-200 ms added on every link of a node."""

    def make(at: float) -> Fault:
        if rng.random() < 0.5:
            return Fault(
                at, "net-one-way-leader", rng.uniform(2.0, 4.0), partition=rng.randrange(3)
            )
        return Fault(at, "net-latency", rng.uniform(3.0, 5.0), count=rng.randint(50, 200))

    return _every(rng, duration_s, make)


def disk_corrupt(rng: random.Random, duration_s: float) -> list[Fault]:
    """A follower killed, the tail of its log torn and a byte flipped, then restarted."""
    return _every(
        rng,
        duration_s,
        lambda at: Fault(
            at, "corrupt-follower-tail", rng.uniform(1.0, 2.0), partition=rng.randrange(3)
        ),
    )


def disk_full(rng: random.Random, duration_s: float) -> list[Fault]:
    """A broker's disk filled until writes fail (ENOSPC), then freed. Needs root."""
    return _every(rng, duration_s, lambda at: Fault(at, "fill-disk", rng.uniform(3.0, 5.0)))


def unsafe_power_loss(rng: random.Random, duration_s: float) -> list[Fault]:
    """Loses acknowledged records on purpose: every replica of a partition loses its last
    records, as a power loss would on nodes that never fsync. A valid verdict here means
    the checkers are broken."""
    return _every(
        rng,
        duration_s,
        lambda at: Fault(
            at, "power-loss-all-replicas", rng.uniform(1.0, 2.0), count=200, partition=0
        ),
    )[:1]


def random_mix(rng: random.Random, duration_s: float) -> list[Fault]:
    kinds = [
        leader_broker_kill,
        active_controller_kill,
        broker_pause,
        network_isolate_controller,
        network_isolate_leader,
        network_flaky,
        disk_corrupt,
    ]
    faults: list[Fault] = []
    at = 2.0
    while True:
        pick = rng.choice(kinds)(rng, at + 12.0)
        if not pick:
            return faults
        fault = pick[-1]
        fault = Fault(at, fault.kind, fault.heal_after_s, fault.count, fault.partition)
        if at + fault.heal_after_s > duration_s - 2.0:
            return faults
        faults.append(fault)
        at += fault.heal_after_s + rng.uniform(2.0, 4.0)


def group_churn(rng: random.Random, duration_s: float) -> list[Fault]:
    """A consumer group member killed (kill -9) and a new one started, over and over,
    while the producer runs (the runner's group workload)."""
    return _every(rng, duration_s, lambda at: Fault(at, "kill-group-member", rng.uniform(1.0, 2.0)))


SCENARIOS: dict[str, tuple[Scenario, str]] = {
    "leader-broker-kill": (leader_broker_kill, "kill -9 the leader of a partition, restart it"),
    "active-controller-kill": (
        active_controller_kill,
        "kill -9 the active controller, restart it",
    ),
    "controller-minority-kill": (
        controller_minority_kill,
        "kill -9 a minority of the controllers at once, restart them",
    ),
    "broker-pause": (
        broker_pause,
        "SIGSTOP a partition leader past its session timeout, then SIGCONT",
    ),
    "controller-majority-kill": (
        controller_majority_kill,
        "kill -9 a majority of the controllers at once, restart them",
    ),
    "rolling-restart": (rolling_restart, "restart every node in turn, as an upgrade does"),
    "network-isolate-controller": (
        network_isolate_controller,
        "cut the active controller off from every other node, then heal",
    ),
    "network-isolate-leader": (
        network_isolate_leader,
        "a partition leader and a minority of controllers cut off from the rest",
    ),
    "network-flaky": (
        network_flaky,
        "a one-way cut from a partition leader, or 50-200 ms of latency on a node's links",
    ),
    "disk-corrupt": (
        disk_corrupt,
        "kill a follower, tear and corrupt the tail of its log, restart it",
    ),
    "disk-full": (disk_full, "fill a broker's disk until writes fail, then free it (root)"),
    "random-mix": (random_mix, "the faults above, drawn at random (not disk-full)"),
    "group-churn": (
        group_churn,
        "a consumer group of 3 processes: kill -9 a member, start another, repeatedly",
    ),
    "unsafe-power-loss": (
        unsafe_power_loss,
        "LOSES DATA on purpose (power loss without fsync on every replica): must be INVALID",
    ),
}
