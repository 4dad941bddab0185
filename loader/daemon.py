"""The loader daemon: sources -> one bounded queue -> one dispatcher that orders per (table,
producer), fetches ahead (a small pool), verifies, applies through the embedding client to
every shard, and only then advances the watermark (and lets Kafka commit).

Storage is the source of truth: on start, and whenever a stream has a gap or a server fell
behind (restarted), the dispatcher lists storage after the stream's watermark.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.embedding_server.errors import ShardError, ShardIdentityError
from persia_inc.foundation.kafka import KafkaSettings
from persia_inc.foundation.retry import RetryPolicy, daemon_delay_s
from persia_inc.foundation.threads import ServiceThread, thread_name
from persia_inc.loader.fetch import Fetched, Quarantine, fetch_packet
from persia_inc.loader.metrics import LoaderMetrics, MetricsServer
from persia_inc.loader.ordering import Action, Offer, Ordering, Stream
from persia_inc.loader.settings import LoaderSettings
from persia_inc.loader.sources import (
    Candidate,
    DirectoryWatcher,
    KafkaSource,
    StoragePoller,
    packet_id_of_key,
)
from persia_inc.packet_format import (
    DEFAULT_LIMITS,
    PacketError,
    PacketId,
    PacketLimits,
    Position,
    packet_key,
    stream_prefix,
)
from persia_inc.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

# Server rejections that mean "this packet can never apply" (quarantine), not "try later".
# A ShardIdentityError (the server list is in the wrong order) is not the packet's fault: it is
# never quarantined, it waits (with the longest backoff) for the configuration to be fixed.
_PERMANENT_APPLY_CODES = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE"})


def _packet_rejected(exc: ShardError) -> bool:
    """Whether a failed Apply means the packet itself can never apply (quarantine it)."""
    return exc.code in _PERMANENT_APPLY_CODES and not isinstance(exc, ShardIdentityError)
_BACKOFF_CAP = 10  # the longest retry wait, in units of `retry_backoff_s`


def loader_retry_policy(retry_backoff_s: float) -> RetryPolicy:
    """How the dispatcher retries a failed listing, fetch or apply, and unreachable servers:
    never giving up (a daemon), waits doubling from `retry_backoff_s` up to ten times it."""
    return RetryPolicy(max_attempts=None, initial_backoff_s=retry_backoff_s,
                       max_backoff_s=_BACKOFF_CAP * retry_backoff_s, deadline_s=0)


def server_positions(client: EmbeddingClient) -> dict[Stream, list[Position | None]] | None:
    """Per stream, each shard's watermark (None: that shard holds nothing of it); None when a
    shard is unreachable or not ready (still loading its checkpoint)."""
    per_shard: list[dict[Stream, Position]] = []
    for shard in range(len(client.servers)):
        status = client.status(shard)
        if not status.ready:
            return None
        per_shard.append({(w.table, w.producer): (w.generation, w.sequence) for w in status.watermarks})
    streams = set().union(*per_shard) if per_shard else set()
    return {s: [marks.get(s) for marks in per_shard] for s in streams}


def lowest(positions: list[Position | None]) -> Position | None:
    """What every shard holds: the minimum, None if any shard holds nothing."""
    return None if any(p is None for p in positions) else min(positions)  # type: ignore[type-var]


def table_dims(client: EmbeddingClient) -> dict[str, int]:
    """table -> dim as the servers know it (shard 0; all shards agree or apply fails)."""
    return {t.name: t.dim for t in client.status(0).tables}


class Loader:
    """The daemon for `model`'s packets in `store` (the incremental_dir store), applied through
    `client` (an EmbeddingClient, not closed here); the store is closed at `close()` only if
    `owns_store`. `kafka`: the announcements' broker and topic; with it the `auto` source is
    Kafka, without it a directory watch (local) or a listing. Start with `start()`, stop with
    `close()` (finishes the packet in flight, commits)."""

    def __init__(self, client: EmbeddingClient, store: ObjectStore, *, model: str,
                 settings: LoaderSettings | None = None, limits: PacketLimits = DEFAULT_LIMITS,
                 kafka: KafkaSettings | None = None, owns_store: bool = False,
                 source: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings if settings is not None else LoaderSettings()
        self.model = model
        self.kafka = kafka
        self.client = client
        self._owns_store = owns_store
        self.store = store
        self.limits = limits
        self.clock = clock
        self.metrics = LoaderMetrics(self.model)
        self.quarantine = Quarantine(self.store, self.settings.quarantine_prefix)
        self.ordering = Ordering(self.settings.gap_timeout_s,
                                 min(self.settings.list_interval_s, self.settings.rescan_interval_s))
        self.queue: queue.Queue[Candidate | None] = queue.Queue(self.settings.queue_size)
        self.stop = threading.Event()
        self.source_kind = self._pick_source(source or self.settings.source)
        self.sources: list[Any] = []
        self._settlers: dict[tuple[Stream, Position], list[Callable[[], None]]] = {}
        self._created: dict[tuple[Stream, Position], int] = {}
        self._fetches: dict[tuple[Stream, Position], Future] = {}
        self._pool = ThreadPoolExecutor(self.settings.prefetch,
                                        thread_name_prefix=thread_name("loader-fetch"))
        self._positions: dict[Stream, str | None] = {}
        self._dims: dict[str, int] = {}
        self._last_poll = float("-inf")
        self._servers_ok = False
        self._must_check = True  # read the servers' watermarks before the next apply
        self._retry_at: dict[Stream, float] = {}
        self._failures: dict[object, int] = {}  # stream or stage -> consecutive failures
        self.applied = 0  # packets applied (every shard acked), for tests and logs
        self.last_loop = clock()
        self._thread = ServiceThread("loader-dispatcher", self._run, stop=self.stop)
        self._http: MetricsServer | None = None
        self._closed = False
        self.error: BaseException | None = None

    # ------------------------------------------------------------------------ lifecycle

    def _pick_source(self, source: str) -> str:
        if source == "auto":
            if self.kafka is not None:
                return "kafka"
            return "watch" if self.store.kind == "local" else "list"
        if source == "kafka" and self.kafka is None:
            raise ValueError("loader.source 'kafka' needs the Kafka settings (persia_inc.kafka)")
        if source == "watch" and self.store.kind != "local":
            raise ValueError("loader.source 'watch' needs a local incremental_dir; use 'list'")
        return source

    def start(self) -> Loader:
        """Read the servers' watermarks, start the sources and the dispatcher."""
        self.refresh_servers(force=True)
        s = self.settings
        positions = self.positions_snapshot
        rejected = self._count_rejected
        if self.source_kind == "watch":
            rescan = StoragePoller(self.store.list, self.model, self.queue, positions,
                                   interval_s=s.rescan_interval_s, discover_every=s.discover_every,
                                   name="rescan", on_error=self._count_error)
            self.sources.append(DirectoryWatcher(str(self.store.root), self.model,  # type: ignore[attr-defined]
                                                 self.queue, rescan, on_reject=rejected).start())
        elif self.source_kind == "list":
            self.sources.append(StoragePoller(self.store.list, self.model, self.queue, positions,
                                              interval_s=s.list_interval_s,
                                              discover_every=s.discover_every,
                                              on_error=self._count_error).start())
        else:
            kafka = self.kafka
            if kafka is None:  # _pick_source refuses this; a guard for the type checker
                raise ValueError("loader.source 'kafka' needs the Kafka settings")
            # storage stays the truth: one listing round at start finds what Kafka missed
            self.sources.append(StoragePoller(self.store.list, self.model, self.queue, positions,
                                              interval_s=max(s.rescan_interval_s, s.list_interval_s),
                                              discover_every=s.discover_every, name="kafka-list",
                                              on_error=self._count_error).start())
            self.sources.append(KafkaSource(kafka, kafka.topic_for(self.model), self.model,
                                            self.queue, self.store.key_of,
                                            on_reject=rejected).start())
        self._thread.start()
        if s.metrics_port:
            self._http = self.metrics.serve(s.metrics_port, s.metrics_addr, self.health)
        log.info("loader for model %s on %s: source %s, %d servers", self.model,
                 self.store.root_uri, self.source_kind, len(self.client.servers))
        return self

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop: finish the packet in flight, commit Kafka offsets, stop every thread.
        Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.stop.set()
        for source in self.sources:
            source.stop.set()
        self._thread.close(timeout_s)  # bounded: logs if the dispatcher did not stop
        for source in self.sources:
            source.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._http is not None:
            self._http.close()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> Loader:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        alive = self._thread.is_alive() and self.clock() - self.last_loop < 30
        report = {"healthy": bool(alive and self._servers_ok), "dispatcher": alive,
                  "servers": self._servers_ok, "applied": self.applied,
                  "queue": self.queue.qsize(), "source": self.source_kind}
        self.metrics.healthy.labels(self.model).set(1 if report["healthy"] else 0)
        return report

    # ---------------------------------------------------------------------- positions

    def positions_snapshot(self) -> dict[Stream, str | None]:
        """{stream: key of its watermark packet or None}, for listers (read-only copy)."""
        return dict(self._positions)

    def _publish_position(self, stream: Stream) -> None:
        mark = self.ordering.watermark(stream)
        self._positions = {**self._positions,
                           stream: None if mark is None else packet_key(self.model, *stream, *mark)}

    def _count_rejected(self, reason: str) -> None:
        self.metrics.rejected.labels(self.model, reason).inc()

    def _count_error(self, stage: str) -> None:
        self.metrics.errors.labels(self.model, stage).inc()

    # ----------------------------------------------------------------- servers' state

    def refresh_servers(self, *, force: bool = False) -> bool:
        """Read every shard's watermarks; rewind streams where a shard fell behind (it
        restarted empty or from an older checkpoint), so they replay from storage.
        Returns False when some shard is unreachable or not ready."""
        now = self.clock()
        if not force and not self._must_check and now - self._last_poll < self.settings.watermark_poll_s:
            return True
        self._last_poll = now
        try:
            marks = server_positions(self.client)
            if marks is not None:
                self._dims = table_dims(self.client)
        except ShardError as exc:
            if self._servers_ok:
                log.warning("embedding servers unreachable: %s", exc)
            marks = None
        self._servers_ok = marks is not None
        if marks is None:
            self._must_check = True
            return False
        self._must_check = False
        self._failures.pop(_SERVERS, None)
        streams = set(self.ordering.streams)
        if self.source_kind != "kafka":  # kafka: a loader follows the streams it is told about
            streams |= set(marks)
        for stream in streams:
            held = lowest(marks.get(stream, [None]))
            ours = self.ordering.watermark(stream)
            fresh = stream not in self.ordering.streams
            if fresh or held != ours:
                if not fresh and (held is None or (ours is not None and held < ours)):
                    log.warning("stream %s/%s: the servers hold only up to %s, not %s (a server "
                                "restarted?): replaying from storage", *stream, held, ours)
                    self.metrics.replays.labels(self.model).inc()
                    self._drop_fetches(stream)
                self.ordering.set_watermark(stream, held, now=now)
                self._publish_position(stream)
                if held is not None:
                    self._settle_upto(stream, held)  # another loader of the group applied them
        return True

    # ---------------------------------------------------------------------- dispatcher

    def _backoff_s(self, what: object, exc: BaseException) -> float:
        """The wait before retrying `what` (a stream, or a stage of the dispatcher) after it
        failed once more with `exc`, as the one retry rule decides (`loader_retry_policy`)."""
        attempt = self._failures.get(what, 0) + 1
        self._failures[what] = attempt
        return daemon_delay_s(exc, attempt, loader_retry_policy(self.settings.retry_backoff_s))

    def _run(self) -> None:
        while not self.stop.is_set():
            self.last_loop = self.clock()
            try:
                busy = self._step()
                self._failures.pop(_DISPATCH, None)
            except Exception as exc:  # the dispatcher never dies: log, count, back off, go on
                log.exception("loader: dispatcher step failed")
                self._count_error("dispatch")
                busy = False
                self.stop.wait(self._backoff_s(_DISPATCH, exc))
            if not busy:
                self._drain(timeout_s=0.05)

    def _drain(self, timeout_s: float = 0.0) -> int:
        """Move queued candidates into the ordering; returns how many."""
        count = 0
        try:
            candidate = self.queue.get(timeout=timeout_s) if timeout_s else self.queue.get_nowait()
            while candidate is not None:
                self._take(candidate)
                count += 1
                candidate = self.queue.get_nowait()
        except queue.Empty:
            pass
        self.metrics.queue.labels(self.model).set(self.queue.qsize())
        return count

    def _take(self, candidate: Candidate) -> None:
        packet_id = candidate.packet_id
        stream = (packet_id.table, packet_id.producer)
        if stream not in self.ordering.streams:
            self._must_check = True  # a new stream: learn where the servers are first
            self.refresh_servers()
        outcome = self.ordering.offer(packet_id, now=self.clock())
        if outcome is Offer.STALE:
            self.metrics.skipped.labels(self.model, "watermark").inc()
            if candidate.settle:
                candidate.settle()
            return
        if outcome is Offer.DUPLICATE:
            self.metrics.skipped.labels(self.model, "duplicate").inc()
        ident = (stream, packet_id.position)
        if candidate.settle:
            self._settlers.setdefault(ident, []).append(candidate.settle)
        if candidate.created_at_ns:
            self._created[ident] = candidate.created_at_ns

    def _step(self) -> bool:
        """One pass over the streams; True if it did work."""
        self._drain()
        if not self.refresh_servers():
            self.stop.wait(self._backoff_s(_SERVERS, _servers_down()))
            return False
        did = False
        now = self.clock()
        for stream in list(self.ordering.streams):
            if self.stop.is_set():
                break
            if self._retry_at.get(stream, 0) > now:
                continue
            decision = self.ordering.decide(stream, now=now)
            if decision.action is Action.LIST:
                self._list_stream(stream)
                did = True
                decision = self.ordering.decide(stream, now=self.clock())
            if decision.action in (Action.APPLY, Action.PASS_GAP) and decision.head is not None:
                if decision.action is Action.PASS_GAP:
                    log.error("GAP in %s/%s/%s: nothing after %s arrived within %.1f s; passing "
                              "it and applying %s", self.model, *stream, decision.missing_after,
                              self.settings.gap_timeout_s, decision.head.position)
                    self.metrics.gaps.labels(self.model, stream[0]).inc()
                self._prefetch(stream)
                self._process(stream, decision.head)
                did = True
                if self._must_check:
                    break
            self.metrics.lag.labels(self.model, stream[0]).set(len(self.ordering.state(stream).pending))
        return did

    def _list_stream(self, stream: Stream) -> None:
        started = self.clock()
        after = self._positions.get(stream)
        try:
            infos = self.store.list(stream_prefix(self.model, *stream), after)
        except (StorageError, OSError) as exc:
            wait = self._backoff_s(stream, exc)
            log.warning("listing %s/%s failed (retry in %.2fs): %s", *stream, wait, exc)
            self._count_error("list")
            self._retry_at[stream] = started + wait
            return
        self._failures.pop(stream, None)
        found = [p for p in (packet_id_of_key(i.key, self.model) for i in infos) if p is not None]
        self.ordering.listed(stream, found, at=started, now=self.clock())

    def _prefetch(self, stream: Stream) -> None:
        for packet_id in self.ordering.pending(stream)[: self.settings.prefetch]:
            ident = (stream, packet_id.position)
            if ident not in self._fetches:
                self._fetches[ident] = self._pool.submit(
                    fetch_packet, self.store, packet_id.key, packet_id, limits=self.limits,
                    dims=dict(self._dims))

    def _drop_fetches(self, stream: Stream) -> None:
        for ident in [i for i in self._fetches if i[0] == stream]:
            self._fetches.pop(ident).cancel()

    def _settle_upto(self, stream: Stream, position: Position) -> None:
        for ident in [i for i in self._settlers if i[0] == stream and i[1] <= position]:
            self._settle(ident)

    def _settle(self, ident: tuple[Stream, Position]) -> None:
        for settle in self._settlers.pop(ident, []):
            settle()
        self._created.pop(ident, None)

    def _process(self, stream: Stream, packet_id: PacketId) -> None:
        """Fetch (or take the prefetched), verify and apply the head of `stream`."""
        ident = (stream, packet_id.position)
        future = self._fetches.pop(ident, None)
        if future is None:
            future = self._pool.submit(fetch_packet, self.store, packet_id.key, packet_id,
                                       limits=self.limits, dims=dict(self._dims))
        try:
            fetched: Fetched = future.result()
        except FileNotFoundError:
            log.warning("%s is announced or listed but not in storage: dropped", packet_id.key)
            self._count_rejected("missing")
            self.ordering.reject(packet_id, now=self.clock())
            self._settle(ident)
            return
        except PacketError as exc:
            self.quarantine.put(packet_id.key, str(exc))
            self.metrics.quarantined.labels(self.model, type(exc).__name__).inc()
            self.ordering.reject(packet_id, now=self.clock())
            self._settle(ident)
            return
        except (StorageError, OSError) as exc:
            wait = self._backoff_s(stream, exc)
            log.warning("fetching %s failed (retry in %.2fs): %s", packet_id.key, wait, exc)
            self._count_error("fetch")
            self._retry_at[stream] = self.clock() + wait
            return
        self._apply(stream, fetched)

    def _apply(self, stream: Stream, fetched: Fetched) -> None:
        packet_id, packet = fetched.packet_id, fetched.packet
        ident = (stream, packet_id.position)
        # a shard that restarted since our last look would take this packet on top of nothing:
        # confirm every shard still holds the watermark first (cheap next to the apply)
        before = self.ordering.watermark(stream)
        self._must_check = True
        if not self.refresh_servers() or self.ordering.watermark(stream) != before:
            if self.ordering.pending(stream)[:1] == [packet_id]:
                self._fetches[ident] = _done_future(fetched)  # keep it for the next pass
            wait = 0.0 if self._servers_ok else self._backoff_s(_SERVERS, _servers_down())
            self._retry_at[stream] = self.clock() + wait
            return
        started = self.clock()
        try:
            result = self.client.apply(packet)
        except ShardError as exc:
            if _packet_rejected(exc):
                self.quarantine.put(packet_id.key, f"rejected by the servers: {exc}")
                self.metrics.quarantined.labels(self.model, "server_rejected").inc()
                self.ordering.reject(packet_id, now=self.clock())
                self._settle(ident)
                return
            wait = self._backoff_s(stream, exc)
            log.warning("applying %s failed (retry in %.2fs): %s", packet_id.key, wait, exc)
            self._count_error("apply")
            self._must_check = True
            self._fetches[ident] = _done_future(fetched)
            self._retry_at[stream] = self.clock() + wait
            return
        done = self.clock()
        h = packet.header
        m, table = self.metrics, h.table
        if result.skipped:
            m.skipped.labels(self.model, "servers_held").inc()
        else:
            m.packets.labels(self.model, table).inc()
            m.rows.labels(self.model, table).inc(h.rows + h.deleted_rows)
            m.bytes.labels(self.model, table).inc(fetched.nbytes)
            m.apply_latency.labels(self.model).observe(done - started)
            m.freshness.labels(self.model).observe(max(0.0, (time.time_ns() - h.created_at_ns) / 1e9))
        self.applied += 1
        self._dims.setdefault(table, h.dim)
        self.ordering.applied(packet_id, now=done)
        self._failures.pop(stream, None)
        self._publish_position(stream)
        self._settle(ident)


_SERVERS, _DISPATCH = "servers", "dispatch"  # failure counters that are not a stream's


def _servers_down() -> ConnectionError:
    """What an unreachable or unready server set is, to the retry rule: no answer (retriable)."""
    return ConnectionError("embedding servers unreachable or not ready")


def _done_future(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
