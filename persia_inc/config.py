"""`global_config.yaml`: the PERSIA keys, PERSIA's nested form, and our own section.

Three shapes are read into one frozen, typed `Config`:

* the seed-document form: `PersiaInferConfig.{servers, initial_sparse_checkpoint}` and
  top-level `enable_incremental_update`, `incremental_buffer_size`, `incremental_dir`, `storage`;
* PERSIA's repository form: `common_config.infer_config.{servers, embedding_checkpoint}` (or
  `common_config.job_type: Infer` with `servers`/`initial_sparse_checkpoint` beside it) and
  `embedding_parameter_server_config.{enable_incremental_update, incremental_buffer_size,
  incremental_dir, storage}`; PERSIA's other documented keys are accepted and ignored;
* our additions under `persia_inc:`, every field with a default.

Unknown keys, wrong types and inconsistent values raise one `ConfigError` naming the file, the
key and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from persia_inc.packet_format import PacketLimits
from persia_inc.packet_format.header import check_name
from persia_inc.storage import RetryPolicy, storage_kind
from persia_inc.storage.hdfs import HdfsSettings
from persia_inc.storage.s3 import S3Settings

StorageName = Literal["local", "hdfs", "ceph"]


class ConfigError(ValueError):
    """A configuration file that cannot be used; names the file and the key."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source, self.key, self.reason = source, key, reason
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class InferConfig:
    """`PersiaInferConfig`: the embedding servers (host:port, one per shard, in shard order)
    and the sparse checkpoint they load at start (any storage URI; empty: start empty)."""

    servers: tuple[str, ...] = ()
    initial_sparse_checkpoint: str = ""


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """Announcements over Kafka (kafka-python). `topic` may use {model}; delivery_timeout_ms:
    how long the producer side lets one announcement wait for acks before re-sending it."""

    bootstrap_servers: tuple[str, ...] = ("127.0.0.1:9092",)
    topic: str = "persia-inc.{model}"
    group_id: str = "persia-inc-loader"
    client_id: str = "persia-inc"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    request_timeout_ms: int = 30_000
    num_partitions: int = 4
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    delivery_timeout_ms: int = 60_000

    def topic_for(self, model: str) -> str:
        return self.topic.format(model=model)


@dataclass(frozen=True, slots=True)
class ProducerSettings:
    """Training side. flush_interval_s: flush when the oldest unflushed sign is this old;
    max_pending_bytes: rows buffered while storage is down before `backpressure` applies.

    producer_id: this producer's stream name (empty: "producer-0"; keep it stable across
    restarts so a restart finds its earlier generations); close_timeout_s: how long `close()`
    waits for pending packets to be stored; metrics_port: serve Prometheus metrics on
    127.0.0.1:port (0: off); metrics_addr: the address it binds.

    writer_policy: "idle" (default) runs the packet writer thread under SCHED_IDLE (Linux): it
    takes only CPU time the training threads leave, and yields at once when they wake; on the
    CTR benchmark this halved the slowdown of the steps after a burst of flushes. "normal":
    an ordinary thread, `writer_nice` (Linux nice increment, 0-19) nicer than training.
    row_pool_bytes: idle snapshot row buffers kept for reuse between flushes (0: none).
    """

    flush_interval_s: float = 30.0
    announce: Literal["dir", "kafka"] = "dir"
    max_pending_bytes: int = 1024 * 1024 * 1024
    backpressure: Literal["block", "raise"] = "block"
    dtype: Literal["float32", "float16"] = "float32"
    close_on_exit: bool = True
    close_on_sigterm: bool = True
    metrics_port: int = 0
    producer_id: str = ""
    close_timeout_s: float = 30.0
    metrics_addr: str = "127.0.0.1"
    writer_policy: Literal["idle", "normal"] = "idle"
    writer_nice: int = 0
    row_pool_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EmbeddingServerSettings:
    """Serving side shards. capacity: rows per table on each shard before LRU eviction
    (0: unbounded); token_env: name of the environment variable holding the write token
    (empty: no token); tls_cert_file/tls_key_file: PEM server certificate and key (both or
    neither; empty: plaintext); tls_ca_file: PEM roots clients trust (empty: the server
    certificate itself); metrics_port_base: shard I serves Prometheus metrics on base + I
    (0: off); grace_s: seconds in-flight calls get on SIGTERM; request_timeout_s: client
    deadline per call; dump_chunk_rows: rows per checkpoint part file; load_log_interval_s:
    seconds between checkpoint-load progress lines."""

    capacity: int = 0
    max_message_bytes: int = 256 * 1024 * 1024
    token_env: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    metrics_port_base: int = 0
    workers: int = 8
    grace_s: float = 5.0
    request_timeout_s: float = 60.0
    dump_chunk_rows: int = 1_000_000
    load_log_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise ValueError("capacity must be >= 0 (0: unbounded)")
        if self.max_message_bytes < 1024 * 1024:
            raise ValueError("max_message_bytes must be at least 1 MiB")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.workers < 1 or self.dump_chunk_rows < 1:
            raise ValueError("workers and dump_chunk_rows must be positive")
        if self.grace_s < 0 or self.request_timeout_s <= 0 or self.load_log_interval_s <= 0:
            raise ValueError("grace_s must be >= 0, request_timeout_s and load_log_interval_s > 0")
        if not 0 <= self.metrics_port_base < 65536:
            raise ValueError("metrics_port_base must be a port number (0: off)")


