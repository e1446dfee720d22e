"""A controllable TCP proxy that injects network faults between the nodes of a chaos run.

Theory of operation. The harness puts one link on every ordered pair of nodes (src, dst): node src
dials the link's port whenever it wants to reach dst, and the proxy connects on to dst's real
address. Bytes from the dialling side are "src->dst", bytes coming back are "dst->src". A
`LinkTable` says which directions are blocked and how much latency each direction has; it is
plain data behind a lock, changed by the nemesis from any thread, and it calls its listeners after
every change. A `NetProxy` runs an asyncio loop in one daemon thread and consults the table for
every chunk; a change wakes the waiting directions at once, so faults need no root and no iptables.

A blocked direction is a black hole that stalls and never drops bytes. A real partition makes TCP
retransmit, so the stream stalls and resumes intact; dropping bytes from the middle of a stream
would corrupt the framing of HTTP/2 (gRPC) or of the Raft library's protocol, which no network
does. So while a direction is blocked the proxy stops reading its source socket and forwards
nothing; the bytes wait in the kernel and in bounded proxy buffers, and TCP flow control pushes
back on the sender. On heal everything that waited is forwarded, in order. A connection accepted
while src->dst is blocked is held without dialling dst until the direction opens.

Each direction of a connection is two tasks joined by a `_Pipe` bounded in bytes: a reader that
reads chunks only while the direction is open and stamps each with its delivery time (the time it
was read plus the direction's latency at that moment), and a writer that delivers the chunks in
order, no earlier than their stamps and only while the direction is open. End of stream travels
through the pipe like a chunk, so a FIN is delayed and stalled like data and then forwarded as a
half-close; a connection is closed once both directions have ended, or at once (with a reset) if
either side fails.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

log = logging.getLogger(__name__)

Pair = tuple[int, int]
"""A direction between two nodes: (src, dst)."""

Listener = Callable[[], None]

CHUNK_BYTES = 64 * 1024
"""The largest read from a socket, and the StreamReader buffer limit."""

PIPE_LIMIT_BYTES = 1024 * 1024
"""Bytes a direction may hold between reading and delivering (stalled or delayed)."""

ACCEPT_BATCH = 16
"""Connections accepted per wake-up of a listening socket, so one busy link cannot hog the loop."""

ACCEPT_RETRY_S = 0.5
"""The pause before listening again after accept failed (out of file descriptors, say)."""

CONNECT_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0

_T = TypeVar("_T")


def _pair(src: int, dst: int) -> Pair:
    if src == dst:
        raise ValueError(f"a link joins two different nodes, not {src} to itself")
    return (src, dst)


def _both_ways(a: int, b: int) -> list[Pair]:
    return [_pair(a, b), _pair(b, a)]


class LinkTable:
    """The network faults in force: blocked directions and added latency, per (src, dst) pair.

    Thread-safe: the nemesis changes it from its own thread while proxy threads read it. Every
    method that changes something bumps `version` and then calls the listeners, outside the lock,
    in the changing thread; a listener must be quick and must not change the table.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocked: frozenset[Pair] = frozenset()
        self._delay_s: dict[Pair, float] = {}
        self._version = 0
        self._listeners: list[Listener] = []

    # Faults.

    def cut(self, a: int, b: int) -> None:
        """Block both directions between a and b."""
        self._update(block=_both_ways(a, b))

    def cut_one_way(self, src: int, dst: int) -> None:
        """Block src->dst only; dst->src still flows."""
        self._update(block=[_pair(src, dst)])

    def partition(self, side_a: Iterable[int], side_b: Iterable[int]) -> None:
        """Block every direction between a node of side_a and a node of side_b."""
        a, b = frozenset(side_a), frozenset(side_b)
        if a & b:
            raise ValueError(f"partition sides overlap on {sorted(a & b)}")
        self._update(block=[p for x in a for y in b for p in _both_ways(x, y)])

    def isolate(self, node: int, others: Iterable[int]) -> None:
        """Cut node from every one of others (node itself among them is ignored)."""
        self.partition([node], [o for o in others if o != node])

    def add_latency(self, src: int, dst: int, seconds: float, *, both_ways: bool = False) -> None:
        """Set the latency added to src->dst (and dst->src if both_ways), replacing any earlier
        value; 0 removes it. Chunks already read keep the latency they were read with."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"latency must be a finite number of seconds >= 0, not {seconds}")
        pairs = _both_ways(src, dst) if both_ways else [_pair(src, dst)]
        self._update(delay_s={p: float(seconds) for p in pairs})

    def heal(self) -> None:
        """Remove every fault: nothing blocked, no added latency."""
        self._update(heal=True)

    # Queries.

    def blocked(self, src: int, dst: int) -> bool:
        # The set and the dict are replaced on change, never mutated: one read needs no lock.
        return (src, dst) in self._blocked

    def delay(self, src: int, dst: int) -> float:
        """The latency added to src->dst, in seconds."""
        return self._delay_s.get((src, dst), 0.0)

    @property
    def version(self) -> int:
        """Counts the changes so far; it grows by one per call that changed something."""
        with self._lock:
            return self._version

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary of the faults in force, for the run's history."""
        with self._lock:
            blocked, delay_s = self._blocked, dict(self._delay_s)
        return {
            "blocked": [{"src": s, "dst": d} for s, d in sorted(blocked)],
            "latency": [
                {"src": s, "dst": d, "delay_s": x} for (s, d), x in sorted(delay_s.items())
            ],
        }

    # Listeners.

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Remove listener if present."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _update(
        self,
        *,
        block: Iterable[Pair] = (),
        delay_s: dict[Pair, float] | None = None,
        heal: bool = False,
    ) -> None:
        with self._lock:
            if heal:
                blocked: frozenset[Pair] = frozenset()
                delays: dict[Pair, float] = {}
            else:
                blocked = self._blocked | frozenset(block)
                merged = {**self._delay_s, **(delay_s or {})}
                delays = {p: x for p, x in merged.items() if x > 0}
            if blocked == self._blocked and delays == self._delay_s:
                return
            self._blocked, self._delay_s = blocked, delays
            self._version += 1
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:
                log.exception("link table listener %r failed", listener)


