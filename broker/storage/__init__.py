"""Partition log storage: segments of RecordBatch v2 batches with sparse indexes."""

from broker.storage.checkpoint import read_offset_checkpoint, write_offset_checkpoint
from broker.storage.log import (
    LOG_START_CHECKPOINT,
    RECOVERY_POINT_CHECKPOINT,
    LogConfig,
    OffsetOutOfRangeError,
    PartitionLog,
)
from broker.storage.segment import LogSegment, segment_file_name

__all__ = [
    "LOG_START_CHECKPOINT",
    "RECOVERY_POINT_CHECKPOINT",
    "LogConfig",
    "LogSegment",
    "OffsetOutOfRangeError",
    "PartitionLog",
    "read_offset_checkpoint",
    "segment_file_name",
    "write_offset_checkpoint",
]