@dataclass(frozen=True, slots=True)
class LoaderSettings:
    """Serving side loader daemon (seconds everywhere).

    source: where new packets are noticed: `auto` (kafka when producer.announce is kafka,
    else watch for a local incremental_dir, else list), `watch` (watchdog + rescan, local only),
    `list` (poll storage listings), `kafka` (consumer group; storage is still listed at start);
    rescan_interval_s: full rescan of a watched directory (bounds a missed event's cost);
    list_interval_s: listing period of HDFS/S3; discover_every: every Nth listing round also
    lists the whole model to find new (table, producer) streams; gap_timeout_s: how long a
    missing packet is waited for before it is passed; prefetch: packets fetched ahead;
    quarantine_prefix: key prefix (under incremental_dir) packets that fail verification are
    moved to (empty: recorded only); metrics_port / metrics_addr: Prometheus metrics and
    /healthz (0: off); watermark_poll_s: how often the servers' watermarks are read to notice a
    restarted server; retry_backoff_s: wait before retrying a failed fetch or apply;
    queue_size: bound of the candidate queue between sources and the dispatcher.
    """

    rescan_interval_s: float = 5.0
    list_interval_s: float = 1.0
    gap_timeout_s: float = 30.0
    prefetch: int = 4
    quarantine_prefix: str = ""
    metrics_port: int = 0
    source: Literal["auto", "watch", "list", "kafka"] = "auto"
    discover_every: int = 10
    metrics_addr: str = "127.0.0.1"
    watermark_poll_s: float = 2.0
    retry_backoff_s: float = 0.5
    queue_size: int = 10_000

    def __post_init__(self) -> None:
        for name in ("rescan_interval_s", "list_interval_s", "watermark_poll_s", "retry_backoff_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.gap_timeout_s < 0:
            raise ValueError("gap_timeout_s must be >= 0")
        if self.prefetch < 1 or self.discover_every < 1 or self.queue_size < 1:
            raise ValueError("prefetch, discover_every and queue_size must be positive")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError("metrics_port must be in [0, 65535] (0: off)")
        if self.quarantine_prefix and (self.quarantine_prefix.startswith("/")
                                       or ".." in self.quarantine_prefix.split("/")):
            raise ValueError("quarantine_prefix must be a relative key prefix without '..'")


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

    def open_store(self, uri: str | None = None):  # -> storage.ObjectStore
        """The store at `uri` (default: `incremental_dir`) with this config's settings."""
        from persia_inc.storage import open_store

        s = self.persia_inc
        return open_store(uri or self.incremental_dir, retry=s.retry, s3=s.s3, hdfs=s.hdfs)


# ------------------------------------------------------------------------- typed building


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against type `tp`, converting lists to tuples; raise ConfigError."""
    origin = get_origin(tp)
    bad = ConfigError(source, key, f"expected {_describe(tp)}, got {value!r:.80}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key, source)
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise bad
        return tuple(_convert(get_args(tp)[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(source, key, f"unsupported field type {tp}")


_DISPLAY_NAMES = {"infer": "PersiaInferConfig"}  # field name -> the key users write


def _build(cls: type, mapping: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(source, where, f"unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in mapping.items():
        key = f"{prefix}.{name}" if prefix else _DISPLAY_NAMES.get(name, name)
        values[name] = _convert(hints[name], value, key, source)
    try:
        return cls(**values)
    except ValueError as exc:  # the dataclass's own cross-field checks
        raise ConfigError(source, prefix, str(exc)) from exc


# ----------------------------------------------------------------------- the three shapes

# PERSIA's documented keys that we accept and ignore, so its files load unchanged.
_PERSIA_IGNORED = {
    "common_config": {"metrics_config", "job_type", "intent", "checkpointing_config"},
    "embedding_parameter_server_config": {
        "capacity", "num_hashmap_internal_shards", "full_amount_manager_buffer_size",
        "incremental_channel_capacity", "num_persistence_workers", "num_signs_per_file",
    },
}
_PERSIA_SECTIONS = {
    "common_config", "embedding_parameter_server_config", "shard_server_config",
    "embedding_worker_config", "middleware_config",
}
_INCREMENTAL_KEYS = ("enable_incremental_update", "incremental_buffer_size", "incremental_dir",
                     "storage")
_STORAGE_ALIASES = {"ceph": "ceph", "hdfs": "hdfs", "local": "local"}


def _flatten_persia(raw: dict, source: str) -> dict:
    """Lift PERSIA's nested keys to the seed-document form; reject unknown nested keys."""
    flat: dict[str, Any] = {}
    infer: dict[str, Any] = {}
    common = raw.get("common_config") or {}
    if not isinstance(common, dict):
        raise ConfigError(source, "common_config", "expected a mapping")
    known_common = _PERSIA_IGNORED["common_config"] | {
        "infer_config", "servers", "initial_sparse_checkpoint"}
    for key in common:
        if key not in known_common:
            raise ConfigError(source, f"common_config.{key}", "unknown key")
    infer_config = common.get("infer_config") or {}
    if not isinstance(infer_config, dict):
        raise ConfigError(source, "common_config.infer_config", "expected a mapping")
    for key, value in infer_config.items():
        if key == "servers":
            infer["servers"] = value
        elif key in ("embedding_checkpoint", "initial_sparse_checkpoint"):
            infer["initial_sparse_checkpoint"] = value
        else:
            raise ConfigError(source, f"common_config.infer_config.{key}", "unknown key")
    for key in ("servers", "initial_sparse_checkpoint"):
        if key in common:
            infer[key] = common[key]
    for section in ("embedding_parameter_server_config", "shard_server_config"):
        body = raw.get(section) or {}
        if not isinstance(body, dict):
            raise ConfigError(source, section, "expected a mapping")
        for key, value in body.items():
            if key in _INCREMENTAL_KEYS:
                flat[key] = value
            elif key not in _PERSIA_IGNORED["embedding_parameter_server_config"]:
                raise ConfigError(source, f"{section}.{key}", "unknown key")
    for section in ("embedding_worker_config", "middleware_config"):
        body = raw.get(section) or {}
        if not isinstance(body, dict) or set(body) - {"forward_buffer_size"}:
            raise ConfigError(source, section, "expected a mapping with forward_buffer_size only")
    if infer:
        flat["PersiaInferConfig"] = infer
    return flat


def config_from_mapping(raw: Any, source: str = "<mapping>") -> Config:
    """Build and validate a `Config` from parsed YAML."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "", "the top level must be a mapping")
    merged: dict[str, Any] = {}
    nested = _flatten_persia(raw, source)
    for key, value in raw.items():
        if key in _PERSIA_SECTIONS:
            continue
        if key in nested and nested[key] != value:
            raise ConfigError(source, key, "given both at the top level and in PERSIA's sections")
        merged[key] = value
    for key, value in nested.items():
        if key == "PersiaInferConfig" and isinstance(merged.get(key), dict):
            merged[key] = {**value, **merged[key]}
        else:
            merged.setdefault(key, value)

    renamed = dict(merged)
    if "PersiaInferConfig" in renamed:
        renamed["infer"] = renamed.pop("PersiaInferConfig")
    for internal in ("infer", "source"):
        if internal in merged:
            raise ConfigError(source, internal, "unknown key")
    if isinstance(renamed.get("storage"), str):
        renamed["storage"] = _STORAGE_ALIASES.get(renamed["storage"].lower(), renamed["storage"])
    config: Config = _build(Config, renamed, "", source)
    config = dataclasses.replace(config, source=source)
    _check_together(config)
    return config


def _check_together(config: Config) -> None:
    source = config.source
    try:
        implied = storage_kind(config.incremental_dir)
    except ValueError as exc:
        raise ConfigError(source, "incremental_dir", str(exc)) from exc
    if implied != config.storage:
        raise ConfigError(
            source, "storage",
            f"is {config.storage!r} but incremental_dir {config.incremental_dir!r} is on {implied!r}",
        )
    if config.incremental_buffer_size <= 0:
        raise ConfigError(source, "incremental_buffer_size", "must be a positive integer")
    try:
        check_name("model", config.persia_inc.model)
    except ValueError as exc:
        raise ConfigError(source, "persia_inc.model", str(exc)) from exc
    for i, server in enumerate(config.infer.servers):
        host, sep, port = server.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(source, f"PersiaInferConfig.servers[{i}]",
                              f"expected host:port, got {server!r}")
    if len(set(config.infer.servers)) != len(config.infer.servers):
        raise ConfigError(source, "PersiaInferConfig.servers", "lists one address twice")
    producer = config.persia_inc.producer
    if producer.flush_interval_s <= 0:
        raise ConfigError(source, "persia_inc.producer.flush_interval_s", "must be positive")
    if producer.max_pending_bytes <= 0:
        raise ConfigError(source, "persia_inc.producer.max_pending_bytes", "must be positive")
    if producer.close_timeout_s <= 0:
        raise ConfigError(source, "persia_inc.producer.close_timeout_s", "must be positive")
    if not 0 <= producer.writer_nice <= 19:
        raise ConfigError(source, "persia_inc.producer.writer_nice", "must be in [0, 19]")
    if producer.row_pool_bytes < 0:
        raise ConfigError(source, "persia_inc.producer.row_pool_bytes", "must be 0 or more")
    if not 0 <= producer.metrics_port < 65536:
        raise ConfigError(source, "persia_inc.producer.metrics_port", "must be in [0, 65535]")
    if producer.producer_id:
        try:
            check_name("producer", producer.producer_id)
        except ValueError as exc:
            raise ConfigError(source, "persia_inc.producer.producer_id", str(exc)) from exc
    kafka = config.persia_inc.kafka
    if kafka.delivery_timeout_ms < kafka.request_timeout_ms:
        raise ConfigError(source, "persia_inc.kafka.delivery_timeout_ms",
                          "must be at least request_timeout_ms")
    if kafka.heartbeat_interval_ms >= kafka.session_timeout_ms:
        raise ConfigError(source, "persia_inc.kafka.heartbeat_interval_ms",
                          "must be below session_timeout_ms")
    if producer.announce == "kafka" and not kafka.bootstrap_servers:
        raise ConfigError(source, "persia_inc.kafka.bootstrap_servers",
                          "announce is 'kafka' but no bootstrap servers are set")


def load_config(path: str | os.PathLike[str], *, need_servers: bool = False) -> Config:
    """Read and validate a YAML configuration file; `need_servers` also requires
    PersiaInferConfig.servers (for the commands that talk to the embedding servers)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(source, "", "no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "", f"cannot read: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"not valid YAML: {exc}") from exc
    config = config_from_mapping(raw, source)
    if need_servers and not config.infer.servers:
        raise ConfigError(source, "PersiaInferConfig.servers",
                          "is empty, and this command talks to the embedding servers")
    return config

