"""Errors raised by the client library, one class per kind a caller handles."""

from __future__ import annotations

from raftka.v1 import common_pb2


class RaftkaError(Exception):
    """An error answered by the cluster, with its error code."""

    retriable = False

    def __init__(self, code: int, message: str = ""):
        self.code = code
        self.code_name = common_pb2.ErrorCode.Name(code) if code in _KNOWN else str(code)
        self.message = message
        super().__init__(f"{self.code_name}: {message}" if message else self.code_name)


class NotControllerError(RaftkaError):
    retriable = True


class QuorumUnavailableError(RaftkaError):
    retriable = True


class UnknownOutcomeError(RaftkaError):
    """The request may or may not have been applied; read back before retrying."""


class RequestTimedOutError(RaftkaError):
    retriable = True


class TopicAlreadyExistsError(RaftkaError):
    pass


class UnknownTopicError(RaftkaError):
    pass


class InvalidRequestError(RaftkaError):
    pass


_KNOWN = set(common_pb2.ErrorCode.values())
_BY_CODE: dict[int, type[RaftkaError]] = {
    common_pb2.NOT_CONTROLLER: NotControllerError,
    common_pb2.QUORUM_UNAVAILABLE: QuorumUnavailableError,
    common_pb2.UNKNOWN_OUTCOME: UnknownOutcomeError,
    common_pb2.REQUEST_TIMED_OUT: RequestTimedOutError,
    common_pb2.TOPIC_ALREADY_EXISTS: TopicAlreadyExistsError,
    common_pb2.UNKNOWN_TOPIC_OR_PARTITION: UnknownTopicError,
    common_pb2.INVALID_REQUEST: InvalidRequestError,
}


def error_for(code: int, message: str = "") -> RaftkaError:
    return _BY_CODE.get(code, RaftkaError)(code, message)


def check(error: common_pb2.Error | None) -> None:
    """Raise the error carried by a response, if any."""
    if error is not None and error.code != common_pb2.NONE:
        raise error_for(error.code, error.message)
