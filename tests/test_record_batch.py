"""RecordBatch v2: known byte vectors, round trips, and what the broker refuses."""

from __future__ import annotations

import dataclasses
import gzip
import struct

import crc32c
import lz4.frame
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.record_batch import (
    RECORD_BATCH_OVERHEAD,
    BatchTooLargeError,
    Compression,
    CorruptBatchError,
    InvalidRecordError,
    Record,
    TimestampType,
    TruncatedBatchError,
    _read_varint,
    _write_varint,
    decode_records,
    encode_batch,
    iter_batches,
    patch_batch,
    read_header,
    validate_batch,
)

MAX = 1 << 20

# --------------------------------------------------------------------------- helpers


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected poly 0x82F63B78), one bit at a time.

    Independent of the ``crc32c`` package the module uses, so the hand-built vector below
    checks the CRC as well as the layout.
    """
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def build_batch(
    *,
    records_blob: bytes,
    records_count: int,
    attributes: int = 0,
    last_offset_delta: int | None = None,
    base_offset: int = 0,
    partition_leader_epoch: int = -1,
    base_timestamp: int = 0,
    max_timestamp: int = 0,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
    magic: int = 2,
) -> bytes:
    """A batch laid out field by field from the Kafka docs, CRC by ``crc32c_bitwise``."""
    if last_offset_delta is None:
        last_offset_delta = records_count - 1
    after_crc = (
        struct.pack(
            ">hiqqqhii",
            attributes,
            last_offset_delta,
            base_timestamp,
            max_timestamp,
            producer_id,
            producer_epoch,
            base_sequence,
            records_count,
        )
        + records_blob
    )
    head = struct.pack(
        ">qiib", base_offset, len(after_crc) + 9, partition_leader_epoch, magic
    ) + struct.pack(">I", crc32c_bitwise(after_crc))
    return head + after_crc


def rewrite_header(batch: bytes, **changes: int) -> bytes:
    """Change header fields and recompute the CRC, so only the changed rule is broken."""
    fields = dataclasses.asdict(read_header(batch))
    fields.update(changes)
    return build_batch(
        records_blob=batch[RECORD_BATCH_OVERHEAD:],
        records_count=fields["records_count"],
        attributes=fields["attributes"],
        last_offset_delta=fields["last_offset_delta"],
        base_offset=fields["base_offset"],
        partition_leader_epoch=fields["partition_leader_epoch"],
        base_timestamp=fields["base_timestamp"],
        max_timestamp=fields["max_timestamp"],
        producer_id=fields["producer_id"],
        producer_epoch=fields["producer_epoch"],
        base_sequence=fields["base_sequence"],
        magic=fields["magic"],
    )


def numbered(records: list[Record]) -> list[Record]:
    return [dataclasses.replace(r, offset_delta=i) for i, r in enumerate(records)]


SAMPLE = [
    Record(b"key-0", b"value-0", (("trace", b"abc"),), 1_700_000_000_000),
    Record(None, b"tombstone-less", (), 1_700_000_000_007),
    Record(b"key-2", None, (("a", None), ("\u00e9t\u00e9", b"")), 1_699_999_999_990),
]


def test_crc32c_bitwise_matches_the_catalogue_check_value() -> None:
    # CRC-32C/ISCSI check value from the CRC catalogue: crc("123456789") = 0xE3069283.
    assert crc32c_bitwise(b"123456789") == 0xE3069283
    assert crc32c.crc32c(b"123456789") == 0xE3069283


# --------------------------------------------------------------------------- known vectors

# Byte vectors from Sarama (IBM/sarama, record_test.go, recordBatchTestCases), a Go Kafka
# client: one record, key 01020304, value 050607, header 08090a -> 0b0c, firstTimestamp
# 1479847795000 ms, timestampDelta 5 ms, maxTimestamp 0, producer fields 0.
_SARAMA_HEAD = [0, 0, 0, 0, 0, 0, 0, 0]  # first offset
_SARAMA_TAIL = [
    *[0, 0, 0, 0],  # last offset delta
    *[0, 0, 1, 88, 141, 205, 89, 56],  # first timestamp
    *[0] * 8,  # max timestamp
    *[0] * 8,  # producer id
    *[0, 0],  # producer epoch
    *[0, 0, 0, 0],  # first sequence
]
_SARAMA_RECORD = [40, 0, 10, 0, 8, 1, 2, 3, 4, 6, 5, 6, 7, 2, 6, 8, 9, 10, 4, 11, 12]


def _sarama(length: int, crc: list[int], attributes: int, count: int, body: list[int]) -> bytes:
    return bytes(
        _SARAMA_HEAD
        + [0, 0, 0, length, 0, 0, 0, 0, 2]
        + crc
        + [0, attributes]
        + _SARAMA_TAIL
        + [0, 0, 0, count]
        + body
    )


SARAMA_UNCOMPRESSED = _sarama(70, [84, 121, 97, 253], 0, 1, _SARAMA_RECORD)
SARAMA_GZIP = _sarama(
    95,
    [231, 74, 206, 165],
    1,
    1,
    [31, 139, 8, 0, 0, 9, 110, 136, 0, 255, 0, 21, 0, 234, 255, 40, 0, 10, 0, 8, 1, 2]
    + [3, 4, 6, 5, 6, 7, 2, 6, 8, 9, 10, 4, 11, 12, 3, 0, 173, 201, 88, 103, 21, 0, 0, 0],
)
# Sarama writes raw (unframed) snappy, as librdkafka does.
SARAMA_SNAPPY = _sarama(72, [21, 0, 159, 97], 2, 1, [21, 80] + _SARAMA_RECORD)
SARAMA_LZ4 = _sarama(
    89,
    [169, 74, 119, 197],
    3,
    1,
    [4, 34, 77, 24, 100, 112, 185, 21, 0, 0, 128] + _SARAMA_RECORD + [0, 0, 0, 0, 12, 59, 239, 146],
)
SARAMA_EMPTY = bytes(
    _SARAMA_HEAD
    + [0, 0, 0, 49, 0, 0, 0, 0, 2, 89, 95, 183, 221, 0, 0]
    + _SARAMA_TAIL[:4]
    + [0] * 30
    + [0, 0, 0, 0]
)
SARAMA_CONTROL = bytes(
    _SARAMA_HEAD
    + [0, 0, 0, 49, 0, 0, 0, 0, 2, 81, 46, 67, 217, 0, 32]
    + _SARAMA_TAIL[:4]
    + [0] * 30
    + [0, 0, 0, 0]
)
SARAMA_RECORD = Record(
    key=b"\x01\x02\x03\x04",
    value=b"\x05\x06\x07",
    headers=(("\x08\x09\x0a", b"\x0b\x0c"),),
    timestamp_ms=1_479_847_795_005,
    offset_delta=0,
)


@pytest.mark.parametrize(
    ("batch", "codec"),
    [
        (SARAMA_UNCOMPRESSED, Compression.NONE),
        (SARAMA_GZIP, Compression.GZIP),
        (SARAMA_SNAPPY, Compression.SNAPPY),
        (SARAMA_LZ4, Compression.LZ4),
    ],
    ids=["none", "gzip", "raw-snappy", "lz4"],
)
def test_sarama_vectors_validate_and_decode(batch: bytes, codec: Compression) -> None:
    header = validate_batch(batch, max_batch_bytes=MAX)
    assert header.compression is codec
    assert header.base_timestamp == 1_479_847_795_000
    assert header.records_count == 1
    assert decode_records(batch) == [SARAMA_RECORD]


def test_encoder_reproduces_sarama_uncompressed_vector_bit_for_bit() -> None:
    encoded = encode_batch(
        [SARAMA_RECORD],
        producer_id=0,
        producer_epoch=0,
        base_sequence=0,
        partition_leader_epoch=0,
        base_timestamp=1_479_847_795_000,
        max_timestamp=0,
    )
    assert encoded == SARAMA_UNCOMPRESSED


def test_sarama_empty_and_control_batches_are_refused_from_clients() -> None:
    assert decode_records(SARAMA_EMPTY) == []
    with pytest.raises(InvalidRecordError, match="recordsCount 0"):
        validate_batch(SARAMA_EMPTY, max_batch_bytes=MAX)
    assert read_header(SARAMA_CONTROL).is_control
    with pytest.raises(InvalidRecordError, match="control"):
        validate_batch(SARAMA_CONTROL, max_batch_bytes=MAX)


def test_hand_built_vector_matches_encoder() -> None:
    # Records laid out by hand from the Kafka docs (zigzag varints: 0 -> 00, 1 -> 02,
    # -1 -> 01, 3 -> 06, 7 -> 0e, -10 -> 13 ...).
    record0 = bytes.fromhex(
        "00"  # attributes
        "00"  # timestampDelta 0
        "00"  # offsetDelta 0
        "02"
        "6b"  # key length 1, "k"
        "04"
        "7631"  # value length 2, "v1"
        "02"  # 1 header
        "02"
        "68"
        "01"  # key "h", null value
    )
    record1 = bytes.fromhex(
        "00"  # attributes
        "13"  # timestampDelta -10
        "02"  # offsetDelta 1
        "01"  # null key
        "06"
        "763232"  # value "v22"
        "00"  # no headers
    )
    blob = bytes([len(record0) * 2]) + record0 + bytes([len(record1) * 2]) + record1
    expected = build_batch(
        records_blob=blob,
        records_count=2,
        base_offset=0,
        partition_leader_epoch=-1,
        base_timestamp=1_000,
        max_timestamp=1_000,
        producer_id=7,
        producer_epoch=3,
        base_sequence=42,
    )
    records = [
        Record(b"k", b"v1", (("h", None),), 1_000),
        Record(None, b"v22", (), 990),
    ]
    encoded = encode_batch(records, producer_id=7, producer_epoch=3, base_sequence=42)
    assert encoded == expected
    assert decode_records(expected) == numbered(records)


def test_varints_are_zigzag_as_in_kafka_byteutils() -> None:
    cases = {0: "00", -1: "01", 1: "02", -2: "03", 63: "7e", -64: "7f", 64: "8001", 300: "d804"}
    for value, hex_bytes in cases.items():
        out = bytearray()
        _write_varint(out, value)
        assert out.hex() == hex_bytes
        assert _read_varint(bytes(out), 0, 5, len(out)) == (value, len(out))
    for value in (-(1 << 31), (1 << 31) - 1, -(1 << 63), (1 << 63) - 1):
        out = bytearray()
        _write_varint(out, value)
        assert _read_varint(bytes(out), 0, 10, len(out)) == (value, len(out))


# --------------------------------------------------------------------------- codecs


def test_snappy_is_written_in_xerial_framing_like_the_java_client() -> None:
    batch = encode_batch(SAMPLE, compression=Compression.SNAPPY)
    blob = batch[RECORD_BATCH_OVERHEAD:]
    assert blob[:16] == b"\x82SNAPPY\x00" + struct.pack(">ii", 1, 1)
    assert decode_records(batch) == numbered(SAMPLE)


def test_lz4_uses_the_java_frame_settings() -> None:
    batch = encode_batch(SAMPLE, compression=Compression.LZ4)
    blob = batch[RECORD_BATCH_OVERHEAD:]
    assert blob[:4] == b"\x04\x22\x4d\x18"  # LZ4 frame magic
    assert blob[4] == 0x60  # version 01, independent blocks, no checksums, no size
    assert blob[5] == 0x40  # 64 KiB blocks


def test_multi_block_xerial_snappy_and_streamed_zstd_decode() -> None:
    payload = encode_batch(SAMPLE * 800)[RECORD_BATCH_OVERHEAD:]  # > 32 KiB of records
    snappy = encode_batch(SAMPLE * 800, compression=Compression.SNAPPY)
    assert decode_records(snappy) == numbered(SAMPLE * 800)
    # zstd-jni's streams carry no content size in the frame header.
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(payload)
    batch = build_batch(
        records_blob=frame,
        records_count=len(SAMPLE) * 800,
        attributes=int(Compression.ZSTD),
        base_timestamp=SAMPLE[0].timestamp_ms,
    )
    assert decode_records(batch) == numbered(SAMPLE * 800)


def test_validate_never_decompresses() -> None:
    garbage = build_batch(records_blob=b"not gzip at all", records_count=3, attributes=1)
    assert validate_batch(garbage, max_batch_bytes=MAX).records_count == 3
    with pytest.raises(CorruptBatchError, match="cannot decompress GZIP"):
        decode_records(garbage)


def test_gzip_output_is_deterministic() -> None:
    batch = encode_batch(SAMPLE, compression=Compression.GZIP)
    assert batch == encode_batch(SAMPLE, compression=Compression.GZIP)
    assert gzip.decompress(batch[RECORD_BATCH_OVERHEAD:]) == encode_batch(SAMPLE)[61:]
    assert (
        lz4.frame.decompress(encode_batch(SAMPLE, compression=Compression.LZ4)[61:])
        == (encode_batch(SAMPLE)[61:])
    )


# --------------------------------------------------------------------------- round trips

header_names = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)
records_strategy = st.lists(
    st.builds(
        Record,
        key=st.none() | st.binary(max_size=40),
        value=st.none() | st.binary(max_size=200),
        headers=st.lists(
            st.tuples(header_names, st.none() | st.binary(max_size=20)), max_size=3
        ).map(tuple),
        timestamp_ms=st.integers(min_value=-1, max_value=1 << 45),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(
    records=records_strategy,
    codec=st.sampled_from(list(Compression)),
    producer_id=st.integers(min_value=-1, max_value=(1 << 63) - 1),
    producer_epoch=st.integers(min_value=-1, max_value=(1 << 15) - 1),
    base_sequence=st.integers(min_value=-1, max_value=(1 << 31) - 1),
    is_transactional=st.booleans(),
)
def test_round_trip(
    records: list[Record],
    codec: Compression,
    producer_id: int,
    producer_epoch: int,
    base_sequence: int,
    is_transactional: bool,
) -> None:
    if is_transactional and producer_id < 0:
        producer_id = 0
    batch = encode_batch(
        records,
        compression=codec,
        producer_id=producer_id,
        producer_epoch=producer_epoch,
        base_sequence=base_sequence,
        is_transactional=is_transactional,
    )
    header = validate_batch(batch, max_batch_bytes=MAX)
    assert header.compression is codec
    assert header.records_count == len(records)
    assert header.last_offset_delta == len(records) - 1
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (
        producer_id,
        producer_epoch,
        base_sequence,
    )
    assert header.is_transactional is is_transactional
    assert header.base_timestamp == records[0].timestamp_ms
    assert header.max_timestamp == max(r.timestamp_ms for r in records)
    assert decode_records(batch) == numbered(records)


@settings(max_examples=100, deadline=None)
@given(
    records=records_strategy,
    codec=st.sampled_from(list(Compression)),
    base_offset=st.integers(min_value=0, max_value=(1 << 63) - 1),
    leader_epoch=st.integers(min_value=-1, max_value=(1 << 31) - 1),
)
def test_patch_keeps_the_batch_valid(
    records: list[Record], codec: Compression, base_offset: int, leader_epoch: int
) -> None:
    batch = encode_batch(records, compression=codec)
    patched = patch_batch(batch, base_offset, leader_epoch)
    header = validate_batch(patched, max_batch_bytes=MAX)
    assert (header.base_offset, header.partition_leader_epoch) == (base_offset, leader_epoch)
    assert header.last_offset == base_offset + len(records) - 1
    assert patched[8:12] == batch[8:12] and patched[16:] == batch[16:]
    assert decode_records(patched) == decode_records(batch)
    assert patch_batch(memoryview(bytearray(batch)), base_offset, leader_epoch) == patched


def test_log_append_time_gives_every_record_the_max_timestamp() -> None:
    batch = encode_batch(
        SAMPLE, timestamp_type=TimestampType.LOG_APPEND_TIME, max_timestamp=1_800_000_000_000
    )
    header = validate_batch(batch, max_batch_bytes=MAX)
    assert header.timestamp_type is TimestampType.LOG_APPEND_TIME
    assert {r.timestamp_ms for r in decode_records(batch)} == {1_800_000_000_000}


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("codec", list(Compression))
def test_any_flipped_byte_is_caught_or_harmless(codec: Compression) -> None:
    batch = encode_batch(SAMPLE, compression=codec, producer_id=5, producer_epoch=0)
    for position in range(len(batch)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(batch)
            damaged[position] ^= mask
            if position < 8 or 12 <= position < 16:
                # baseOffset and partitionLeaderEpoch are outside the CRC by design.
                validate_batch(damaged, max_batch_bytes=MAX)
            else:
                with pytest.raises(CorruptBatchError):
                    validate_batch(damaged, max_batch_bytes=MAX)
                if position >= 21:
                    with pytest.raises(CorruptBatchError, match="CRC"):
                        validate_batch(damaged, max_batch_bytes=MAX)


@settings(max_examples=60, deadline=None)
@given(records=records_strategy, data=st.data())
def test_flipping_any_byte_under_the_crc_is_corrupt(
    records: list[Record], data: st.DataObject
) -> None:
    batch = encode_batch(records, compression=data.draw(st.sampled_from(list(Compression))))
    position = data.draw(st.integers(min_value=21, max_value=len(batch) - 1))
    mask = data.draw(st.integers(min_value=1, max_value=255))
    damaged = bytearray(batch)
    damaged[position] ^= mask
    with pytest.raises(CorruptBatchError, match="CRC"):
        validate_batch(bytes(damaged), max_batch_bytes=MAX)


def test_header_rules() -> None:
    good = encode_batch(SAMPLE, producer_id=1, producer_epoch=0, base_sequence=0)
    validate_batch(good, max_batch_bytes=MAX)
    cases = [
        (rewrite_header(good, magic=1), CorruptBatchError, "magic 1"),
        (good + b"\x00", CorruptBatchError, "batchLength"),
        (good[:-1], CorruptBatchError, "batchLength"),
        (good[:60], CorruptBatchError, "61 bytes"),
        (rewrite_header(good, attributes=5), InvalidRecordError, "codec 5"),
        (rewrite_header(good, attributes=7), InvalidRecordError, "codec 7"),
        (rewrite_header(good, attributes=0x20), InvalidRecordError, "control"),
        (rewrite_header(good, last_offset_delta=1), InvalidRecordError, "lastOffsetDelta"),
        (rewrite_header(good, records_count=4), InvalidRecordError, "lastOffsetDelta"),
        (rewrite_header(good, attributes=0x10, producer_id=-1), InvalidRecordError, "producer"),
    ]
    for batch, error, message in cases:
        with pytest.raises(error, match=message):
            validate_batch(batch, max_batch_bytes=MAX)
    validate_batch(rewrite_header(good, attributes=0x10), max_batch_bytes=MAX)


def test_oversized_batch_is_refused() -> None:
    batch = encode_batch([Record(None, b"x" * 1000)])
    assert validate_batch(batch, max_batch_bytes=len(batch)).records_count == 1
    with pytest.raises(BatchTooLargeError, match=f"{len(batch)} bytes exceeds"):
        validate_batch(batch, max_batch_bytes=len(batch) - 1)


def test_decode_refuses_records_that_disagree_with_the_header() -> None:
    blob = encode_batch(SAMPLE)[RECORD_BATCH_OVERHEAD:]
    too_many = build_batch(records_blob=blob, records_count=4)
    with pytest.raises(CorruptBatchError, match="ends after 3 records"):
        decode_records(too_many)
    too_few = build_batch(records_blob=blob, records_count=2)
    with pytest.raises(CorruptBatchError, match="after the last record"):
        decode_records(too_few)
    # A record whose declared length is one byte short of its fields.
    short = bytearray(blob)
    short[0] -= 2
    with pytest.raises(CorruptBatchError, match="record 0"):
        decode_records(build_batch(records_blob=bytes(short), records_count=3))


# --------------------------------------------------------------------------- segments


def _segment() -> tuple[bytes, list[int]]:
    batches = [
        patch_batch(encode_batch(SAMPLE, compression=codec), base_offset, 3)
        for base_offset, codec in zip(
            (0, 3, 6), (Compression.NONE, Compression.LZ4, Compression.ZSTD), strict=True
        )
    ]
    starts = [0]
    for batch in batches:
        starts.append(starts[-1] + len(batch))
    return b"".join(batches), starts


def test_iter_batches_walks_a_segment() -> None:
    segment, starts = _segment()
    batches = iter_batches(segment)
    found = [(position, header.base_offset) for position, header in batches]
    assert found == [(starts[0], 0), (starts[1], 3), (starts[2], 6)]
    assert batches.valid_bytes == len(segment)
    assert batches.error is None
    assert list(batches) == []  # Exhausted iterators stay exhausted.


def test_iter_batches_stops_at_a_torn_tail_at_every_cut() -> None:
    segment, starts = _segment()
    for cut in range(len(segment) + 1):
        batches = iter_batches(segment[:cut])
        positions = [position for position, _ in batches]
        whole = [s for s, end in zip(starts, starts[1:], strict=False) if end <= cut]
        assert positions == whole, cut
        assert batches.valid_bytes == max([s for s in starts if s <= cut]), cut
        if cut in starts:
            assert batches.error is None, cut
        else:
            assert isinstance(batches.error, TruncatedBatchError), cut


def test_iter_batches_stops_before_a_corrupt_batch() -> None:
    segment, starts = _segment()
    damaged = bytearray(segment)
    damaged[starts[1] + 40] ^= 0x10
    batches = iter_batches(bytes(damaged))
    assert [position for position, _ in batches] == [0]
    assert batches.valid_bytes == starts[1]
    assert isinstance(batches.error, CorruptBatchError)
    assert not isinstance(batches.error, TruncatedBatchError)
    assert f"position {starts[1]}" in str(batches.error)
    # Without CRC checks the walk goes on by lengths alone.
    assert len(list(iter_batches(bytes(damaged), verify_crc=False))) == 3


def test_iter_batches_stops_at_a_garbage_length() -> None:
    segment, starts = _segment()
    damaged = bytearray(segment)
    damaged[starts[2] + 8 : starts[2] + 12] = struct.pack(">i", 10)
    batches = iter_batches(bytes(damaged))
    assert len(list(batches)) == 2
    assert batches.valid_bytes == starts[2]
    assert "batchLength 10" in str(batches.error)