@dataclass(frozen=True)
class LinkStats:
    """Counters of one proxy link; bytes are counted when delivered."""

    src: int
    dst: int
    port: int
    target_host: str
    target_port: int
    connections_accepted: int
    connections_open: int
    bytes_src_to_dst: int
    bytes_dst_to_src: int


class _Pipe:
    """A FIFO of (deliver_at, chunk) from a direction's reader to its writer, bounded in bytes.

    An empty chunk marks the end of the stream.
    """

    def __init__(self, limit_bytes: int) -> None:
        self._chunks: deque[tuple[float, bytes]] = deque()
        self._bytes = 0
        self._limit_bytes = limit_bytes
        self._changed = asyncio.Condition()

    async def put(self, deliver_at: float, chunk: bytes) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._bytes < self._limit_bytes)
            self._chunks.append((deliver_at, chunk))
            self._bytes += len(chunk)
            self._changed.notify_all()

    async def get(self) -> tuple[float, bytes]:
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._chunks))
            deliver_at, chunk = self._chunks.popleft()
            self._bytes -= len(chunk)
            self._changed.notify_all()
            return deliver_at, chunk


class _Link:
    """One listening port: connections src opened to dst. Touched only in the proxy's loop."""

    def __init__(self, src: int, dst: int, target_host: str, target_port: int) -> None:
        self.src, self.dst = src, dst
        self.target_host, self.target_port = target_host, target_port
        self.listener: socket.socket | None = None
        self.port = 0
        self.connections: set[_Connection] = set()
        self.connections_accepted = 0
        self.bytes_src_to_dst = 0
        self.bytes_dst_to_src = 0

    def count(self, src: int, n: int) -> None:
        if src == self.src:
            self.bytes_src_to_dst += n
        else:
            self.bytes_dst_to_src += n

    def stats(self) -> LinkStats:
        return LinkStats(
            src=self.src,
            dst=self.dst,
            port=self.port,
            target_host=self.target_host,
            target_port=self.target_port,
            connections_accepted=self.connections_accepted,
            connections_open=len(self.connections),
            bytes_src_to_dst=self.bytes_src_to_dst,
            bytes_dst_to_src=self.bytes_dst_to_src,
        )


