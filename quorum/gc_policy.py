"""Garbage collection for long-running nodes.

CPython's full (generation 2) collection scans every tracked object. A
controller or broker holds the metadata image: hundreds of thousands of
objects at 100,000 partitions. A full collection then takes a few hundred
milliseconds, longer than the Raft leader's fallback timeout, and pauses every
thread, so the leader steps down under steady load (seen with
``raftka bench metadata --duration 60`` before this policy).

What survives a full collection is long-lived, and the image is acyclic:
replaced parts are freed by reference counting whether or not the collector
tracks them. So after each full collection the survivors are frozen
(``gc.freeze``), and the next full collection scans only what came since.
The cost: a reference cycle among frozen objects that later becomes garbage
is not reclaimed. Metadata has no cycles; what else lives that long (threads,
channels) lives for the whole process.
"""

from __future__ import annotations

import gc
from typing import Any

_installed = False


def _freeze_after_full_collection(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()


def install() -> None:
    """Apply the policy to this process (idempotent)."""
    global _installed
    if not _installed:
        gc.callbacks.append(_freeze_after_full_collection)
        _installed = True
