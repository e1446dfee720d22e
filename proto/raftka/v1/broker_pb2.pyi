from raftka.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeBrokerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LocalPartition(_message.Message):
    __slots__ = ("topic", "partition", "role", "leader", "leader_epoch")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    topic: str
    partition: int
    role: str
    leader: int
    leader_epoch: int
    def __init__(self, topic: _Optional[str] = ..., partition: _Optional[int] = ..., role: _Optional[str] = ..., leader: _Optional[int] = ..., leader_epoch: _Optional[int] = ...) -> None: ...

class DescribeBrokerResponse(_message.Message):
    __slots__ = ("error", "broker_id", "broker_epoch", "state", "metadata_offset", "controller_epoch", "partitions", "registrations", "metadata_snapshots_loaded", "metadata_high_watermark")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BROKER_ID_FIELD_NUMBER: _ClassVar[int]
    BROKER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METADATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    REGISTRATIONS_FIELD_NUMBER: _ClassVar[int]
    METADATA_SNAPSHOTS_LOADED_FIELD_NUMBER: _ClassVar[int]
    METADATA_HIGH_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    error: _common_pb2.Error
    broker_id: int
    broker_epoch: int
    state: str
    metadata_offset: int
    controller_epoch: int
    partitions: _containers.RepeatedCompositeFieldContainer[LocalPartition]
    registrations: int
    metadata_snapshots_loaded: int
    metadata_high_watermark: int
    def __init__(self, error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ..., broker_id: _Optional[int] = ..., broker_epoch: _Optional[int] = ..., state: _Optional[str] = ..., metadata_offset: _Optional[int] = ..., controller_epoch: _Optional[int] = ..., partitions: _Optional[_Iterable[_Union[LocalPartition, _Mapping]]] = ..., registrations: _Optional[int] = ..., metadata_snapshots_loaded: _Optional[int] = ..., metadata_high_watermark: _Optional[int] = ...) -> None: ...
