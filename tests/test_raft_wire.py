"""quorum/raft_wire.py: Raft messages framed as pysyncobj frames them, without zlib's
set-up cost for small ones; pysyncobj's receiver (zlib.decompress, then unpickle)
reads what it sends, compressed or not."""

from __future__ import annotations

import zlib

import pysyncobj.pickle as sync_pickle
from hypothesis import given, settings
from hypothesis import strategies as st
from pysyncobj.tcp_connection import TcpConnection

from quorum import raft_wire


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3 * 0xFFFF + 10))
def test_stored_blocks_are_zlib_that_decompresses_to_the_data(data: bytes) -> None:
    framed = raft_wire.stored_zlib(data)
    assert zlib.decompress(framed) == data
    # Stored: the data plus a few bytes per 64 KiB block, nothing compressed away.
    blocks = max(1, -(-len(data) // 0xFFFF))
    assert len(framed) == 2 + 5 * blocks + len(data) + 4


def test_a_small_message_is_stored_and_a_large_one_compressed() -> None:
    small = ("append_entries", 7, [(b"x" * 300, 5, 7)], 12, 3)
    large = ("append_entries", 7, [(bytes([i]) * 1000, i, 7) for i in range(200)], 12, 3)
    for message in (small, large):
        data = raft_wire.encode(message)
        assert sync_pickle.loads(zlib.decompress(data)) == message
    plain = sync_pickle.dumps(small)
    assert len(raft_wire.encode(small)) > len(plain)  # not compressed
    assert len(raft_wire.encode(large)) < len(sync_pickle.dumps(large)) // 10


def test_install_replaces_pysyncobjs_send() -> None:
    raft_wire.install()
    assert TcpConnection.send is raft_wire._send
