"""Client streams: requests on one open gRPC stream per server instead of unary calls.

A unary call in gRPC's Python API pays for setting up a call, on both sides, every
time; a message on an open stream does not. On this project's 2-core machine a unary
round trip costs 0.5-0.6 ms back to back and 1.1-1.4 ms with a few idle milliseconds
between calls (as a producer lingering 5 ms has), a stream message 0.2-0.3 and 0.6-0.9
ms (``README.md``, end-to-end latency). So the producer sends on ``ProduceStream``, the
consumer fetches on ``FetchStream``, one stream per broker, and ``ControllerClient``
sends on a controller's ``Requests``.

A stream carries one request at a time, answered in order (the server handles a
stream's requests one by one, as Kafka handles a connection's). When the stream is
busy, the request goes as a unary call instead, so a client never has fewer requests
in flight than with unary calls alone.

Each open stream holds a thread on the server, which serves a limited number of them
(a broker ``max.client.streams``): past that it refuses a new one
(``RESOURCE_EXHAUSTED`` with trailing metadata ``raftka-stream-refused``), and a server
that does not know the method answers ``UNIMPLEMENTED``. Either way, before any answer
on the stream, the request is resent as a unary call and that server gets unary calls
for ``_FALLBACK_S``. A stream unused for ``_IDLE_CLOSE_S`` is closed by the next
``sweep``, to give its server thread back.

A request on a stream has no gRPC deadline of its own: ``StreamPool.sweep`` (the
client's loop calls it at least once a second, or the pool's own thread with
``sweep_every_s``) ends a stream whose request is overdue,
and the request fails with ``DEADLINE_EXCEEDED``, as a unary call's would. A caller
that waits on ``result(timeout)`` can ``cancel`` instead.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

log = logging.getLogger(__name__)

# Trailing metadata of a stream the server refused (quorum/streams.py STREAM_REFUSED).
STREAM_REFUSED = "raftka-stream-refused"
# A broker that refused a stream gets unary calls for this long.
_FALLBACK_S = 30.0
# A stream without a request for this long is closed.
_IDLE_CLOSE_S = 10.0

_END = object()  # Ends a stream's request iterator: the client is done sending.


class StreamError(grpc.RpcError):
    """Why a request on a stream failed: a status code and details, as a gRPC call's."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class StreamCall:
    """The answer to one request sent on a stream (or resent as a unary call): the
    part of ``grpc.Future`` the clients use."""

    __slots__ = (
        "request",
        "deadline_s",
        "_unary",
        "_stream",
        "_future",
        "_lock",
        "_callbacks",
        "_outcome",
        "_cancelled",
    )

    def __init__(self, request: Any, deadline_s: float, unary: Callable[..., Any]):
        self.request = request
        self.deadline_s = deadline_s
        self._unary = unary
        self._stream: _Stream | None = None
        self._future: Any = None  # The unary call it was resent as.
        self._lock = threading.Condition(threading.Lock())
        self._callbacks: list[Callable[[StreamCall], object]] = []
        self._outcome: tuple[Any, BaseException | None] | None = None
        self._cancelled = False

    def add_done_callback(self, fn: Callable[[StreamCall], object]) -> None:
        with self._lock:
            if self._outcome is None:
                self._callbacks.append(fn)
                return
        fn(self)

    def done(self) -> bool:
        return self._outcome is not None

    def result(self, timeout: float | None = None) -> Any:
        with self._lock:
            if self._outcome is None and not self._lock.wait_for(
                lambda: self._outcome is not None, timeout
            ):
                raise TimeoutError("no answer yet")
            assert self._outcome is not None
            response, error = self._outcome
        if error is not None:
            raise error
        return response

    def cancel(self) -> bool:
        """Fail the request with CANCELLED, ending its stream (the broker may have
        handled it, as with a cancelled unary call). False when it is already done."""
        with self._lock:
            if self._outcome is not None:
                return False
            self._cancelled = True
            future, stream = self._future, self._stream
        if future is not None:
            return bool(future.cancel())
        if stream is not None:
            stream.abort(StreamError(grpc.StatusCode.CANCELLED, "cancelled"), only_for=self)
        return True

    def _finish(self, response: Any, error: BaseException | None) -> None:
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = (response, error)
            callbacks, self._callbacks = self._callbacks, []
            self._lock.notify_all()
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("a stream call's callback failed")

    def _resend_unary(self) -> None:
        with self._lock:
            cancelled = self._cancelled
            self._stream = None
        if cancelled:
            self._finish(None, StreamError(grpc.StatusCode.CANCELLED, "cancelled"))
            return
        remaining = self.deadline_s - time.monotonic()
        try:
            future = self._unary(self.request, timeout=max(remaining, 0.001))
        except Exception as exc:  # The channel is closed.
            self._finish(None, exc)
            return
        with self._lock:
            self._future = future
            cancelled = self._cancelled
        if cancelled:
            future.cancel()

        def done(f: Any) -> None:
            try:
                self._finish(f.result(), None)
            except BaseException as exc:
                self._finish(None, exc)

        future.add_done_callback(done)


