"""The replication link (broker/replication_link.py): framing, and a follower's
session against a listener served by a stand-in replica manager, on loopback."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time

import pytest
from raftka.v1 import broker_pb2, common_pb2

from broker.replication_link import (
    MAGIC,
    MAX_FRAME_BYTES,
    LinkListener,
    LinkSession,
    SessionError,
    read_frame,
    write_frame,
)

HOST = "127.0.0.1"


def reader(data: bytes) -> io.BufferedReader:
    return io.BufferedReader(io.BytesIO(data))


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_frames_are_read_whole_and_a_clean_end_is_none():
    stream = reader(frame(b"one") + frame(b"") + frame(b"three"))
    assert [read_frame(stream) for _ in range(4)] == [b"one", b"", b"three", None]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 8])
def test_a_frame_cut_anywhere_is_an_error_not_a_short_message(cut):
    data = frame(b"hello")[:cut]
    with pytest.raises(SessionError, match="closed"):
        read_frame(reader(data))


def test_an_oversized_frame_is_refused_before_its_body_is_read():
    with pytest.raises(SessionError, match="limit"):
        read_frame(reader(struct.pack(">I", MAX_FRAME_BYTES + 1)))


class _Session:
    def __init__(self) -> None:
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


class _Replicas:
    """Answers a fetch with the request's replica id as the answer's first partition;
    a fetch with ``max_wait_ms`` 999 waits until ``release`` is set."""

    def __init__(self) -> None:
        self.sessions: list[_Session] = []
        self.requests: list[broker_pb2.FetchRequest] = []
        self.release = threading.Event()

    def new_fetch_session(self) -> _Session:
        session = _Session()
        self.sessions.append(session)
        return session

    def fetch_in_session(self, session, request):
        self.requests.append(request)
        if request.max_wait_ms == 999:
            self.release.wait(10)
        response = broker_pb2.FetchResponse(in_session=True)
        response.topics.add(topic="t").partitions.add(partition=request.replica_id)
        return response


@pytest.fixture
def served():
    replicas = _Replicas()
    listener = LinkListener(HOST, 0, replicas, name="test")  # type: ignore[arg-type]
    listener.start()
    yield replicas, listener
    replicas.release.set()
    listener.stop()


def fetch(replica_id: int, max_wait_ms: int = 0) -> broker_pb2.FetchRequest:
    return broker_pb2.FetchRequest(replica_id=replica_id, max_wait_ms=max_wait_ms)


def answered(response: broker_pb2.FetchResponse) -> int:
    return response.topics[0].partitions[0].partition


def wait_for(what: str, condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_session_sends_fetches_one_by_one_on_one_link(served):
    replicas, listener = served
    session = LinkSession(f"{HOST}:{listener.port}", lifetime_s=30)
    assert [answered(session.exchange(fetch(i))) for i in (7, 8, 9)] == [7, 8, 9]
    assert len(replicas.sessions) == 1 and listener.link_count() == 1
    session.close()
    # The leader's fetch session ends with the link.
    assert replicas.sessions[0].closed.wait(5)
    wait_for("the link to be gone", lambda: listener.link_count() == 0)


def test_a_consumer_is_refused_and_its_link_ended(served):
    replicas, listener = served
    session = LinkSession(f"{HOST}:{listener.port}", lifetime_s=30)
    refused = session.exchange(fetch(-1))
    assert refused.error.code == common_pb2.INVALID_REQUEST
    assert "only followers" in refused.error.message
    # The leader closed the link: an end of stream, or a reset when the next request
    # reached the closed socket first.
    with pytest.raises(SessionError):
        session.exchange(fetch(1))
    assert replicas.requests == []


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="not-a-link"),
        pytest.param(MAGIC + frame(b"\xff\xff\xff"), id="unreadable-request"),
        pytest.param(MAGIC + struct.pack(">I", MAX_FRAME_BYTES + 1), id="oversized"),
    ],
)
def test_a_link_the_leader_cannot_read_is_closed_and_changes_nothing(served, sent):
    replicas, listener = served
    with socket.create_connection((HOST, listener.port), timeout=5) as raw:
        raw.sendall(sent)
        assert raw.recv(100) == b""  # Closed without an answer.
    assert replicas.requests == []
    wait_for("the link to be gone", lambda: listener.link_count() == 0)
    # The listener still serves others.
    session = LinkSession(f"{HOST}:{listener.port}", lifetime_s=30)
    assert answered(session.exchange(fetch(3))) == 3
    session.close()


def test_close_from_another_thread_ends_an_exchange_waiting_for_its_answer(served):
    replicas, listener = served
    session = LinkSession(f"{HOST}:{listener.port}", lifetime_s=30)
    session.exchange(fetch(1))  # Connected.
    failed: list[BaseException] = []

    def waiting() -> None:
        try:
            session.exchange(fetch(2, max_wait_ms=999))
        except SessionError as e:
            failed.append(e)

    thread = threading.Thread(target=waiting)
    thread.start()
    wait_for("the fetch to reach the leader", lambda: len(replicas.requests) == 2)
    session.close()
    thread.join(5)
    assert not thread.is_alive() and len(failed) == 1 and not failed[0].expired  # type: ignore[attr-defined]
    assert session.closed
    with pytest.raises(SessionError, match="closed"):
        session.exchange(fetch(3))


def test_a_session_outliving_its_lifetime_fails_as_expired(served):
    _, listener = served
    session = LinkSession(f"{HOST}:{listener.port}", lifetime_s=0.3)
    started = time.monotonic()
    with pytest.raises(SessionError) as failure:
        session.exchange(fetch(1, max_wait_ms=999))
    assert failure.value.expired
    assert time.monotonic() - started < 5
    session.close()


def test_a_leader_that_is_not_listening_fails_the_exchange():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    session = LinkSession(f"{HOST}:{port}", lifetime_s=30)
    with pytest.raises(SessionError) as failure:
        session.exchange(fetch(1))
    assert not failure.value.expired
    session.close()


def test_stopping_the_listener_ends_its_links(served):
    replicas, listener = served
    session = LinkSession(f"{HOST}:{listener.port}", lifetime_s=30)
    session.exchange(fetch(1))
    listener.stop()
    with pytest.raises(SessionError):
        session.exchange(fetch(2))
    assert listener.link_count() == 0
    assert replicas.sessions[0].closed.is_set()
    session.close()


def test_links_past_the_limit_are_refused():
    replicas = _Replicas()
    listener = LinkListener(HOST, 0, replicas, name="test", max_links=1)  # type: ignore[arg-type]
    listener.start()
    try:
        first = LinkSession(f"{HOST}:{listener.port}", lifetime_s=30)
        assert answered(first.exchange(fetch(1))) == 1
        second = LinkSession(f"{HOST}:{listener.port}", lifetime_s=30)
        with pytest.raises(SessionError):
            second.exchange(fetch(2))
        assert answered(first.exchange(fetch(3))) == 3
        first.close()
        second.close()
    finally:
        listener.stop()


def test_a_large_answer_crosses_whole():
    body = bytes(range(256)) * 4096  # Over one write's size.
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(target=write_frame, args=(left, body))
        sender.start()
        with right.makefile("rb") as stream:
            assert read_frame(stream) == body
        sender.join(5)


@pytest.fixture
def unanswering():
    """A port whose connects hang: its listener's backlog is full and never accepted."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    probe = socket.socket()
    probe.settimeout(0.3)
    with pytest.raises(OSError):
        probe.connect(listener.getsockname())  # The backlog is full: connects hang.
    probe.close()
    yield f"{HOST}:{listener.getsockname()[1]}"
    for s in [*fillers, listener]:
        s.close()


