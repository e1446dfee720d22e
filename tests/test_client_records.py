"""The client's batch builder and fetch decoder, against the reference codec."""

from __future__ import annotations

import struct

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.record_batch import (
    Compression,
    Record,
    TimestampType,
    decode_records,
    encode_batch,
    patch_batch,
)
from client._records import BatchBuilder, FetchedRecords, decode_fetch, scan_next_offset
from client.errors import CorruptRecordError

T0 = 1_700_000_000_000

records_strategy = st.lists(
    st.builds(
        Record,
        key=st.none() | st.binary(max_size=40),
        value=st.none() | st.binary(max_size=300),
        headers=st.lists(
            st.tuples(st.text(max_size=8), st.none() | st.binary(max_size=8)), max_size=3
        ).map(tuple),
        # Deltas from the first record both ways, small ones and ones past the varint table.
        timestamp_ms=st.integers(min_value=-(10**7), max_value=10**7).map(lambda d: T0 + d),
    ),
    min_size=1,
    max_size=40,
)


def build(records: list[Record], compression: Compression = Compression.NONE) -> bytes:
    builder = BatchBuilder(compression, limit_bytes=1 << 30)
    for record in records:
        assert (
            builder.try_append(record.timestamp_ms, record.key, record.value, record.headers) >= 0
        )
    return builder.build()


def with_attributes(batch: bytes, extra: int) -> bytes:
    """The batch with attribute bits added and its CRC recomputed."""
    out = bytearray(batch)
    (attributes,) = struct.unpack_from(">h", out, 21)
    struct.pack_into(">h", out, 21, attributes | extra)
    struct.pack_into(">I", out, 17, crc32c.crc32c(bytes(out[21:])))
    return bytes(out)


# --------------------------------------------------------------------------- builder


@settings(max_examples=150, deadline=None)
@given(records_strategy, st.sampled_from(list(Compression)))
def test_builder_bytes_equal_encode_batch(records, compression):
    assert build(records, compression) == encode_batch(records, compression=compression)


@settings(max_examples=50, deadline=None)
@given(records_strategy, st.sampled_from(list(Compression)))
def test_built_batches_decode_to_the_same_records(records, compression):
    data = patch_batch(build(records, compression), 100, 7)
    decoded, next_offset = decode_fetch(data, "t", 3, 100)
    assert next_offset == 100 + len(records)
    assert [r.offset for r in decoded] == list(range(100, 100 + len(records)))
    assert [(r.key, r.value, r.headers, r.timestamp) for r in decoded] == [
        (r.key, r.value, r.headers, r.timestamp_ms) for r in records
    ]
    assert {(r.topic, r.partition, r.leader_epoch) for r in decoded} == {("t", 3, 7)}


def test_builder_size_is_the_uncompressed_batch_size_and_the_limit_holds():
    builder = BatchBuilder(Compression.NONE, limit_bytes=1000)
    assert builder.size_bytes == 61 and builder.record_count == 0
    deltas = []
    while (delta := builder.try_append(T0, b"k", b"v" * 100)) >= 0:
        deltas.append(delta)
        assert builder.size_bytes <= 1000
    assert deltas == list(range(len(deltas))) and len(deltas) == 8
    assert builder.size_bytes == len(builder.build())


def test_first_record_always_fits_and_a_full_batch_says_so():
    builder = BatchBuilder(Compression.NONE, limit_bytes=100)
    assert builder.try_append(T0, None, b"x" * 500) == 0
    assert builder.is_full
    assert builder.try_append(T0, None, b"") == -1
    assert decode_records(builder.build())[0].value == b"x" * 500


def test_compression_shrinks_the_batch_and_round_trips():
    records = [Record(None, b"the same value, again and again " * 4, (), T0 + i) for i in range(50)]
    plain = build(records)
    for codec in (Compression.GZIP, Compression.SNAPPY, Compression.LZ4, Compression.ZSTD):
        packed = build(records, codec)
        assert len(packed) < len(plain) / 3, codec
        assert decode_records(packed) == decode_records(plain)


def test_build_is_idempotent_and_closes_the_batch():
    builder = BatchBuilder()
    builder.try_append(T0, None, b"v")
    first = builder.build()
    assert builder.build() is first
    with pytest.raises(RuntimeError, match="already built"):
        builder.try_append(T0, None, b"w")
    with pytest.raises(ValueError, match="at least one record"):
        BatchBuilder().build()


def test_bad_headers_are_refused():
    builder = BatchBuilder()
    with pytest.raises(TypeError, match="header names must be str"):
        builder.try_append(T0, None, b"v", [(b"name", b"v")])
    with pytest.raises(TypeError, match="bytes or None"):
        builder.try_append(T0, None, b"v", [("name", "text")])


# --------------------------------------------------------------------------- decoder


def log_of(*batches: list[Record]) -> bytes:
    """Batches as a broker stores them: consecutive base offsets from 10, epoch 4."""
    out, offset = b"", 10
    for records in batches:
        out += patch_batch(encode_batch(records), offset, 4)
        offset += len(records)
    return out


