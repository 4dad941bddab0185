"""Prometheus metrics of one loader, in its own registry, and the HTTP endpoint that serves
them with `/healthz` beside `/metrics`."""

from __future__ import annotations

import hmac
import http.server
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from persia_inc.foundation.threads import ServiceThread

if TYPE_CHECKING:
    from persia_inc.loader.reports import HealthReport, LoaderReport
    from persia_inc.packet_format import Cut

log = logging.getLogger(__name__)

# the label values the loader counts under, created at 0 when it starts
_QUARANTINE_REASONS = ("CorruptPacketError", "UnsupportedPacketError", "PacketTooLargeError",
                       "VerificationError", "NonFiniteError", "server_rejected")
_REJECT_REASONS = ("announcement", "missing", "watch_event", "kafka_error", "symlink", "fifo")
_ERROR_STAGES = ("list", "fetch", "fetch_timeout", "unsettled", "apply", "dispatch", "other_models")

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
                         [*t, "producer"], registry=r)
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
        self.shard_current = Gauge(  # shard label 'SrR' for replica R of a replicated shard S
            "persia_inc_loader_shard_current", "1 when the shard (replica) answered at the last "
            "look and holds what its sibling replicas hold (serving), 0 while it catches up or "
            "is down", [*m, "shard"], registry=r)
        self.shard_lagging_streams = Gauge(
            "persia_inc_loader_shard_lagging_streams", "Streams where the shard replica holds "
            "less than the freshest replica of its shard (as last seen)", [*m, "shard"],
            registry=r)
        self.catch_ups = Gauge("persia_inc_loader_catch_ups", "Replicas being caught up from "
                               "storage now, each by a thread of its own", m, registry=r)
        self.shard_catching_up = Gauge(
            "persia_inc_loader_shard_catching_up", "1 while the loader catches the shard replica "
            "up from storage (it is out of live dispatch meanwhile)", [*m, "shard"], registry=r)
        self.catch_up_packets = Counter(
            "persia_inc_loader_catch_up_packets", "Packets applied to a shard replica by its "
            "catch-up from storage", [*m, "shard"], registry=r)
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
                                     "register or validate, conflict) and quarantined",
                                     [*m, "reason"], registry=r)
        self.dense_torchserve_up = Gauge("persia_inc_loader_dense_torchserve_up",
                                         "1 when TorchServe's management API answered the dense "
                                         "sync's last look", m, registry=r)
        self.dense_errors = Counter("persia_inc_loader_dense_errors",
                                    "Failed dense-sync steps (retried)", [*m, "stage"], registry=r)

        self._streams: set[tuple[str, str]] = set()
        # every label set known up front exports 0 from the start (a dashboard's sum then reads
        # 0, not "No data"); per-table sets are made when a stream is first seen (`stream`)
        for reason in _QUARANTINE_REASONS:
            self.quarantined.labels(model, reason)
        for reason in _REJECT_REASONS:
            self.rejected.labels(model, reason)
        for stage in _ERROR_STAGES:
            self.errors.labels(model, stage)
        for why in ("watermark", "duplicate", "servers_held"):
            self.skipped.labels(model, why)
        for one in (self.replays, self.apply_latency, self.freshness, self.queue,
                    self.other_models, self.healthy):
            one.labels(model)

    def stream(self, table: str, producer: str) -> None:
        """Make the label sets of a stream (table = its lane for cuts), so they export 0."""
        if (table, producer) in self._streams:
            return
        self._streams.add((table, producer))
        m = self.model
        for counter in (self.packets, self.bytes, self.gaps, self.skipped_below):
            counter.labels(m, table)
        for outcome in ("held", "passed"):
            self.generation_jumps.labels(m, table, outcome)
        self.lag.labels(m, table, producer)

    def observe_applied(self, packet: Cut, nbytes: int, apply_s: float, seen_ns: int,
                        fetched_ns: int) -> None:
        """One packet applied: its counts, the apply time, and the latency budget of its stages
        (flush -> seen -> fetched -> applied; a stage at 0 ns is not known)."""
        lane, created_ns = packet.header.lane, packet.header.created_at_ns
        self.packets.labels(self.model, lane).inc()
        for table in packet.tables:
            self.rows.labels(self.model, table.name).inc(table.row_count)
        self.bytes.labels(self.model, lane).inc(nbytes)
        self.apply_latency.labels(self.model).observe(apply_s)
        applied_ns = time.time_ns()
        for stage, at_ns in (("seen", seen_ns), ("fetched", fetched_ns), ("applied", applied_ns)):
            if at_ns:
                self.stages.labels(self.model, stage).observe(max(0.0, (at_ns - created_ns) / 1e9))
        self.freshness.labels(self.model).observe(max(0.0, (applied_ns - created_ns) / 1e9))

    def serve(self, port: int, addr: str, health: Callable[[], HealthReport],
              streams: Callable[[], LoaderReport] | None = None,
              clear: Callable[[list[tuple[str, str]] | None], list[tuple[str, str]]] | None = None,
              clear_token: str = "") -> MetricsServer:
        """Serve /metrics, /healthz, /streams and POST /clear on addr:port (0: a free port);
        with `clear_token`, POST /clear needs `Authorization: Bearer <clear_token>`."""
        return MetricsServer(self.registry, port, addr, health, streams, clear, clear_token)


