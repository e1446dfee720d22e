"""Run a node in the foreground until SIGTERM or SIGINT, then stop it cleanly.

The node runs its own threads; this process's main thread only waits for a
signal or for the node to end on its own (``wait()`` returning). On the first
signal the node is stopped the clean way (a broker moves its leaderships away
first); a second signal during that shutdown exits at once, as an operator
pressing Ctrl-C twice expects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("raftka.cli")

# A broker holds one descriptor per partition log it hosts (its active segment's
# .log; index files only once written to, so a busy partition holds three), as
# Kafka holds one per segment and maps its indexes.
DESCRIPTORS_PER_LOG = 1


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit.

    The usual soft limit of 1024 runs a broker out of descriptors at about 300
    partitions, where the hard limit (often 524,288 or more) would not; a JVM
    raises it the same way at start. Returns (limit before, limit after).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, e)
            return soft, soft
        return soft, hard
    return soft, soft


class Node(Protocol):
    def start(self) -> Any: ...

    def stop(self) -> Any: ...

    def wait(self) -> Any: ...


def run_until_signalled(
    node: Node,
    stop: Callable[[], Any],
    *,
    name: str,
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
    poll_s: float = 0.5,
) -> str:
    """Start ``node``, block until a signal or its end, stop it; returns why it ended
    (``"signal"`` or ``"exited"``)."""
    ended = threading.Event()
    signalled = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if signalled.is_set():
            log.warning("%s: second signal during shutdown, exiting now", name)
            os._exit(128 + signum)
        log.info("%s: %s received, shutting down", name, signal.Signals(signum).name)
        signalled.set()
        ended.set()

    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        try:
            node.start()
        except BaseException:
            # Release what a half-started node holds (ports, threads).
            with contextlib.suppress(Exception):
                stop()
            raise
        log.info("%s: started", name)

        def watch() -> None:
            try:
                node.wait()
            finally:
                ended.set()

        threading.Thread(target=watch, name=f"{name}-wait", daemon=True).start()
        # Waiting with a timeout keeps the main thread returning to the
        # interpreter, where signal handlers run.
        while not ended.wait(poll_s):
            pass
        if signalled.is_set():
            stop()
            log.info("%s: stopped", name)
            return "signal"
        log.warning("%s: node ended by itself", name)
        return "exited"
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
