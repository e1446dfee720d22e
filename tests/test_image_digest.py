"""The image digest: equal images give equal digests, in any process and whatever
order their maps were built in; any difference, the offset included, changes it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_replay_properties import RECORDS, _apply_in_batches

from quorum import records as r
from quorum.image import EMPTY_IMAGE, Endpoint, MetadataImage
from quorum.replay import replay_batch
from quorum.snapshot import (
    DigestCache,
    decode_image,
    encode_image,
    image_digest,
    image_to_records,
    records_to_image,
)

ROOT = Path(__file__).resolve().parent.parent


def _cluster_records() -> list:
    # Broker epochs given (not taken from the offset), so the order can change.
    out = [
        r.register_broker(
            b,
            f"inc-{b}",
            [Endpoint("PLAINTEXT", "127.0.0.1", 9000 + b)],
            fenced=False,
            broker_epoch=10 + b,
        )
        for b in range(3)
    ]
    for t in range(40):
        topic_id = f"id-{t:02d}"
        out.append(r.topic(f"topic-{t}", topic_id))
        for p in range(3):
            replicas = [(p + i) % 3 for i in range(3)]
            out.append(r.partition(topic_id, p, replicas, replicas, replicas[0]))
        out.append(r.config(r.CONFIG_TOPIC, f"topic-{t}", "retention.ms", str(1000 * t)))
    out.append(r.feature_level("metadata.version", 2))
    out.append(r.producer_ids(0, 0, 0, 1000))
    return out


def _image(records: list) -> MetadataImage:
    image, no_ops = replay_batch(EMPTY_IMAGE, records, 0)
    assert not no_ops, no_ops
    return image


_SCRIPT = """
import json
from quorum.replay import replay_batch
from quorum.image import EMPTY_IMAGE
from quorum.snapshot import image_digest
from test_image_digest import _cluster_records
image, _ = replay_batch(EMPTY_IMAGE, _cluster_records(), 0)
print(json.dumps({"digest": image_digest(image), "order": list(image.topic_ids.keys())}))
"""


def _digest_in_subprocess(seed: str) -> dict:
    env = dict(os.environ, PYTHONHASHSEED=seed)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "tests"), str(ROOT), str(ROOT / "proto"), env.get("PYTHONPATH", "")]
    )
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_digest_does_not_depend_on_the_hash_seed():
    first, second = _digest_in_subprocess("1"), _digest_in_subprocess("2")
    # The maps really do iterate in another order in the other process ...
    assert first["order"] != second["order"]
    # ... and the digest is the same, and the same as here.
    assert first["digest"] == second["digest"] == image_digest(_image(_cluster_records()))


def test_equal_images_built_in_different_orders_have_equal_digests():
    records = _cluster_records()
    image = _image(records)
    brokers, rest = records[:3], records[3:]
    # Brokers, topics (each with its partitions and config) in another order.
    groups = [rest[i : i + 5] for i in range(0, 200, 5)]
    shuffled = random.Random(7)
    for _ in range(5):
        shuffled.shuffle(groups)
        shuffled.shuffle(brokers)
        other = _image(brokers + [rec for group in groups for rec in group] + rest[200:])
        assert other == image
        assert image_digest(other) == image_digest(image)
    # Loaded from a snapshot (maps rebuilt in sorted order), through protobuf bytes.
    snapshot = encode_image(image)
    loaded = decode_image(type(snapshot).FromString(snapshot.SerializeToString()))
    assert image_digest(loaded) == image_digest(image)


def test_every_difference_changes_the_digest():
    records = _cluster_records()
    image = _image(records)
    end = image.offset + 1
    changes = [
        r.fence_broker(1, 11),
        r.partition_change("id-00", 0, leader=1),
        r.partition_change("id-00", 0, isr=[0, 1]),
        r.config(r.CONFIG_TOPIC, "topic-0", "retention.ms", "5"),
        r.config(r.CONFIG_TOPIC, "topic-0", "retention.ms", None),
        r.feature_level("metadata.version", 3),
        r.producer_ids(0, 0, 1000, 1000),
        r.remove_topic("id-01"),
        r.controller_epoch(1, 2),
        r.no_op(),  # Only the offset changes.
    ]
    digests = {image_digest(image)}
    for change in changes:
        changed, no_ops = replay_batch(image, [change], end)
        assert not no_ops, no_ops
        digests.add(image_digest(changed))
    # Only the offset: the same image one record later is not the same image.
    digests.add(image_digest(replace(image, offset=image.offset + 5)))
    # A derived index alone (a replay bug) is a difference too.
    digests.add(image_digest(replace(image, replica_counts=image.replica_counts.set(0, 99))))
    assert len(digests) == len(changes) + 3


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORDS, max_size=40), st.lists(st.integers(0, 40), max_size=10))
def test_any_replay_and_its_snapshot_have_one_digest(records, cuts):
    whole = _apply_in_batches(records, []).image
    split = _apply_in_batches(records, cuts).image
    loaded = records_to_image(image_to_records(whole), whole.offset)
    assert image_digest(whole) == image_digest(split) == image_digest(loaded)


def test_the_cache_answers_for_the_same_image_only():
    cache = DigestCache()
    image = _image(_cluster_records())
    assert cache.digest(image) == image_digest(image)
    assert cache.digest(image) == image_digest(image)
    later, _ = replay_batch(image, [r.no_op()], image.offset + 1)
    assert cache.digest(later) == image_digest(later) != image_digest(image)
