"""Producer ids for idempotent producers, handed out by a broker from controller blocks.

The controller allocates ids in blocks through the metadata log (a committed
record per block, so no id is ever handed out twice, across restarts and
controller failovers). A broker takes the next id from its current block and
asks for a new block when it runs out. Every new id starts at epoch 0; a
producer that re-initialises an id it holds gets the next epoch, which fences
its older incarnation's batches (INVALID_PRODUCER_EPOCH).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from raftka.v1 import common_pb2, controller_pb2

from client.errors import RaftkaError

_MAX_EPOCH = 32767


class ProducerIdManager:
    def __init__(
        self,
        broker_id: int,
        broker_epoch: Callable[[], int],
        allocate: Callable[
            [controller_pb2.AllocateProducerIdsRequest], controller_pb2.AllocateProducerIdsResponse
        ],
    ):
        self.broker_id = broker_id
        self._broker_epoch = broker_epoch
        self._allocate = allocate
        self._lock = threading.Lock()
        self._next = 0
        self._end = 0  # Exclusive end of the current block.

    def init_producer_id(self, producer_id: int, producer_epoch: int) -> tuple[int, int]:
        """(producer id, epoch): a new id at epoch 0, or the next epoch of ``producer_id``.

        Raises ``RaftkaError`` when the controller cannot hand out a block.
        """
        if producer_id >= 0 and 0 <= producer_epoch < _MAX_EPOCH:
            return producer_id, producer_epoch + 1
        with self._lock:
            if self._next >= self._end:
                response = self._allocate(
                    controller_pb2.AllocateProducerIdsRequest(
                        broker_id=self.broker_id, broker_epoch=self._broker_epoch()
                    )
                )
                if response.error.code != common_pb2.NONE:
                    raise RaftkaError(response.error.code, response.error.message)
                self._next = response.first_producer_id
                self._end = response.first_producer_id + response.block_size
            producer_id = self._next
            self._next += 1
            return producer_id, 0
