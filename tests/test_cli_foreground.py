"""Running a node in the foreground: a signal stops it cleanly; its own end is noticed."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading

import pytest

from cli._foreground import run_until_signalled


class FakeNode:
    def __init__(self, fail_start: bool = False):
        self.fail_start = fail_start
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.stop_calls = 0

    def start(self) -> None:
        if self.fail_start:
            raise OSError("port in use")
        self.started.set()

    def stop(self) -> None:
        self.stop_calls += 1
        self.stopped.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self.stopped.wait(timeout_s)


def test_sigterm_stops_the_node_and_restores_handlers():
    node = FakeNode()
    before = signal.getsignal(signal.SIGTERM)

    def send_sigterm() -> None:
        assert node.started.wait(5)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_sigterm)
    sender.start()
    assert run_until_signalled(node, node.stop, name="test", poll_s=0.05) == "signal"
    sender.join(5)
    assert node.stop_calls == 1
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_node_that_ends_by_itself_returns_without_stop():
    node = FakeNode()
    threading.Timer(0.1, node.stopped.set).start()
    assert run_until_signalled(node, node.stop, name="test", poll_s=0.05) == "exited"
    assert node.stop_calls == 0


def test_a_failed_start_releases_the_node_and_raises():
    node = FakeNode(fail_start=True)
    with pytest.raises(OSError, match="port in use"):
        run_until_signalled(node, node.stop, name="test")
    assert node.stop_calls == 1


def test_a_node_raises_its_open_files_limit_to_the_hard_limit() -> None:
    """A broker holds three descriptors per partition log: the usual soft limit
    of 1024 would stop it at about 300 partitions."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # The child starts with a soft limit of 256 under a hard one of at most 4096
    # (lowering a hard limit needs no privilege).
    hard = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    code = (
        "import resource\n"
        "from cli._foreground import raise_open_files_limit\n"
        "print(*raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ).stdout.split()
    assert [int(x) for x in out] == [256, hard, hard]
