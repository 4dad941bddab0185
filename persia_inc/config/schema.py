"""The configuration's shape: PERSIA's keys plus our `persia_inc:` section, each section the
settings dataclass of the package that uses it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from persia_inc.embedding_server.settings import EmbeddingServerSettings
from persia_inc.foundation.fields import FieldError, check_fields, positive
from persia_inc.foundation.kafka import KafkaSettings
from persia_inc.foundation.retry import RetryPolicy
from persia_inc.loader.settings import LoaderSettings
from persia_inc.packet_format import PacketLimits
from persia_inc.packet_format.header import check_name
from persia_inc.producer.settings import ProducerSettings
from persia_inc.storage.settings import HdfsSettings, S3Settings

if TYPE_CHECKING:
    from persia_inc.storage import ObjectStore

StorageName = Literal["local", "hdfs", "ceph"]


@dataclass(frozen=True, slots=True)
class InferConfig:
    """`PersiaInferConfig`: the embedding servers in shard order, each entry host:port (one
    replica, PERSIA's form) or a list of host:port (the replicas of that shard, each a full
    copy), and the sparse checkpoint they load at start (any storage URI; empty: start empty)."""

    servers: tuple[str | tuple[str, ...], ...] = ()
    """Embedding servers in shard order: per shard `host:port`, or a list of `host:port` (its replicas)."""
    initial_sparse_checkpoint: str = ""
    """Checkpoint (any storage URI) the servers load at start; empty: start empty."""


@dataclass(frozen=True, slots=True)
class PersiaIncSettings:
    """Our additions to PERSIA's keys, under `persia_inc:`."""

    model: str = "default"
    """The model's name: packets, topics and servers are kept apart by it."""
    producer: ProducerSettings = field(default_factory=ProducerSettings)
    """The training side's producer."""
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    """Announcements over Kafka."""
    s3: S3Settings = field(default_factory=S3Settings)
    """The Ceph S3 gateway."""
    hdfs: HdfsSettings = field(default_factory=HdfsSettings)
    """WebHDFS."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retries of storage and Kafka calls."""
    limits: PacketLimits = field(default_factory=PacketLimits)
    """What a reader accepts at most per packet."""
    embedding_server: EmbeddingServerSettings = field(default_factory=EmbeddingServerSettings)
    """The embedding-server shards and their clients."""
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    """The loader daemon."""

    def __post_init__(self) -> None:
        check_fields(self)
        try:
            check_name("model", self.model)
        except ValueError as exc:
            raise FieldError("model", str(exc).removeprefix("model ")) from None


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, as PERSIA names it plus `persia_inc`."""

    infer: InferConfig = field(default_factory=InferConfig)
    """`PersiaInferConfig`: the embedding servers and their initial checkpoint."""
    enable_incremental_update: bool = False
    """Ship incremental updates at all (false: the producer does nothing)."""
    incremental_buffer_size: int = 1_000_000
    """Distinct signs buffered over all tables together that start a flush of every table."""
    incremental_dir: str = "/workspace/incremental_dir/"
    """Storage root of packets: a path, file://, hdfs:// or s3:// URI."""
    storage: StorageName = "local"
    """Which backend incremental_dir is on (local, hdfs or ceph), checked against its scheme."""
    persia_inc: PersiaIncSettings = field(default_factory=PersiaIncSettings)
    """Our additions to PERSIA's keys."""
    source: str = "<defaults>"
    """Where this configuration was read from (set by the loader, never in a file)."""

    def __post_init__(self) -> None:
        check_fields(self)
        positive("incremental_buffer_size", self.incremental_buffer_size)

    def open_store(self, uri: str | None = None) -> ObjectStore:
        """The store at `uri` (default: `incremental_dir`) with this config's settings."""
        from persia_inc.storage import open_store

        s = self.persia_inc
        return open_store(uri or self.incremental_dir, retry=s.retry, s3=s.s3, hdfs=s.hdfs)