class _Stream:
    """One open stream to a broker, carrying one request at a time."""

    def __init__(self, pool: StreamPool, address: str, open_stream: Callable[..., Any]):
        self.address = address
        self.last_used_s = time.monotonic()
        self.broken = False
        self._pool = pool
        self._lock = threading.Lock()
        self._outstanding: StreamCall | None = None
        self._answered = 0
        self._abort_error: StreamError | None = None
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call = open_stream(iter(self._requests.get, _END))
        self._reader = threading.Thread(
            target=self._read, name=f"raftka-stream-{address}", daemon=True
        )
        self._reader.start()

    @property
    def outstanding(self) -> StreamCall | None:
        return self._outstanding

    def send(self, call: StreamCall) -> bool:
        """Send the call's request unless the stream is busy or broken."""
        with self._lock:
            if self.broken or self._outstanding is not None:
                return False
            self._outstanding = call
            call._stream = self
            self.last_used_s = time.monotonic()
            # Under the lock: a close() on another thread queues its end after this.
            self._requests.put(call.request)
        return True

    def abort(self, error: StreamError, only_for: StreamCall | None = None) -> None:
        """End the stream; its outstanding request fails with ``error``. With
        ``only_for``, only while that call is the one outstanding."""
        with self._lock:
            if only_for is not None and self._outstanding is not only_for:
                return
            if self._abort_error is None:
                self._abort_error = error
            self.broken = True
        self._requests.put(_END)  # Lets gRPC's thread sending the requests end.
        self._call.cancel()

    def close(self) -> None:
        """End the stream once the server has answered what was sent."""
        with self._lock:
            self.broken = True
            self._requests.put(_END)

    def close_if_idle(self, now: float, idle_s: float) -> bool:
        """Close the stream if nothing is outstanding and it was last used ``idle_s``
        ago or more (in one step, so no request is sent on it meanwhile)."""
        with self._lock:
            if self.broken or self._outstanding is not None:
                return False
            if now - self.last_used_s < idle_s:
                return False
            self.broken = True
            self._requests.put(_END)
            return True

    def _read(self) -> None:
        error: BaseException
        try:
            for response in self._call:
                with self._lock:
                    call, self._outstanding = self._outstanding, None
                    self._answered += 1
                if call is not None:
                    call._finish(response, None)
            error = StreamError(grpc.StatusCode.UNAVAILABLE, "the broker ended the stream")
        except grpc.RpcError as exc:
            error = exc
        except Exception as exc:  # A response that could not be parsed, say.
            error = StreamError(grpc.StatusCode.UNKNOWN, f"stream failed: {exc}")
        self._requests.put(_END)
        with self._lock:
            self.broken = True
            call, self._outstanding = self._outstanding, None
            if self._abort_error is not None:
                error = self._abort_error
            refused = self._answered == 0 and self._abort_error is None and _refused(self._call)
        self._pool._forget(self, refused)
        if call is None:
            return
        if refused:
            call._resend_unary()
        else:
            call._finish(None, error)


def _refused(call: Any) -> bool:
    """Did the broker refuse the stream (too many, or it does not know the method)?"""
    try:
        code = call.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return True
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return any(key == STREAM_REFUSED for key, _ in call.trailing_metadata() or ())
    except Exception:  # Not a call that ended with a status.
        return False
    return False


