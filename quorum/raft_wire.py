"""How a Raft message goes on the wire: pysyncobj's frame, without its zlib cost.

pysyncobj (0.3.17, pinned) sends every message as ``zlib.compress(pickle.dumps(message), 3)``,
then a Fernet token when a password is set, behind a 4-byte length. ``zlib.compress``
sets up a new compressor on each call, which costs about 40 µs on this project's
machine whatever the level, for messages that are mostly a few hundred bytes (an
AppendEntries with one metadata batch, its answer, a heartbeat). A committed metadata
write sends four of them on its way (the leader's AppendEntries to each follower, the
first answer back), and every idle heartbeat costs one more.

So messages up to ``COMPRESS_MIN_BYTES`` go as zlib *stored* blocks: the zlib format
with no compression, which pysyncobj's receiver decompresses as it does any zlib data
(so nodes with and without this change read each other's messages). Larger ones,
where the bytes matter more than the set-up (a node catching up, a snapshot), are
still compressed as before. The rest of the frame (pickle, Fernet, length) is
pysyncobj's own.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pysyncobj.pickle as sync_pickle
from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.tcp_connection import TcpConnection

# Messages at least this large are compressed (zlib level 3, as pysyncobj does).
COMPRESS_MIN_BYTES = 64 * 1024
_STORED_BLOCK = 0xFFFF  # The most a stored deflate block holds.
_HEADER = b"\x78\x01"  # zlib: deflate, 32 KiB window, no dictionary, fastest.


def stored_zlib(data: bytes) -> bytes:
    """``data`` in the zlib format as stored (uncompressed) deflate blocks."""
    parts = [_HEADER]
    view = memoryview(data)
    start = 0
    while True:
        chunk = view[start : start + _STORED_BLOCK]
        start += len(chunk)
        final = start >= len(data)
        parts.append(struct.pack("<BHH", 1 if final else 0, len(chunk), len(chunk) ^ 0xFFFF))
        parts.append(bytes(chunk))
        if final:
            break
    parts.append(struct.pack(">I", zlib.adler32(data)))
    return b"".join(parts)


def encode(message: Any) -> bytes:
    """The bytes pysyncobj's receiver expects before encryption: zlib of a pickle."""
    data = sync_pickle.dumps(message)
    if len(data) >= COMPRESS_MIN_BYTES:
        return zlib.compress(data, 3)
    return stored_zlib(data)


def _send(self: Any, message: Any) -> None:
    # TcpConnection.send (pysyncobj 0.3.17) with ``encode`` in place of its zlib call.
    if self.sendRandKey:
        message = (self.sendRandKey, message)
    data = encode(message)
    if self.encryptor:
        data = self.encryptor.encrypt_at_time(data, int(monotonic_time()))
    self._TcpConnection__writeBuffer += struct.pack("i", len(data)) + data
    self._TcpConnection__trySendBuffer()


def install() -> None:
    """Make every pysyncobj connection in this process send with ``encode``."""
    TcpConnection.send = _send  # type: ignore[method-assign]
