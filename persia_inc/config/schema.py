"""The configuration's shape: PERSIA's keys plus our `persia_inc:` section, each section the
settings dataclass of the package that uses it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from persia_inc.embedding_server.settings import EmbeddingServerSettings
from persia_inc.foundation.kafka import KafkaSettings
from persia_inc.foundation.retry import RetryPolicy
from persia_inc.loader.settings import LoaderSettings
from persia_inc.packet_format import PacketLimits
from persia_inc.producer.settings import ProducerSettings
from persia_inc.storage.settings import HdfsSettings, S3Settings

if TYPE_CHECKING:
    from persia_inc.storage import ObjectStore

StorageName = Literal["local", "hdfs", "ceph"]


@dataclass(frozen=True, slots=True)
class InferConfig:
    """`PersiaInferConfig`: the embedding servers (host:port, one per shard, in shard order)
    and the sparse checkpoint they load at start (any storage URI; empty: start empty)."""

    servers: tuple[str, ...] = ()
    initial_sparse_checkpoint: str = ""


@dataclass(frozen=True, slots=True)
class PersiaIncSettings:
    """Our additions to PERSIA's keys, under `persia_inc:`."""

    model: str = "default"
    producer: ProducerSettings = field(default_factory=ProducerSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    hdfs: HdfsSettings = field(default_factory=HdfsSettings)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    limits: PacketLimits = field(default_factory=PacketLimits)
    embedding_server: EmbeddingServerSettings = field(default_factory=EmbeddingServerSettings)
    loader: LoaderSettings = field(default_factory=LoaderSettings)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, as PERSIA names it plus `persia_inc`.

    incremental_buffer_size: distinct signs per table that trigger a flush;
    incremental_dir: storage root of packets (a path, file://, hdfs:// or s3:// URI);
    storage: which backend `incremental_dir` is on, checked against its scheme.
    """

    infer: InferConfig = field(default_factory=InferConfig)
    enable_incremental_update: bool = False
    incremental_buffer_size: int = 1_000_000
    incremental_dir: str = "/workspace/incremental_dir/"
    storage: StorageName = "local"
    persia_inc: PersiaIncSettings = field(default_factory=PersiaIncSettings)
    source: str = "<defaults>"

    def open_store(self, uri: str | None = None) -> ObjectStore:
        """The store at `uri` (default: `incremental_dir`) with this config's settings."""
        from persia_inc.storage import open_store

        s = self.persia_inc
        return open_store(uri or self.incremental_dir, retry=s.retry, s3=s.s3, hdfs=s.hdfs)
