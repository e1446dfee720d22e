"""The broker's session with the controller: register, heartbeat, shut down in order.

Theory of operation. A broker process gets a fresh incarnation id. Its
lifecycle thread registers with the active controller (the answer is its
broker epoch), then heartbeats every ``broker.heartbeat.interval.ms``,
reporting the last metadata offset the follower has applied. The controller
unfences the broker once that offset has passed its registration, and fences
it when heartbeats stop for ``broker.session.timeout.ms``.

The states and the moves between them are the table ``TRANSITIONS`` below::

    starting -> registering -> fenced <-> running
                    ^            |          |
                    +------------+----------+   (STALE_BROKER_EPOCH / BROKER_ID_NOT_REGISTERED)
    any -> shutting_down -> stopped;  any -> stopped

A move that the table does not allow is ignored, which keeps
``shutting_down`` sticky against a heartbeat answer that was already on its way.

Re-registration happens only when the controller says the registration is
gone. A controller failover is not that: heartbeats that fail with
NOT_CONTROLLER or an unreachable node are retried through ``ControllerClient``
(which follows hints and tries every address) with a per-call timeout well
under the session timeout, so the broker keeps its epoch across failovers.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Protocol

from raftka.v1 import common_pb2, controller_pb2

from broker.replication_link import REPLICATION_LISTENER
from client._controller import ControllerClient
from client.errors import RaftkaError, check
from quorum.config import NodeConfig

log = logging.getLogger(__name__)

STARTING = "starting"
REGISTERING = "registering"
FENCED = "fenced"
RUNNING = "running"
SHUTTING_DOWN = "shutting_down"
STOPPED = "stopped"

TRANSITIONS: dict[str, frozenset[str]] = {
    STARTING: frozenset({REGISTERING, SHUTTING_DOWN, STOPPED}),
    REGISTERING: frozenset({FENCED, RUNNING, SHUTTING_DOWN, STOPPED}),
    FENCED: frozenset({RUNNING, REGISTERING, SHUTTING_DOWN, STOPPED}),
    RUNNING: frozenset({FENCED, REGISTERING, SHUTTING_DOWN, STOPPED}),
    SHUTTING_DOWN: frozenset({STOPPED}),
    STOPPED: frozenset(),
}

# Errors that mean the controller no longer knows this registration.
_REGISTRATION_LOST = {common_pb2.STALE_BROKER_EPOCH, common_pb2.BROKER_ID_NOT_REGISTERED}
_RETRY_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0)
# How often to heartbeat while a controlled shutdown waits for leaderships to move.
_SHUTDOWN_HEARTBEAT_S = 0.1
# Granularity of waits between heartbeats (to notice catch-up and requests).
_POLL_S = 0.05


class OffsetSource(Protocol):
    """What the lifecycle needs from the metadata follower."""

    @property
    def offset(self) -> int: ...

    def wait_for_offset(self, offset: int, timeout_s: float) -> bool: ...


class BrokerLifecycle:
    """Registration and heartbeats of one broker process, on one daemon thread."""

    def __init__(
        self,
        config: NodeConfig,
        follower: OffsetSource,
        client: ControllerClient,
        *,
        listener: tuple[str, int] | None = None,
        replication_listener: tuple[str, int] | None = None,
    ):
        self.broker_id = config.node_id
        self.cluster_id = config.cluster_id
        self.rack = str(config["broker.rack"])
        self.listener = listener if listener is not None else config.listener
        # Registered in this order: clients take the first (the gRPC listener).
        self.listeners = {"PLAINTEXT": self.listener}
        if replication_listener is not None:
            self.listeners[REPLICATION_LISTENER] = replication_listener
        self.heartbeat_interval_s = config["broker.heartbeat.interval.ms"] / 1000
        self.session_timeout_s = config["broker.session.timeout.ms"] / 1000
        # Long enough to ride out a controller election, short enough to leave
        # room for another heartbeat before the session expires.
        self.request_timeout_s = min(
            self.session_timeout_s / 3, max(self.heartbeat_interval_s, 1.0)
        )
        self.follower = follower
        self.client = client
        self.incarnation_id = uuid.uuid4().hex
        self.broker_epoch = -1
        self.registrations = 0
        self.heartbeats = 0
        self._state = STARTING
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._want_shutdown = False
        self._shutdown_done = threading.Event()
        self._reported_offset = -1
        self._thread = threading.Thread(
            target=self._run, name=f"broker-lifecycle-{self.broker_id}", daemon=True
        )

    @property
    def state(self) -> str:
        return self._state

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout_s: float) -> bool:
        """Controlled shutdown: heartbeat with want_shutdown until the controller agrees.

        Returns True if the controller answered should_shut_down within
        ``timeout_s``; the lifecycle is stopped either way.
        """
        deadline = time.monotonic() + timeout_s
        agreed = False
        if self._thread.is_alive() and self.broker_epoch >= 0:
            self._want_shutdown = True
            self._set_state(SHUTTING_DOWN)
            self._wake.set()
            agreed = self._shutdown_done.wait(max(0.0, deadline - time.monotonic()))
            if not agreed:
                log.warning("broker %d: controlled shutdown timed out", self.broker_id)
        self.stop(max(0.1, deadline - time.monotonic()))
        return agreed

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop heartbeating at once; True if the thread ended within ``timeout_s``."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._set_state(STOPPED)
        return not self._thread.is_alive()

    # -- the thread ---------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                if self.broker_epoch < 0:
                    self._set_state(REGISTERING)
                    ok = self._register()
                else:
                    ok = self._heartbeat()
                if self._shutdown_done.is_set():
                    break
                if ok:
                    failures = 0
                    self._wait_for_next_heartbeat()
                else:
                    self._wake.wait(_RETRY_BACKOFF_S[min(failures, len(_RETRY_BACKOFF_S) - 1)])
                    failures += 1
        except Exception:
            log.exception("broker %d: lifecycle thread failed", self.broker_id)
        finally:
            self._set_state(STOPPED)

    def _register(self) -> bool:
        request = controller_pb2.RegisterBrokerRequest(
            broker_id=self.broker_id,
            incarnation_id=self.incarnation_id,
            listeners=[
                common_pb2.Endpoint(name=name, host=host, port=port)
                for name, (host, port) in self.listeners.items()
            ],
            rack=self.rack,
            cluster_id=self.cluster_id,
        )
        try:
            response = self.client.call("RegisterBroker", request, timeout_s=self.request_timeout_s)
            check(response.error)
        except RaftkaError as exc:
            log.warning("broker %d: registration failed: %s", self.broker_id, exc)
            return False
        self.broker_epoch = response.broker_epoch
        self.registrations += 1
        self._reported_offset = -1
        log.info(
            "broker %d registered (epoch %d, incarnation %s, registration #%d)",
            self.broker_id,
            self.broker_epoch,
            self.incarnation_id,
            self.registrations,
        )
        self._set_state(FENCED)
        return True

    def _heartbeat(self) -> bool:
        offset = self.follower.offset
        request = controller_pb2.BrokerHeartbeatRequest(
            broker_id=self.broker_id,
            broker_epoch=self.broker_epoch,
            metadata_offset=offset,
            want_shutdown=self._want_shutdown,
        )
        try:
            response = self.client.call(
                "BrokerHeartbeat", request, timeout_s=self.request_timeout_s
            )
            check(response.error)
        except RaftkaError as exc:
            if exc.code in _REGISTRATION_LOST:
                return self._registration_lost(exc)
            log.warning("broker %d: heartbeat failed: %s", self.broker_id, exc)
            return False
        self.heartbeats += 1
        self._reported_offset = offset
        if response.should_shut_down:
            log.info("broker %d: controller agreed to shut down", self.broker_id)
            self._shutdown_done.set()
        elif not self._want_shutdown:
            self._set_state(FENCED if response.is_fenced else RUNNING)
        return True

    def _registration_lost(self, exc: RaftkaError) -> bool:
        if self._want_shutdown:
            # Fencing already moved every leadership away: nothing is left to hand over.
            log.info("broker %d: registration gone during shutdown (%s)", self.broker_id, exc)
            self._shutdown_done.set()
            return True
        log.warning("broker %d: registration lost (%s); registering again", self.broker_id, exc)
        self.broker_epoch = -1
        self._set_state(REGISTERING)
        return True

    def _wait_for_next_heartbeat(self) -> None:
        interval = _SHUTDOWN_HEARTBEAT_S if self._want_shutdown else self.heartbeat_interval_s
        deadline = time.monotonic() + interval
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._wake.is_set():
                self._wake.clear()
                return
            if self._state == FENCED and self._reported_offset < self.broker_epoch:
                # Heartbeat as soon as the follower passes the registration, so
                # the controller can unfence without waiting a whole interval.
                if self.follower.wait_for_offset(self.broker_epoch, min(remaining, _POLL_S)):
                    return
            else:
                self._wake.wait(min(remaining, _POLL_S))

    def _set_state(self, state: str) -> bool:
        with self._state_lock:
            current = self._state
            if state == current or state not in TRANSITIONS[current]:
                return False
            self._state = state
        log.info("broker %d: %s -> %s", self.broker_id, current, state)
        return True
