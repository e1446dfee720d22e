"""Partition log storage: segments of RecordBatch v2 batches with sparse indexes."""

from broker.storage.checkpoint import (
    CorruptCheckpointError,
    read_offset_checkpoint,
    read_partition_offsets,
    write_offset_checkpoint,
    write_partition_offsets,
)
from broker.storage.cleaner import CleanResult, compact
from broker.storage.leader_epoch import (
    LEADER_EPOCH_CHECKPOINT,
    UNDEFINED_EPOCH,
    UNDEFINED_EPOCH_OFFSET,
    EpochEntry,
    LeaderEpochCache,
)
from broker.storage.log import (
    CLEANED_SUFFIX,
    LOG_START_CHECKPOINT,
    RECOVERY_POINT_CHECKPOINT,
    SWAP_SUFFIX,
    LogConfig,
    OffsetOutOfRangeError,
    PartitionLog,
)
from broker.storage.segment import LogSegment, segment_file_name

__all__ = [
    "CLEANED_SUFFIX",
    "LEADER_EPOCH_CHECKPOINT",
    "LOG_START_CHECKPOINT",
    "RECOVERY_POINT_CHECKPOINT",
    "SWAP_SUFFIX",
    "UNDEFINED_EPOCH",
    "UNDEFINED_EPOCH_OFFSET",
    "CleanResult",
    "CorruptCheckpointError",
    "EpochEntry",
    "LeaderEpochCache",
    "LogConfig",
    "LogSegment",
    "OffsetOutOfRangeError",
    "PartitionLog",
    "compact",
    "read_offset_checkpoint",
    "read_partition_offsets",
    "segment_file_name",
    "write_offset_checkpoint",
    "write_partition_offsets",
]
