"""The broker's copy of the metadata log: fetch committed records, replay them, publish the image.

Theory of operation. One daemon thread keeps a FetchMetadata stream open to
one controller (any controller serves committed records) asking for the
offset after the last one applied. Each response's entries are replayed in
order with ``quorum.replay.replay``; the result is handed to ``on_change``
and then published as one ``(image, offset)`` tuple, so a reader never sees an
image and an offset that disagree.

Offsets are applied exactly once and never skipped: an entry at or below the
applied offset is a duplicate and is dropped, an entry beyond the next offset
is a gap, after which the stream is dropped and re-opened from the next offset
(on another controller, since this one misbehaved). When the controller
answers SNAPSHOT_REQUIRED (the wanted offset is older than its retained tail),
the follower loads the snapshot image and continues from its end offset + 1;
a snapshot that is not ahead of the applied offset is refused, so the image
never goes back in time.

A follower that starts publishes nothing until it has replayed up to the high
watermark the controller first reported (as a KRaft broker waits to catch up
before its first publish); one that falls behind later replays on but publishes
at most every ``_CATCH_UP_PUBLISH_S``. on_change sees the change from the last
published image to the latest, so a broker acts on where the log is, not on
every topic that was created and deleted on the way (each would cost it a log
directory). Once caught up, every response is published as it is replayed.

A stream lives at most ``stream_timeout_s`` (10 s). The controller ends it a
little before that deadline, so an end it did not make is a broker lost (see
quorum/service.py). It answers at least every ``max_wait_ms`` (500 ms), so a
stream that has said nothing for ``silence_s`` (2 s) is cancelled by a watchdog
and the next address tried: a controller that is paused or cut off keeps its
connection up, and the stream would otherwise wait out its deadline. Waiting
here is what counts as silence, not the time the broker takes to apply an answer.
A stream that ends after delivering something is re-opened at once on the
same controller; a stream that fails or delivers nothing moves to the next
address after a short backoff. ``stop()`` cancels the call in flight, so the
thread ends within a bounded time.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc
from raftka.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from raftka.v1 import metadata_pb2 as pb

from quorum.image import EMPTY_IMAGE, MetadataImage
from quorum.records import touched_topic_ids
from quorum.replay import replay_batch
from quorum.snapshot import SnapshotError, decode_image

log = logging.getLogger(__name__)

# (old image, new image, ids of the topics the change touched; None after a
# snapshot load, when any topic may have changed).
OnChange = Callable[[MetadataImage, MetadataImage, frozenset[str] | None], None]

_BACKOFF_S = (0.05, 0.1, 0.2, 0.5)
# The watchdog's "last heard" while the follower applies an answer: never silent.
_APPLYING = float("inf")
# While behind the high watermark, what was replayed is published at most this often.
_CATCH_UP_PUBLISH_S = 0.5
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
]


class _Outcome(enum.Enum):
    RENEW = "renew"  # the stream ended in order; open the next one on the same controller
    SWITCH = "switch"  # the controller failed or misbehaved; back off and try the next one
    REDIRECT = "redirect"  # not the leader; the hint already chose the next address
    STOPPED = "stopped"


class MetadataFollower:
    """Follows the metadata log from a set of controller addresses on one daemon thread."""

    def __init__(
        self,
        controller_addresses: Sequence[str],
        broker_id: int,
        on_change: OnChange | None = None,
        *,
        max_records: int = 2000,
        max_wait_ms: int = 500,
        stream_timeout_s: float = 10.0,
        silence_s: float = 2.0,
        snapshot_timeout_s: float = 30.0,
        dial: Callable[[str], str] | None = None,
    ):
        if not controller_addresses:
            raise ValueError("no controller address given")
        self.addresses = list(controller_addresses)
        # The address to dial for a controller's own (see network.dial.overrides).
        self._dial = dial or (lambda address: address)
        self.broker_id = broker_id
        self.on_change = on_change
        self.max_records = max_records
        self.max_wait_ms = max_wait_ms
        self.stream_timeout_s = stream_timeout_s
        self.silence_s = silence_s
        self.snapshot_timeout_s = snapshot_timeout_s
        # The last applied offset and the image at it, always assigned together.
        self._published: tuple[MetadataImage, int] = (EMPTY_IMAGE, EMPTY_IMAGE.offset)
        # The last replayed offset and image (ahead of the published ones while catching
        # up), the topics touched since the last publish, and when it was.
        self._replayed: tuple[MetadataImage, int] = self._published
        self._unpublished_topics: set[str] = set()
        self._last_publish_s = time.monotonic()
        # The high watermark of the first response: nothing is published before it.
        self._first_high_watermark: int | None = None
        # The committed end of the log as last reported by a controller (next offset to write).
        self.high_watermark = 0
        self.snapshots_loaded = 0
        self._published_cond = threading.Condition()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._call: grpc.Future | None = None
        # The stream the watchdog watches, when it last heard from the controller (or
        # the follower went back to waiting on it), and the one it cancelled.
        self._watched: grpc.Future | None = None
        self._last_heard = 0.0
        self._silenced: grpc.Future | None = None
        self._channels: dict[str, grpc.Channel] = {}
        self._address_index = 0
        self._thread = threading.Thread(
            target=self._run, name=f"metadata-follower-{broker_id}", daemon=True
        )
        self._watchdog = threading.Thread(
            target=self._watch_silence, name=f"metadata-watchdog-{broker_id}", daemon=True
        )

    # -- what readers see ---------------------------------------------------

    @property
    def image(self) -> MetadataImage:
        return self._published[0]

    @property
    def offset(self) -> int:
        """The offset of the last applied record; -1 before the first."""
        return self._published[1]

    def published(self) -> tuple[MetadataImage, int]:
        """The image and its offset, read together."""
        return self._published

    @property
    def current_address(self) -> str:
        return self.addresses[self._address_index]

    def wait_for_offset(self, offset: int, timeout_s: float) -> bool:
        """Wait until ``offset`` has been applied; False if ``timeout_s`` passed first."""
        with self._published_cond:
            return self._published_cond.wait_for(lambda: self.offset >= offset, timeout_s)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop the thread; True if it ended within ``timeout_s``."""
        self._stopping.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._watchdog.is_alive():
            self._watchdog.join(timeout_s)
        stopped = not self._thread.is_alive()
        if stopped:
            with self._lock:
                for channel in self._channels.values():
                    channel.close()
                self._channels.clear()
        return stopped

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # -- the thread ---------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            address = self.current_address
            try:
                outcome = self._follow(address)
            except Exception:  # the follower must outlive any one bad answer
                log.exception("metadata follower: unexpected error with controller %s", address)
                outcome = _Outcome.SWITCH
            if outcome is _Outcome.STOPPED:
                break
            if outcome is _Outcome.RENEW:
                failures = 0
                continue
            if outcome is _Outcome.REDIRECT:
                # A short pause bounds the loop if two nodes point at each other.
                self._stopping.wait(_BACKOFF_S[0])
                continue
            self._address_index = (self._address_index + 1) % len(self.addresses)
            self._stopping.wait(_BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)])
            failures += 1
        log.debug(
            "metadata follower of broker %d stopped at offset %d", self.broker_id, self.offset
        )

    def _stub(self, address: str) -> controller_pb2_grpc.ControllerStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.insecure_channel(self._dial(address), options=_CHANNEL_OPTIONS)
                self._channels[address] = channel
        return controller_pb2_grpc.ControllerStub(channel)

    def _watch(self, call: grpc.Future | None) -> None:
        with self._lock:
            self._watched = call
            self._last_heard = time.monotonic()

    def _watch_silence(self) -> None:
        """Cancel the stream in flight once the controller has said nothing on it
        for ``silence_s``; the follower then tries the next address."""
        while not self._stopping.wait(self.silence_s / 4):
            with self._lock:
                call = self._watched
                if call is not None and time.monotonic() - self._last_heard > self.silence_s:
                    self._silenced = call
                    call.cancel()

    def _track(self, call: grpc.Future | None) -> bool:
        """Remember the call in flight so stop() can cancel it; False when stopping."""
        with self._lock:
            if call is not None and self._stopping.is_set():
                call.cancel()
                return False
            self._call = call
            return True

    def _follow(self, address: str) -> _Outcome:
        """One FetchMetadata stream, from the next offset until it ends or fails."""
        request = controller_pb2.FetchMetadataRequest(
            offset=self._replayed[1] + 1,
            max_records=self.max_records,
            max_wait_ms=self.max_wait_ms,
            replica_id=self.broker_id,
        )
        call = self._stub(address).FetchMetadata(request, timeout=self.stream_timeout_s)
        if not self._track(call):
            return _Outcome.STOPPED
        self._watch(call)
        received = False
        try:
            for response in call:
                received = True
                self._last_heard = _APPLYING
                outcome = self._handle(address, response)
                if outcome is not None:
                    return outcome
                self._last_heard = time.monotonic()  # Waiting again from here.
        except grpc.RpcError as exc:
            if self._stopping.is_set():
                return _Outcome.STOPPED
            if self._silenced is call:
                log.info("controller %s said nothing for %.1f s", address, self.silence_s)
                return _Outcome.SWITCH
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and received:
                return _Outcome.RENEW
            log.info("metadata fetch from %s failed: %s", address, exc.code())
            return _Outcome.SWITCH
        finally:
            self._watch(None)
            self._track(None)
            call.cancel()
        return _Outcome.RENEW if received else _Outcome.SWITCH

    def _handle(
        self, address: str, response: controller_pb2.FetchMetadataResponse
    ) -> _Outcome | None:
        """Apply one response; an outcome ends the stream, None reads on."""
        code = response.error.code
        if code == common_pb2.SNAPSHOT_REQUIRED:
            return self._load_snapshot(address)
        if code == common_pb2.NOT_CONTROLLER and self._redirect(response.hint):
            return _Outcome.REDIRECT
        if code != common_pb2.NONE:
            log.info(
                "metadata fetch from %s at offset %d: %s %s",
                address,
                self._replayed[1] + 1,
                common_pb2.ErrorCode.Name(code),
                response.error.message,
            )
            return _Outcome.SWITCH
        self.high_watermark = max(self.high_watermark, response.high_watermark)
        if self._first_high_watermark is None:
            self._first_high_watermark = response.high_watermark
        contiguous = self._apply(response.entries)
        self._maybe_publish()
        return None if contiguous else _Outcome.SWITCH

    def _redirect(self, hint: controller_pb2.ControllerHint) -> bool:
        """Point at the leader the hint names; False when it names none."""
        if hint.leader_id < 0 or not hint.leader_host or hint.leader_port <= 0:
            return False
        address = f"{hint.leader_host}:{hint.leader_port}"
        if address not in self.addresses:
            self.addresses.append(address)
        self._address_index = self.addresses.index(address)
        return True

    def _apply(self, entries: Sequence[pb.MetadataLogEntry]) -> bool:
        """Replay entries in offset order; False when they skip an offset."""
        old_image, applied = self._replayed
        fresh = [entry for entry in entries if entry.offset > applied]
        if len(fresh) < len(entries):
            log.warning("dropping %d metadata entries already applied", len(entries) - len(fresh))
        # Entries must continue the log exactly; the first gap ends the batch.
        contiguous = True
        for i, entry in enumerate(fresh):
            if entry.offset != applied + 1 + i:
                log.warning(
                    "metadata entries skip from %d to %d; fetching again",
                    applied + i,
                    entry.offset,
                )
                fresh = fresh[:i]
                contiguous = False
                break
        if not fresh:
            return contiguous
        records = [e.record for e in fresh]
        image, no_ops = replay_batch(old_image, records, applied + 1)
        for offset, reason in no_ops:
            log.debug("metadata record at %d is a no-op: %s", offset, reason)
        applied = fresh[-1].offset
        if image is not old_image:
            assert image.offset == applied, (image.offset, applied)
            self._replayed = (image, applied)
            self._unpublished_topics.update(touched_topic_ids(records))
        return contiguous

    def _maybe_publish(self) -> None:
        """Publish what was replayed: once caught up; while behind, not before the first
        high watermark, then ``_CATCH_UP_PUBLISH_S`` after the last publish."""
        image, offset = self._replayed
        published, _ = self._published
        if image is published:
            return
        if offset + 1 < self.high_watermark:
            first = self._first_high_watermark
            if first is not None and offset + 1 < first:
                return  # Starting up: not caught up with the log as it was at the start.
            if time.monotonic() - self._last_publish_s < _CATCH_UP_PUBLISH_S:
                return
        topics = frozenset(self._unpublished_topics)
        self._unpublished_topics.clear()
        self._publish(published, image, offset, topics)

    def _load_snapshot(self, address: str) -> _Outcome:
        future = self._stub(address).FetchSnapshot.future(
            controller_pb2.FetchSnapshotRequest(replica_id=self.broker_id),
            timeout=self.snapshot_timeout_s,
        )
        if not self._track(future):
            return _Outcome.STOPPED
        try:
            response = future.result()
        except grpc.RpcError as exc:
            if self._stopping.is_set():
                return _Outcome.STOPPED
            log.info("metadata snapshot from %s failed: %s", address, exc.code())
            return _Outcome.SWITCH
        except grpc.FutureCancelledError:
            return _Outcome.STOPPED
        finally:
            self._track(None)
        if response.error.code != common_pb2.NONE:
            log.info("metadata snapshot from %s: %s", address, response.error.message)
            return _Outcome.SWITCH
        old_image, _ = self._published
        _, applied = self._replayed
        end_offset = response.snapshot.end_offset
        if end_offset <= applied:
            # Loading it would take the image back in time; ask someone else.
            log.warning("snapshot from %s ends at %d, not past %d", address, end_offset, applied)
            return _Outcome.SWITCH
        started = time.monotonic()
        try:
            image = decode_image(response.snapshot)
        except SnapshotError as exc:
            log.error("snapshot from %s does not load: %s", address, exc)
            return _Outcome.SWITCH
        log.info(
            "loaded metadata snapshot at offset %d from %s (%d records, %.0f ms)",
            end_offset,
            address,
            len(response.snapshot.records),
            (time.monotonic() - started) * 1000,
        )
        self.snapshots_loaded += 1
        self._unpublished_topics.clear()  # Whatever they were, the snapshot has them.
        self._publish(old_image, image, end_offset, None)
        return _Outcome.RENEW

    def _publish(
        self,
        old_image: MetadataImage,
        image: MetadataImage,
        offset: int,
        topic_ids: frozenset[str] | None,
    ) -> None:
        # on_change runs before the offset is published, so an offset that the
        # broker reports (heartbeats, wait_for_offset) has been acted on too.
        if self.on_change is not None:
            try:
                self.on_change(old_image, image, topic_ids)
            except Exception:
                log.exception("metadata change handler failed at offset %d", offset)
        with self._published_cond:
            self._published = self._replayed = (image, offset)
            self._published_cond.notify_all()
        self._last_publish_s = time.monotonic()