def _reset_on_close(sock: socket.socket) -> None:
    """Make closing sock send a reset (RST) rather than an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # Already closed.


class _Connection:
    """One accepted connection: its socket, the task relaying it, and the stream writers of
    both sides once the relay has made them."""

    task: asyncio.Task[None]

    def __init__(self, accepted: socket.socket) -> None:
        self.accepted = accepted
        self.writers: list[asyncio.StreamWriter] = []

    def abort(self) -> None:
        """Close both sockets at once with a reset, discarding anything unsent."""
        if not self.writers:
            # The relay never wrapped the socket (or its transport has closed it already).
            _reset_on_close(self.accepted)
            self.accepted.close()
        for writer in self.writers:
            if not writer.transport.is_closing():
                _reset_on_close(writer.get_extra_info("socket"))
            writer.transport.abort()


class NetProxy:
    """TCP links between nodes that obey a `LinkTable`; an asyncio loop in one daemon thread.

    The public methods are for other threads (the harness, tests); each waits at most a few
    seconds for the loop. `close` (or leaving the `with` block) stops everything.
    """

    def __init__(self, table: LinkTable, host: str = "127.0.0.1") -> None:
        self._table = table
        self._host = host
        self._links: dict[int, _Link] = {}
        self._closed = False
        self._close_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        # Replaced by a fresh event each time it is set: a broadcast to every waiting direction.
        self._table_changed = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="netproxy", daemon=True)
        self._thread.start()
        table.add_listener(self._on_table_change)

    def __enter__(self) -> NetProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Public API, for other threads.

    def add_link(self, src: int, dst: int, target_host: str, target_port: int) -> int:
        """Listen on a free port of the proxy's host for connections src opens to dst, which
        is at (target_host, target_port); returns the port."""
        link = _Link(*_pair(src, dst), target_host, target_port)
        listener = socket.create_server((self._host, 0))
        listener.setblocking(False)
        try:
            return self._call(self._start_link(link, listener))
        except BaseException:
            listener.close()
            raise

    def reset(self, a: int, b: int) -> int:
        """Close, with a reset, every open connection on the links between a and b, both
        directions, as a TCP timeout would after a long cut; returns how many were closed."""
        pairs = set(_both_ways(a, b))
        return self._call(self._reset(lambda link: (link.src, link.dst) in pairs))

    def reset_node(self, node: int) -> int:
        """Close every open connection on the links to and from node; returns how many."""
        return self._call(self._reset(lambda link: node in (link.src, link.dst)))

    def stats(self) -> dict[int, LinkStats]:
        """Counters per link, by listening port."""
        if self._closed:
            return {port: link.stats() for port, link in self._links.items()}
        return self._call(self._stats())

    def close(self) -> None:
        """Stop accepting, close every connection and listening socket, and stop the thread.
        Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._table.remove_listener(self._on_table_change)
        try:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            future.result(CLOSE_TIMEOUT_S)
        except Exception:
            log.exception("netproxy shutdown failed")
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:
            pass  # The loop is already closed.
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.error("netproxy thread did not stop within %s s", CLOSE_TIMEOUT_S)

    # The loop's thread.

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # Whatever is still running (a call cut short by close) is cancelled, as asyncio.run
            # does, so the loop closes without pending tasks.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._closed:
            coro.close()
            raise RuntimeError("the proxy is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("NetProxy methods are for other threads than the proxy's own")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT_S)

    def _on_table_change(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:
            pass  # The loop is closed: nothing is waiting.

    def _wake(self) -> None:
        woken, self._table_changed = self._table_changed, asyncio.Event()
        woken.set()

    async def _wait_open(self, src: int, dst: int) -> None:
        # No await between the check and taking the event, and table changes wake us through
        # the loop, so a change cannot slip by unseen.
        while self._table.blocked(src, dst):
            await self._table_changed.wait()

    async def _start_link(self, link: _Link, listener: socket.socket) -> int:
        link.listener = listener
        link.port = listener.getsockname()[1]
        self._links[link.port] = link
        self._loop.add_reader(listener.fileno(), self._accept, link)
        return link.port

    async def _stats(self) -> dict[int, LinkStats]:
        return {port: link.stats() for port, link in self._links.items()}

    async def _reset(self, chosen: Callable[[_Link], bool]) -> int:
        connections = [c for link in self._links.values() if chosen(link) for c in link.connections]
        for connection in connections:
            connection.task.cancel()
        if connections:
            await asyncio.wait([c.task for c in connections], timeout=CLOSE_TIMEOUT_S)
        for connection in connections:
            connection.abort()  # Done already when the task ended; this covers a stuck one.
        return len(connections)

    async def _shutdown(self) -> None:
        for link in self._links.values():
            if link.listener is not None:
                self._loop.remove_reader(link.listener.fileno())
                link.listener.close()  # The kernel resets connections not yet accepted.
        await self._reset(lambda link: True)

    def _accept(self, link: _Link) -> None:
        # Accepting here, in a plain callback, and registering the connection in the same step
        # means no accepted socket is ever out of reach of reset and close.
        assert link.listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                accepted, _ = link.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # Out of file descriptors, say: stop listening a moment rather than spin.
                log.exception("netproxy accept on port %s failed", link.port)
                fd = link.listener.fileno()
                self._loop.remove_reader(fd)
                self._loop.call_later(ACCEPT_RETRY_S, self._loop.add_reader, fd, self._accept, link)
                return
            accepted.setblocking(False)
            connection = _Connection(accepted)
            connection.task = self._loop.create_task(self._relay(link, connection))
            connection.task.add_done_callback(functools.partial(self._relay_done, link, connection))
            link.connections.add(connection)
            link.connections_accepted += 1

    def _relay_done(self, link: _Link, connection: _Connection, task: asyncio.Task[None]) -> None:
        link.connections.discard(connection)
        connection.abort()
        if not task.cancelled() and task.exception() is not None:
            log.error("netproxy relay failed", exc_info=task.exception())

    async def _relay(self, link: _Link, connection: _Connection) -> None:
        """Connect to dst once src->dst is open, then relay both directions until both end.

        Any socket error ends the relay; `_relay_done` then resets both sockets.
        """
        try:
            reader, writer = await asyncio.open_connection(
                sock=connection.accepted, limit=CHUNK_BYTES
            )
            connection.writers.append(writer)
            # A connection src opens during a cut is held: dst sees nothing until it heals.
            await self._wait_open(link.src, link.dst)
            # asyncio.timeout rather than wait_for: in Python 3.11, wait_for swallows a
            # cancellation (reset, close) that arrives as the connection completes.
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                up_reader, up_writer = await asyncio.open_connection(
                    link.target_host, link.target_port, limit=CHUNK_BYTES
                )
            connection.writers.append(up_writer)
            forward, back = _Pipe(PIPE_LIMIT_BYTES), _Pipe(PIPE_LIMIT_BYTES)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._read(reader, forward, link.src, link.dst))
                tasks.create_task(self._write(link, forward, up_writer, link.src, link.dst))
                tasks.create_task(self._read(up_reader, back, link.dst, link.src))
                tasks.create_task(self._write(link, back, writer, link.dst, link.src))
            # Both directions ended cleanly: let the last bytes and FINs go before closing.
            for w in connection.writers:
                w.close()
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.gather(*(w.wait_closed() for w in connection.writers))
        except* OSError:
            pass  # Refused, timed out or reset: closing both sockets with a reset passes it on.

    async def _read(self, reader: asyncio.StreamReader, pipe: _Pipe, src: int, dst: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_open(src, dst)
            chunk = await reader.read(CHUNK_BYTES)
            await pipe.put(loop.time() + self._table.delay(src, dst), chunk)
            if not chunk:
                return

    async def _write(
        self, link: _Link, pipe: _Pipe, writer: asyncio.StreamWriter, src: int, dst: int
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            deliver_at, chunk = await pipe.get()
            wait_s = deliver_at - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            await self._wait_open(src, dst)
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            link.count(src, len(chunk))
            await writer.drain()
