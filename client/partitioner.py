"""Kafka's default partitioner for keyed records, bit for bit with the Java client.

The Java producer places a keyed record on ``toPositive(murmur2(key)) % numPartitions``
over *all* partitions of the topic (``BuiltInPartitioner.partitionForKey``), so a key lands
on the same partition whether it was produced by raftka, the Java client, kafka-python or
confluent-kafka with ``partitioner=murmur2_random``. Keyless records are spread by the
producer's sticky batching, which lives with the producer, not here.

``murmur2`` is Kafka's variant of MurmurHash2 (``Utils.murmur2``): 32-bit, seed
``0x9747b28c``, little-endian 4-byte blocks, and Java's signed ``int`` arithmetic, which
this module reproduces by masking to 32 bits after every multiply and converting the final
value to a signed int.
"""

from __future__ import annotations

__all__ = ["murmur2", "partition_for_key", "to_positive"]

_SEED = 0x9747B28C
_M = 0x5BD1E995
_R = 24
_MASK32 = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2(byte[])``: a signed 32-bit hash, as Java returns it."""
    length = len(data)
    h = (_SEED ^ length) & _MASK32
    whole = length - (length & 3)
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK32
        k ^= k >> _R
        k = (k * _M) & _MASK32
        h = (h * _M) & _MASK32
        h ^= k
    tail = length & 3
    # The tail bytes are XORed in unsigned ((data[i] & 0xff) in Java), highest first.
    if tail == 3:
        h ^= data[whole + 2] << 16
    if tail >= 2:
        h ^= data[whole + 1] << 8
    if tail >= 1:
        h ^= data[whole]
        h = (h * _M) & _MASK32
    h ^= h >> 13  # h is kept unsigned, so >> is Java's logical >>>.
    h = (h * _M) & _MASK32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def to_positive(number: int) -> int:
    """Kafka's ``Utils.toPositive``: clear the sign bit (not ``abs``, which fails on INT_MIN)."""
    return number & 0x7FFFFFFF


def partition_for_key(key: bytes, num_partitions: int) -> int:
    """The partition the Java client's default partitioner picks for a non-null ``key``."""
    if num_partitions <= 0:
        raise ValueError(f"num_partitions must be positive, got {num_partitions}")
    return to_positive(murmur2(key)) % num_partitions
