"""Calls to the active controller, from any set of controller addresses.

Every controller serves the Controller service; only the active one changes
metadata, and the others answer NOT_CONTROLLER with a hint naming it. This
module follows hints, tries the other addresses when a node is down, and
retries until a deadline, so callers (the broker, Admin, the CLI) see one
call that either has an answer or a clear error.

Retries are made on NOT_CONTROLLER and QUORUM_UNAVAILABLE (nothing was
applied) and when a node cannot be reached. A node that dies mid-call may
have committed the request, so every controller request is designed to be
safe to repeat: registration is idempotent per incarnation, AlterPartition is
conditional on the partition epoch, a repeated CreateTopics answers
TOPIC_ALREADY_EXISTS. UNKNOWN_OUTCOME and a deadline hit mid-call are
surfaced to the caller.

Requests go on one ``Requests`` stream per controller when it is free (a message on
an open stream costs less than a unary call; ``client/_streams.py``), else as unary
calls: the answers and errors are the same either way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from raftka.v1 import common_pb2, controller_pb2_grpc
from raftka.v1 import controller_pb2 as cpb

from client._streams import StreamError, StreamPool
from client.errors import RaftkaError, error_for

RETRIABLE = {
    common_pb2.NOT_CONTROLLER,
    common_pb2.QUORUM_UNAVAILABLE,
}
# Transport failures after which another node is tried.
_NOT_DELIVERED = {grpc.StatusCode.UNAVAILABLE}
# Between passes over every address while no controller is active (an
# election takes a few hundred ms): short enough that a client notices the new
# controller within 50 ms, and a pass is only one small call per controller.
_BACKOFF_S = (0.01, 0.02, 0.05)


# The methods a Requests stream carries: the field of its oneof for each.
STREAM_FIELDS = {
    "".join(part.title() for part in field.name.split("_")): field.name
    for field in cpb.ControllerRequest.DESCRIPTOR.oneofs_by_name["request"].fields
}


class _UnaryInEnvelope:
    """A unary call made for a request of a Requests stream: answers as the stream
    would, in a ``ControllerResponse``."""

    __slots__ = ("_future", "_field")

    def __init__(self, future: Any, field: str):
        self._future = future
        self._field = field

    def result(self, timeout: float | None = None) -> Any:
        return cpb.ControllerResponse(**{self._field: self._future.result(timeout)})

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        self._future.add_done_callback(lambda _future: fn(self))

    def done(self) -> bool:
        return bool(self._future.done())

    def cancel(self) -> bool:
        return bool(self._future.cancel())


def _unary_in_envelope(stub: controller_pb2_grpc.ControllerStub) -> Callable[..., Any]:
    def call(envelope: Any, timeout: float) -> _UnaryInEnvelope:
        field = envelope.WhichOneof("request")
        method = getattr(stub, _METHOD_OF[field])
        return _UnaryInEnvelope(method.future(getattr(envelope, field), timeout=timeout), field)

    return call


_METHOD_OF = {field: method for method, field in STREAM_FIELDS.items()}


def parse_addresses(bootstrap: str | Sequence[str]) -> list[str]:
    if isinstance(bootstrap, str):
        items = bootstrap.split(",")
    else:
        items = list(bootstrap)
    addresses = [a.strip() for a in items if a and a.strip()]
    if not addresses:
        raise ValueError("no controller address given")
    return addresses


class ControllerClient:
    """Thread-safe; one gRPC channel per controller address, opened lazily."""

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        *,
        timeout_s: float = 10.0,
        dial: Callable[[str], str] | None = None,
        stream_idle_close_s: float = 10.0,
    ):
        self.addresses = parse_addresses(bootstrap)
        self.timeout_s = timeout_s
        # The address to dial for a controller's own (see network.dial.overrides).
        self._dial = dial or (lambda address: address)
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, controller_pb2_grpc.ControllerStub] = {}
        self._preferred: str | None = None
        # Its own thread closes idle streams (each holds a controller thread).
        self._streams = StreamPool(
            self.stub,
            "Requests",
            _unary_in_envelope,
            idle_close_s=stream_idle_close_s,
            sweep_every_s=min(1.0, stream_idle_close_s / 2),
        )
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()
        self._streams.close()
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stub(self, address: str) -> controller_pb2_grpc.ControllerStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                channel = grpc.insecure_channel(
                    self._dial(address),
                    options=[
                        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                        ("grpc.max_send_message_length", 64 * 1024 * 1024),
                        ("grpc.initial_reconnect_backoff_ms", 50),
                        ("grpc.max_reconnect_backoff_ms", 500),
                    ],
                )
                self._channels[address] = channel
                stub = self._stubs[address] = controller_pb2_grpc.ControllerStub(channel)
            return stub

    def _order(self) -> list[str]:
        preferred = self._preferred
        rest = [a for a in self.addresses if a != preferred]
        return ([preferred] if preferred else []) + rest

    def call(self, method: str, request: Any, *, timeout_s: float | None = None) -> Any:
        """Send ``request`` to the active controller and return its response.

        Raises a ``RaftkaError`` subclass for an error the caller must handle.
        """
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        attempt = 0
        last: RaftkaError | None = None
        while True:
            for address in self._order():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                response, last = self._try(address, method, request, remaining)
                if response is not None:
                    return response
            if time.monotonic() >= deadline:
                break
            time.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
            attempt += 1
        if last is None:
            last = error_for(common_pb2.REQUEST_TIMED_OUT, f"{method}: no controller answered")
        raise last

    def _try(
        self, address: str, method: str, request: Any, remaining: float
    ) -> tuple[Any, RaftkaError | None]:
        try:
            response = self._send(address, method, request, remaining)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in _NOT_DELIVERED:
                return None, error_for(
                    common_pb2.REQUEST_TIMED_OUT, f"controller {address} unreachable"
                )
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                # Silent: paused, or cut off without a reset. The next call starts with
                # the other controllers (one of them names the active one) instead of
                # waiting here again: a broker's heartbeats would otherwise all go to a
                # cut-off controller, and the new active one would fence the broker.
                self._demote(address)
                raise error_for(
                    common_pb2.UNKNOWN_OUTCOME, f"{method} timed out at {address}"
                ) from exc
            raise error_for(
                common_pb2.UNKNOWN_SERVER_ERROR, f"{method} at {address}: {exc}"
            ) from exc
        error = getattr(response, "error", None)
        code = error.code if error is not None else common_pb2.NONE
        if code in RETRIABLE:
            self._follow_hint(response)
            return None, error_for(code, error.message if error is not None else "")
        self._preferred = address
        return response, None

    def _send(self, address: str, method: str, request: Any, remaining: float) -> Any:
        """The answer of ``address`` to ``request``: on its Requests stream when the
        method has a place there, else (or when the stream is busy) a unary call."""
        if self._closed.is_set():
            raise error_for(common_pb2.UNKNOWN_SERVER_ERROR, f"{method}: the client is closed")
        field = STREAM_FIELDS.get(method)
        if field is None:
            return getattr(self.stub(address), method)(request, timeout=remaining)
        started = time.monotonic()
        call = self._streams.call(address, cpb.ControllerRequest(**{field: request}), remaining)
        try:
            envelope = call.result(timeout=remaining)
        except (TimeoutError, grpc.FutureTimeoutError):
            call.cancel()  # The stream ends; the controller may have done it.
            raise StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time") from None
        answered = envelope.WhichOneof("response")
        if answered == field:
            return getattr(envelope, field)
        if answered is None and envelope.error.code == common_pb2.INVALID_REQUEST:
            # An older controller that does not carry this request on its stream:
            # nothing was done, so ask with the unary method.
            left = remaining - (time.monotonic() - started)
            return getattr(self.stub(address), method)(request, timeout=max(left, 0.001))
        raise StreamError(
            grpc.StatusCode.INTERNAL,
            f"asked {field}, answered {answered}: {envelope.error.message}",
        )

    def _demote(self, address: str) -> None:
        if self._preferred == address:
            self._preferred = None
        if address in self.addresses:
            # A new list: calls on other threads go on iterating the one they took.
            self.addresses = [a for a in self.addresses if a != address] + [address]

    def _follow_hint(self, response: Any) -> None:
        hint = getattr(response, "hint", None)
        if hint is None or not hint.leader_host or hint.leader_port <= 0:
            return
        address = f"{hint.leader_host}:{hint.leader_port}"
        if address not in self.addresses:
            self.addresses.append(address)
        self._preferred = address
