"""The producer's settings (`persia_inc.producer` in global_config.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_MAX_PACKET_ROWS = 1_000_000
"""Rows (upserts and deletes) one packet holds at most, by default."""
DEFAULT_MAX_PACKET_BYTES = 128 * 1024 * 1024
"""Encoded bytes one packet takes at most, by default: half the default gRPC message limit."""
MIN_MAX_PACKET_BYTES = 1024 * 1024
"""The smallest `max_packet_bytes` accepted: room for the framing and a row of the largest dim."""


@dataclass(frozen=True, slots=True)
class ProducerSettings:
    """Training side. flush_interval_s: flush when the oldest unflushed sign is this old;
    max_pending_bytes: rows buffered while storage is down before `backpressure` applies.

    producer_id: this producer's stream name (empty: "producer-0"; keep it stable across
    restarts so a restart finds its earlier generations); close_timeout_s: how long `close()`
    waits for pending packets to be stored; metrics_port: serve Prometheus metrics on
    127.0.0.1:port (0: off); metrics_addr: the address it binds.

    writer_nice: how much nicer than training the packet writer thread runs (Linux nice
    increment, 0-19; 0: an ordinary thread, which stored the demo's packets sooner than a
    SCHED_IDLE writer did, at no measurable cost in step time: bench/results/producer.json).

    max_packet_rows, max_packet_bytes: no packet holds more rows (upserts and deletes) or
    more bytes than these. Snapshots queued behind a slow or unreachable store merge only up
    to the bound (a snapshot that would pass it is queued as its own next packet), and a flush
    larger than the bound goes out as several packets of contiguous sign ranges with
    consecutive sequences. The defaults, 1,000,000 rows and 128 MiB, keep one packet within
    half of the embedding servers' default 256 MiB gRPC message limit: an Apply carries a
    shard's signs and float32 rows, fewer bytes than the packet's bound (which also counts the
    optimizer state serving never gets), so even with one shard a packet's slice fits one
    message with room for framing, and a loader decodes at most 128 MiB per packet. At dim 64
    the bytes bound rules (about 500,000 rows a packet); at dim 16 and below the rows bound.
    `incremental_buffer_size` is not capped by them: it says when to flush (freshness, and
    how often the training thread swaps buffers), they say how big a packet may be; a flush
    over the bound is split on the writer thread, off the training step.

    dtype: how rows travel: float32 (exact), float16, or int8 (row-wise, with a float16 scale
    and offset per row; loaders dequantize). max_inflight: packets being stored at once
    (0: the store's own default, `ObjectStore.parallel_writes`, measured per backend in
    bench/results/producer.json); announcements still go out in sequence order.

    update_policy: which touched rows a flush ships (producer/update_policy.py). "all"
    (default): every touched row, at every flush, exactly as before the setting existed.
    "prioritized": at each flush the touched rows whose change since they were last shipped
    is largest (`update_rank`), within a budget: `update_budget_fraction` of the rows "all"
    would ship (0 < f <= 1) and, when set, at most `update_budget_rows` rows per flush
    (0: no row bound). Every other touched row stays pending and ships no later than
    `max_staleness_s` (seconds) after it was touched; deletes are never deferred, and
    `close()` ships every pending row. update_rank: "delta" (the size of the row's change
    against an int8 copy of what was shipped; dim + 9 bytes a row) or "touches" (flushes
    that touched it since it was shipped; 7 bytes a row): `bench/traffic.py` measures both.

    ship_optimizer_state: ship the optimizer state a reader returns. True (default) ships it,
    as before the setting existed (the default ships exactly what it shipped); serving never
    uses it, so set false for a stream that only feeds serving (rows only).
    """

    flush_interval_s: float = 30.0
    announce: Literal["dir", "kafka"] = "dir"
    max_pending_bytes: int = 1024 * 1024 * 1024
    backpressure: Literal["block", "raise"] = "block"
    dtype: Literal["float32", "float16", "int8"] = "float32"
    close_on_exit: bool = True
    close_on_sigterm: bool = True
    metrics_port: int = 0
    producer_id: str = ""
    close_timeout_s: float = 30.0
    metrics_addr: str = "127.0.0.1"
    writer_nice: int = 0
    max_packet_rows: int = DEFAULT_MAX_PACKET_ROWS
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES
    max_inflight: int = 0
    update_policy: Literal["all", "prioritized"] = "all"
    update_budget_fraction: float = 0.25
    update_budget_rows: int = 0
    max_staleness_s: float = 60.0
    update_rank: Literal["delta", "touches"] = "delta"
    ship_optimizer_state: bool = True

    def __post_init__(self) -> None:
        check_update_policy(self)


def check_update_policy(settings: ProducerSettings) -> None:
    """ValueError naming the update-policy field that is out of range (or inconsistent with
    `flush_interval_s`: the bound needs a flush between a row's deferral and its deadline)."""
    if settings.update_policy not in ("all", "prioritized"):
        raise ValueError(f"update_policy must be 'all' or 'prioritized', got "
                         f"{settings.update_policy!r}")
    if settings.update_rank not in ("delta", "touches"):
        raise ValueError(f"update_rank must be 'delta' or 'touches', got {settings.update_rank!r}")
    if not 0.0 < settings.update_budget_fraction <= 1.0:
        raise ValueError(f"update_budget_fraction must be in (0, 1], got "
                         f"{settings.update_budget_fraction!r}")
    if isinstance(settings.update_budget_rows, bool) or settings.update_budget_rows < 0:
        raise ValueError(f"update_budget_rows must be >= 0 (0: no bound), got "
                         f"{settings.update_budget_rows!r}")
    if (settings.update_policy == "prioritized"
            and not settings.max_staleness_s > settings.flush_interval_s):
        raise ValueError(f"max_staleness_s ({settings.max_staleness_s!r}) must be above "
                         f"flush_interval_s ({settings.flush_interval_s!r}) with the "
                         "prioritized update policy")
