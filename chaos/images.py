"""Gather every node's metadata image digest from a live local cluster.

For ``chaos.quorum_checks.check_images``: each running controller answers
DescribeCluster from its own image (any controller answers, not only the active
one), each running broker answers DescribeBroker from the image it has
published, both with ``include_image_digest``. Asked directly at the node's own
``host:rpc_port``, not through a client that would route to the leader.

A quiet cluster converges: the active controller writes no periodic records
(heartbeats write only on a change of state: fence, unfence, shutdown), so once
the workload and the faults have stopped every node reaches the same offset.
Until then answers are gathered again, up to ``timeout_s``; the checker compares
digests at equal offsets, so the last answers are useful even when the nodes
never converged.
"""

from __future__ import annotations

import logging
import time

import grpc
from raftka.v1 import broker_pb2, broker_pb2_grpc, controller_pb2, controller_pb2_grpc

from chaos.quorum_checks import NodeImage
from cli.localcluster import LocalCluster, NodeStatus

log = logging.getLogger(__name__)

_RETRY_S = 0.25
# Per call: a digest of a large image takes a while on a busy machine.
_CALL_TIMEOUT_S = 10.0


def gather_images(
    cluster: LocalCluster, timeout_s: float
) -> tuple[dict[int, NodeImage], dict[int, NodeImage]]:
    """(controllers, brokers): per running node, (applied metadata offset, image digest).

    Asks again until every running node has answered and all are at one offset,
    or ``timeout_s`` has passed; returns the last round's answers (a node that did
    not answer in it, or is paused, is left out and logged).
    """
    deadline = time.monotonic() + timeout_s
    channels: dict[str, grpc.Channel] = {}
    try:
        while True:
            nodes = [n for n in cluster.status() if n.state == "running"]
            controllers: dict[int, NodeImage] = {}
            brokers: dict[int, NodeImage] = {}
            missing: list[str] = []
            for node in nodes:
                remaining = deadline - time.monotonic()
                timeout = max(1.0, min(_CALL_TIMEOUT_S, remaining))
                answer = _ask(channels, node, timeout)
                if answer is None:
                    missing.append(f"{node.role} {node.id}")
                elif node.role == "controller":
                    controllers[node.id] = answer
                else:
                    brokers[node.id] = answer
            offsets = {offset for offset, _ in (*controllers.values(), *brokers.values())}
            if not missing and len(offsets) <= 1:
                return controllers, brokers
            if time.monotonic() + _RETRY_S >= deadline:
                if missing:
                    log.warning("no image digest from %s", ", ".join(missing))
                if len(offsets) > 1:
                    log.warning("images did not converge to one offset: %s", sorted(offsets))
                return controllers, brokers
            time.sleep(_RETRY_S)
    finally:
        for channel in channels.values():
            channel.close()


def _ask(channels: dict[str, grpc.Channel], node: NodeStatus, timeout_s: float) -> NodeImage | None:
    address = node.rpc_address
    channel = channels.get(address)
    if channel is None:
        channel = channels[address] = grpc.insecure_channel(address)
    try:
        if node.role == "controller":
            cluster = controller_pb2_grpc.ControllerStub(channel).DescribeCluster(
                controller_pb2.DescribeClusterRequest(include_image_digest=True), timeout=timeout_s
            )
            if cluster.error.code or not cluster.image_digest:
                return None
            return cluster.metadata_offset, cluster.image_digest
        broker = broker_pb2_grpc.BrokerStub(channel).DescribeBroker(
            broker_pb2.DescribeBrokerRequest(include_image_digest=True), timeout=timeout_s
        )
        if broker.error.code or not broker.image_digest:
            return None
        return broker.metadata_offset, broker.image_digest
    except grpc.RpcError as exc:
        log.debug("%s %d did not answer: %s", node.role, node.id, exc)
        return None
