"""The chaos harness's fault-injecting TCP proxy (loopback only, a few seconds in all).

- LinkTable: cut, one-way cut, partition, isolate, latency and heal say exactly which directions
  they affect; listeners hear every change and only changes; describe() is JSON.
- NetProxy: bytes flow both ways (through an echo server, with half-close and counters); a cut
  stalls both directions and heal delivers everything written during it, complete and in order;
  a one-way cut stalls one direction only; latency delays each direction and goes on heal; a
  connection opened during a cut reaches the server only after heal; reset and a refused upstream
  close the client's connection; close() stops the thread and the ports refuse connections.

Every wait is bounded by a socket timeout or `WAIT_S`; the only timed waits watch that nothing
arrives for `QUIET_S`.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from chaos.netproxy import LinkTable, NetProxy

HOST = "127.0.0.1"
WAIT_S = 5.0
"""The bound on waiting for something that should happen."""
QUIET_S = 0.3
"""How long a stalled direction is watched for bytes that should not arrive."""


# Helpers.


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(WAIT_S)
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = _EchoServer((HOST, 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(WAIT_S)


@pytest.fixture
def table() -> LinkTable:
    return LinkTable()


@pytest.fixture
def proxy(table: LinkTable) -> Iterator[NetProxy]:
    with NetProxy(table) as p:
        yield p


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A bare server socket: the test plays the server's part itself."""
    with socket.create_server((HOST, 0)) as sock:
        sock.settimeout(WAIT_S)
        yield sock


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test opened, closed after it."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def connect(port: int, sockets: list[socket.socket]) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=WAIT_S)
    sockets.append(sock)
    return sock


def accept(listener: socket.socket, sockets: list[socket.socket]) -> socket.socket:
    sock, _ = listener.accept()
    sock.settimeout(WAIT_S)
    sockets.append(sock)
    return sock


def open_connection(
    proxy: NetProxy,
    listener: socket.socket,
    sockets: list[socket.socket],
    src: int = 1,
    dst: int = 2,
) -> tuple[socket.socket, socket.socket]:
    """A new link src->dst to the listener, and one connection through it: (client, server)."""
    port = proxy.add_link(src, dst, HOST, listener.getsockname()[1])
    client = connect(port, sockets)
    return client, accept(listener, sockets)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts: list[bytes] = []
    received = 0
    while received < n:
        part = sock.recv(min(n - received, 1 << 20))
        assert part, f"EOF after {received} of {n} bytes"
        parts.append(part)
        received += len(part)
    return b"".join(parts)


def recv_until_eof(sock: socket.socket) -> bytes:
    parts: list[bytes] = []
    while part := sock.recv(1 << 20):
        parts.append(part)
    return b"".join(parts)


def assert_quiet(sock: socket.socket) -> None:
    """Nothing arrives on sock for QUIET_S."""
    sock.settimeout(QUIET_S)
    try:
        with pytest.raises(TimeoutError):
            data = sock.recv(1)
            pytest.fail(f"received {data!r} through a blocked direction")
    finally:
        sock.settimeout(WAIT_S)


def assert_closed(sock: socket.socket) -> None:
    """The peer closed sock (EOF) or reset it."""
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return
    assert data == b""


def round_trip(client: socket.socket, server: socket.socket, size: int = 100) -> float:
    """Seconds for size bytes to go client->server and back."""
    message = os.urandom(size)
    start = time.monotonic()
    client.sendall(message)
    assert recv_exactly(server, size) == message
    server.sendall(message)
    assert recv_exactly(client, size) == message
    return time.monotonic() - start


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# LinkTable: the model.


def test_cut_blocks_both_directions_between_the_pair_only(table: LinkTable) -> None:
    table.cut(1, 2)
    assert table.blocked(1, 2) and table.blocked(2, 1)
    assert not table.blocked(1, 3) and not table.blocked(3, 2)
    assert table.delay(1, 2) == 0.0


def test_cut_one_way_blocks_one_direction(table: LinkTable) -> None:
    table.cut_one_way(1, 2)
    assert table.blocked(1, 2)
    assert not table.blocked(2, 1)


def test_partition_blocks_every_pair_across_the_sides(table: LinkTable) -> None:
    side_a, side_b = [1, 2], [3, 4, 5]
    table.partition(side_a, side_b)
    for x in side_a:
        for y in side_b:
            assert table.blocked(x, y) and table.blocked(y, x)
    assert not table.blocked(1, 2) and not table.blocked(2, 1)
    assert not table.blocked(3, 4) and not table.blocked(5, 3)
    with pytest.raises(ValueError, match="overlap"):
        table.partition([1, 2], [2, 3])


def test_isolate_cuts_a_node_from_the_others(table: LinkTable) -> None:
    table.isolate(2, [1, 2, 3])
    assert all(table.blocked(2, o) and table.blocked(o, 2) for o in (1, 3))
    assert not table.blocked(1, 3) and not table.blocked(3, 1)


