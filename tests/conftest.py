"""Shared test helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cli.localcluster import LocalCluster


@contextmanager
def running_cluster(
    directory: Path, configure: Callable[[LocalCluster], None] | None = None, **create: Any
) -> Iterator[LocalCluster]:
    """A local cluster of real processes, ready, and stopped (by pid) afterwards;
    ``configure`` may change its nodes' configs before they start."""
    cluster = LocalCluster(directory)
    cluster.create(**create)
    if configure is not None:
        configure(cluster)
    try:
        cluster.start()
        cluster.wait_ready(timeout_s=60)
        yield cluster
    finally:
        cluster.stop(timeout_s=15)
