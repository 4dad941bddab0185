"""The loader daemon's dispatch: sources -> one bounded queue -> one dispatcher that orders per
(table, producer), fetches ahead (a small pool), verifies, applies through the embedding client
to every reachable shard, and only then advances the watermark (and lets Kafka commit).

Storage is the source of truth: on start, and whenever a stream has a gap or a server fell
behind (restarted), the dispatcher lists storage after the stream's watermark. Shard tracking
(up, down, positions, rewinds) lives in `shards.py`, the anomalies that stay flagged in
`anomalies.py`, the typed reports (`health()`, `streams()`) in `reports.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.embedding_server.errors import ShardError, WatermarkMovedError
from persia_inc.foundation.kafka import KafkaSettings
from persia_inc.foundation.retry import daemon_delay_s
from persia_inc.foundation.threads import ServiceThread, thread_name
from persia_inc.loader.anomalies import Anomalies
from persia_inc.loader.catchup import CatchUp
from persia_inc.loader.dense_sync import DenseManagement, DenseSync, DenseValidator
from persia_inc.loader.fetch import (
    Fetched,
    NotAnObjectError,
    NotSettledError,
    Quarantine,
    fetch_packet,
)
from persia_inc.loader.metrics import LoaderMetrics, MetricsServer
from persia_inc.loader.ordering import Action, Decision, Offer, Ordering, Stream
from persia_inc.loader.reports import (
    QUARANTINED,
    HealthReport,
    LoaderReport,
    StreamReport,
)
from persia_inc.loader.settings import CANDIDATE_QUEUE_SIZE, LoaderSettings
from persia_inc.loader.shards import ShardTracker, loader_retry_policy, refused_for_good
from persia_inc.loader.sources import (
    Candidate,
    packet_id_of_key,
    pick_source,
    source_name,
    sources_health,
    start_sources,
)
from persia_inc.packet_format import (
    DEFAULT_LIMITS,
    PacketError,
    PacketId,
    PacketLimits,
    Position,
    packet_key,
    stream_listings,
)
from persia_inc.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

class LoaderStartError(RuntimeError):
    """The loader could not start (a source failed to start); what it had started is closed."""


class Loader:
    """The daemon for `model`'s packets in `store` (the incremental_dir store), applied through
    `client` (an EmbeddingClient, not closed here); the store is closed at `close()` only if
    `owns_store`. `kafka`: the announcements' broker and topic; with it the `auto` source is
    Kafka, without it a directory watch (local) or a listing. Start with `start()`, stop with
    `close()` (finishes the packet in flight, commits)."""

    def __init__(self, client: EmbeddingClient, store: ObjectStore, *, model: str,
                 settings: LoaderSettings | None = None, limits: PacketLimits = DEFAULT_LIMITS,
                 kafka: KafkaSettings | None = None, owns_store: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 dense_management: DenseManagement | None = None,
                 dense_validator: DenseValidator | None = None, clear_token: str = "") -> None:
        self.settings = settings if settings is not None else LoaderSettings()
        self.model = model
        self.clear_token = clear_token  # POST /clear needs it when set (loader.metrics)
        self.kafka = kafka
        self.client = client
        self._owns_store = owns_store
        self.store = store
        self.limits = limits
        self.clock = clock
        self.metrics = LoaderMetrics(self.model)
        self.quarantine = Quarantine(self.store, self.settings.quarantine_prefix)
        self.other_models: list[str] = []  # models with packets under incremental_dir, not ours
        self._hung: set[tuple[Stream, Position]] = set()  # fetches past fetch_timeout_s
        self.store.on_not_object = lambda key, kind: self._count_rejected(kind)
        self.ordering = Ordering(self.settings.gap_timeout_s,
                                 min(self.settings.list_interval_s, self.settings.rescan_interval_s))
        self.queue: queue.Queue[Candidate | None] = queue.Queue(CANDIDATE_QUEUE_SIZE)
        self.stop = threading.Event()
        self.source_kind = pick_source(self.settings.source, kafka, store.kind)
        self.sources: list[Any] = []
        self._settlers: dict[tuple[Stream, Position], list[Callable[[], None]]] = {}
        self._seen: dict[tuple[Stream, Position], int] = {}  # wall ns a source first saw it
        self._fetches: dict[tuple[Stream, Position], Future] = {}
        self._pool = ThreadPoolExecutor(self.settings.prefetch,
                                        thread_name_prefix=thread_name("loader-fetch"))
        self._positions: dict[Stream, str | None] = {}
        self._retry_at: dict[Stream, float] = {}
        self._failures: dict[object, int] = {}  # stream or stage -> consecutive failures
        self._catch_ups: dict[int, CatchUp] = {}  # target index -> its catch-up from storage
        self.shards = ShardTracker(client, model, self.metrics, self.settings, clock=clock)
        self.anomalies = Anomalies(model, self.metrics, store.uri,  # flagged until cleared
                                   gap_timeout_s=self.settings.gap_timeout_s)
        self._report = LoaderReport(model)
        self.applied = 0  # packets applied (every shard acked), for tests and logs
        self.last_loop = clock()
        self._thread = ServiceThread("loader-dispatcher", self._run, stop=self.stop)
        self._http: MetricsServer | None = None
        self._closed = False
        self.error: BaseException | None = None
        self.dense_sync: DenseSync | None = None
        if self.settings.dense_sync.enabled:
            if dense_management is None:
                frontend = self.settings.dense_sync.frontend
                raise ValueError(f"loader.dense_sync is enabled (frontend {frontend}) but no management "
                                 "client was given (persia_inc.loader_from_config builds one)")
            self.dense_sync = DenseSync(self.store, model, self.settings.dense_sync, dense_management,
                                        client, validator=dense_validator, quarantine=self.quarantine,
                                        metrics=self.metrics)

    # ------------------------------------------------------------------------ lifecycle

    def start(self) -> Loader:
        """Read the servers' watermarks, start the sources and the dispatcher.

        Shards that are unreachable are waited for (the others are served); a shard that is
        not the shard our list says (ShardIdentityError: the configuration is wrong) or a
        source that fails to start (LoaderStartError) makes it raise, after closing whatever
        it had started (threads, the fetch pool, the store if it owns it)."""
        try:
            return self._start()
        except BaseException:
            log.error("loader for model %s failed to start; closing what it started", self.model)
            self.close()
            raise

    def _start(self) -> Loader:
        self._pool.submit(self.store.warm_up)  # the first fetch then costs what the others do
        self.refresh_servers(force=True)
        wrong = self.shards.identity_error()
        if wrong is not None:
            raise wrong
        self.sources = start_sources(self.source_kind, self.store, self.model, self.queue,
                                     self.positions_snapshot, self.settings, self.kafka,
                                     on_reject=self._count_rejected, on_error=self._count_error,
                                     on_other_models=self._found_other_models)
        for source in self.sources:
            error = getattr(source, "error", None)
            if error is not None:
                raise LoaderStartError(f"loader source {source_name(source)} failed to start: "
                                       f"{type(error).__name__}: {error}") from error
        self._thread.start()
        if self.dense_sync is not None:
            self.dense_sync.start()
        s = self.settings
        if s.metrics_port:
            self._http = self.metrics.serve(s.metrics_port, s.metrics_addr, self.health,
                                            self.streams, self.clear_anomalies, self.clear_token)
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
        for worker in self._catch_ups.values():
            worker.close(timeout_s)
        if self.dense_sync is not None:
            self.dense_sync.close(timeout_s)
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

    def health(self) -> HealthReport:
        """Healthy when the dispatcher loops, every source's threads run and every shard
        answers; otherwise `problems` names what is wrong (a dead source by name, an
        unreachable shard by index and address). Ready when healthy and every source can
        see packets: `waiting` names those that cannot yet (a Kafka consumer with no
        partition assigned: joining its group, or a spare one in a group with more loaders
        than partitions). `flags`: the streams' anomalies not cleared yet."""
        alive = self._thread.is_alive() and self.clock() - self.last_loop < 30
        sources, waiting, source_problems = sources_health(self.sources)
        shards = self._report.shards
        problems = [] if alive else ["dispatcher not running"]
        problems += [f"source {name} is dead" for name, ok in sources.items() if not ok]
        problems += source_problems
        # a replica down is a flag while another replica of its shard answers; a shard with
        # none answering is a problem
        answering = {sh.shard for sh in shards if sh.up}
        problems += [f"shard {sh.shard} ({sh.address}) unreachable: {sh.error}"
                     for sh in shards if not sh.up and sh.shard not in answering]
        replica_flags = [f"shard {sh.shard} replica {sh.replica} ({sh.address}) "
                         + ("unreachable" if not sh.up else f"catching up ({sh.behind_s:.1f} s"
                            + (f", {sh.catch_up_packets} packets from storage)" if sh.catch_up
                               else ")"))
                         for sh in shards if (not sh.up and sh.shard in answering)
                         or (sh.up and not sh.current)]
        dense = None
        if self.dense_sync is not None:
            dense = self.dense_sync.status()
            if not self.dense_sync.is_alive() and self.dense_sync.started:
                problems.append("dense sync is not running")
            if "torchserve-unreachable" in dense["flags"]:
                sync = self.dense_sync
                problems.append(f"{sync.frontend_title} at {sync.address} does not answer: "
                                f"{dense['torchserve']['error']}")
        servers = bool(shards) and all(sh.shard in answering for sh in shards)
        healthy = not problems and servers
        self.metrics.healthy.labels(self.model).set(1 if healthy else 0)
        return HealthReport(healthy=healthy, ready=healthy and not waiting, dispatcher=alive,
                            servers=servers, sources=sources, waiting=tuple(waiting),
                            shards=shards, problems=tuple(problems),
                            flags=(*self.anomalies.flagged(), *replica_flags), applied=self.applied,
                            queue=self.queue.qsize(), source=self.source_kind,
                            other_models=tuple(self.other_models), dense=dense)

    def streams(self) -> LoaderReport:
        """Every stream and shard as of the dispatcher's last pass (`StreamReport`: watermarks,
        pending, the held generation jump, unreachable shards and the anomalies not cleared),
        and `dense` (`DenseSync.status()`) when the dense sync runs."""
        report = self._report
        if self.dense_sync is not None:
            report = dataclasses.replace(report, dense=self.dense_sync.status())
        return report

    def clear_anomalies(self, streams: list[Stream] | None = None) -> list[Stream]:
        """Clear the anomaly flags of `streams` (None: all); returns those that had flags."""
        cleared = self.anomalies.clear(streams)
        self._publish_report()
        return cleared

    # ---------------------------------------------------------------------- positions

    def positions_snapshot(self) -> dict[Stream, str | None]:
        """{stream: key of its watermark packet or None}, for listers (read-only copy)."""
        return dict(self._positions)

    def _publish_position(self, stream: Stream) -> None:
        mark = self.ordering.watermark(stream)
        self._positions = {**self._positions,
                           stream: None if mark is None else packet_key(self.model, *stream, *mark)}

    def _found_other_models(self, models: list[str]) -> None:
        self.other_models = models
        self.metrics.other_models.labels(self.model).set(len(models))

    def _fetch_kwargs(self) -> dict[str, Any]:
        return {"limits": self.limits, "dims": dict(self.shards.dims),
                "allow_non_finite": self.settings.allow_non_finite,
                "settle_s": self.settings.settle_s}

    def _count_rejected(self, reason: str) -> None:
        self.metrics.rejected.labels(self.model, reason).inc()

    def _count_error(self, stage: str) -> None:
        self.metrics.errors.labels(self.model, stage).inc()

    # ----------------------------------------------------------------- servers' state

    def refresh_servers(self, *, force: bool = False) -> bool:
        """Read the shards' watermarks (when due: `ShardTracker.refresh`); rewind streams where a
        reachable shard fell behind, so they replay from storage; settle what every shard holds.
        Returns False when no shard is reachable."""
        ok = self.shards.refresh(self.ordering, follow_servers=self.source_kind != "kafka",
                                 force=force, on_moved=self._moved)
        if ok:
            self._failures.pop(_SERVERS, None)
            for stream in list(self.ordering.streams):
                everywhere = self.shards.held_everywhere(stream)
                if everywhere is not None:
                    self._settle_upto(stream, everywhere)  # every shard holds them
        self._publish_report()
        return ok

    def _moved(self, stream: Stream, rewound: bool) -> None:
        """The servers set `stream`'s watermark (rewound: back, to replay from storage)."""
        if rewound:
            self._drop_fetches(stream)
        self._publish_position(stream)

    def _publish_report(self) -> None:
        """A fresh snapshot for `streams()`, `health()` and `/streams` (read by other threads)."""
        down = tuple(self.shards.down)
        streams = []
        for stream in sorted(self.ordering.streams):
            self.metrics.stream(*stream)
            held = self.ordering.held_jump(stream)
            streams.append(StreamReport(
                stream[0], stream[1], self.shards.held_everywhere(stream),
                self.ordering.watermark(stream), len(self.ordering.state(stream).pending),
                None if held is None else held.key, down, self.anomalies.of(stream)))
        self._report = LoaderReport(self.model, tuple(self.shards.reports()), tuple(streams))

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
        stream = (packet_id.lane, packet_id.producer)
        if stream not in self.ordering.streams:
            self.shards.must_check = True  # a new stream: learn where the servers are first
            self.refresh_servers()
        outcome = self.ordering.offer(packet_id, now=self.clock())
        if outcome is Offer.SKIPPED:
            if candidate.settle:
                candidate.settle()
            self.anomalies.skipped_below(stream, packet_id, candidate.source,
                                         self.ordering.watermark(stream))
            self._publish_report()
            return
        if outcome is Offer.STALE:
            self.metrics.skipped.labels(self.model, "watermark").inc()
            everywhere = self.shards.held_everywhere(stream)
            if candidate.settle and packet_id.position not in self.ordering.state(stream).bad \
                    and (everywhere is None or packet_id.position > everywhere):
                # applied where the shards answer, not yet on one that is down: commit later
                self._settlers.setdefault((stream, packet_id.position), []).append(candidate.settle)
            elif candidate.settle:
                candidate.settle()
            return
        if outcome is Offer.DUPLICATE:
            self.metrics.skipped.labels(self.model, "duplicate").inc()
        elif self.shards.ok:
            self._prefetch(stream)  # fetch while earlier packets apply, not after
        ident = (stream, packet_id.position)
        if candidate.settle:
            self._settlers.setdefault(ident, []).append(candidate.settle)
        self._seen[ident] = min(self._seen.get(ident, candidate.seen_at_ns), candidate.seen_at_ns)

    def _held_jump(self, stream: Stream, decision: Decision) -> None:
        if decision.jump_from is not None and decision.head is not None and \
                self.anomalies.held_jump(stream, decision.head, decision.jump_from,
                                         self.ordering.watermark(stream)):
            self._publish_report()

    def _step(self) -> bool:
        """One pass over the streams; True if it did work."""
        self._drain()
        if not self.refresh_servers():
            self.stop.wait(self._backoff_s(_SERVERS, _servers_down()))
            return False
        self._catch_up()
        did = False
        now = self.clock()
        for stream in list(self.ordering.streams):
            if self.stop.is_set():
                break
            if self._retry_at.get(stream, 0) > now:
                continue
            decision = self.ordering.decide(stream, now=now)
            if decision.action is Action.LIST:
                self._held_jump(stream, decision)
                self._list_stream(stream)
                did = True
                decision = self.ordering.decide(stream, now=self.clock())
            self._held_jump(stream, decision)
            if decision.action in (Action.APPLY, Action.PASS_GAP) and decision.head is not None:
                if decision.action is Action.PASS_GAP:
                    self.anomalies.passed(stream, decision)
                self._prefetch(stream)
                self._process(stream, decision.head)
                did = True
                if self.shards.must_check:
                    break
            self.metrics.lag.labels(self.model, *stream).set(len(self.ordering.state(stream).pending))
        self._publish_report()
        return did

    def _catch_up(self) -> None:
        """Take back into live dispatch the replicas whose catch-up finished (read again:
        still behind, it gets another), and start a catch-up of its own for each replica
        behind its siblings, so new cuts never wait for it."""
        metrics, tracker = self.metrics, self.shards
        for index, worker in list(self._catch_ups.items()):
            label = tracker.shards[index].label or str(index)
            applied = worker.applied  # read once: the thread goes on counting
            metrics.catch_up_packets.labels(self.model, label).inc(
                applied - tracker.catch_up_packets.get(index, 0))
            tracker.catch_up_packets[index] = applied
            if worker.done.is_set() or worker.error is not None:
                del self._catch_ups[index]
                tracker.catching_up.discard(index)
                metrics.shard_catching_up.labels(self.model, label).set(0)
                tracker.look_at(tracker.shards[index], self.clock())
        for index in tracker.behind(self.ordering):
            worker = CatchUp(self.client, self.store, self.model, index,
                             fetch_kwargs=self._fetch_kwargs(),
                             policy=loader_retry_policy(self.settings.retry_backoff_s))
            self._catch_ups[index] = worker
            worker.start()
            tracker.catching_up.add(index)
            tracker.catch_up_packets[index] = 0
            metrics.shard_catching_up.labels(self.model, tracker.shards[index].label
                                             or str(index)).set(1)
        metrics.catch_ups.labels(self.model).set(len(self._catch_ups))

    def _list_stream(self, stream: Stream) -> None:
        started = self.clock()
        after = self._positions.get(stream)
        try:
            infos = [info for prefix, start in stream_listings(self.model, *stream, after)
                     for info in self.store.list(prefix, start)]
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
                    fetch_packet, self.store, packet_id.key, packet_id, **self._fetch_kwargs())

    def _drop_fetches(self, stream: Stream) -> None:
        for ident in [i for i in self._fetches if i[0] == stream]:
            self._fetches.pop(ident).cancel()

    def _settle_upto(self, stream: Stream, position: Position) -> None:
        for ident in [i for i in self._settlers if i[0] == stream and i[1] <= position]:
            self._settle(ident)

    def _settle(self, ident: tuple[Stream, Position]) -> None:
        for settle in self._settlers.pop(ident, []):
            settle()
        self._seen.pop(ident, None)

    def _process(self, stream: Stream, packet_id: PacketId) -> None:
        """Fetch (or take the prefetched), verify and apply the head of `stream`."""
        ident = (stream, packet_id.position)
        future = self._fetches.pop(ident, None)
        if future is None:
            future = self._pool.submit(fetch_packet, self.store, packet_id.key, packet_id,
                                       **self._fetch_kwargs())
        try:
            # a fetch that hangs (stuck storage) is waited for once, then only looked at
            fetched: Fetched = future.result(
                timeout=0 if ident in self._hung else self.settings.fetch_timeout_s)
            self._hung.discard(ident)
        except TimeoutError:  # still running: keep it (never two fetches of one packet)
            self._fetches[ident] = future
            if ident not in self._hung:
                self._hung.add(ident)
                log.error("fetching %s did not finish within %.1f s (storage stuck?); its "
                          "stream waits, the others go on", packet_id.key,
                          self.settings.fetch_timeout_s)
                self._count_error("fetch_timeout")
            self._retry_at[stream] = self.clock() + self.settings.retry_backoff_s
            return
        except NotAnObjectError:  # a symlink, FIFO, ...: the store logged and counted it
            self._hung.discard(ident)
            self.ordering.reject(packet_id, now=self.clock())
            self._settle(ident)
            return
        except NotSettledError as exc:  # written in place, still changing: judged later
            self._hung.discard(ident)
            log.info("%s", exc)
            self._count_error("unsettled")
            self._retry_at[stream] = self.clock() + self._backoff_s(stream, exc)
            return
        except FileNotFoundError:
            log.warning("%s is announced or listed but not in storage: dropped", packet_id.key)
            self._count_rejected("missing")
            self.ordering.reject(packet_id, now=self.clock())
            self._settle(ident)
            return
        except PacketError as exc:
            record = self.quarantine.put(packet_id.key, str(exc), getattr(exc, "judged", None))
            if record["changed"]:  # rewritten since it was judged: judge it again
                self._retry_at[stream] = self.clock() + self.settings.retry_backoff_s
                return
            self.metrics.quarantined.labels(self.model, type(exc).__name__).inc()
            self.anomalies.record(stream, QUARANTINED, packet_id.key, str(exc))
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
        started = self.clock()
        # every replica of every shard that is up and lacks it (one replaying after a restart
        # does not resend the others what they hold); each applies only on top of what we last
        # saw it hold: one that restarted since (empty, or from an older checkpoint) refuses
        # instead of taking this packet over a gap
        targets = self.shards.lacking(stream, packet_id.position)
        expect = {i: self.shards.shards[i].marks.get(stream) for i in targets}
        outcome = self.client.apply_cut_shards(packet, targets, expect) if targets else {}
        moved = {i: r for i, r in outcome.items() if isinstance(r, WatermarkMovedError)}
        if moved:
            for index, refusal in moved.items():
                log.info("shard %d holds %s/%s at %s, not %s as last seen: looking again before "
                         "%s goes there", index, *stream, refusal.held, expect[index],
                         packet_id.key)
            self.shards.must_check = True  # the next pass reads the watermarks (and rewinds)
            outcome = {i: r for i, r in outcome.items() if i not in moved}
        failed = {i: r for i, r in outcome.items() if isinstance(r, ShardError)}
        acked = {i: r for i, r in outcome.items() if not isinstance(r, ShardError)}
        rejected = [exc for exc in failed.values() if refused_for_good(exc)]
        if rejected:
            self.quarantine.put(packet_id.key, f"rejected by the servers: {rejected[0]}")
            self.metrics.quarantined.labels(self.model, "server_rejected").inc()
            self.anomalies.record(stream, QUARANTINED, packet_id.key, str(rejected[0]))
            self.ordering.reject(packet_id, now=self.clock())
            self._settle(ident)
            return
        for index, exc in failed.items():  # down (or the wrong shard): out until it answers
            self.shards.shard_down(self.shards.shards[index], exc, self.clock())
        if failed:
            self._count_error("apply")
        if not acked and (targets or not self.shards.up):
            self._fetches[ident] = _done_future(fetched)  # kept for the next pass
            if moved and not failed:  # look again, then go on at once
                self._retry_at[stream] = self.clock()
                return
            why: BaseException = next(iter(failed.values()), None) or _servers_down()
            wait = self._backoff_s(stream, why)
            log.warning("applying %s failed on every shard (retry in %.2fs): %s", packet_id.key,
                        wait, why)
            self._retry_at[stream] = self.clock() + wait
            return
        self.shards.applied(stream, packet_id.position, acked)
        done = self.clock()
        seen_ns = self._seen.pop(ident, 0)
        if not any(acked.values()):
            self.metrics.skipped.labels(self.model, "servers_held").inc()
        else:
            self.metrics.observe_applied(packet, fetched.nbytes, done - started, seen_ns,
                                         fetched.fetched_at_ns)
        self.applied += 1
        for table in packet.tables:
            self.shards.dims.setdefault(table.name, table.dim)
        self.ordering.applied(packet_id, now=done)
        self._failures.pop(stream, None)
        self._publish_position(stream)
        everywhere = self.shards.held_everywhere(stream)
        if everywhere is not None:  # Kafka commits only what every shard holds
            self._settle_upto(stream, everywhere)


_SERVERS, _DISPATCH = "servers", "dispatch"  # failure counters that are not a stream's


def _servers_down() -> ConnectionError:
    """What an unreachable or unready server set is, to the retry rule: no answer (retriable)."""
    return ConnectionError("embedding servers unreachable or not ready")


def _done_future(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
