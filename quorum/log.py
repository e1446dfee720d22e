"""The metadata log interface, and an in-memory implementation for tests.

The controller runtime talks to Raft only through ``MetadataLog``. All of its
callbacks (``LogListener`` methods and propose callbacks) run on the log's one
thread, the same thread that runs ``call_soon`` functions, so the state
machine and the controller need no locks.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

from quorum.state import BatchResult, MetadataState


class ProposeOutcome(enum.Enum):
    """How a proposal ended when it did not come back committed."""

    # Definitely not applied: safe to answer "failed" and to retry.
    NOT_APPLIED = "not_applied"
    # May still commit (timeout, leader change mid-flight): answer UNKNOWN_OUTCOME.
    UNKNOWN = "unknown"


ProposeCallback = Callable[[BatchResult | None, ProposeOutcome | None], None]


class LogListener(Protocol):
    def on_commit(self, result: BatchResult, state: MetadataState) -> None:
        """An entry was applied (accepted or refused) on this node."""

    def on_snapshot_loaded(self, state: MetadataState) -> None:
        """The state was replaced by a snapshot (restart or catch-up)."""

    def on_leadership_change(self, is_leader: bool, term: int) -> None:
        """This node became Raft leader in ``term``, or stopped being leader."""

    def on_tick(self, now: float) -> None:
        """Called on the log thread at least every tick interval."""


class MetadataLog(Protocol):
    node_id: int

    @property
    def state(self) -> MetadataState: ...

    def propose(self, payload: bytes, callback: ProposeCallback) -> None:
        """Append a batch through Raft; ``callback`` runs on the log thread."""

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the log thread. Safe from any thread."""

    def term(self) -> int: ...

    def is_leader(self) -> bool: ...

    def leader_id(self) -> int | None: ...


class InMemoryMetadataLog:
    """A single-voter log driven by the test: ``run_pending()`` commits.

    ``fail_next(outcome)`` makes the next proposal end with that outcome, and
    ``set_leader`` moves leadership, so the controller runtime's handling of
    unknown outcomes and leadership changes can be tested without sockets.
    """

    def __init__(
        self,
        node_id: int = 1,
        listener: LogListener | None = None,
        clock: Callable[[], float] = lambda: 0.0,
    ):
        self.node_id = node_id
        self._clock = clock
        self.listener = listener
        self._state = MetadataState()
        self._term = 0
        self._leader: int | None = None
        self._queue: deque[tuple[bytes, ProposeCallback]] = deque()
        self._calls: deque[Callable[[], None]] = deque()
        self._failures: deque[ProposeOutcome] = deque()
        self._lock = threading.Lock()

    @property
    def state(self) -> MetadataState:
        return self._state

    def propose(self, payload: bytes, callback: ProposeCallback) -> None:
        with self._lock:
            self._queue.append((payload, callback))

    def call_soon(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._calls.append(fn)

    def term(self) -> int:
        return self._term

    def is_leader(self) -> bool:
        return self._leader == self.node_id

    def leader_id(self) -> int | None:
        return self._leader

    def fail_next(self, outcome: ProposeOutcome) -> None:
        self._failures.append(outcome)

    def set_leader(self, leader: int | None) -> None:
        was = self.is_leader()
        self._term += 1
        self._leader = leader
        if self.listener is not None and (was or self.is_leader()):
            self.listener.on_leadership_change(self.is_leader(), self._term)

    def run_pending(self) -> int:
        """Commit everything proposed so far; return how many entries ran."""
        count = 0
        while True:
            with self._lock:
                calls, self._calls = list(self._calls), deque()
                queued, self._queue = list(self._queue), deque()
            for fn in calls:
                fn()
            for payload, callback in queued:
                count += 1
                if self._failures:
                    outcome = self._failures.popleft()
                    if outcome is ProposeOutcome.UNKNOWN:
                        # Like Raft after a timeout: it commits all the same.
                        self._apply(payload)
                    callback(None, outcome)
                    continue
                callback(self._apply(payload), None)
            if self.listener is not None:
                self.listener.on_tick(self._clock())
            with self._lock:
                # A tick may propose (a fencing, a slice of a transition): run that too.
                more = bool(self._calls or self._queue)
            if not calls and not queued and not more:
                return count

    def _apply(self, payload: bytes) -> BatchResult:
        result = self._state.apply_payload(payload)
        if self.listener is not None:
            self.listener.on_commit(result, self._state)
        return result
