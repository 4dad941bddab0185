from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupRequest(_message.Message):
    __slots__ = ("table", "signs", "shard", "num_shards", "allow_behind")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_BEHIND_FIELD_NUMBER: _ClassVar[int]
    table: str
    signs: bytes
    shard: int
    num_shards: int
    allow_behind: bool
    def __init__(self, table: _Optional[str] = ..., signs: _Optional[bytes] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., allow_behind: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("dim", "rows", "misses")
    DIM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    dim: int
    rows: bytes
    misses: int
    def __init__(self, dim: _Optional[int] = ..., rows: _Optional[bytes] = ..., misses: _Optional[int] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("table", "producer", "generation", "sequence", "dim", "signs", "rows", "deleted_signs", "shard", "num_shards", "apply_id", "chunk", "chunks", "tables", "conditional", "expect_held", "expect_generation", "expect_sequence")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DELETED_SIGNS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    APPLY_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    CONDITIONAL_FIELD_NUMBER: _ClassVar[int]
    EXPECT_HELD_FIELD_NUMBER: _ClassVar[int]
    EXPECT_GENERATION_FIELD_NUMBER: _ClassVar[int]
    EXPECT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    table: str
    producer: str
    generation: int
    sequence: int
    dim: int
    signs: bytes
    rows: bytes
    deleted_signs: bytes
    shard: int
    num_shards: int
    apply_id: str
    chunk: int
    chunks: int
    tables: _containers.RepeatedCompositeFieldContainer[TableSlice]
    conditional: bool
    expect_held: bool
    expect_generation: int
    expect_sequence: int
    def __init__(self, table: _Optional[str] = ..., producer: _Optional[str] = ..., generation: _Optional[int] = ..., sequence: _Optional[int] = ..., dim: _Optional[int] = ..., signs: _Optional[bytes] = ..., rows: _Optional[bytes] = ..., deleted_signs: _Optional[bytes] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., apply_id: _Optional[str] = ..., chunk: _Optional[int] = ..., chunks: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableSlice, _Mapping]]] = ..., conditional: _Optional[bool] = ..., expect_held: _Optional[bool] = ..., expect_generation: _Optional[int] = ..., expect_sequence: _Optional[int] = ...) -> None: ...

class TableSlice(_message.Message):
    __slots__ = ("table", "dim", "signs", "rows", "deleted_signs")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DELETED_SIGNS_FIELD_NUMBER: _ClassVar[int]
    table: str
    dim: int
    signs: bytes
    rows: bytes
    deleted_signs: bytes
    def __init__(self, table: _Optional[str] = ..., dim: _Optional[int] = ..., signs: _Optional[bytes] = ..., rows: _Optional[bytes] = ..., deleted_signs: _Optional[bytes] = ...) -> None: ...

class TableSigns(_message.Message):
    __slots__ = ("table", "signs")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    table: str
    signs: bytes
    def __init__(self, table: _Optional[str] = ..., signs: _Optional[bytes] = ...) -> None: ...

class LookupTablesRequest(_message.Message):
    __slots__ = ("tables", "shard", "num_shards", "allow_behind")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_BEHIND_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableSigns]
    shard: int
    num_shards: int
    allow_behind: bool
    def __init__(self, tables: _Optional[_Iterable[_Union[TableSigns, _Mapping]]] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., allow_behind: _Optional[bool] = ...) -> None: ...

class TableLookup(_message.Message):
    __slots__ = ("table", "dim", "rows", "misses")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    table: str
    dim: int
    rows: bytes
    misses: int
    def __init__(self, table: _Optional[str] = ..., dim: _Optional[int] = ..., rows: _Optional[bytes] = ..., misses: _Optional[int] = ...) -> None: ...

class LookupTablesResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableLookup]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableLookup, _Mapping]]] = ...) -> None: ...

class LookupBlocksRequest(_message.Message):
    __slots__ = ("tables", "counts", "signs", "shard", "num_shards", "allow_behind", "region")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_BEHIND_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    counts: _containers.RepeatedScalarFieldContainer[int]
    signs: bytes
    shard: int
    num_shards: int
    allow_behind: bool
    region: str
    def __init__(self, tables: _Optional[_Iterable[str]] = ..., counts: _Optional[_Iterable[int]] = ..., signs: _Optional[bytes] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., allow_behind: _Optional[bool] = ..., region: _Optional[str] = ...) -> None: ...

