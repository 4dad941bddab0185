"""Prometheus metrics of one producer, in its own registry (two producers never collide).

Served over HTTP only when the training job asks for it (`metrics_port`), bound to
127.0.0.1 by default.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

MetricT = TypeVar("MetricT", bound=MetricWrapperBase)

log = logging.getLogger(__name__)


class ProducerMetrics:
    """Counters and gauges of one producer, labelled by model, producer and (where it helps)
    table and flush reason."""

    def __init__(self, model: str, producer: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model": model, "producer": producer}
        self._labels = labels
        r = self.registry
        self.packets = Counter("persia_inc_producer_packets", "Packets (cuts) durably stored",
                               [*labels, "reason"], registry=r)
        self.rows = Counter("persia_inc_producer_rows", "Rows (upserts and deletes) stored",
                            [*labels, "table"], registry=r)
        self.bytes = Counter("persia_inc_producer_bytes", "Packet bytes stored",
                             list(labels), registry=r)
        self.flushes = Counter("persia_inc_producer_flushes", "Flushes started, by reason",
                               [*labels, "reason"], registry=r)
        self.dump_latency = Histogram(
            "persia_inc_producer_dump_seconds", "From snapshot to packet stored",
            list(labels), registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.stage_latency = Histogram(
            "persia_inc_producer_stage_seconds",
            "From flush (the packet's created_at) to the end of a stage: stored, announced "
            "(Kafka acknowledged it; with directory announcements, when stored)",
            [*labels, "stage"], registry=r,
            buckets=(0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125,
                     0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2, 5, 10, 30),
        )
        self.snapshot_latency = Histogram(
            "persia_inc_producer_snapshot_seconds", "Training-thread time to swap and read rows",
            list(labels), registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.pending_rows = Gauge("persia_inc_producer_pending_rows",
                                  "Rows snapshotted but not yet stored", list(labels), registry=r)
        self.pending_bytes = Gauge("persia_inc_producer_pending_bytes",
                                   "Bytes snapshotted but not yet stored", list(labels), registry=r)
        self.buffered_signs = Gauge("persia_inc_producer_buffered_signs",
                                    "Distinct signs waiting for the next flush", [*labels, "table"],
                                    registry=r)
        self.retries = Counter("persia_inc_producer_retries", "Failed store or announce attempts",
                               [*labels, "what"], registry=r)
        self.announced = Counter("persia_inc_producer_announcements",
                                 "Announcements acknowledged", list(labels), registry=r)
        self.announce_pending = Gauge("persia_inc_producer_announce_pending",
                                      "Announcements not yet acknowledged", list(labels), registry=r)
        self.backpressure = Counter("persia_inc_producer_backpressure",
                                    "Times the memory bound stopped the training thread",
                                    list(labels), registry=r)
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    def of(self, metric: MetricT, **extra: str) -> MetricT:
        """`metric` with this producer's labels plus `extra`."""
        return metric.labels(**self._labels, **extra)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose the registry over HTTP on addr:port; returns the bound port."""
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server, self._server_thread = server, thread
        bound = int(server.server_address[1])
        log.info("producer metrics on http://%s:%d/metrics", addr, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP server if one runs; safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._server_thread is not None:
            self._server_thread.join(timeout=5)
            self._server_thread = None
