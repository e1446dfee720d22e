"""Replica placement for new partitions.

Theory of operation. Brokers are listed rack by rack in turn (Kafka's
rack-alternating list: a1, b1, c1, a2, b2, ...), so that neighbours in the
list sit on different racks. Each partition then picks, greedily:

- its leader: the active broker with the fewest replicas, then the fewest
  preferred leaderships, then the first in the list rotated by
  ``seed + partition`` so that ties are spread;
- each follower: a broker on the rack used least so far by this partition,
  then with the fewest replicas, then the one that already leads the most
  (so that brokers which lead little stay free to lead the next partitions),
  then the nearest after the leader in the list.

Loads start from the replicas already in the image, so topics created one by
one still spread. Picking a least-loaded broker every time keeps the replica
counts of any two brokers within one of each other on a cluster without
racks, and the follower rule keeps preferred leaderships as even. Racks win
over balance: a rack with fewer brokers gets more replicas per broker, as in
Kafka. The result depends only on the arguments.
"""

from __future__ import annotations

from collections import Counter
from itertools import zip_longest

from quorum.image import BrokerRegistration, MetadataImage


class PlacementError(ValueError):
    """The replicas cannot be placed; the message is Kafka's."""


def place_replicas(
    image: MetadataImage,
    num_partitions: int,
    replication_factor: int,
    start_partition: int = 0,
    seed: int = 0,
) -> list[tuple[int, ...]]:
    """Replica lists (preferred leader first) for ``num_partitions`` new partitions."""
    brokers = image.active_brokers()
    _check(brokers, num_partitions, replication_factor)
    placer = _Placer(rack_alternating(brokers), {b.broker_id: b.rack for b in brokers}, image)
    return [
        placer.place(seed + partition, replication_factor)
        for partition in range(start_partition, start_partition + num_partitions)
    ]


class _Placer:
    """The running loads of one placement; each ``place`` adds one partition."""

    def __init__(self, order: list[int], racks: dict[int, str], image: MetadataImage) -> None:
        self.order = order
        self.racks = racks
        self.rack_aware = len(set(racks.values())) > 1
        self.replica_load, self.leader_load = _loads(image, set(order))

    def place(self, rotation: int, replication_factor: int) -> tuple[int, ...]:
        spot = {b: (i - rotation) % len(self.order) for i, b in enumerate(self.order)}
        leader = min(self.order, key=lambda b: (self.replica_load[b], self.leader_load[b], spot[b]))
        replicas = [leader]
        while len(replicas) < replication_factor:
            used = Counter(self.racks[c] for c in replicas) if self.rack_aware else Counter()
            # Among equally loaded brokers a follower is one that already leads
            # the most: the others are kept free to lead the next partitions.
            replicas.append(
                min(
                    (b for b in self.order if b not in replicas),
                    key=lambda b: (
                        used[self.racks[b]],
                        self.replica_load[b],
                        -self.leader_load[b],
                        (spot[b] - spot[leader]) % len(self.order),
                    ),
                )
            )
        # When loads forced the set (say, every broker holds a replica), the
        # member that leads least leads this one.
        leader = min(replicas, key=lambda b: (self.leader_load[b], spot[b]))
        replicas.remove(leader)
        replicas.insert(0, leader)
        self.leader_load[leader] += 1
        self.replica_load.update(replicas)
        return tuple(replicas)


def rack_alternating(brokers: list[BrokerRegistration]) -> list[int]:
    """Broker ids taking one broker from each rack in turn (racks and brokers by name/id)."""
    by_rack: dict[str, list[int]] = {}
    for broker in sorted(brokers, key=lambda b: b.broker_id):
        by_rack.setdefault(broker.rack, []).append(broker.broker_id)
    columns = [by_rack[rack] for rack in sorted(by_rack)]
    return [b for row in zip_longest(*columns) for b in row if b is not None]


def _check(brokers: list[BrokerRegistration], num_partitions: int, replication_factor: int) -> None:
    if replication_factor < 1:
        raise PlacementError(
            f"Invalid replication factor {replication_factor}:"
            " the replication factor must be positive."
        )
    if num_partitions < 0:
        raise PlacementError(f"Invalid number of partitions {num_partitions}.")
    if not brokers:
        raise PlacementError("All brokers are currently fenced.")
    if replication_factor > len(brokers):
        raise PlacementError(
            f"The target replication factor of {replication_factor} cannot be reached because"
            f" only {len(brokers)} broker(s) are unfenced."
        )


def _loads(image: MetadataImage, candidates: set[int]) -> tuple[Counter[int], Counter[int]]:
    """Replicas and preferred leaderships already held by each candidate broker."""
    # Replay keeps these counts, so placement costs O(brokers), not O(partitions).
    replicas: Counter[int] = Counter({b: image.replica_counts.get(b, 0) for b in candidates})
    leaders: Counter[int] = Counter(
        {b: image.preferred_leader_counts.get(b, 0) for b in candidates}
    )
    return replicas, leaders
