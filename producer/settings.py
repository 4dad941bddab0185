"""The producer's settings (`persia_inc.producer` in global_config.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from persia_inc.foundation.fields import FieldError, at_least, check_fields, coerce, in_range, positive
from persia_inc.packet_format.header import check_name, check_position

DEFAULT_MAX_PACKET_ROWS = 1_000_000
"""Rows (upserts and deletes) one packet holds at most, by default."""
DEFAULT_MAX_PACKET_BYTES = 128 * 1024 * 1024
"""Encoded bytes one packet takes at most, by default: half the default gRPC message limit."""
MIN_MAX_PACKET_BYTES = 1024 * 1024
"""The smallest `max_packet_bytes` accepted: room for the framing and a row of the largest dim."""


@dataclass(frozen=True, slots=True)
class ProducerSettings:
    """Training side (`persia_inc.producer`). Each field checks itself when given, in code as
    from YAML (`foundation.fields`): a bad value raises FieldError naming the key.

    Packet bounds: no packet holds more than `max_packet_rows` rows or `max_packet_bytes`
    bytes. Snapshots queued behind a slow store merge only up to the bound, and a flush larger
    than it goes out as several packets of contiguous sign ranges with consecutive sequences,
    split on the writer thread, off the training step. The defaults (1,000,000 rows, 128 MiB)
    keep a packet within half of the embedding servers' default 256 MiB gRPC message limit,
    so even with one shard a packet's slice fits one Apply; at dim 64 the bytes bound rules
    (about 500,000 rows), at dim 16 and below the rows bound. `incremental_buffer_size` is not
    capped by them: it says when to flush, they say how big a packet may be.

    Update policy (producer/update_policy.py): "all" (default) ships every touched row at
    every flush, exactly as before the setting existed; "prioritized" ships at each flush the
    touched rows whose change since they were last shipped is largest (`update_rank`), within
    `update_budget_fraction` of the rows "all" would ship (and `update_budget_rows` per table
    and flush, when set), and every other touched row no later than `max_staleness_s` after
    it was touched, on top of the budget; deletes are never deferred; `close()` ships all.
    Ranks: "delta", the L2 norm of the change against an int8 copy of what was shipped
    (dim + 17 bytes a row), or "touches", flushes that touched it since (13 bytes a row).
    bench/results/traffic.json, on the demo's stream: "delta" at 0.05 with int8 and a 20 s
    bound shipped 10.5x fewer bytes than "all" in float32 at the same AUC (-0.0002);
    "touches" lost 0.003 of AUC.

    ship_optimizer_state stays true by default (the default ships exactly what it shipped);
    serving never uses the state, so set it false for a stream that only feeds serving.
    """

    flush_interval_s: float = 30.0
    """Seconds: flush every table once the oldest unflushed sign is this old, even while training is idle."""
    announce: Literal["dir", "kafka"] = "dir"
    """How loaders hear of a stored packet: dir (they watch or list storage) or kafka."""
    max_pending_bytes: int = 1024 * 1024 * 1024
    """Bytes of rows held while storage is down before `backpressure` applies."""
    backpressure: Literal["block", "raise"] = "block"
    """Over max_pending_bytes: block the training thread, or raise BackpressureError."""
    dtype: Literal["float32", "float16", "int8"] = "float32"
    """How rows travel: float32 (exact), float16, or int8 (row-wise scale and offset)."""
    close_on_exit: bool = True
    """Flush and close at interpreter exit (atexit)."""
    close_on_sigterm: bool = True
    """Flush and close on SIGTERM, after the optimizer step that is running."""
    metrics_port: int = 0
    """Serve Prometheus metrics on metrics_addr:port (0: off)."""
    producer_id: str = ""
    """This producer's stream name, stable across restarts (empty: "producer-0")."""
    close_timeout_s: float = 30.0
    """Seconds close() waits for pending packets to be stored."""
    metrics_addr: str = "127.0.0.1"
    """The address the metrics endpoint binds."""
    writer_nice: int = 0
    """How much nicer than training the writer threads run (Linux nice increment, 0-19)."""
    max_packet_rows: int = DEFAULT_MAX_PACKET_ROWS
    """Rows (upserts and deletes) one packet holds at most."""
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES
    """Encoded bytes one packet takes at most (at least 1 MiB)."""
    max_inflight: int = 0
    """Packets stored at once, 0-64 (0: the store's own default); announced in order."""
    update_policy: Literal["all", "prioritized"] = "all"
    """Which touched rows a flush ships: all, or the prioritized ones within a budget."""
    update_budget_fraction: float = 0.1
    """prioritized: the share (0 < f <= 1) of the rows "all" would ship that a flush ships,
    besides the rows whose deadline comes."""
    update_budget_rows: int = 0
    """prioritized: at most this many rows per table and flush (0: no row bound)."""
    max_staleness_s: float = 120.0
    """prioritized: seconds a touched row waits at most; must be above flush_interval_s."""
    update_rank: Literal["delta", "touches"] = "delta"
    """prioritized: rank rows by the size of their change (delta) or by touches since shipped."""
    ship_optimizer_state: bool = True
    """Ship the optimizer state a reader returns (false: rows only, all serving needs)."""

    def __post_init__(self) -> None:
        check_fields(self)
        positive("flush_interval_s", self.flush_interval_s)
        positive("max_pending_bytes", self.max_pending_bytes)
        positive("close_timeout_s", self.close_timeout_s)
        in_range("writer_nice", self.writer_nice, 0, 19)
        in_range("metrics_port", self.metrics_port, 0, 65535, "0: off")
        positive("max_packet_rows", self.max_packet_rows)
        at_least("max_packet_bytes", self.max_packet_bytes, MIN_MAX_PACKET_BYTES, "1 MiB")
        in_range("max_inflight", self.max_inflight, 0, 64, "0: the storage backend's default")
        if self.producer_id:
            try:
                check_name("producer_id", self.producer_id)
            except ValueError as exc:
                raise FieldError("producer_id", str(exc).removeprefix("producer_id ")) from None
        check_update_policy(self)


def check_update_policy(settings: ProducerSettings) -> None:
    """FieldError naming the update-policy field that is out of range (or inconsistent with
    `flush_interval_s`: the bound needs a flush between a row's deferral and its deadline)."""
    if not 0.0 < settings.update_budget_fraction <= 1.0:
        raise FieldError("update_budget_fraction", f"must be in (0, 1], got "
                         f"{settings.update_budget_fraction!r}")
    if settings.update_budget_rows < 0:
        raise FieldError("update_budget_rows", f"must be >= 0 (0: no bound), got "
                         f"{settings.update_budget_rows!r}")
    if (settings.update_policy == "prioritized"
            and not settings.max_staleness_s > settings.flush_interval_s):
        raise FieldError("max_staleness_s", f"({settings.max_staleness_s!r}) must be above "
                         f"flush_interval_s ({settings.flush_interval_s!r}) with the "
                         "prioritized update policy")


def check_arguments(model: object, settings: object, enabled: object,
                     generation: object) -> None:
    """Refuse a bad `IncrementalProducer` argument now, as YAML refuses the same value at
    load (FieldError naming it)."""
    try:
        check_name("model", model)
    except ValueError as exc:
        raise FieldError("model", str(exc).removeprefix("model ")) from None
    if not isinstance(settings, ProducerSettings):
        raise FieldError("settings", f"expected ProducerSettings, got {settings!r:.80}")
    coerce(bool, enabled, "enabled")
    if generation is not None:
        try:
            check_position(generation, 0)
        except ValueError as exc:
            raise FieldError("generation", str(exc).removeprefix("generation ")) from None
