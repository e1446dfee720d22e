"""Client streams on a synchronous gRPC server: each open one holds a server thread.

A broker serves producers and consumers on streams (``ProduceStream``, a consumer's
``FetchStream``), a controller serves clients on ``Requests``. gRPC's synchronous
server gives each open stream one thread of its pool for as long as it is open, so a
server counts them and refuses a new one past its limit. The refusal is
``RESOURCE_EXHAUSTED`` with trailing metadata ``STREAM_REFUSED``; the client then makes
unary calls (``client/_streams.py``).
"""

from __future__ import annotations

import threading

import grpc

# Trailing metadata of a client stream the server refused: the client calls unary.
STREAM_REFUSED = "raftka-stream-refused"


class StreamSlots:
    """Counts the client streams a server serves: each holds a server thread while it
    is open, so past ``limit`` a new one is refused (the client then calls unary)."""

    def __init__(self, limit: int, setting: str):
        self.limit = limit
        self.setting = setting  # What sets the limit, for the refusal's message.
        self.open = 0
        self.refused = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                self.refused += 1
                return False
            self.open += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.open -= 1

    def refuse(self, context: grpc.ServicerContext) -> None:
        """End the stream being opened with the refusal (raises, as ``abort`` does)."""
        context.set_trailing_metadata(((STREAM_REFUSED, str(self.limit)),))
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this server serves {self.limit} client streams at most ({self.setting}); "
            "use unary calls",
        )
