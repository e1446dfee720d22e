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
    kind: str  # kill-partition-leader, kill-active-controller, kill-controllers, pause-broker
    heal_after_s: float
    count: int = 1  # controllers to kill at once (kill-controllers)
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


def random_mix(rng: random.Random, duration_s: float) -> list[Fault]:
    kinds = [leader_broker_kill, active_controller_kill, broker_pause]
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
    "random-mix": (random_mix, "the faults above, drawn at random"),
    "group-churn": (
        group_churn,
        "a consumer group of 3 processes: kill -9 a member, start another, repeatedly",
    ),
}
