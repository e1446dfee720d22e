"""quorum/raft_wire.py: Raft messages framed as pysyncobj frames them, without zlib's
set-up cost for small ones; pysyncobj's receiver (zlib.decompress, then unpickle)
reads what it sends, compressed or not."""

from __future__ import annotations

import struct
import zlib

import pysyncobj.pickle as sync_pickle
import pytest
from cryptography.fernet import Fernet
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


@pytest.mark.parametrize("size", [0, 1, 0xFFFF - 1, 0xFFFF, 0xFFFF + 1, 2 * 0xFFFF, 200_000])
def test_stored_blocks_at_the_block_edges(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    framed = raft_wire.stored_zlib(data)
    assert zlib.decompress(framed) == data
    assert len(framed) == 2 + 5 * max(1, -(-size // 0xFFFF)) + size + 4


class _Connection:
    """The parts of pysyncobj's TcpConnection that send touches."""

    def __init__(self, rand_key: bytes | None, encryptor: object | None) -> None:
        self.sendRandKey = rand_key
        self.encryptor = encryptor
        self._TcpConnection__writeBuffer = b""
        self.flushed = 0

    def _TcpConnection__trySendBuffer(self) -> None:  # noqa: N802
        self.flushed += 1


def _receive(frame: bytes, rand_key: bytes | None, encryptor: object | None) -> object:
    """As pysyncobj's receiver reads one frame (TcpConnection.__processParseMessage)."""
    (length,) = struct.unpack("i", frame[:4])
    data = frame[4 : 4 + length]
    assert len(frame) == 4 + length
    if encryptor is not None:
        data = encryptor.decrypt(data)  # type: ignore[attr-defined]
    message = sync_pickle.loads(zlib.decompress(data))
    if rand_key is not None:
        key, message = message
        assert key == rand_key
    return message


@pytest.mark.parametrize("rand_key", [None, b"k" * 32])
@pytest.mark.parametrize("encrypted", [False, True])
def test_send_frames_a_message_as_pysyncobjs_receiver_reads_it(rand_key, encrypted) -> None:
    encryptor = Fernet(Fernet.generate_key()) if encrypted else None
    for message in (("ae", 1, [(b"x", 2, 3)]), ("big", [bytes([i]) * 1000 for i in range(100)])):
        connection = _Connection(rand_key, encryptor)
        raft_wire._send(connection, message)
        frame = connection._TcpConnection__writeBuffer
        assert connection.flushed == 1
        assert _receive(frame, rand_key, encryptor) == message


def test_install_replaces_pysyncobjs_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TcpConnection, "send", TcpConnection.send)  # Restored after.
    raft_wire.install()
    assert TcpConnection.send is raft_wire._send
