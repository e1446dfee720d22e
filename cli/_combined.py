"""A combined node: controller and broker roles in one process (Kafka's
``process.roles=broker,controller``), for a laptop or a test."""

from __future__ import annotations

from typing import Any

from quorum.config import NodeConfig


class CombinedNode:
    """Starts the controller first, so the broker has a quorum to register
    with; stops the broker first (controlled), so its leaderships move while
    the quorum is still whole."""

    def __init__(self, config: NodeConfig):
        from broker.node import BrokerNode
        from quorum.node import ControllerNode

        self.controller = ControllerNode(config)
        self.broker = BrokerNode(config)

    def start(self) -> None:
        self.controller.start()
        try:
            self.broker.start()
        except BaseException:
            self.controller.stop()
            raise

    def stop(self, controlled: bool = True) -> None:
        try:
            self.broker.stop(controlled=controlled)
        finally:
            self.controller.stop()

    def wait(self, timeout_s: float | None = None) -> Any:
        return self.broker.wait(timeout_s) and self.controller.wait(timeout_s)
