"""Helpers shared by the controller decisions: errors, broker checks, scratch replay."""

from __future__ import annotations

from collections.abc import Sequence

from raftka.v1 import common_pb2
from raftka.v1 import metadata_pb2 as pb

from quorum.image import BrokerRegistration, MetadataImage
from quorum.replay import replay_batch

ErrorCode = common_pb2.ErrorCode


class InvalidRecordError(AssertionError):
    """A decision produced a record that replay would refuse: a controller bug.

    Raised instead of committing, because a no-op in the log would leave the
    caller answered with a state that never existed.
    """


def ok() -> common_pb2.Error:
    return common_pb2.Error(code=common_pb2.NONE)


def error(code: int, message: str = "") -> common_pb2.Error:
    return common_pb2.Error(code=code, message=message)  # type: ignore[arg-type]


def check_broker_epoch(
    image: MetadataImage, broker_id: int, broker_epoch: int
) -> tuple[BrokerRegistration | None, common_pb2.Error]:
    """Kafka's checkBrokerEpoch: an unknown broker is as stale as a wrong epoch."""
    broker = image.brokers.get(broker_id)
    if broker is None:
        return None, error(ErrorCode.STALE_BROKER_EPOCH, f"broker {broker_id} is not registered")
    if broker.broker_epoch != broker_epoch:
        return None, error(
            ErrorCode.STALE_BROKER_EPOCH,
            f"broker {broker_id} has epoch {broker.broker_epoch}, not {broker_epoch}",
        )
    return broker, ok()


def apply_records(
    image: MetadataImage, records: Sequence[pb.MetadataRecord], base_offset: int | None = None
) -> MetadataImage:
    """Replay ``records`` on a scratch copy of the image, as the log will.

    Decisions that build on their own earlier records (several brokers fenced
    in one batch, several topics in one request) and answers that describe the
    state after commit use this, so they see exactly what replay will produce.
    """
    offset = image.offset + 1 if base_offset is None else base_offset
    image, no_ops = replay_batch(image, records, offset)
    if no_ops:
        at, reason = no_ops[0]
        raise InvalidRecordError(f"record {at - offset} would not apply: {reason}")
    return image
