"""client/_streams.py against a small gRPC server on loopback: requests on one stream
in order, unary calls while it is busy, a refused or unknown stream resent as unary,
deadlines, cancel and idle close. And the broker side: a broker past
max.client.streams refuses a client stream with the status the client looks for."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from dataplane import wait_until
from raftka.v1 import broker_pb2

from broker.node import _BrokerService
from client._brokers import rpc_error
from client._streams import STREAM_REFUSED, StreamCall, StreamError, StreamPool
from client.errors import NetworkError, RequestTimedOutError
from quorum.streams import STREAM_REFUSED as SERVER_STREAM_REFUSED
from quorum.streams import StreamSlots

WAIT_S = 10.0


def _bytes(b: bytes) -> bytes:
    return b


class _Server:
    """Echoes b"<kind>:<request>"; ``mode`` decides what a new stream does."""

    def __init__(self, *, with_stream: bool = True):
        self.mode = "ok"  # ok | refuse
        self.hold = threading.Event()
        self.hold.set()
        self.streams_opened = 0
        self.streams_ended = 0
        self.unary_calls = 0
        self._lock = threading.Lock()
        methods = {"U": grpc.unary_unary_rpc_method_handler(self._unary, _bytes, _bytes)}
        if with_stream:
            methods["S"] = grpc.stream_stream_rpc_method_handler(self._stream, _bytes, _bytes)
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("t.T", methods),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = _Stub(self.channel)

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.unary_calls += 1
        self.hold.wait(WAIT_S)
        return b"unary:" + request

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._lock:
            self.streams_opened += 1
        try:
            if self.mode == "refuse":
                context.set_trailing_metadata(((STREAM_REFUSED, "0"),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams")
            for request in requests:
                self.hold.wait(WAIT_S)
                yield b"stream:" + request
        finally:
            with self._lock:
                self.streams_ended += 1

    def close(self) -> None:
        self.hold.set()
        self.channel.close()
        self.server.stop(grace=None).wait(WAIT_S)


class _Stub:
    def __init__(self, channel: grpc.Channel):
        self.S = channel.stream_stream("/t.T/S", _bytes, _bytes)  # noqa: N815
        self.U = channel.unary_unary("/t.T/U", _bytes, _bytes)  # noqa: N815


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def _pool(server: _Server, **kwargs: Any) -> StreamPool:
    return StreamPool(lambda _address: server.stub, "S", "U", **kwargs)


@pytest.fixture
def pool(server: _Server) -> Iterator[StreamPool]:
    p = _pool(server)
    yield p
    p.close()


def _answer(call: Any) -> bytes:
    return bytes(call.result(timeout=WAIT_S))


def test_requests_go_on_one_stream_in_order(server: _Server, pool: StreamPool) -> None:
    answers = [_answer(pool.call("a", b"%d" % i, 5.0)) for i in range(20)]
    assert answers == [b"stream:%d" % i for i in range(20)]
    assert server.streams_opened == 1
    assert server.unary_calls == 0
    assert list(pool.streams()) == ["a"]


def test_a_busy_stream_sends_the_next_request_unary(server: _Server, pool: StreamPool) -> None:
    server.hold.clear()
    first = pool.call("a", b"1", 5.0)
    second = pool.call("a", b"2", 5.0)
    assert isinstance(first, StreamCall)
    assert not isinstance(second, StreamCall)
    server.hold.set()
    assert _answer(first) == b"stream:1"
    assert _answer(second) == b"unary:2"
    assert _answer(pool.call("a", b"3", 5.0)) == b"stream:3"  # Free again.


def test_a_refused_stream_resends_unary_and_falls_back(server: _Server) -> None:
    server.mode = "refuse"
    pool = _pool(server)
    try:
        assert _answer(pool.call("a", b"1", 5.0)) == b"unary:1"
        assert _answer(pool.call("a", b"2", 5.0)) == b"unary:2"
        assert server.streams_opened == 1  # Not asked again within the fallback time.
        assert server.unary_calls == 2
    finally:
        pool.close()


def test_the_fallback_ends(server: _Server) -> None:
    server.mode = "refuse"
    pool = _pool(server, fallback_s=0.0)
    try:
        assert _answer(pool.call("a", b"1", 5.0)) == b"unary:1"
        server.mode = "ok"
        assert _answer(pool.call("a", b"2", 5.0)) == b"stream:2"
    finally:
        pool.close()


def test_a_server_without_the_stream_gets_unary_calls() -> None:
    server = _Server(with_stream=False)
    pool = _pool(server)
    try:
        assert _answer(pool.call("a", b"1", 5.0)) == b"unary:1"
        assert _answer(pool.call("a", b"2", 5.0)) == b"unary:2"
    finally:
        pool.close()
        server.close()


def test_an_overdue_request_fails_with_deadline_exceeded(server: _Server, pool: StreamPool) -> None:
    server.hold.clear()
    call = pool.call("a", b"1", 0.05)
    assert isinstance(call, StreamCall)
    pool.sweep(call.deadline_s - 0.01)
    assert not call.done()  # Not yet due.
    pool.sweep(call.deadline_s)
    with pytest.raises(StreamError) as caught:
        call.result(timeout=WAIT_S)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(rpc_error(caught.value, "Produce"), RequestTimedOutError)
    server.hold.set()
    # The next request goes on a new stream (the broken one is forgotten).
    assert _answer(pool.call("a", b"2", 5.0)) == b"stream:2"


def test_cancel_fails_the_request_as_a_network_error(server: _Server, pool: StreamPool) -> None:
    server.hold.clear()
    call = pool.call("a", b"1", 5.0)
    seen: list[StreamCall] = []
    call.add_done_callback(seen.append)
    call.cancel()
    with pytest.raises(StreamError) as caught:
        call.result(timeout=WAIT_S)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert isinstance(rpc_error(caught.value, "Produce"), NetworkError)
    assert seen == [call]


def test_a_stream_that_breaks_fails_its_request(server: _Server, pool: StreamPool) -> None:
    assert _answer(pool.call("a", b"1", 5.0)) == b"stream:1"
    server.hold.clear()
    call = pool.call("a", b"2", 5.0)
    server.server.stop(grace=None)
    with pytest.raises(grpc.RpcError) as caught:
        call.result(timeout=WAIT_S)
    assert isinstance(rpc_error(caught.value, "Produce"), NetworkError)


def test_an_idle_stream_is_closed(server: _Server) -> None:
    pool = _pool(server, idle_close_s=0.0)
    try:
        assert _answer(pool.call("a", b"1", 5.0)) == b"stream:1"
        pool.sweep(float("inf"))
        assert list(pool.streams()) == []
        wait_until("the server saw the stream end", lambda: server.streams_ended == 1, WAIT_S)
    finally:
        pool.close()


def test_cancelling_an_answered_call_leaves_the_next_one_alone(
    server: _Server, pool: StreamPool
) -> None:
    first = pool.call("a", b"1", 5.0)
    assert _answer(first) == b"stream:1"
    server.hold.clear()
    second = pool.call("a", b"2", 5.0)
    assert isinstance(second, StreamCall)
    assert first.cancel() is False
    server.hold.set()
    assert _answer(second) == b"stream:2"


def test_close_cancels_and_refuses(server: _Server) -> None:
    pool = _pool(server)
    server.hold.clear()
    call = pool.call("a", b"1", 5.0)
    pool.close()
    with pytest.raises(StreamError) as caught:
        call.result(timeout=WAIT_S)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    with pytest.raises(RuntimeError):
        pool.call("a", b"2", 5.0)


# --------------------------------------------------------------------- broker side


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.trailing: Any = None
        self.status: Any = None

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise _Aborted


class _Session:
    def __init__(self, replicas: _Replicas):
        self._replicas = replicas
        replicas.sessions += 1

    def close(self) -> None:
        self._replicas.sessions -= 1


class _Replicas:
    def __init__(self) -> None:
        self.produced: list[Any] = []
        self.sessions = 0

    def produce(self, request: Any) -> Any:
        self.produced.append(request)
        return ("answer", request)

    def new_fetch_session(self) -> _Session:
        return _Session(self)

    def fetch_in_session(self, session: _Session, request: Any) -> Any:
        return ("fetched", request.replica_id)


class _Node:
    def __init__(self, limit: int):
        self.client_streams = StreamSlots(limit, "max.client.streams")
        self.replicas = _Replicas()


def test_the_broker_refuses_client_streams_past_its_limit() -> None:
    assert SERVER_STREAM_REFUSED == STREAM_REFUSED
    node = _Node(limit=1)
    service = _BrokerService(node)  # type: ignore[arg-type]
    first = service.ProduceStream(iter([b"r1", b"r2"]), _Context())  # type: ignore[arg-type]
    assert next(first) == ("answer", b"r1")
    assert node.client_streams.open == 1
    context = _Context()
    second = service.ProduceStream(iter([b"r3"]), context)  # type: ignore[arg-type]
    with pytest.raises(_Aborted):
        next(second)
    assert context.status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert context.trailing == ((STREAM_REFUSED, "1"),)
    assert node.replicas.produced == [b"r1"]  # The refused stream's request was not handled.
    assert list(first) == [("answer", b"r2")]
    assert node.client_streams.open == 0  # The first stream gave its slot back.
    assert node.client_streams.refused == 1
    third = service.ProduceStream(iter([b"r4"]), _Context())  # type: ignore[arg-type]
    assert list(third) == [("answer", b"r4")]


def test_only_a_consumers_fetch_stream_counts_as_a_client_stream() -> None:
    node = _Node(limit=1)
    service = _BrokerService(node)  # type: ignore[arg-type]
    consumer = broker_pb2.FetchRequest(replica_id=-1)
    follower = broker_pb2.FetchRequest(replica_id=101, replica_epoch=5)
    first = service.FetchStream(iter([consumer, consumer]), _Context())  # type: ignore[arg-type]
    assert next(first) == ("fetched", -1)
    assert node.client_streams.open == 1
    # A follower's session is never refused, whatever the count.
    replication = service.FetchStream(iter([follower]), _Context())  # type: ignore[arg-type]
    assert list(replication) == [("fetched", 101)]
    context = _Context()
    refused = service.FetchStream(iter([consumer]), context)  # type: ignore[arg-type]
    with pytest.raises(_Aborted):
        next(refused)
    assert context.status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert node.replicas.sessions == 1  # The refused stream's session was closed.
    first.close()  # The client went away: the slot and the session are given back.
    assert node.client_streams.open == 0
    assert node.replicas.sessions == 0


def test_a_pool_with_its_own_sweeper_closes_an_idle_stream_unasked(server: _Server) -> None:
    """A consumer that stops polling, an Admin left open: nobody calls sweep."""
    pool = _pool(server, idle_close_s=0.2, sweep_every_s=0.05)
    try:
        assert _answer(pool.call("a", b"1", 5.0)) == b"stream:1"
        wait_until("the idle stream to end", lambda: server.streams_ended == 1, WAIT_S)
        assert list(pool.streams()) == []
        sweeper = pool._sweeper
        assert sweeper is not None and sweeper.is_alive()
    finally:
        pool.close()
    sweeper.join(WAIT_S)
    assert not sweeper.is_alive()


def test_close_returns_once_the_streams_threads_have_ended(server: _Server) -> None:
    """A reader thread still inside a gRPC call when the interpreter exits holds the
    call's lock, and the call's finaliser then waits for it for good: a CLI command
    hung at exit so. close() waits for them."""
    pool = _pool(server, sweep_every_s=0.05)
    for address in ("a", "b", "c"):
        assert _answer(pool.call(address, b"x", 5.0)) == b"stream:x"
    readers = [s._reader for s in pool._live]
    assert len(readers) == 3 and pool._sweeper is not None
    pool.close()
    assert not any(t.is_alive() for t in readers)
    assert not pool._sweeper.is_alive()
