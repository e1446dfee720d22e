"""Every node's metadata image, gathered from real processes, is the controllers' image."""

from __future__ import annotations

import time

import grpc
import pytest
from conftest import running_cluster
from raftka.v1 import broker_pb2, broker_pb2_grpc, controller_pb2, controller_pb2_grpc

from chaos.images import gather_images
from chaos.quorum_checks import check_images
from client import Admin
from quorum.snapshot import decode_image, image_digest

pytestmark = pytest.mark.integration


def test_every_broker_image_equals_the_controllers(tmp_path):
    with running_cluster(tmp_path, controllers=3, brokers=2) as cluster:
        with Admin(cluster.bootstrap, timeout_s=15.0) as admin:
            admin.create_topic("orders", num_partitions=3, replication_factor=2)
            admin.create_topic(
                "audit", num_partitions=2, replication_factor=1, configs={"retention.ms": "60000"}
            )
        started = time.monotonic()
        controllers, brokers = gather_images(cluster, timeout_s=30)
        took = time.monotonic() - started
        nodes = {n.id: n for n in cluster.status()}
        controller_ids = sorted(i for i, n in nodes.items() if n.role == "controller")
        broker_ids = sorted(i for i, n in nodes.items() if n.role == "broker")
        assert len(controller_ids) == 3 and len(broker_ids) == 2
        assert sorted(controllers) == controller_ids and sorted(brokers) == broker_ids, (
            controllers,
            brokers,
        )
        verdict = check_images(controllers, brokers)
        assert verdict.valid, verdict.to_dict()
        images = {*controllers.values(), *brokers.values()}
        assert len(images) == 1, images
        ((offset, digest),) = images
        assert offset == verdict.offset > 0 and took < 30

        with grpc.insecure_channel(nodes[controller_ids[0]].rpc_address) as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            # The digest is of the real image: the same from the controller's snapshot.
            snapshot = stub.FetchSnapshot(controller_pb2.FetchSnapshotRequest(), timeout=10)
            image = decode_image(snapshot.snapshot)
            assert image.topic_by_name("orders") is not None
            if image.offset == offset:  # Nothing was written since.
                assert image_digest(image) == digest
            # Only computed when asked.
            plain = stub.DescribeCluster(controller_pb2.DescribeClusterRequest(), timeout=10)
            assert plain.metadata_offset >= offset and not plain.image_digest
        with grpc.insecure_channel(nodes[broker_ids[0]].rpc_address) as channel:
            plain = broker_pb2_grpc.BrokerStub(channel).DescribeBroker(
                broker_pb2.DescribeBrokerRequest(), timeout=10
            )
            assert plain.metadata_offset >= offset and not plain.image_digest
