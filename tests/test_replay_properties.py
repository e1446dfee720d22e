"""Properties of replay, the state machine and snapshots (Hypothesis).

- Any split of a record stream into batches replays to the same image.
- image -> snapshot records -> image round-trips, also through protobuf bytes.
- The full replicated state round-trips through the Raft snapshot encoding.
- Replay never raises, whatever the records.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quorum import records as r
from quorum.image import EMPTY_IMAGE, Endpoint
from quorum.replay import replay
from quorum.snapshot import decode_image, decode_state, encode_image, encode_state
from quorum.state import MetadataState

BROKERS = st.integers(min_value=0, max_value=4)
EPOCHS = st.integers(min_value=0, max_value=30)
TOPICS = st.sampled_from(["a", "b", "c", "a.b", "a_b"])
REPLICAS = st.lists(BROKERS, min_size=1, max_size=4, unique=True)


def _partition(topic: str, index: int, replicas: list[int], isr_len: int, lead: bool):
    isr = replicas[: max(1, min(isr_len, len(replicas)))]
    return r.partition(f"id-{topic}", index, replicas, isr, isr[0] if lead else -1)


RECORDS = st.one_of(
    st.builds(
        lambda b, rack, fenced: r.register_broker(
            b, f"inc-{b}", [Endpoint("PLAINTEXT", "127.0.0.1", 9000 + b)], rack, fenced=fenced
        ),
        BROKERS,
        st.sampled_from(["", "r1", "r2"]),
        st.booleans(),
    ),
    st.builds(r.fence_broker, BROKERS, EPOCHS),
    st.builds(r.unfence_broker, BROKERS, EPOCHS),
    st.builds(r.broker_shutdown, BROKERS, EPOCHS),
    st.builds(r.unregister_broker, BROKERS, EPOCHS),
    st.builds(lambda t: r.topic(t, f"id-{t}"), TOPICS),
    st.builds(lambda t: r.remove_topic(f"id-{t}"), TOPICS),
    st.builds(_partition, TOPICS, st.integers(0, 3), REPLICAS, st.integers(1, 4), st.booleans()),
    st.builds(
        lambda t, p, leader, isr: r.partition_change(f"id-{t}", p, leader=leader, isr=isr),
        TOPICS,
        st.integers(0, 3),
        st.one_of(st.none(), st.integers(-1, 4)),
        st.one_of(st.none(), REPLICAS),
    ),
    st.builds(
        lambda t, name, value: r.config(r.CONFIG_TOPIC, t, name, value),
        TOPICS,
        st.sampled_from(["retention.ms", "cleanup.policy"]),
        st.one_of(st.none(), st.sampled_from(["1000", "compact"])),
    ),
    st.builds(
        lambda first, size: r.producer_ids(0, 0, first, size),
        st.integers(0, 5000),
        st.integers(0, 1000),
    ),
    st.builds(r.feature_level, st.sampled_from(["metadata.version"]), st.integers(1, 3)),
    st.just(r.no_op()),
)


def _apply_in_batches(records, cuts) -> MetadataState:
    state = MetadataState(tail_max_records=4)
    claim = r.encode_batch(
        [r.controller_epoch(1, 1)],
        controller_epoch=1,
        proposer_id=1,
        expected_base_offset=-1,
        append_time_ms=0,
    )
    assert state.apply_payload(claim).accepted
    bounds = sorted({0, len(records), *[c for c in cuts if 0 < c < len(records)]})
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        payload = r.encode_batch(
            records[lo:hi],
            controller_epoch=1,
            proposer_id=1,
            expected_base_offset=state.next_offset,
            append_time_ms=0,
        )
        result = state.apply_payload(payload)
        assert result.accepted, result.reason
    return state


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORDS, max_size=40), st.lists(st.integers(0, 40), max_size=10))
def test_any_split_into_batches_gives_the_same_image(records, cuts):
    whole = _apply_in_batches(records, [])
    split = _apply_in_batches(records, cuts)
    assert split.image == whole.image
    assert split.next_offset == whole.next_offset == len(records) + 1
    assert [e.offset for e in split.entries()] == list(
        range(split.log_start_offset, split.next_offset)
    )


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORDS, max_size=40))
def test_image_snapshot_round_trips(records):
    state = _apply_in_batches(records, [])
    snapshot = encode_image(state.image)
    wire = type(snapshot).FromString(snapshot.SerializeToString())
    assert decode_image(wire) == state.image


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORDS, max_size=40))
def test_replicated_state_round_trips_and_keeps_replaying_alike(records):
    state = _apply_in_batches(records, [])
    restored = decode_state(encode_state(state), tail_max_records=4)
    assert restored.image == state.image
    assert restored.next_offset == state.next_offset
    assert restored.log_start_offset == state.log_start_offset
    assert list(restored.tail) == list(state.tail)
    more = r.encode_batch(
        [r.topic("z", "id-z")],
        controller_epoch=1,
        proposer_id=1,
        expected_base_offset=state.next_offset,
        append_time_ms=0,
    )
    assert restored.apply_payload(more) == state.apply_payload(more)
    assert restored.image == state.image


@given(st.lists(RECORDS, max_size=60))
def test_replay_never_raises_and_keeps_partition_invariants(records):
    image = EMPTY_IMAGE
    for offset, record in enumerate(records):
        image, _reason = replay(image, record, offset)
        assert image.offset == offset
    replicas: Counter[int] = Counter()
    leaders: Counter[int] = Counter()
    leading: Counter[int] = Counter()
    leaderless = set()
    for topic, index, part in image.iter_partitions():
        assert part.isr and set(part.isr) <= set(part.replicas)
        assert part.leader == -1 or part.leader in part.isr
        replicas.update(part.replicas)
        leaders[part.replicas[0]] += 1
        if part.leader == -1:
            leaderless.add((topic.topic_id, index))
        else:
            leading[part.leader] += 1
    # The indexes replay keeps equal a full recount.
    isr_members: dict[int, set[tuple[str, int]]] = {}
    for topic, index, part in image.iter_partitions():
        for broker in part.isr:
            isr_members.setdefault(broker, set()).add((topic.topic_id, index))
    assert {b: set(m.keys()) for b, m in image.isr_index.items()} == isr_members
    assert dict(image.replica_counts) == dict(replicas)
    assert dict(image.preferred_leader_counts) == dict(leaders)
    assert dict(image.leader_counts) == dict(leading)
    assert set(image.leaderless.keys()) == leaderless
    assert dict(image.unified_names) == {n.replace(".", "_"): n for n in image.topic_ids.keys()}


def test_garbage_payload_is_refused_and_changes_nothing():
    state = MetadataState()
    before = (state.image, state.next_offset)
    for payload in (b"\xff\xff\xff", b"", "not bytes"):
        result = state.apply_payload(payload)  # type: ignore[arg-type]
        assert not result.accepted and result.reason
    assert (state.image, state.next_offset) == before


def test_stale_expected_offset_is_refused_whole():
    state = _apply_in_batches([r.topic("a", "id-a")], [])
    payload = r.encode_batch(
        [r.topic("b", "id-b"), r.topic("c", "id-c")],
        controller_epoch=1,
        proposer_id=1,
        expected_base_offset=state.next_offset - 1,
        append_time_ms=0,
    )
    before = state.next_offset
    result = state.apply_payload(payload)
    assert not result.accepted
    assert state.next_offset == before and state.image.topic_by_name("b") is None