class LookupBlocksResponse(_message.Message):
    __slots__ = ("dims", "rows", "misses", "rows_in_region")
    DIMS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    ROWS_IN_REGION_FIELD_NUMBER: _ClassVar[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    rows: bytes
    misses: _containers.RepeatedScalarFieldContainer[int]
    rows_in_region: bool
    def __init__(self, dims: _Optional[_Iterable[int]] = ..., rows: _Optional[bytes] = ..., misses: _Optional[_Iterable[int]] = ..., rows_in_region: _Optional[bool] = ...) -> None: ...

class Watermark(_message.Message):
    __slots__ = ("table", "producer", "generation", "sequence")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    table: str
    producer: str
    generation: int
    sequence: int
    def __init__(self, table: _Optional[str] = ..., producer: _Optional[str] = ..., generation: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("applied", "inserted", "updated", "deleted", "evicted", "watermark", "staged")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    inserted: int
    updated: int
    deleted: int
    evicted: int
    watermark: Watermark
    staged: bool
    def __init__(self, applied: _Optional[bool] = ..., inserted: _Optional[int] = ..., updated: _Optional[int] = ..., deleted: _Optional[int] = ..., evicted: _Optional[int] = ..., watermark: _Optional[_Union[Watermark, _Mapping]] = ..., staged: _Optional[bool] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("table", "signs", "shard", "num_shards")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    signs: bytes
    shard: int
    num_shards: int
    def __init__(self, table: _Optional[str] = ..., signs: _Optional[bytes] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class WatermarksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatermarksResponse(_message.Message):
    __slots__ = ("watermarks",)
    WATERMARKS_FIELD_NUMBER: _ClassVar[int]
    watermarks: _containers.RepeatedCompositeFieldContainer[Watermark]
    def __init__(self, watermarks: _Optional[_Iterable[_Union[Watermark, _Mapping]]] = ...) -> None: ...

class LoadCheckpointRequest(_message.Message):
    __slots__ = ("uri",)
    URI_FIELD_NUMBER: _ClassVar[int]
    uri: str
    def __init__(self, uri: _Optional[str] = ...) -> None: ...

class LoadCheckpointResponse(_message.Message):
    __slots__ = ("rows", "seconds")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    seconds: float
    def __init__(self, rows: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableStatus(_message.Message):
    __slots__ = ("name", "dim", "rows", "bytes", "lookups", "lookup_rows", "misses")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_ROWS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    rows: int
    bytes: int
    lookups: int
    lookup_rows: int
    misses: int
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., rows: _Optional[int] = ..., bytes: _Optional[int] = ..., lookups: _Optional[int] = ..., lookup_rows: _Optional[int] = ..., misses: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("shard", "num_shards", "ready", "uptime_s", "tables", "watermarks", "max_message_bytes", "staged_applies", "staged_bytes", "foreign_lookup_signs", "replica", "num_replicas", "current", "behind_s", "siblings_up", "model", "shared_memory")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    WATERMARKS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGED_APPLIES_FIELD_NUMBER: _ClassVar[int]
    STAGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FOREIGN_LOOKUP_SIGNS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    BEHIND_S_FIELD_NUMBER: _ClassVar[int]
    SIBLINGS_UP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    shard: int
    num_shards: int
    ready: bool
    uptime_s: float
    tables: _containers.RepeatedCompositeFieldContainer[TableStatus]
    watermarks: _containers.RepeatedCompositeFieldContainer[Watermark]
    max_message_bytes: int
    staged_applies: int
    staged_bytes: int
    foreign_lookup_signs: int
    replica: int
    num_replicas: int
    current: bool
    behind_s: float
    siblings_up: int
    model: str
    shared_memory: str
    def __init__(self, shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., ready: _Optional[bool] = ..., uptime_s: _Optional[float] = ..., tables: _Optional[_Iterable[_Union[TableStatus, _Mapping]]] = ..., watermarks: _Optional[_Iterable[_Union[Watermark, _Mapping]]] = ..., max_message_bytes: _Optional[int] = ..., staged_applies: _Optional[int] = ..., staged_bytes: _Optional[int] = ..., foreign_lookup_signs: _Optional[int] = ..., replica: _Optional[int] = ..., num_replicas: _Optional[int] = ..., current: _Optional[bool] = ..., behind_s: _Optional[float] = ..., siblings_up: _Optional[int] = ..., model: _Optional[str] = ..., shared_memory: _Optional[str] = ...) -> None: ...

class DumpRequest(_message.Message):
    __slots__ = ("table", "chunk_rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ROWS_FIELD_NUMBER: _ClassVar[int]
    table: str
    chunk_rows: int
    def __init__(self, table: _Optional[str] = ..., chunk_rows: _Optional[int] = ...) -> None: ...

class DumpChunk(_message.Message):
    __slots__ = ("table", "dim", "signs", "rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    table: str
    dim: int
    signs: bytes
    rows: bytes
    def __init__(self, table: _Optional[str] = ..., dim: _Optional[int] = ..., signs: _Optional[bytes] = ..., rows: _Optional[bytes] = ...) -> None: ...