class StreamPool:
    """A client's streams for one method pair (``ProduceStream``/``Produce``,
    ``FetchStream``/``Fetch``, a controller's ``Requests`` and its unary methods), one
    per server address. Any thread may call; a request that finds the stream busy
    goes as a unary call."""

    def __init__(
        self,
        stub_for: Callable[[str], Any],
        stream_method: str,
        unary_method: str | Callable[[Any], Callable[..., Any]],
        *,
        idle_close_s: float = _IDLE_CLOSE_S,
        fallback_s: float = _FALLBACK_S,
        sweep_every_s: float | None = None,
    ):
        self._stub_for = stub_for
        self._stream_method = stream_method
        # A method name, or a function of a stub that returns the unary call for a
        # stream's request (when the unary methods take something else).
        self._unary_for: Callable[[Any], Callable[..., Any]]
        if isinstance(unary_method, str):
            name = unary_method
            self._unary_for = lambda stub: getattr(stub, name).future
            self._unary_name = unary_method
        else:
            self._unary_for = unary_method
            self._unary_name = "unary calls"
        self._idle_close_s = idle_close_s
        self._fallback_s = fallback_s
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._unary_until: dict[str, float] = {}
        self._closed = False
        # With ``sweep_every_s``, a thread of the pool's own sweeps (from its first
        # stream until close), for clients whose loop may stop calling ``sweep``: an
        # idle stream holds a server thread.
        self._sweep_every_s = sweep_every_s
        self._sweeper: threading.Thread | None = None
        self._stopped = threading.Event()
        # Streams whose reader thread has not ended (close waits for them).
        self._live: set[_Stream] = set()

    def call(self, address: str, request: Any, timeout_s: float) -> Any:
        """Send ``request`` to ``address``: on its stream when that is free, else as a
        unary call. Returns a future of the answer (``result``, ``add_done_callback``,
        ``cancel``). Raises what opening a channel raises (the client is closed)."""
        if self._closed:
            raise RuntimeError("the client is closed")
        stub = self._stub_for(address)
        unary = self._unary_for(stub)
        now = time.monotonic()
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            stream = self._streams.get(address)
            use_unary = self._unary_until.get(address, 0.0) > now
            if not use_unary and (stream is None or stream.broken):
                stream = self._streams[address] = _Stream(
                    self, address, getattr(stub, self._stream_method)
                )
                self._live.add(stream)
                self._start_sweeper()
        if use_unary or stream is None:
            return unary(request, timeout=timeout_s)
        call = StreamCall(request, now + timeout_s, unary)
        if stream.send(call):
            return call
        return unary(request, timeout=timeout_s)

    def sweep(self, now: float) -> None:
        """Fail overdue requests (ending their streams) and close idle streams."""
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            call = stream.outstanding
            if call is not None:
                if now >= call.deadline_s:
                    stream.abort(
                        StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time"),
                        only_for=call,
                    )
            elif stream.close_if_idle(now, self._idle_close_s):
                with self._lock:
                    if self._streams.get(stream.address) is stream:
                        del self._streams[stream.address]

    def streams(self) -> Iterator[str]:
        """Addresses with an open stream (for tests and diagnostics)."""
        with self._lock:
            return iter([a for a, s in self._streams.items() if not s.broken])

    def _start_sweeper(self) -> None:
        # Under self._lock.
        if self._sweep_every_s is None or self._sweeper is not None:
            return
        self._sweeper = threading.Thread(
            target=self._sweep_loop, name=f"raftka-{self._stream_method}-sweep", daemon=True
        )
        self._sweeper.start()

    def _sweep_loop(self) -> None:
        assert self._sweep_every_s is not None
        while not self._stopped.wait(self._sweep_every_s):
            self.sweep(time.monotonic())

    def close(self, wait_s: float = 2.0) -> None:
        """End every stream; requests on them fail with CANCELLED. Waits up to
        ``wait_s`` for the streams' threads to end: a thread still inside a gRPC call
        when the interpreter exits can leave the exit waiting on its lock for good."""
        self._stopped.set()
        with self._lock:
            self._closed = True
            streams = list(self._streams.values())
            self._streams.clear()
            live = list(self._live)
        for stream in streams:
            stream.abort(StreamError(grpc.StatusCode.CANCELLED, "the client is closed"))
        deadline = time.monotonic() + wait_s
        me = threading.current_thread()
        threads = [stream._reader for stream in live]
        if self._sweeper is not None:
            threads.append(self._sweeper)
        for thread in threads:
            if thread is not me:
                thread.join(max(0.0, deadline - time.monotonic()))

    def _forget(self, stream: _Stream, refused: bool) -> None:
        with self._lock:
            self._live.discard(stream)
            if self._streams.get(stream.address) is stream:
                del self._streams[stream.address]
            if refused:
                self._unary_until[stream.address] = time.monotonic() + self._fallback_s
        if refused:
            log.info(
                "%s refused a %s stream: using %s for %.0f s",
                stream.address,
                self._stream_method,
                self._unary_name,
                self._fallback_s,
            )