def values(records) -> list[bytes]:
    return [r.value for r in records]


def rec(value: bytes, ts: int = T0) -> Record:
    return Record(None, value, (), ts)


def test_records_below_the_fetch_offset_in_the_first_batch_are_skipped():
    data = log_of([rec(b"a"), rec(b"b"), rec(b"c")], [rec(b"d")])
    decoded, next_offset = decode_fetch(data, "t", 0, 11)
    assert [(r.offset, r.value) for r in decoded] == [(11, b"b"), (12, b"c"), (13, b"d")]
    assert next_offset == 14 == scan_next_offset(data, 11)


def test_a_batch_wholly_below_the_fetch_offset_is_not_decoded():
    data = log_of([rec(b"a")], [rec(b"b")])
    corrupt_first = bytearray(data)
    corrupt_first[66] ^= 0xFF  # The first record's value length: its CRC no longer holds.
    decoded, _ = decode_fetch(bytes(corrupt_first), "t", 0, 11)
    assert [(r.offset, r.value) for r in decoded] == [(11, b"b")]
    with pytest.raises(CorruptRecordError, match="CRC"):
        decode_fetch(bytes(corrupt_first), "t", 0, 10)


def test_control_batches_are_skipped_but_advance_the_position():
    marker = patch_batch(with_attributes(encode_batch([rec(b"commit")]), 0x20 | 0x10), 12, 4)
    data = log_of([rec(b"a"), rec(b"b")]) + marker + patch_batch(encode_batch([rec(b"c")]), 13, 4)
    decoded, next_offset = decode_fetch(data, "t", 0, 10)
    assert [(r.offset, r.value) for r in decoded] == [(10, b"a"), (11, b"b"), (13, b"c")]
    assert next_offset == 14
    only_marker, after = decode_fetch(marker, "t", 0, 12)
    assert only_marker == [] and after == 13


def test_log_append_time_and_headers_and_keys():
    batch = encode_batch(
        [Record(b"k", b"v", (("h", b"1"), ("n", None)), T0), Record(None, None, (), T0 + 5)],
        timestamp_type=TimestampType.LOG_APPEND_TIME,
        max_timestamp=T0 + 99,
    )
    decoded, _ = decode_fetch(patch_batch(batch, 0, 1), "t", 0, 0)
    assert [(r.key, r.value, r.headers) for r in decoded] == [
        (b"k", b"v", (("h", b"1"), ("n", None))),
        (None, None, ()),
    ]
    assert {(r.timestamp, r.timestamp_type) for r in decoded} == {
        (T0 + 99, TimestampType.LOG_APPEND_TIME)
    }
    plain, _ = decode_fetch(log_of([rec(b"x", T0 + 3)]), "t", 0, 10)
    assert (plain[0].timestamp, plain[0].timestamp_type) == (T0 + 3, TimestampType.CREATE_TIME)


def test_a_truncated_trailing_batch_is_left_for_the_next_fetch():
    data = log_of([rec(b"a")], [rec(b"b"), rec(b"c")])
    decoded, next_offset = decode_fetch(data[:-5], "t", 0, 10)
    assert values(decoded) == [b"a"] and next_offset == 11 == scan_next_offset(data[:-5], 10)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:-5], "ends inside its first batch"),
        (lambda d: d[:30] + bytes([d[30] ^ 1]) + d[31:], "CRC-32C mismatch"),
        (lambda d: d[:16] + b"\x01" + d[17:], "magic 1"),
    ],
)
def test_corrupt_input_raises_a_clear_error(damage, message):
    data = log_of([rec(b"a"), rec(b"b")])
    with pytest.raises(CorruptRecordError, match=message) as info:
        decode_fetch(damage(data), "orders", 2, 10)
    assert "orders-2: batch at offset 10" in str(info.value)


def test_a_record_that_lies_about_its_length_is_corrupt_even_with_a_good_crc():
    batch = bytearray(encode_batch([rec(b"abc")]))
    batch[61] += 2  # The record's length varint: claims one byte more than it has.
    batch[17:21] = struct.pack(">I", crc32c.crc32c(bytes(batch[21:])))
    with pytest.raises(CorruptRecordError, match="record length"):
        decode_fetch(bytes(batch), "t", 0, 0)


def test_take_hands_out_records_a_batch_at_a_time_with_positions():
    data = log_of([rec(b"a"), rec(b"b"), rec(b"c")], [rec(b"d"), rec(b"e")])
    fetched = FetchedRecords(data, "t", 0, 10)
    assert values(fetched.take(2)) == [b"a", b"b"] and fetched.position == 12
    assert values(fetched.take(2)) == [b"c", b"d"] and fetched.position == 14
    assert not fetched.exhausted
    assert values(fetched.take(10)) == [b"e"] and fetched.position == 15
    assert fetched.exhausted and fetched.take(10) == []


def test_empty_answer():
    assert decode_fetch(b"", "t", 0, 5) == ([], 5)
    assert scan_next_offset(b"", 5) == 5