def test_latency_per_direction_replaces_and_zero_removes(table: LinkTable) -> None:
    table.add_latency(1, 2, 0.1)
    assert (table.delay(1, 2), table.delay(2, 1)) == (0.1, 0.0)
    table.add_latency(1, 2, 0.25, both_ways=True)
    assert (table.delay(1, 2), table.delay(2, 1)) == (0.25, 0.25)
    table.add_latency(2, 1, 0)
    assert (table.delay(1, 2), table.delay(2, 1)) == (0.25, 0.0)
    assert not table.blocked(1, 2)
    with pytest.raises(ValueError):
        table.add_latency(1, 2, -0.1)
    with pytest.raises(ValueError):
        table.add_latency(1, 2, float("nan"))


def test_a_node_has_no_link_to_itself(table: LinkTable) -> None:
    with pytest.raises(ValueError):
        table.cut(1, 1)
    with pytest.raises(ValueError):
        table.add_latency(3, 3, 0.1)


def test_heal_removes_every_fault(table: LinkTable) -> None:
    table.partition([1], [2, 3])
    table.cut_one_way(3, 2)
    table.add_latency(2, 3, 0.5, both_ways=True)
    table.heal()
    pairs = [(s, d) for s in (1, 2, 3) for d in (1, 2, 3) if s != d]
    assert not any(table.blocked(s, d) for s, d in pairs)
    assert all(table.delay(s, d) == 0.0 for s, d in pairs)
    assert table.describe() == {"blocked": [], "latency": []}


def test_describe_is_json_and_sorted(table: LinkTable) -> None:
    table.cut_one_way(3, 1)
    table.cut(2, 1)
    table.add_latency(2, 3, 0.05)
    summary = json.loads(json.dumps(table.describe()))
    assert summary == {
        "blocked": [{"src": 1, "dst": 2}, {"src": 2, "dst": 1}, {"src": 3, "dst": 1}],
        "latency": [{"src": 2, "dst": 3, "delay_s": 0.05}],
    }


def test_listeners_hear_every_change_and_only_changes(table: LinkTable) -> None:
    calls: list[int] = []

    def listener() -> None:
        calls.append(table.version)

    table.add_listener(listener)
    table.cut(1, 2)
    table.cut(2, 1)  # Already in force: no change, no call.
    table.add_latency(1, 2, 0.1)
    table.heal()
    table.heal()  # Nothing to heal.
    assert calls == [1, 2, 3]
    table.remove_listener(listener)
    table.cut(1, 2)
    assert calls == [1, 2, 3]
    assert table.version == 4


# NetProxy: real sockets on loopback.


def test_forwards_both_ways_through_an_echo_server_and_counts(
    proxy: NetProxy, echo_port: int, sockets: list[socket.socket]
) -> None:
    port = proxy.add_link(1, 2, HOST, echo_port)
    clients = [connect(port, sockets) for _ in range(3)]
    payloads = [os.urandom(256 * 1024) for _ in clients]
    for _ in range(2):  # Interleave the connections: they must not mix.
        for client, payload in zip(clients, payloads, strict=True):
            for offset in range(0, len(payload), 32 * 1024):
                piece = payload[offset : offset + 32 * 1024]
                client.sendall(piece)
                assert recv_exactly(client, len(piece)) == piece
    # Half-close: the client's FIN reaches the echo server, which then closes; the reply comes
    # back in full before the EOF.
    tail = os.urandom(100_000)
    clients[0].sendall(tail)
    clients[0].shutdown(socket.SHUT_WR)
    assert recv_until_eof(clients[0]) == tail

    total = 2 * sum(len(p) for p in payloads) + len(tail)
    (stats,) = proxy.stats().values()
    assert (stats.src, stats.dst, stats.port, stats.target_port) == (1, 2, port, echo_port)
    assert stats.connections_accepted == 3
    assert stats.bytes_src_to_dst == total
    assert stats.bytes_dst_to_src == total
    wait_until(lambda: proxy.stats()[port].connections_open == 2)


def test_cut_stalls_both_directions_and_heal_delivers_everything_in_order(
    proxy: NetProxy, table: LinkTable, listener: socket.socket, sockets: list[socket.socket]
) -> None:
    client, server = open_connection(proxy, listener, sockets)
    assert round_trip(client, server) < WAIT_S

    table.cut(1, 2)
    payload = os.urandom(1 << 20)  # More than a chunk, a pipe or (likely) a socket buffer holds.
    sender = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
    sender.start()
    server.sendall(b"reply written during the cut")
    assert_quiet(server)
    assert_quiet(client)
    (stats,) = proxy.stats().values()
    delivered_before_cut = (stats.bytes_src_to_dst, stats.bytes_dst_to_src)

    healed_at = time.monotonic()
    table.heal()
    first = server.recv(1)
    assert time.monotonic() - healed_at < 1.0  # Woken promptly, not on some slow timer.
    assert first + recv_exactly(server, len(payload) - 1) == payload
    assert recv_exactly(client, 28) == b"reply written during the cut"
    sender.join(WAIT_S)
    assert not sender.is_alive()
    (stats,) = proxy.stats().values()
    assert stats.bytes_src_to_dst == delivered_before_cut[0] + len(payload)
    assert stats.bytes_dst_to_src == delivered_before_cut[1] + 28