class MetricsServer:
    """A tiny HTTP server: `/metrics` (Prometheus text), `/healthz` (JSON; 503 when not
    healthy), `/streams` (JSON: per stream, the loader's watermarks and flags, which
    `persia-inc status` shows) and `POST /clear` (body `{"streams": ["table/producer", ...]}`
    or `{"streams": "all"}`: clears those streams' anomaly flags; answers the ones cleared).
    With a `clear_token` (the embedding servers' write token), POST /clear answers 401 unless
    it carries `Authorization: Bearer <clear_token>`: clearing a flag is a write, and the
    metrics port is often opened to a Prometheus scraper.
    Runs on a `ServiceThread` (`persia-inc-loader-metrics`); `close()` stops it promptly and
    is safe to call twice."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str,
                 health: Callable[[], HealthReport], streams: Callable[[], LoaderReport] | None = None,
                 clear: Callable[[list[tuple[str, str]] | None], list[tuple[str, str]]] | None = None,
                 clear_token: str = "") -> None:
        expected = f"Bearer {clear_token}".encode()

        class MetricsRequestHandler(http.server.BaseHTTPRequestHandler):
            def _reply(self, code: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.startswith("/healthz"):
                    report = health()
                    self._reply(200 if report.healthy else 503, json.dumps(report.to_json()).encode())
                elif self.path.startswith("/streams") and streams is not None:
                    self._reply(200, json.dumps(streams().to_json()).encode())
                elif self.path.startswith("/metrics") or self.path == "/":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                else:
                    self._reply(404, b"not found\n", "text/plain")

            def do_POST(self) -> None:
                if not self.path.startswith("/clear") or clear is None:
                    self._reply(404, b"not found\n", "text/plain")
                    return
                given = (self.headers.get("Authorization") or "").encode()
                if clear_token and not hmac.compare_digest(given, expected):
                    log.warning("POST /clear from %s refused: %s Authorization header",
                                self.client_address[0], "a wrong" if given else "no")
                    self._reply(401, json.dumps({"error": "POST /clear needs 'Authorization: Bearer "
                                                 "<token>' with the embedding servers' write token "
                                                 "(persia_inc.embedding_server.token_env)"}).encode())
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    chosen = parse_clear(json.loads(self.rfile.read(min(length, 1 << 20)) or b"{}"))
                except ValueError as exc:  # json.JSONDecodeError is a ValueError
                    self._reply(400, json.dumps({"error": str(exc)}).encode())
                    return
                cleared = clear(chosen)
                self._reply(200, json.dumps({"cleared": [f"{t}/{p}" for t, p in cleared]}).encode())

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics http: " + format, *args)

        self._server = http.server.ThreadingHTTPServer((addr, port), MetricsRequestHandler)
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


def parse_clear(body: object) -> list[tuple[str, str]] | None:
    """The streams a `/clear` body names: `{"streams": "all"}` -> None (every stream), or
    `{"streams": ["table/producer", ...]}`. Raises ValueError naming what is wrong."""
    if not isinstance(body, dict) or "streams" not in body:
        raise ValueError('the body must be {"streams": "all"} or {"streams": ["table/producer"]}')
    chosen = body["streams"]
    if chosen == "all":
        return None
    if not isinstance(chosen, list) or not all(isinstance(c, str) and c.count("/") == 1
                                               for c in chosen):
        raise ValueError(f'"streams" must be "all" or a list of "table/producer", not {chosen!r}')
    return [(c.split("/")[0], c.split("/")[1]) for c in chosen]
