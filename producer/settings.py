"""The producer's settings (`persia_inc.producer` in global_config.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class ProducerSettings:
    """Training side. flush_interval_s: flush when the oldest unflushed sign is this old;
    max_pending_bytes: rows buffered while storage is down before `backpressure` applies.

    producer_id: this producer's stream name (empty: "producer-0"; keep it stable across
    restarts so a restart finds its earlier generations); close_timeout_s: how long `close()`
    waits for pending packets to be stored; metrics_port: serve Prometheus metrics on
    127.0.0.1:port (0: off); metrics_addr: the address it binds.

    writer_nice: how much nicer than training the packet writer thread runs (Linux nice
    increment, 0-19; 0: an ordinary thread, which stored the demo's packets soonest at no
    measurable cost in step time, bench/results/producer.json).
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
    writer_nice: int = 0
