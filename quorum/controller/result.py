"""What a controller decision returns, and what it may know besides the image."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from raftka.v1 import metadata_pb2 as pb

from quorum.image import MetadataImage

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ControllerResult(Generic[R]):
    """Records to commit, and the response to send once they have committed.

    A decision never writes anything itself (Kafka's ControllerResult). An
    empty ``records`` means the response can go at once.
    """

    records: list[pb.MetadataRecord]
    response: R
    # The image after replaying ``records`` from ``ctx.next_offset``, when the
    # decision has computed it anyway; None means the caller replays them.
    image: MetadataImage | None = None
    # Work the records begin and later batches finish (``reconcile.py``): brokers
    # still to leave ISRs and leaderships, and leaderless partitions to elect for.
    leaving: tuple[int, ...] = ()
    electing: bool = False


@dataclass(slots=True)
class ControllerContext:
    """Inputs of a decision other than the image and the request.

    ``next_offset`` is the offset the first record of the result will get, so a
    decision can say which broker epoch a registration record will create.
    ``new_topic_id`` and ``now_ms`` are injected so that tests are deterministic.
    """

    next_offset: int
    now_ms: int = 0
    cluster_id: str = ""
    new_topic_id: Callable[[], str] = field(default=lambda: "")
    defaults: dict[str, int] = field(
        default_factory=lambda: {
            "num.partitions": 1,
            "default.replication.factor": 1,
            "producer.id.block.size": 1000,
        }
    )
    # A broker transition works out at most this many partition changes in its
    # own batch and leaves the rest to later ones (``reconcile.py``); None: all.
    transition_slice: int | None = None
    # Brokers whose earlier transition is still leaving ISRs: not unfenced yet.
    settling: frozenset[int] = frozenset()
