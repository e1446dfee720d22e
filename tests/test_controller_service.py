"""The Controller service's reads that only the active controller answers.

A newly elected Raft leader is not yet the active controller: until it has
committed its controller epoch its log may end before records committed under
the previous leader (after a full restart, pysyncobj applies the journal only
as the new leader commits again). DescribeQuorum and an ``active_only`` read of
the metadata log must not answer from that past.
"""

from __future__ import annotations

import pytest
from raftka.v1 import common_pb2
from raftka.v1 import controller_pb2 as cpb

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
