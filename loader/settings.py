"""The loader daemon's settings (`persia_inc.loader` in global_config.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from persia_inc.foundation.fields import FieldError, at_least, in_range, positive

CANDIDATE_QUEUE_SIZE = 10_000
"""Bound of the candidate queue between the loader's sources and its dispatcher: sources wait
while it is full (a constant: nobody had a reason to tune it)."""


@dataclass(frozen=True, slots=True)
class DenseSyncSettings:
    """The loader's dense sync (`persia_inc.loader.dense_sync`): activates published dense
    versions in TorchServe once every shard holds their sparse positions (TorchServe registers
    local archives only from its model_store, hence `model_store`)."""

    enabled: bool = False
    """Run the dense sync (dense versions activated in TorchServe in step with the sparse stream)."""
    frontend: Literal["torchserve", "kserve"] = "torchserve"
    """Where versions go: `torchserve`, or `kserve` (`persia-inc serve --frontend kserve`; then
    management_address is its REST `host:port`, which also answers the validation request, and
    model_store its --model-store)."""
    management_address: str = "127.0.0.1:7071"
    """TorchServe's gRPC management API, `host:port`."""
    model_name: str = ""
    """The TorchServe model name (empty: `persia_inc.model`)."""
    model_store: str = ""
    """TorchServe's `model_store` folder, where each version's `.mar` is copied before it is registered
    (required when enabled)."""
    keep_versions: int = 2
    """Registered versions kept, the active one included; older ones are unregistered."""
    interval_s: float = 1.0
    """Listing and checking period."""
    register_timeout_s: float = 180.0
    """Longest wait for one management call."""
    retire_grace_s: float = 30.0
    """A version that stopped being the default is unregistered no sooner than this, so requests TorchServe
    already routed to it finish."""
    inference_address: str = "127.0.0.1:7070"
    """TorchServe's gRPC inference API, `host:port`: each version answers one request shaped by its
    spec there, sent to that version alone, before it becomes the default."""
    log_dir: str = ""
    """TorchServe's log folder (its LOG_LOCATION), read for a refused version's worker error (empty:
    not read)."""

    def __post_init__(self) -> None:
        at_least("keep_versions", self.keep_versions, 1)
        positive("interval_s", self.interval_s)
        positive("register_timeout_s", self.register_timeout_s)
        at_least("retire_grace_s", self.retire_grace_s, 0)
        if self.enabled and not self.model_store:
            raise FieldError("model_store", "TorchServe's model_store folder is required when "
                             "dense_sync is enabled")


@dataclass(frozen=True, slots=True)
class LoaderSettings:
    """Serving side loader daemon (seconds everywhere); each field says what it means below it."""

    rescan_interval_s: float = 5.0
    """Full rescan of a watched directory (bounds a missed event's cost)."""
    list_interval_s: float = 1.0
    """Listing period of HDFS and S3."""
    gap_timeout_s: float = 30.0
    """How long a missing packet is waited for before it is passed."""
    prefetch: int = 4
    """Packets fetched ahead."""
    quarantine_prefix: str = ""
    """Key prefix (under `incremental_dir`) packets that fail verification are moved to (empty: recorded
    only)."""
    metrics_port: int = 0
    """Prometheus metrics and /healthz on `metrics_addr`:port (0: off)."""
    source: Literal["auto", "watch", "list", "kafka"] = "auto"
    """Where new packets are noticed: `auto` (kafka when producer.announce is kafka, else watch for a local
    incremental_dir, else list), `watch` (watchdog + rescan, local only), `list` (poll storage listings),
    `kafka` (consumer group; storage is still listed at start)."""
    discover_every: int = 10
    """Every Nth listing round also lists the whole model, to find new streams."""
    metrics_addr: str = "127.0.0.1"
    """The address the metrics endpoint binds."""
    watermark_poll_s: float = 2.0
    """How often the servers' watermarks are read, to notice a restarted server."""
    retry_backoff_s: float = 0.5
    """Wait before retrying a failed fetch or apply."""
    unreachable_log_interval_s: float = 30.0
    """An unreachable shard is logged (ERROR, with its address) at most this often; every failure is still
    counted, and the other shards keep applying."""
    settle_s: float = 2.0
    """A packet file that fails verification while it changed less than this long ago (a copy written in
    place, not by rename) is not judged yet but retried: never quarantined half written."""
    fetch_timeout_s: float = 60.0
    """Longest wait for one fetch; past it the packet is named in an ERROR, counted, and its stream waits
    while the others go on."""
    allow_non_finite: bool = False
    """Apply rows holding NaN or Inf; when false such a packet is quarantined, the reason naming the table
    and the first bad sign."""
    other_models_interval_s: float = 30.0
    """How often the top level of `incremental_dir` is listed for other models' packets (a WARNING once per
    model, counted, in health and `persia-inc status`)."""
    dense_sync: DenseSyncSettings = field(default_factory=DenseSyncSettings)
    """Activate dense versions in TorchServe in step with the sparse stream."""

    def __post_init__(self) -> None:
        for name in ("rescan_interval_s", "list_interval_s", "watermark_poll_s", "retry_backoff_s",
                     "fetch_timeout_s", "other_models_interval_s", "unreachable_log_interval_s"):
            positive(name, getattr(self, name))
        for name in ("gap_timeout_s", "settle_s"):
            at_least(name, getattr(self, name), 0)
        for name in ("prefetch", "discover_every"):
            at_least(name, getattr(self, name), 1)
        in_range("metrics_port", self.metrics_port, 0, 65535, "0: off")
        if self.quarantine_prefix and (self.quarantine_prefix.startswith("/")
                                       or ".." in self.quarantine_prefix.split("/")):
            raise FieldError("quarantine_prefix", "must be a relative key prefix without '..', "
                             f"got {self.quarantine_prefix!r}")
