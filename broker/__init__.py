"""The broker: follows the metadata log, keeps its session with the controller, hosts partitions."""

from broker.lifecycle import BrokerLifecycle
from broker.local_changes import LocalChanges, local_changes
from broker.metadata_follower import MetadataFollower
from broker.node import BrokerNode, HostedPartition

__all__ = [
    "BrokerLifecycle",
    "BrokerNode",
    "HostedPartition",
    "LocalChanges",
    "MetadataFollower",
    "local_changes",
]
