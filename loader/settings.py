"""The loader daemon's settings (`persia_inc.loader` in global_config.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class DenseSyncSettings:
    """The loader's dense sync (`persia_inc.loader.dense_sync`): activates published dense
    versions in TorchServe once every shard holds their sparse positions.

    enabled: default false; management_address: TorchServe's gRPC management API (host:port,
    default 127.0.0.1:7071); model_name: the TorchServe model name (default "": the
    persia_inc.model); model_store: TorchServe's model_store folder, where each version's
    `.mar` is copied before it is registered (required when enabled; TorchServe registers local
    archives only from there); keep_versions: registered versions kept (default 2, the active
    one included; older ones are unregistered); interval_s: listing and checking period
    (default 1.0 s); register_timeout_s: longest wait for one management call (default 180 s);
    retire_grace_s: a version that stopped being the default is unregistered no sooner than this
    (default 30 s), so the requests TorchServe already routed to it finish.
    """

    enabled: bool = False
    management_address: str = "127.0.0.1:7071"
    model_name: str = ""
    model_store: str = ""
    keep_versions: int = 2
    interval_s: float = 1.0
    register_timeout_s: float = 180.0
    retire_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if self.keep_versions < 1:
            raise ValueError("dense_sync.keep_versions must be at least 1")
        if self.interval_s <= 0 or self.register_timeout_s <= 0:
            raise ValueError("dense_sync.interval_s and register_timeout_s must be positive")
        if self.retire_grace_s < 0:
            raise ValueError("dense_sync.retire_grace_s must be >= 0")
        if self.enabled and not self.model_store:
            raise ValueError("dense_sync.model_store (TorchServe's model_store folder) is required "
                             "when dense_sync is enabled")


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
    queue_size: bound of the candidate queue between sources and the dispatcher;
    settle_s: a packet file that fails verification while it changed less than this long ago
    (size or mtime; local disk, where a copy may be written in place) is not judged yet but
    tried again, so a slow in-place copy is never quarantined half written; fetch_timeout_s:
    longest wait for one fetch (read and verify) before the dispatcher gives up on it for now,
    logs the packet's name and retries it later; allow_non_finite: apply rows holding NaN or
    Inf (false: such a packet is quarantined, naming the table and the first bad sign);
    other_models_interval_s: how often the top level of incremental_dir is listed to notice
    packets of other models (logged once per model, counted, in health and status);
    unreachable_log_interval_s: least time between two log lines about the same unreachable
    shard (every failure is still counted in a metric, and shown in health and status).
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
    unreachable_log_interval_s: float = 30.0
    settle_s: float = 2.0
    fetch_timeout_s: float = 60.0
    allow_non_finite: bool = False
    other_models_interval_s: float = 30.0
    dense_sync: DenseSyncSettings = field(default_factory=DenseSyncSettings)

    def __post_init__(self) -> None:
        for name in ("rescan_interval_s", "list_interval_s", "watermark_poll_s", "retry_backoff_s",
                     "fetch_timeout_s", "other_models_interval_s", "unreachable_log_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.gap_timeout_s < 0 or self.settle_s < 0:
            raise ValueError("gap_timeout_s and settle_s must be >= 0")
        if self.prefetch < 1 or self.discover_every < 1 or self.queue_size < 1:
            raise ValueError("prefetch, discover_every and queue_size must be positive")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError("metrics_port must be in [0, 65535] (0: off)")
        if self.quarantine_prefix and (self.quarantine_prefix.startswith("/")
                                       or ".." in self.quarantine_prefix.split("/")):
            raise ValueError("quarantine_prefix must be a relative key prefix without '..'")
