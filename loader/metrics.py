"""Prometheus metrics of one loader, in its own registry, and the HTTP endpoint that serves
them with `/healthz` beside `/metrics`."""

from __future__ import annotations

import http.server
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from persia_inc.foundation.threads import ServiceThread

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600)
# fine enough below a second to read a p99 off (the latency budget per stage)
_STAGE_BUCKETS = (0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125, 0.15,
                  0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2, 5, 10, 30, 60, 300, 3600)


class LoaderMetrics:
    """Counters, gauges and histograms of one loader, labelled by model (and table)."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model"]
        self.model = model
        t = [*m, "table"]
        self.packets = Counter("persia_inc_loader_packets_applied", "Packets applied on every shard",
                               t, registry=r)
        self.skipped = Counter("persia_inc_loader_packets_skipped",
                               "Candidates skipped: duplicates or at/below the watermark",
                               [*m, "why"], registry=r)
        self.rows = Counter("persia_inc_loader_rows_applied", "Rows (upserts and deletes) applied",
                            t, registry=r)
        self.bytes = Counter("persia_inc_loader_bytes_applied", "Packet bytes applied", t, registry=r)
        self.apply_latency = Histogram("persia_inc_loader_apply_seconds",
                                       "Apply through the embedding client, every shard acked",
                                       m, registry=r, buckets=_LATENCY_BUCKETS)
        self.freshness = Histogram("persia_inc_loader_freshness_seconds",
                                   "Apply time minus the packet's created-at", m, registry=r,
                                   buckets=_FRESHNESS_BUCKETS)
        self.stages = Histogram(
            "persia_inc_loader_stage_seconds",
            "From the packet's created-at (its flush) to the end of a stage: seen (a source "
            "announced or listed it), fetched (read and verified), applied (every reachable "
            "shard acked)", [*m, "stage"], registry=r, buckets=_STAGE_BUCKETS)
        self.quarantined = Counter("persia_inc_loader_quarantined", "Packets failing verification",
                                   [*m, "reason"], registry=r)
        self.rejected = Counter("persia_inc_loader_rejected",
                                "Announcements or paths rejected (malformed, outside, missing)",
                                [*m, "reason"], registry=r)
        self.gaps = Counter("persia_inc_loader_gaps", "Missing packets passed after the gap timeout",
                            t, registry=r)
        self.errors = Counter("persia_inc_loader_errors", "Failed fetches, applies and listings "
                              "(retried)", [*m, "stage"], registry=r)
        self.replays = Counter("persia_inc_loader_replays",
                               "Streams rewound because a server fell behind (restarted)",
                               m, registry=r)
        self.lag = Gauge("persia_inc_loader_lag_packets", "Packets pending (known, not applied)",
                         t, registry=r)
        self.queue = Gauge("persia_inc_loader_queue", "Candidates waiting for the dispatcher",
                           m, registry=r)
        self.other_models = Gauge("persia_inc_loader_other_models",
                                  "Other models whose packets are under incremental_dir (this "
                                  "loader ignores them: is persia_inc.model right?)", m, registry=r)
        self.healthy = Gauge("persia_inc_loader_healthy", "1 when the dispatcher runs and the "
                             "servers answer", m, registry=r)
        self.skipped_below = Counter(
            "persia_inc_loader_skipped_below_watermark",
            "Packets that arrived below their stream's watermark after it leapt past them (a "
            "passed gap or generation jump): never applied", t, registry=r)
        self.generation_jumps = Counter(
            "persia_inc_loader_generation_jumps",
            "Generation starts more than one above the producer's highest known generation: "
            "held (outcome=held), then passed after the gap timeout (outcome=passed)",
            [*t, "outcome"], registry=r)
        self.shard_unreachable = Counter(
            "persia_inc_loader_shard_unreachable",
            "Failed looks at or applies to one shard (why: unreachable, wrong_shard)",
            [*m, "shard", "address", "why"], registry=r)
        self.shard_up = Gauge("persia_inc_loader_shard_up", "1 when the shard answered at the "
                              "last look", [*m, "shard"], registry=r)
        self.dense_active = Gauge("persia_inc_loader_dense_active_version",
                                  "The dense version TorchServe serves by default (0: none yet)",
                                  m, registry=r)
        self.dense_age = Gauge("persia_inc_loader_dense_active_age_seconds",
                               "Now minus the active dense version's export time", m, registry=r)
        self.dense_pending = Gauge("persia_inc_loader_dense_pending_versions",
                                   "Dense versions found, not active yet (waiting for the sparse "
                                   "stream or for registration)", m, registry=r)
        self.dense_skew = Gauge(
            "persia_inc_loader_dense_sparse_skew_packets",
            "Packets every shard holds beyond the active dense version's sparse position, per "
            "stream (same generation; NaN when the generations differ or a shard is unknown)",
            [*m, "lane", "producer"], registry=r)
        self.dense_refused = Counter("persia_inc_loader_dense_refused",
                                     "Dense versions refused (bad manifest, checksum, failed to "
                                     "register) and quarantined", [*m, "reason"], registry=r)
        self.dense_errors = Counter("persia_inc_loader_dense_errors",
                                    "Failed dense-sync steps (retried)", [*m, "stage"], registry=r)

    def serve(self, port: int, addr: str, health: Callable[[], dict[str, Any]],
              streams: Callable[[], dict[str, Any]] | None = None) -> MetricsServer:
        """Serve /metrics, /healthz and /streams on addr:port (port 0 picks a free port)."""
        return MetricsServer(self.registry, port, addr, health, streams)


class MetricsServer:
    """A tiny HTTP server: `/metrics` (Prometheus text), `/healthz` (JSON; 503 when not
    healthy) and `/streams` (JSON: per stream, the loader's watermarks and flags, which
    `persia-inc status` shows). Runs on a `ServiceThread` (`persia-inc-loader-metrics`);
    `close()` stops it promptly and is safe to call twice."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str,
                 health: Callable[[], dict[str, Any]],
                 streams: Callable[[], dict[str, Any]] | None = None) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/healthz"):
                    report = health()
                    body = json.dumps(report).encode()
                    self.send_response(200 if report.get("healthy") else 503)
                    self.send_header("Content-Type", "application/json")
                elif self.path.startswith("/streams") and streams is not None:
                    body = json.dumps(streams()).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                elif self.path.startswith("/metrics") or self.path == "/":
                    body = generate_latest(registry)
                    self.send_response(200)
                    self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                else:
                    body = b"not found\n"
                    self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics http: " + format, *args)

        self._server = http.server.ThreadingHTTPServer((addr, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = ServiceThread("loader-metrics", self._serve, wake=self._shutdown).start()

    def _serve(self) -> None:
        self._server.serve_forever(poll_interval=0.2)

    def _shutdown(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, so only if it runs
            self._server.shutdown()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving; safe to call twice."""
        self._thread.close(timeout_s)
        self._server.server_close()
