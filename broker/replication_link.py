"""Followers' fetch sessions over a plain TCP link: replication without gRPC.

A follower's fetch is on the path of every ``acks=all`` produce: the leader
appends, answers the follower's fetch in flight, the follower appends and sends
its next fetch, and that fetch's offset is what moves the high watermark. Over
a gRPC stream in Python each of those messages is several thread hand-offs in
each process (gRPC's polling thread, then the handler or the thread feeding
the request iterator, then the wait for the send's completion), and about
0.12 ms of CPU a side. Over a socket, the leader's link thread writes the answer
itself, and the follower's fetcher thread reads it, appends and writes its next
request itself: one wake-up a side. Kafka replicates over its own TCP protocol
for the same reason.

The link carries the same messages as the FetchStream, so the leader serves it
with the same fetch session (``ReplicaManager.fetch_in_session``) and the
follower builds the same requests. It is a broker's second listener,
``replication.listener``, advertised in its registration as ``REPLICATION``; a
follower whose leader advertises none fetches over the FetchStream as before.

Wire format: the dialling follower first sends ``MAGIC``; then each message is
a 4-byte big-endian length and a serialized protobuf, ``FetchRequest`` from the
follower and ``FetchResponse`` from the leader, one answer per request, in
order. A frame the leader cannot read ends the link (nothing else changes);
only followers fetch here, never consumers.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError
from raftka.v1 import broker_pb2, common_pb2

if TYPE_CHECKING:
    from broker.fetch_session import FetchSession
    from broker.replica_manager import ReplicaManager

log = logging.getLogger(__name__)

# The name of the listener in a broker's registration.
REPLICATION_LISTENER = "REPLICATION"
MAGIC = b"RKFETCH1"
_LENGTH = struct.Struct(">I")
# As large as the gRPC listener takes.
MAX_FRAME_BYTES = 128 * 1024 * 1024
# A frame this small goes out in one write (header and body together).
_ONE_WRITE_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 5.0
_CONNECT_POLL_S = 0.05
_CONNECTING = {errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK}
# A session's socket timeout ends at its deadline; this much early still counts.
_CLOCK_SLACK_S = 0.01
# The follower sends MAGIC right after connecting.
HANDSHAKE_S = 10.0
# A follower always has a fetch out (it waits at most max.wait.ms for each
# answer), so a link silent for this long has lost its follower.
IDLE_LINK_S = 120.0
MAX_LINKS = 256


class SessionError(Exception):
    """A fetch session failed or ended; ``expired`` when its lifetime ran out."""

    def __init__(self, reason: str, *, expired: bool = False):
        super().__init__(reason)
        self.expired = expired


class _HandlerFailed(Exception):
    """The leader failed to answer a fetch (its cause is chained): logged in full."""


def read_frame(reader: io.BufferedReader) -> bytes | None:
    """The next frame's body; None at a clean end (between frames)."""
    header = reader.read(_LENGTH.size)
    if not header:
        return None
    if len(header) < _LENGTH.size:
        raise SessionError("the link closed inside a frame header")
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise SessionError(f"a frame of {length} bytes is over the {MAX_FRAME_BYTES} limit")
    body = reader.read(length)
    if len(body) < length:
        raise SessionError(f"the link closed {len(body)} bytes into a {length}-byte frame")
    return body


def write_frame(sock: socket.socket, body: bytes) -> None:
    if len(body) > MAX_FRAME_BYTES:
        raise SessionError(f"a frame of {len(body)} bytes is over the {MAX_FRAME_BYTES} limit")
    header = _LENGTH.pack(len(body))
    if len(body) <= _ONE_WRITE_BYTES:
        sock.sendall(header + body)
    else:
        sock.sendall(header)
        sock.sendall(body)


# --------------------------------------------------------------------------- follower side