def test_a_connect_that_times_out_is_a_failure_not_an_expiry(unanswering, monkeypatch):
    monkeypatch.setattr("broker.replication_link.CONNECT_TIMEOUT_S", 0.3)
    session = LinkSession(unanswering, lifetime_s=30)
    with pytest.raises(SessionError, match="timed out") as failure:
        session.exchange(fetch(1))
    assert not failure.value.expired  # The fetcher logs it and backs off.
    session.close()


def test_close_ends_a_connect_that_hangs(unanswering):
    session = LinkSession(unanswering, lifetime_s=30)
    failed: list[SessionError] = []

    def connecting() -> None:
        try:
            session.exchange(fetch(1))
        except SessionError as e:
            failed.append(e)

    thread = threading.Thread(target=connecting)
    thread.start()
    time.sleep(0.2)  # Into the connect (nothing to wait on: it never completes).
    started = time.monotonic()
    session.close()
    thread.join(5)
    assert not thread.is_alive() and len(failed) == 1
    assert time.monotonic() - started < 1.0  # Not the 5 s connect timeout.


class _FailingReplicas(_Replicas):
    def fetch_in_session(self, session, request):
        if request.replica_id == 13:
            raise RuntimeError("a bug")
        return super().fetch_in_session(session, request)


def test_a_fetch_the_leader_fails_to_answer_ends_the_link_and_is_logged(caplog):
    replicas = _FailingReplicas()
    listener = LinkListener(HOST, 0, replicas, name="test")  # type: ignore[arg-type]
    listener.start()
    try:
        session = LinkSession(f"{HOST}:{listener.port}", lifetime_s=30)
        with pytest.raises(SessionError):
            session.exchange(fetch(13))
        session.close()
        wait_for("the link to be gone", lambda: listener.link_count() == 0)
        assert any(
            r.levelname == "ERROR" and r.exc_info and "a bug" in repr(r.exc_info[1].__cause__)
            for r in caplog.records
        )
        again = LinkSession(f"{HOST}:{listener.port}", lifetime_s=30)
        assert answered(again.exchange(fetch(2))) == 2
        again.close()
    finally:
        listener.stop()
