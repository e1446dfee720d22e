"""Producer id blocks for idempotent producers, handed out by the controller.

Blocks never overlap because the next free id is in the image and every
block is a committed record; a broker that restarts simply asks for a new
block, and the ids of the old one are never reused.
"""

from __future__ import annotations

from raftka.v1 import controller_pb2 as cpb

from quorum import records as r
from quorum.controller._common import ErrorCode, check_broker_epoch, ok
from quorum.controller.result import ControllerContext, ControllerResult
from quorum.image import MetadataImage

DEFAULT_BLOCK_SIZE = 1000


def allocate(
    image: MetadataImage, req: cpb.AllocateProducerIdsRequest, ctx: ControllerContext
) -> ControllerResult[cpb.AllocateProducerIdsResponse]:
    _, stale = check_broker_epoch(image, req.broker_id, req.broker_epoch)
    if stale.code != ErrorCode.NONE:
        return ControllerResult([], cpb.AllocateProducerIdsResponse(error=stale))
    block_size = ctx.defaults.get("producer.id.block.size", DEFAULT_BLOCK_SIZE)
    first = image.next_producer_id
    record = r.producer_ids(req.broker_id, req.broker_epoch, first, block_size)
    response = cpb.AllocateProducerIdsResponse(
        error=ok(), first_producer_id=first, block_size=block_size
    )
    return ControllerResult([record], response)