@pytest.mark.parametrize("blocked_src", [1, 2], ids=["client-to-server", "server-to-client"])
def test_one_way_cut_stalls_one_direction_only(
    proxy: NetProxy,
    table: LinkTable,
    listener: socket.socket,
    sockets: list[socket.socket],
    blocked_src: int,
) -> None:
    client, server = open_connection(proxy, listener, sockets, src=1, dst=2)
    node_socket = {1: client, 2: server}  # Node 1 dialled; node 2 accepted.
    sender, receiver = node_socket[blocked_src], node_socket[3 - blocked_src]

    table.cut_one_way(blocked_src, 3 - blocked_src)
    sender.sendall(b"stalled")
    # The other direction still flows, several times over.
    for i in range(3):
        greeting = b"greeting %d" % i
        receiver.sendall(greeting)
        assert recv_exactly(sender, len(greeting)) == greeting
    assert_quiet(receiver)

    table.heal()
    assert recv_exactly(receiver, 7) == b"stalled"


def test_latency_delays_each_direction_until_heal(
    proxy: NetProxy, table: LinkTable, listener: socket.socket, sockets: list[socket.socket]
) -> None:
    client, server = open_connection(proxy, listener, sockets)
    table.add_latency(1, 2, 0.1, both_ways=True)
    for _ in range(3):
        # Each direction's chunk is read after it was sent, and delivered 0.1 s after that read.
        assert round_trip(client, server) >= 0.2 - 0.002

    table.heal()
    # The smallest of a few trips, so a busy machine's hiccup cannot fail the test.
    assert min(round_trip(client, server) for _ in range(3)) < 0.1


def test_a_connection_opened_during_a_cut_reaches_the_server_after_heal(
    proxy: NetProxy, table: LinkTable, listener: socket.socket, sockets: list[socket.socket]
) -> None:
    port = proxy.add_link(1, 2, HOST, listener.getsockname()[1])
    table.cut(1, 2)
    client = connect(port, sockets)
    client.sendall(b"hello from the cut")
    wait_until(lambda: proxy.stats()[port].connections_accepted == 1)
    listener.settimeout(QUIET_S)
    with pytest.raises(TimeoutError):
        accept(listener, sockets)  # The proxy holds the connection and does not dial.

    table.heal()
    listener.settimeout(WAIT_S)
    server = accept(listener, sockets)
    assert recv_exactly(server, 18) == b"hello from the cut"
    server.sendall(b"welcome")
    assert recv_exactly(client, 7) == b"welcome"


def test_reset_closes_the_connections_between_the_pair_only(
    proxy: NetProxy, listener: socket.socket, sockets: list[socket.socket]
) -> None:
    client_12, server_12 = open_connection(proxy, listener, sockets, 1, 2)
    client_21, server_21 = open_connection(proxy, listener, sockets, 2, 1)
    client_13, server_13 = open_connection(proxy, listener, sockets, 1, 3)

    assert proxy.reset(2, 1) == 2
    for sock in (client_12, server_12, client_21, server_21):
        assert_closed(sock)
    assert round_trip(client_13, server_13) < WAIT_S
    assert [s.connections_open for s in proxy.stats().values()] == [0, 0, 1]

    # The links themselves stay: a new connection works.
    port_12 = next(p for p, s in proxy.stats().items() if (s.src, s.dst) == (1, 2))
    client = connect(port_12, sockets)
    assert round_trip(client, accept(listener, sockets)) < WAIT_S

    assert proxy.reset_node(3) == 1
    assert_closed(client_13)
    assert_closed(server_13)


def test_a_refused_upstream_closes_the_client(
    proxy: NetProxy, sockets: list[socket.socket]
) -> None:
    with socket.socket() as bound:
        bound.bind((HOST, 0))  # Bound, never listening: connecting to it is refused.
        port = proxy.add_link(1, 2, HOST, bound.getsockname()[1])
        try:
            client = connect(port, sockets)
        except ConnectionResetError:
            return  # The proxy's reset came before connect() returned.
        assert_closed(client)


def test_close_stops_the_thread_and_the_ports_refuse(
    table: LinkTable, listener: socket.socket, sockets: list[socket.socket]
) -> None:
    threads_before = set(threading.enumerate())
    proxy = NetProxy(table)
    threads = set(threading.enumerate()) - threads_before
    assert threads, "the proxy runs a thread"
    client, server = open_connection(proxy, listener, sockets)
    port = next(iter(proxy.stats()))
    table.cut(2, 1)
    held = connect(port, sockets)  # Dialled, but its replies are held by the cut.

    proxy.close()
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=WAIT_S).close()
    for sock in (client, server, held):
        assert_closed(sock)
    proxy.close()  # Idempotent.
    with pytest.raises(RuntimeError):
        proxy.add_link(1, 2, HOST, listener.getsockname()[1])
    table.heal()  # The proxy no longer listens to the table.