class LinkSession:
    """A fetch session over a link to the leader, opened at the first exchange.

    ``close()`` may come from any thread: it wakes an exchange waiting on the
    link (which then raises) and the socket is closed by whichever of the two
    finishes last, so no thread reads from a descriptor number reused since."""

    def __init__(self, address: str, lifetime_s: float):
        self._address = address
        self._deadline = time.monotonic() + lifetime_s
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._reader: io.BufferedReader | None = None
        self._busy = False
        self.closed = False

    def exchange(self, request: broker_pb2.FetchRequest) -> broker_pb2.FetchResponse:
        """Send ``request`` and wait for its answer; ``SessionError`` when the link
        fails, is closed or outlives its lifetime."""
        with self._lock:
            if self.closed:
                raise SessionError("the session is closed")
            self._busy = True
        try:
            sock, reader = self._sock, self._reader
            if sock is None or reader is None:
                sock, reader = self._connect()
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise SessionError("the session's lifetime ran out", expired=True)
            sock.settimeout(remaining)
            write_frame(sock, request.SerializeToString())
            body = read_frame(reader)
            if body is None:
                raise SessionError("the leader closed the link")
            return broker_pb2.FetchResponse.FromString(body)
        except TimeoutError as e:
            # The socket's timeout is the session's end; a kernel's ETIMEDOUT (a
            # peer gone silent mid-stream) comes as TimeoutError too, and is a failure.
            if time.monotonic() >= self._deadline - _CLOCK_SLACK_S:
                raise SessionError("the session's lifetime ran out", expired=True) from None
            raise SessionError(f"link to {self._address}: {e}") from e
        except (OSError, DecodeError) as e:
            raise SessionError(f"link to {self._address}: {e}") from e
        finally:
            with self._lock:
                self._busy = False
                if self.closed:
                    self._release()

    def _connect(self) -> tuple[socket.socket, io.BufferedReader]:
        """Connect without blocking, looking at ``closed`` between short waits, so
        that ``close()`` ends a connect to a leader that does not answer at once."""
        host, port = self._address.rsplit(":", 1)
        family, kind, proto, _, address = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM
        )[0]
        sock = socket.socket(family, kind, proto)
        reader = sock.makefile("rb")
        with self._lock:
            self._sock, self._reader = sock, reader
            if self.closed:
                raise SessionError("the session is closed")
        sock.setblocking(False)
        code = sock.connect_ex(address)
        if code in _CONNECTING:
            poller = select.poll()  # Not select(): a broker's descriptors go past 1024.
            poller.register(sock, select.POLLOUT)
            deadline = min(time.monotonic() + CONNECT_TIMEOUT_S, self._deadline)
            while not poller.poll(_CONNECT_POLL_S * 1000):
                if self.closed:
                    raise SessionError("the session is closed")
                if time.monotonic() >= deadline:
                    raise SessionError(f"connecting to {self._address} timed out")
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code != 0:
            raise SessionError(f"cannot connect to {self._address}: {os.strerror(code)}")
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(MAGIC)
        return sock, reader

    def close(self) -> None:
        with self._lock:
            self.closed = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # Never connected, or the peer is gone already.
            if not self._busy:
                self._release()

    def _release(self) -> None:
        """Under the lock, with no exchange on the link."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# --------------------------------------------------------------------------- leader side


class LinkListener:
    """Accepts followers' links and answers their fetches, one thread per link
    (a follower has one link to each broker it follows, so there are few)."""

    def __init__(
        self,
        host: str,
        port: int,
        replicas: ReplicaManager,
        *,
        name: str = "broker",
        max_links: int = MAX_LINKS,
        idle_link_s: float = IDLE_LINK_S,
    ):
        self._address = (host, port)
        self._replicas = replicas
        self._name = name
        self._max_links = max_links
        self._idle_link_s = idle_link_s
        self._sock: socket.socket | None = None
        self._links: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._accepting: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        """Listen; returns the bound port (``port`` 0 picks a free one)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A restarted broker binds its port again while its old links linger in
        # TIME_WAIT (gRPC's listener does the same).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(self._address)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accepting = threading.Thread(
            target=self._accept_loop, name=f"{self._name}-link-accept", daemon=True
        )
        self._accepting.start()
        return self.port

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # Wakes accept() on Linux.
            except OSError:
                pass
        if self._accepting is not None:
            self._accepting.join(timeout_s)
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            # Under the lock: a link's thread closes its socket only after taking
            # it out of _links under the same lock, so none is shut down once closed.
            links = dict(self._links)
            for conn in links:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        deadline = time.monotonic() + timeout_s
        for thread in links.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def link_count(self) -> int:
        with self._lock:
            return len(self._links)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopped.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                log.exception("%s: replication listener cannot accept", self._name)
                self._stopped.wait(0.1)
                continue
            with self._lock:
                if len(self._links) >= self._max_links or self._stopped.is_set():
                    log.warning(
                        "%s: refusing a link from %s: %d open", self._name, peer, len(self._links)
                    )
                    conn.close()
                    continue
                thread = threading.Thread(
                    target=self._serve,
                    args=(conn, peer),
                    name=f"{self._name}-link-{peer[1]}",
                    daemon=True,
                )
                self._links[conn] = thread
                try:
                    thread.start()
                except RuntimeError:  # No thread to be had: refuse this link, keep accepting.
                    log.exception("%s: cannot serve a link from %s", self._name, peer)
                    del self._links[conn]
                    conn.close()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        session: FetchSession | None = None
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(HANDSHAKE_S)
            with conn.makefile("rb") as reader:
                magic = reader.read(len(MAGIC))
                if magic != MAGIC:
                    if magic:  # Nothing at all is a follower that gave up at once.
                        log.warning("%s: %s:%d is not a follower's link", self._name, *peer)
                    return
                conn.settimeout(self._idle_link_s)
                session = self._replicas.new_fetch_session()
                self._answer_fetches(conn, reader, session)
        except (OSError, SessionError) as e:
            if not self._stopped.is_set():
                log.info("%s: link from %s:%d ended: %s", self._name, *peer, e)
        except Exception:
            log.exception("%s: link from %s:%d failed", self._name, *peer)
        finally:
            if session is not None:
                session.close()
            with self._lock:
                self._links.pop(conn, None)
                conn.close()

    def _answer_fetches(
        self,
        conn: socket.socket,
        reader: io.BufferedReader,
        session: FetchSession,
    ) -> None:
        while not self._stopped.is_set():
            body = read_frame(reader)
            if body is None:
                return
            try:
                request = broker_pb2.FetchRequest.FromString(body)
            except DecodeError as e:
                raise SessionError(f"an unreadable fetch request ({e})") from None
            if request.replica_id < 0:
                refusal = broker_pb2.FetchResponse(
                    error=common_pb2.Error(
                        code=common_pb2.INVALID_REQUEST,
                        message="only followers fetch over the replication listener",
                    )
                )
                write_frame(conn, refusal.SerializeToString())
                return
            try:
                response = self._replicas.fetch_in_session(session, request)
            except Exception as e:
                # Not the link's fault (a storage error, a bug): said as such, and
                # the link ends, as a gRPC stream's does when its handler raises.
                raise _HandlerFailed() from e
            write_frame(conn, response.SerializeToString())
