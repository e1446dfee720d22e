"""Admin over canned controller answers: without a network, then over real gRPC on loopback."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any

import grpc
import pytest
from dataplane import wait_until
from raftka.v1 import common_pb2, controller_pb2, controller_pb2_grpc, metadata_pb2

from client import Admin, NewTopic, RaftkaError, TopicAlreadyExistsError, UnknownTopicError
from client._controller import STREAM_FIELDS, ControllerClient
from client.admin import LogEntry
from quorum.service import serve_requests
from quorum.streams import StreamSlots

OK = common_pb2.Error(code=common_pb2.NONE)


def err(code: int, message: str = "") -> common_pb2.Error:
    return common_pb2.Error(code=code, message=message)


class FakeCaller:
    """Answers ``call`` from a table method -> response and records the requests."""

    def __init__(self, answers: dict[str, Any]):
        self.answers = answers
        self.requests: list[tuple[str, Any]] = []
        self.closed = False

    def call(self, method: str, request: Any, *, timeout_s: float | None = None) -> Any:
        self.requests.append((method, request))
        return self.answers[method]

    def close(self) -> None:
        self.closed = True


def admin_with(**answers: Any) -> tuple[Admin, FakeCaller]:
    caller = FakeCaller(answers)
    return Admin("unused:1", client=caller), caller


def test_create_topics_sends_the_topics_and_returns_per_topic_errors():
    response = controller_pb2.CreateTopicsResponse(
        results=[
            controller_pb2.CreateTopicResult(name="a", topic_id="id-a", num_partitions=3),
            controller_pb2.CreateTopicResult(
                name="b", error=err(common_pb2.TOPIC_ALREADY_EXISTS, "exists")
            ),
        ]
    )
    admin, caller = admin_with(CreateTopics=response)
    results = admin.create_topics(
        [NewTopic("a", 3, 2, {"retention.ms": "1000"}), NewTopic("b", assignments=[[1, 2]])],
        validate_only=True,
    )
    assert results["a"] is None
    assert isinstance(results["b"], TopicAlreadyExistsError)
    method, request = caller.requests[0]
    assert method == "CreateTopics" and request.validate_only
    assert request.topics[0].name == "a" and request.topics[0].replication_factor == 2
    assert dict(request.topics[0].configs) == {"retention.ms": "1000"}
    assert request.topics[1].num_partitions == -1
    assert list(request.topics[1].assignments[0].ids) == [1, 2]


def test_create_topic_raises_the_topic_error_and_returns_the_created_topic():
    exists = controller_pb2.CreateTopicsResponse(
        results=[
            controller_pb2.CreateTopicResult(name="t", error=err(common_pb2.TOPIC_ALREADY_EXISTS))
        ]
    )
    admin, _ = admin_with(CreateTopics=exists)
    with pytest.raises(TopicAlreadyExistsError, match="t"):
        admin.create_topic("t")
    created = controller_pb2.CreateTopicsResponse(
        results=[
            controller_pb2.CreateTopicResult(
                name="t", topic_id="x", num_partitions=3, replication_factor=3
            )
        ]
    )
    admin, _ = admin_with(CreateTopics=created)
    topic = admin.create_topic("t", 3, 3)
    assert (topic.topic_id, topic.num_partitions, topic.replication_factor) == ("x", 3, 3)


def test_request_level_error_raises():
    admin, _ = admin_with(
        DeleteTopicsResponse=None,
        DeleteTopics=controller_pb2.DeleteTopicsResponse(
            error=err(common_pb2.UNKNOWN_OUTCOME, "lost")
        ),
    )
    with pytest.raises(RaftkaError, match="UNKNOWN_OUTCOME"):
        admin.delete_topics(["x"])


def describe_response() -> controller_pb2.DescribeTopicsResponse:
    def part(i: int, leader: int, isr: list[int]) -> controller_pb2.PartitionDescription:
        return controller_pb2.PartitionDescription(
            partition=i,
            leader=leader,
            leader_epoch=2,
            partition_epoch=5,
            replicas=[1, 2, 3],
            isr=isr,
        )

    return controller_pb2.DescribeTopicsResponse(
        topics=[
            controller_pb2.TopicDescription(
                name="zeta", topic_id="z", partitions=[part(1, -1, []), part(0, 1, [1, 2, 3])]
            ),
            controller_pb2.TopicDescription(name="alpha", topic_id="a", configs={"k": "v"}),
        ]
    )


def test_describe_topics_returns_sorted_plain_values():
    admin, _ = admin_with(DescribeTopics=describe_response())
    alpha, zeta = admin.describe_topics()
    assert alpha.name == "alpha" and alpha.configs == {"k": "v"} and alpha.partitions == ()
    assert [p.partition for p in zeta.partitions] == [0, 1]
    assert zeta.partitions[0].replicas == (1, 2, 3) and zeta.partitions[0].isr == (1, 2, 3)
    assert zeta.partitions[1].offline and zeta.partitions[1].under_replicated
    assert zeta.replication_factor == 3
    assert admin.list_topics() == ["alpha", "zeta"]


def test_describe_topics_raises_for_a_missing_topic():
    response = controller_pb2.DescribeTopicsResponse(
        topics=[
            controller_pb2.TopicDescription(
                name="nope", error=err(common_pb2.UNKNOWN_TOPIC_OR_PARTITION)
            )
        ]
    )
    admin, _ = admin_with(DescribeTopics=response)
    with pytest.raises(UnknownTopicError, match="nope"):
        admin.describe_topics(["nope"])


def test_describe_quorum_computes_lag():
    response = controller_pb2.DescribeQuorumResponse(
        cluster_id="c",
        leader_id=1,
        leader_epoch=4,
        high_watermark=100,
        voters=[
            controller_pb2.ReplicaState(replica_id=1, log_end_offset=100),
            controller_pb2.ReplicaState(replica_id=2, log_end_offset=90),
            controller_pb2.ReplicaState(replica_id=3, log_end_offset=-1),
        ],
        observers=[controller_pb2.ReplicaState(replica_id=100, log_end_offset=100)],
    )
    admin, _ = admin_with(DescribeQuorum=response)
    quorum = admin.describe_quorum()
    assert [v.lag for v in quorum.voters] == [0, 10, -1]
    assert quorum.observers[0].replica_id == 100 and quorum.leader_epoch == 4


def test_elect_leaders_and_partitions_and_log():
    admin, caller = admin_with(
        ElectLeaders=controller_pb2.ElectLeadersResponse(
            results=[
                controller_pb2.ElectLeaderResult(
                    partition=controller_pb2.TopicPartition(topic="t", partition=0),
                    error=err(common_pb2.ELECTION_NOT_NEEDED),
                )
            ]
        ),
        CreatePartitions=controller_pb2.CreatePartitionsResponse(
            results=[controller_pb2.CreatePartitionsResult(name="t")]
        ),
        ReadMetadataLog=controller_pb2.ReadMetadataLogResponse(
            entries=[
                metadata_pb2.MetadataLogEntry(
                    offset=7,
                    controller_epoch=2,
                    append_time_ms=5,
                    record=metadata_pb2.MetadataRecord(),
                )
            ]
        ),
    )
    results = admin.elect_leaders([("t", 0)], "unclean")
    assert results[("t", 0)].code_name == "ELECTION_NOT_NEEDED"
    assert caller.requests[-1][1].election_type == controller_pb2.UNCLEAN
    with pytest.raises(ValueError):
        admin.elect_leaders(None, "sideways")
    admin.increase_partitions("t", 6)
    assert caller.requests[-1][1].topics[0].count == 6
    (entry,) = admin.read_metadata_log(7, 10)
    assert isinstance(entry, LogEntry)
    offset, epoch, append_time_ms, _record = entry
    assert (offset, epoch, append_time_ms) == (7, 2, 5)
    assert caller.requests[-1][1].max_records == 10


# -- over gRPC, on loopback ---------------------------------------------------


class FakeController(controller_pb2_grpc.ControllerServicer):
    """A controller that is not active: it points to ``leader_port``. It serves
    ``Requests`` streams as a controller does, ``max_streams`` of them at once; with
    ``streams=False`` it knows no such method (an older controller)."""

    def __init__(
        self, leader_port: int | None = None, *, streams: bool = True, max_streams: int = 4
    ):
        self.leader_port = leader_port
        self.topics: dict[str, int] = {}
        self.streams = streams
        self.slots = StreamSlots(max_streams, "test")
        self.answered = 0  # Requests answered, on a stream or unary.
        self.stream_requests = 0

    def Requests(self, request_iterator, context):  # noqa: N802
        if not self.streams:
            return super().Requests(request_iterator, context)

        def counted():
            for request in request_iterator:
                self.stream_requests += 1
                yield request

        return serve_requests(self, self.slots, counted(), context)

    def CreateTopics(self, request, context):  # noqa: N802 (gRPC's name)
        self.answered += 1
        if self.leader_port is not None:
            return controller_pb2.CreateTopicsResponse(
                error=err(common_pb2.NOT_CONTROLLER),
                hint=controller_pb2.ControllerHint(
                    leader_id=2, leader_host="127.0.0.1", leader_port=self.leader_port
                ),
            )
        results = []
        for topic in request.topics:
            if topic.name in self.topics:
                results.append(
                    controller_pb2.CreateTopicResult(
                        name=topic.name, error=err(common_pb2.TOPIC_ALREADY_EXISTS, "exists")
                    )
                )
            else:
                self.topics[topic.name] = topic.num_partitions
                results.append(
                    controller_pb2.CreateTopicResult(
                        name=topic.name, num_partitions=topic.num_partitions
                    )
                )
        return controller_pb2.CreateTopicsResponse(results=results)

    def DescribeTopics(self, request, context):  # noqa: N802
        self.answered += 1
        return controller_pb2.DescribeTopicsResponse(
            topics=[
                controller_pb2.TopicDescription(
                    name=name,
                    partitions=[
                        controller_pb2.PartitionDescription(
                            partition=i, leader=100, replicas=[100], isr=[100]
                        )
                        for i in range(count)
                    ],
                )
                for name, count in sorted(self.topics.items())
            ]
        )


def serve(servicer: FakeController) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    controller_pb2_grpc.add_ControllerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture(params=[True, False], ids=["streams", "unary"])
def controllers(request):
    """Two fake controllers: a standby (first) that hints at the active one."""
    active = FakeController(streams=request.param)
    active_server, active_port = serve(active)
    standby_server, standby_port = serve(
        FakeController(leader_port=active_port, streams=request.param)
    )
    yield active, f"127.0.0.1:{standby_port}"
    standby_server.stop(grace=None)
    active_server.stop(grace=None)


def test_admin_over_grpc_follows_the_hint_to_the_active_controller(controllers):
    active, standby_address = controllers
    with Admin(standby_address, timeout_s=5.0) as admin:
        assert admin.create_topics([NewTopic("t", 2)]) == {"t": None}
        with pytest.raises(TopicAlreadyExistsError):
            admin.create_topic("t", 2)
        assert [len(t.partitions) for t in admin.describe_topics()] == [2]
    assert active.topics == {"t": 2}


class SilentController(FakeController):
    """Answers nothing (as if paused or cut off) until ``released`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()

    def DescribeTopics(self, request, context):  # noqa: N802
        self.released.wait(10)
        return super().DescribeTopics(request, context)


@pytest.mark.parametrize("streams", [True, False], ids=["streams", "unary"])
def test_a_controller_that_timed_out_is_not_asked_first_again(streams):
    """A broker's heartbeats must not all go to a controller that went silent: after one
    call timed out there, the next starts with the others."""
    silent, active = SilentController(), FakeController()
    silent.streams = streams
    silent_server, silent_port = serve(silent)
    active_server, active_port = serve(active)
    silent_address = f"127.0.0.1:{silent_port}"
    try:
        with ControllerClient([silent_address, f"127.0.0.1:{active_port}"]) as client:
            client._preferred = silent_address  # It answered last.
            request = controller_pb2.DescribeTopicsRequest()
            with pytest.raises(RaftkaError) as timed_out:
                client.call("DescribeTopics", request, timeout_s=0.5)
            assert timed_out.value.code_name == "UNKNOWN_OUTCOME"
            started = time.monotonic()
            client.call("DescribeTopics", request, timeout_s=0.5)
            assert time.monotonic() - started < 0.4
            assert client.addresses[-1] == silent_address
            silent.released.set()
            # The stream the client gave up on ends (the client is still open), and
            # its server thread is free.
            wait_until("the stream's slot is free", lambda: silent.slots.open == 0, 5.0)
    finally:
        silent.released.set()
        silent_server.stop(grace=None)
        active_server.stop(grace=None)


def test_requests_go_on_one_stream_and_end_with_the_client():
    active = FakeController()
    server, port = serve(active)
    try:
        with ControllerClient([f"127.0.0.1:{port}"]) as client:
            for i in range(5):
                request = controller_pb2.CreateTopicsRequest(
                    topics=[controller_pb2.CreatableTopic(name=f"t{i}", num_partitions=i + 1)]
                )
                answer = client.call("CreateTopics", request)
                assert answer.results[0].num_partitions == i + 1
            assert active.stream_requests == active.answered == 5
            assert active.slots.open == 1
        wait_until("the stream's slot is free", lambda: active.slots.open == 0, 5.0)
        assert active.topics == {f"t{i}": i + 1 for i in range(5)}
    finally:
        server.stop(grace=None)


def test_a_controller_that_refuses_the_stream_gets_unary_calls():
    active = FakeController(max_streams=0)
    server, port = serve(active)
    try:
        with ControllerClient([f"127.0.0.1:{port}"]) as client:
            for i in range(3):
                request = controller_pb2.CreateTopicsRequest(
                    topics=[controller_pb2.CreatableTopic(name=f"t{i}", num_partitions=1)]
                )
                assert client.call("CreateTopics", request).results[0].error.code == 0
        assert active.answered == 3 and active.stream_requests == 0
        assert active.slots.refused == 1  # Then unary calls only, for a while.
    finally:
        server.stop(grace=None)


def test_an_empty_request_on_the_stream_is_refused_and_the_stream_goes_on():
    controller = FakeController()
    requests = [
        controller_pb2.ControllerRequest(),
        controller_pb2.ControllerRequest(describe_topics=controller_pb2.DescribeTopicsRequest()),
    ]
    answers = list(serve_requests(controller, controller.slots, iter(requests), None))
    assert answers[0].error.code == common_pb2.INVALID_REQUEST
    assert answers[0].WhichOneof("response") is None
    assert answers[1].WhichOneof("response") == "describe_topics"
    assert controller.slots.open == 0


def test_the_stream_carries_the_same_methods_on_both_sides():
    from quorum.service import STREAM_METHODS, ControllerService

    assert {m: f for f, m in STREAM_METHODS.items()} == STREAM_FIELDS
    for method in STREAM_METHODS.values():
        assert callable(getattr(ControllerService, method))


def test_an_idle_stream_is_closed_without_another_call():
    """An open client that goes quiet gives its controller thread back."""
    active = FakeController()
    server, port = serve(active)
    try:
        with ControllerClient([f"127.0.0.1:{port}"], stream_idle_close_s=0.3) as client:
            client.call("DescribeTopics", controller_pb2.DescribeTopicsRequest())
            assert active.stream_requests == 1 and active.slots.open == 1
            wait_until("the idle stream's slot is free", lambda: active.slots.open == 0, 5.0)
            client.call("DescribeTopics", controller_pb2.DescribeTopicsRequest())
            assert active.stream_requests == 2  # A new stream for the next call.
    finally:
        server.stop(grace=None)


class OlderController(FakeController):
    """Serves Requests but knows none of the requests in it (an older version)."""

    def Requests(self, request_iterator, context):  # noqa: N802
        for _ in request_iterator:
            self.stream_requests += 1
            yield controller_pb2.ControllerResponse(
                error=err(common_pb2.INVALID_REQUEST, "unknown request")
            )


def test_a_request_the_controllers_stream_does_not_know_goes_unary():
    older = OlderController()
    server, port = serve(older)
    try:
        with ControllerClient([f"127.0.0.1:{port}"]) as client:
            request = controller_pb2.CreateTopicsRequest(
                topics=[controller_pb2.CreatableTopic(name="t", num_partitions=2)]
            )
            assert client.call("CreateTopics", request).results[0].num_partitions == 2
        assert older.stream_requests == 1 and older.answered == 1
        assert older.topics == {"t": 2}
    finally:
        server.stop(grace=None)


def test_a_closed_client_refuses_calls_with_a_clear_error():
    client = ControllerClient(["127.0.0.1:1"])
    client.close()
    with pytest.raises(RaftkaError, match="closed"):
        client.call("DescribeTopics", controller_pb2.DescribeTopicsRequest())
