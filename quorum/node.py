"""A controller node: a Raft voter, the controller runtime and its gRPC service."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc

from quorum import gc_policy
from quorum.config import ConfigError, NodeConfig
from quorum.controller.runtime import ControllerRuntime, RuntimeSettings
from quorum.raft import RaftMetadataLog, RaftTimeouts
from quorum.service import ControllerService, add_to_server

log = logging.getLogger(__name__)

# Each broker holds one FetchMetadata stream open; leave room for requests.
GRPC_WORKERS = 128
# Clients' Requests streams (a broker's, an admin client's) the node serves at once;
# past this, a client makes unary calls. The rest of the threads (104: as many
# brokers' FetchMetadata streams, less a few for unary calls) are for the others.
MAX_CLIENT_STREAMS = 24


def runtime_settings(config: NodeConfig) -> RuntimeSettings:
    return RuntimeSettings(
        node_id=config.node_id,
        cluster_id=config.cluster_id,
        session_timeout_ms=config["broker.session.timeout.ms"],
        heartbeat_interval_ms=config["broker.heartbeat.interval.ms"],
        connection_loss_grace_ms=config["broker.connection.loss.grace.ms"],
        request_timeout_s=config["controller.request.timeout.ms"] / 1000.0,
        batch_max_records=config["controller.batch.max.records"],
        max_records_per_request=config["controller.max.records.per.request"],
        transition_slice=config["controller.transition.slice.partitions"],
        defaults={
            "num.partitions": config["num.partitions"],
            "default.replication.factor": config["default.replication.factor"],
            "producer.id.block.size": config["producer.id.block.size"],
        },
    )


class ControllerNode:
    def __init__(self, config: NodeConfig):
        voter = config.self_voter
        if voter is None or "controller" not in config.roles:
            raise ConfigError(f"node {config.node_id} is not a controller in this config")
        gc_policy.install()
        self.config = config
        self.voter = voter
        timeouts = RaftTimeouts(
            election_min_s=config["controller.election.timeout.min.ms"] / 1000.0,
            election_max_s=config["controller.election.timeout.max.ms"] / 1000.0,
            heartbeat_s=config["controller.heartbeat.interval.ms"] / 1000.0,
            leader_fallback_s=config["controller.leader.fallback.ms"] / 1000.0,
        )
        self.raft_log = RaftMetadataLog(
            config.node_id,
            config.voters,
            config.path("metadata.log.dir"),
            password=config["controller.quorum.password"],
            timeouts=timeouts,
            tail_max_records=config["metadata.log.tail.records"],
            snapshot_min_entries=config["metadata.log.snapshot.min.entries"],
            fsync=config["metadata.log.fsync"],
            dial=config.dialer(),
        )
        self.runtime = ControllerRuntime(self.raft_log, runtime_settings(config))
        self.raft_log.listener = self.runtime
        self.service = ControllerService(
            config.node_id,
            config.voters,
            self.raft_log,
            self.runtime,
            cluster_id=config.cluster_id,
            request_timeout_s=config["controller.request.timeout.ms"] / 1000.0,
            max_client_streams=MAX_CLIENT_STREAMS,
        )
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="ctl-rpc"),
            options=[("grpc.so_reuseport", 0), ("grpc.max_send_message_length", 256 << 20)],
        )
        add_to_server(self.server, self.service)
        bound = self.server.add_insecure_port(voter.rpc_address)
        if bound == 0:
            raise OSError(f"cannot bind the controller service to {voter.rpc_address}")
        self._stopped = threading.Event()

    def start(self) -> None:
        self.raft_log.start()
        self.server.start()
        log.info(
            "controller %d serving on %s (raft %s)",
            self.config.node_id,
            self.voter.rpc_address,
            self.voter.raft_address,
        )

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self.service.stop()
        self.server.stop(grace=1.0).wait(2.0)
        self.raft_log.stop()
        self._stopped.set()
        log.info("controller %d stopped", self.config.node_id)

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._stopped.wait(timeout_s)
