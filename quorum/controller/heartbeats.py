"""Broker sessions, counted in time the caller passes in.

The active controller touches a broker's session on every heartbeat and asks
which sessions have expired on its own schedule; the fencing that follows is
decided by ``brokers.expire_sessions``. Sessions are not replicated: a new
active controller starts every registered, unfenced broker on a fresh session
(``reset_all``), as Kafka's BrokerHeartbeatManager does, so a failover never
fences a broker that was heartbeating to the old controller.

A broker also holds a metadata stream open to the active controller. When that
stream is torn down from the broker's side (its process died: the kernel
closes its sockets), the session becomes *suspect* and expires after a short
grace unless the broker reconnects or heartbeats first. A crashed broker is
then fenced in well under a second instead of a whole session timeout, while
a paused or partitioned one (whose connection stays up) keeps the full
timeout. Kafka has no such shortcut; a streaming platform on one laptop or
one rack gains seconds of failover from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from quorum.image import MetadataImage


@dataclass(slots=True)
class _Session:
    broker_epoch: int
    last_contact_ms: int
    metadata_offset: int
    # Set when the broker's metadata stream dropped: the session expires then.
    suspect_until_ms: int | None = None


class BrokerHeartbeatManager:
    """Last contact per broker; pure apart from its own small table."""

    def __init__(self, session_timeout_ms: int) -> None:
        if session_timeout_ms <= 0:
            raise ValueError(f"session timeout must be positive, not {session_timeout_ms}")
        self.session_timeout_ms = session_timeout_ms
        self._sessions: dict[int, _Session] = {}

    def touch(self, broker_id: int, broker_epoch: int, now_ms: int, metadata_offset: int) -> None:
        self._sessions[broker_id] = _Session(broker_epoch, now_ms, metadata_offset)

    def connection_lost(self, broker_id: int, now_ms: int, grace_ms: int) -> None:
        """The broker's stream dropped: expire its session ``grace_ms`` from now
        unless it shows up again first (``touch`` or ``connection_opened``)."""
        session = self._sessions.get(broker_id)
        if session is not None and grace_ms >= 0:
            session.suspect_until_ms = now_ms + grace_ms

    def connection_opened(self, broker_id: int) -> None:
        session = self._sessions.get(broker_id)
        if session is not None:
            session.suspect_until_ms = None

    def remove(self, broker_id: int) -> None:
        self._sessions.pop(broker_id, None)

    def reset_all(self, image: MetadataImage, now_ms: int) -> None:
        """Start a fresh session for every registered, unfenced broker; forget the rest."""
        previous = self._sessions
        self._sessions = {}
        for broker in image.brokers.values():
            if not broker.fenced:
                known = previous.get(broker.broker_id)
                offset = known.metadata_offset if known else -1
                self.touch(broker.broker_id, broker.broker_epoch, now_ms, offset)

    def expired(self, now_ms: int) -> list[tuple[int, int]]:
        """(broker id, broker epoch) of sessions older than the timeout, by broker id.

        A session is still valid exactly at the timeout, expired one
        millisecond later.
        """
        deadline = now_ms - self.session_timeout_ms
        return sorted(
            (broker_id, s.broker_epoch)
            for broker_id, s in self._sessions.items()
            if s.last_contact_ms < deadline
            or (s.suspect_until_ms is not None and s.suspect_until_ms < now_ms)
        )

    def metadata_offset(self, broker_id: int) -> int:
        """The last metadata offset the broker reported, -1 when unknown."""
        session = self._sessions.get(broker_id)
        return -1 if session is None else session.metadata_offset

    def __contains__(self, broker_id: object) -> bool:
        return broker_id in self._sessions
