"""The Controller service's reads that only the active controller answers.

A newly elected Raft leader is not yet the active controller: until it has
committed its controller epoch its log may end before records committed under
the previous leader (after a full restart, pysyncobj applies the journal only
as the new leader commits again). DescribeQuorum and an ``active_only`` read of
the metadata log must not answer from that past.
"""

from __future__ import annotations

import threading

import pytest
from raftka.v1 import common_pb2
from raftka.v1 import controller_pb2 as cpb

from quorum import service as service_module
from quorum.config import Voter
from quorum.controller.runtime import ControllerRuntime, RuntimeSettings
from quorum.log import InMemoryMetadataLog
from quorum.service import ControllerService


@pytest.fixture
def service():
    log = InMemoryMetadataLog(node_id=1)
    runtime = ControllerRuntime(log, RuntimeSettings(node_id=1, cluster_id="c1"))
    log.listener = runtime
    voters = tuple(Voter(node_id=i, host="127.0.0.1", raft_port=0, rpc_port=0) for i in (1, 2, 3))
    svc = ControllerService(
        1,
        voters,
        log,
        runtime,
        cluster_id="c1",
        request_timeout_s=1.0,  # type: ignore[arg-type]
    )
    return log, runtime, svc


def read(svc: ControllerService, active_only: bool) -> cpb.ReadMetadataLogResponse:
    request = cpb.ReadMetadataLogRequest(offset=0, max_records=100, active_only=active_only)
    return svc.ReadMetadataLog(request, None)


def test_an_elected_leader_answers_only_once_it_has_claimed_its_epoch(service):
    log, runtime, svc = service
    log.set_leader(1)  # Elected; the epoch claim is proposed but not committed.
    assert log.is_leader() and not runtime.active

    for response in (svc.DescribeQuorum(cpb.DescribeQuorumRequest(), None), read(svc, True)):
        assert response.error.code == common_pb2.NOT_CONTROLLER
        assert "elected" in response.error.message

    log.run_pending()
    assert runtime.active
    answer = read(svc, True)
    assert answer.error.code == common_pb2.NONE
    assert [e.offset for e in answer.entries] == list(range(answer.high_watermark))
    assert answer.entries[-1].record.controller_epoch.controller_id == 1


def test_a_follower_refuses_active_only_reads_but_serves_its_own_log(service):
    log, runtime, svc = service
    log.set_leader(1)
    log.run_pending()
    log.set_leader(2)
    assert not runtime.active

    refused = read(svc, True)
    assert refused.error.code == common_pb2.NOT_CONTROLLER
    assert not refused.entries
    own = read(svc, False)
    assert own.error.code == common_pb2.NONE
    assert len(own.entries) == own.high_watermark > 0
    quorum = svc.DescribeQuorum(cpb.DescribeQuorumRequest(), None)
    assert quorum.error.code == common_pb2.NOT_CONTROLLER


def test_without_a_leader_the_reads_say_the_quorum_is_unavailable(service):
    log, _, svc = service
    log.set_leader(None)
    for response in (svc.DescribeQuorum(cpb.DescribeQuorumRequest(), None), read(svc, True)):
        assert response.error.code == common_pb2.QUORUM_UNAVAILABLE


class StreamContext:
    """A server-side stream context: a deadline, cancellation and end callbacks."""

    def __init__(self, remaining_s: float):
        self.remaining_s = remaining_s
        self.active = True
        self.callbacks: list = []

    def time_remaining(self) -> float:
        return self.remaining_s

    def is_active(self) -> bool:
        return self.active

    def add_callback(self, fn) -> bool:
        self.callbacks.append(fn)
        return True

    def end(self) -> None:
        self.active = False
        for fn in self.callbacks:
            fn()


@pytest.fixture
def leading(service, monkeypatch):
    log, runtime, svc = service
    log.commit_condition = threading.Condition()
    log.set_leader(1)
    log.run_pending()
    reports: list[tuple[int, bool, bool]] = []
    monkeypatch.setattr(
        runtime,
        "broker_connection",
        lambda broker_id, opened, dropped=True: reports.append((broker_id, opened, dropped)),
    )
    return log, svc, reports


def fetch(svc: ControllerService, context: StreamContext):
    request = cpb.FetchMetadataRequest(offset=0, max_wait_ms=500, replica_id=100)
    return svc.FetchMetadata(request, context)


def test_a_stream_the_broker_drops_just_before_its_deadline_is_a_loss(leading, monkeypatch):
    _, svc, reports = leading
    # Within the last quarter second of the broker's deadline: a broker killed
    # there used to look like one whose stream had reached its deadline, and
    # was fenced a heartbeat interval late (1 leader kill in 8).
    monkeypatch.setattr(service_module, "STREAM_END_MARGIN_S", 0.1)
    context = StreamContext(remaining_s=0.25)
    stream = fetch(svc, context)
    assert next(stream).entries
    stream.close()
    context.end()
    assert reports == [(100, True, True), (100, False, True)]


def test_a_stream_the_server_ends_at_its_time_leaves_the_broker_only_suspect(leading):
    _, svc, reports = leading
    context = StreamContext(remaining_s=0.3)
    answers = list(fetch(svc, context))  # Ends by itself, before the deadline.
    context.end()
    assert answers and not any(a.error.code for a in answers)
    assert reports == [(100, True, True), (100, False, False)]


def test_a_stream_ended_with_a_redirect_reports_nothing(leading):
    log, svc, reports = leading
    context = StreamContext(remaining_s=2.0)
    stream = fetch(svc, context)
    next(stream)
    log.set_leader(2)
    (redirect,) = list(stream)
    context.end()
    assert redirect.error.code == common_pb2.NOT_CONTROLLER
    assert reports == [(100, True, True)]
