"""Nodes freeze what survives a full collection, so later ones skip the image."""

from __future__ import annotations

import gc

from quorum import gc_policy


def test_survivors_of_a_full_collection_are_frozen():
    gc_policy.install()
    gc_policy.install()  # idempotent
    assert gc.callbacks.count(gc_policy._freeze_after_full_collection) == 1
    gc.unfreeze()
    long_lived = [[i] for i in range(10_000)]
    gc.collect()
    frozen = gc.get_freeze_count()
    assert frozen >= len(long_lived), "the survivors were not frozen"
    # A young collection freezes nothing.
    gc.unfreeze()
    gc.collect(0)
    assert gc.get_freeze_count() == 0
    gc.collect()  # leave the process as nodes run: survivors frozen
