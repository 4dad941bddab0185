"""The loader daemon: sources -> one bounded queue -> one dispatcher that orders per (table,
producer), fetches ahead (a small pool), verifies, applies through the embedding client to
every shard, and only then advances the watermark (and lets Kafka commit).

Storage is the source of truth: on start, and whenever a stream has a gap or a server fell
behind (restarted), the dispatcher lists storage after the stream's watermark.

Progress is kept per shard. A shard that is unreachable (or not the shard our list says) is
logged with its address at most every `unreachable_log_interval_s`, counted, shown in health
and status, and left out: the reachable shards still get their slices. The ordering's watermark
is what the reachable shards hold; what *every* shard holds (the minimum, with the last known
marks of the shards that are down) is what Kafka may commit and what status reports. A shard
that comes back holds less than the others, so the stream is rewound and replayed from storage
(the "server fell behind" path); the others skip what they already hold.

Nothing goes stale in silence: a packet that arrives below its stream's watermark after the
watermark leapt over it (a passed gap or generation jump) is an ERROR naming it, a metric and a
flag; a generation jump is held like a gap, logged as an ERROR, and passed (loudly) only after
`gap_timeout_s`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.embedding_server.errors import ShardError, ShardIdentityError, WatermarkMovedError
from persia_inc.foundation.kafka import KafkaSettings
from persia_inc.foundation.retry import RetryPolicy, daemon_delay_s
from persia_inc.foundation.threads import ServiceThread, thread_name
from persia_inc.loader.dense_sync import DenseManagement, DenseSync
from persia_inc.loader.fetch import (
    Fetched,
    NotAnObjectError,
    NotSettledError,
    Quarantine,
    fetch_packet,
)
from persia_inc.loader.metrics import LoaderMetrics, MetricsServer
from persia_inc.loader.ordering import Action, Offer, Ordering, Stream
from persia_inc.loader.settings import LoaderSettings
from persia_inc.loader.sources import (
    Candidate,
    DirectoryWatcher,
    KafkaSource,
    OtherModelsWatch,
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
    stream_listings,
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


class LoaderStartError(RuntimeError):
    """The loader could not start (a source failed to start); what it had started is closed."""


@dataclass
class ShardState:
    """What the dispatcher knows of one shard: whether it answered at the last look, its
    watermarks then (kept while it is down: the last known), and why it is down."""

    index: int
    address: str
    up: bool = False
    marks: dict[Stream, Position] = field(default_factory=dict)
    seen: bool = False  # answered (ready) at least once
    error: BaseException | None = None  # why it is down (None while up)
    failures: int = 0  # consecutive failed looks or applies
    retry_at: float = float("-inf")  # monotonic time of its next look while down
    logged_at: float = float("-inf")  # monotonic time of the last log line about it
    down_since: float | None = None


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
                 source: str | None = None, clock: Callable[[], float] = time.monotonic,
                 dense_management: DenseManagement | None = None) -> None:
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
        self.other_models: list[str] = []  # models with packets under incremental_dir, not ours
        self._hung: set[tuple[Stream, Position]] = set()  # fetches past fetch_timeout_s
        self.store.on_not_object = lambda key, kind: self._count_rejected(kind)
        self.ordering = Ordering(self.settings.gap_timeout_s,
                                 min(self.settings.list_interval_s, self.settings.rescan_interval_s))
        self.queue: queue.Queue[Candidate | None] = queue.Queue(self.settings.queue_size)
        self.stop = threading.Event()
        self.source_kind = self._pick_source(source or self.settings.source)
        self.sources: list[Any] = []
        self._settlers: dict[tuple[Stream, Position], list[Callable[[], None]]] = {}
        self._seen: dict[tuple[Stream, Position], int] = {}  # wall ns a source first saw it
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
        self._shards = [ShardState(i, address) for i, address in enumerate(client.servers)]
        # per stream, for status and health: packets skipped below the watermark (count, last
        # key), the held generation jump already logged, generation jumps passed
        self._skipped: dict[Stream, tuple[int, str]] = {}
        self._jump_logged: dict[Stream, Position] = {}
        self._jumps_passed: dict[Stream, int] = {}
        self._report: dict[str, Any] = {"model": model, "shards": [], "streams": []}
        self.applied = 0  # packets applied (every shard acked), for tests and logs
        self.last_loop = clock()
        self._thread = ServiceThread("loader-dispatcher", self._run, stop=self.stop)
        self._http: MetricsServer | None = None
        self._closed = False
        self.error: BaseException | None = None
        self.dense_sync: DenseSync | None = None
        if self.settings.dense_sync.enabled:
            if dense_management is None:
                raise ValueError("loader.dense_sync is enabled but no TorchServe management client "
                                 "was given (persia_inc.loader_from_config builds one)")
            self.dense_sync = DenseSync(self.store, model, self.settings.dense_sync, dense_management,
                                        client, quarantine=self.quarantine, metrics=self.metrics)

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
        for shard in self._shards:
            if isinstance(shard.error, ShardIdentityError):
                raise shard.error
        s = self.settings
        positions = self.positions_snapshot
        rejected = self._count_rejected
        if self.source_kind == "watch":
            rescan = StoragePoller(self.store.list, self.model, self.queue, positions,
                                   interval_s=s.rescan_interval_s, discover_every=s.discover_every,
                                   name="rescan", on_error=self._count_error)
            self.sources.append(DirectoryWatcher(str(self.store.root), self.model,  # type: ignore[attr-defined]
                                                 self.queue, rescan, on_reject=rejected,
                                                 is_object=self.store.exists).start())
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
        self._start_other_models_watch()
        for source in self.sources:
            error = getattr(source, "error", None)
            if error is not None:
                raise LoaderStartError(f"loader source {_source_name(source)} failed to start: "
                                       f"{type(error).__name__}: {error}") from error
        self._thread.start()
        if self.dense_sync is not None:
            self.dense_sync.start()
        if s.metrics_port:
            self._http = self.metrics.serve(s.metrics_port, s.metrics_addr, self.health,
                                            self.streams)
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

    def health(self) -> dict[str, Any]:
        """Healthy when the dispatcher loops, every source's threads run and every shard
        answers; otherwise `problems` names what is wrong (a dead source by name, an
        unreachable shard by index and address). Ready when healthy and every source can
        see packets: `waiting` names those that cannot yet (a Kafka consumer with no
        partition assigned: joining its group, or a spare one in a group with more loaders
        than partitions)."""
        alive = self._thread.is_alive() and self.clock() - self.last_loop < 30
        sources = {_source_name(source): _source_alive(source) for source in self.sources}
        waiting = [f"{_source_name(source)}: no partition assigned" for source in self.sources
                   if isinstance(source, KafkaSource) and not source.assigned]
        shards = self._report["shards"]
        problems = [] if alive else ["dispatcher not running"]
        problems += [f"source {name} is dead" for name, ok in sources.items() if not ok]
        problems += [f"shard {sh['shard']} ({sh['address']}) unreachable: {sh['error']}"
                     for sh in shards if not sh["up"]]
        servers = bool(shards) and all(sh["up"] for sh in shards)
        report = {"healthy": not problems and servers, "dispatcher": alive,
                  "servers": servers, "sources": sources, "waiting": waiting, "shards": shards,
                  "problems": problems, "applied": self.applied,
                  "queue": self.queue.qsize(), "source": self.source_kind,
                  "other_models": list(self.other_models)}
        if self.dense_sync is not None:
            report["dense"] = self.dense_sync.status()
            if not self.dense_sync.is_alive() and self.dense_sync.started:
                report["problems"].append("dense sync is not running")
                report["healthy"] = False
        report["ready"] = report["healthy"] and not waiting
        self.metrics.healthy.labels(self.model).set(1 if report["healthy"] else 0)
        return report

    def streams(self) -> dict[str, Any]:
        """Per stream (as of the dispatcher's last pass): `watermark` (what every shard holds,
        the last known marks counting for shards that are down), `reachable_watermark` (what
        the reachable shards hold), `pending`, and the flags `skipped_below_watermark` (count,
        `last_skipped` key), `generation_jump_held` (key of the held packet or None),
        `generation_jumps_passed`, `shards_unreachable` (indices). Also `shards`, and `dense`
        (`DenseSync.status()`: the active and pending dense versions) when the dense sync runs."""
        if self.dense_sync is not None:
            return {**self._report, "dense": self.dense_sync.status()}
        return self._report

    # ---------------------------------------------------------------------- positions

    def positions_snapshot(self) -> dict[Stream, str | None]:
        """{stream: key of its watermark packet or None}, for listers (read-only copy)."""
        return dict(self._positions)

    def _publish_position(self, stream: Stream) -> None:
        mark = self.ordering.watermark(stream)
        self._positions = {**self._positions,
                           stream: None if mark is None else packet_key(self.model, *stream, *mark)}

    def _start_other_models_watch(self) -> None:
        """Notice packets of other models under incremental_dir (a wrong persia_inc.model)."""
        def found(models: list[str]) -> None:
            self.other_models = models
            self.metrics.other_models.labels(self.model).set(len(models))

        ignore = (self.settings.quarantine_prefix.strip("/").partition("/")[0],)
        self.sources.append(OtherModelsWatch(
            self.store, self.model, interval_s=self.settings.other_models_interval_s,
            ignore=ignore, on_found=found, on_error=self._count_error).start())

    def _fetch_kwargs(self) -> dict[str, Any]:
        return {"limits": self.limits, "dims": dict(self._dims),
                "allow_non_finite": self.settings.allow_non_finite,
                "settle_s": self.settings.settle_s}

    def _count_rejected(self, reason: str) -> None:
        self.metrics.rejected.labels(self.model, reason).inc()

    def _count_error(self, stage: str) -> None:
        self.metrics.errors.labels(self.model, stage).inc()

    # ----------------------------------------------------------------- servers' state

    def refresh_servers(self, *, force: bool = False) -> bool:
        """Read the watermarks of every shard that is up (and of a shard that is down, when its
        retry is due); rewind streams where a reachable shard fell behind (it restarted empty
        or from an older checkpoint, or it was down and came back), so they replay from
        storage. Returns False when no shard is reachable."""
        now = self.clock()
        if not force and not self._must_check and now - self._last_poll < self.settings.watermark_poll_s:
            return self._servers_ok
        self._last_poll = now
        for shard in self._shards:
            if shard.up or force or now >= shard.retry_at:
                self._look_at(shard, now)
        up = [shard for shard in self._shards if shard.up]
        self._servers_ok = bool(up)
        if not up:
            self._must_check = True
            self._publish_report()
            return False
        self._must_check = False
        self._failures.pop(_SERVERS, None)
        streams = set(self.ordering.streams)
        if self.source_kind != "kafka":  # kafka: a loader follows the streams it is told about
            for shard in up:
                streams |= set(shard.marks)
        for stream in streams:
            held = lowest([shard.marks.get(stream) for shard in up])
            ours = self.ordering.watermark(stream)
            fresh = stream not in self.ordering.streams
            if fresh or held != ours:
                if not fresh and (held is None or (ours is not None and held < ours)):
                    behind = [f"{sh.index} ({sh.address})" for sh in up
                              if sh.marks.get(stream) is None
                              or (ours is not None and sh.marks[stream] < ours)]
                    log.warning("stream %s/%s: shard %s holds only up to %s, not %s (restarted, "
                                "or back after it was unreachable): replaying from storage",
                                *stream, ", ".join(behind), held, ours)
                    self.metrics.replays.labels(self.model).inc()
                    self._drop_fetches(stream)
                self.ordering.set_watermark(stream, held, now=now)
                self._publish_position(stream)
            everywhere = self._held_everywhere(stream)
            if everywhere is not None:
                self._settle_upto(stream, everywhere)  # every shard holds them
        self._publish_report()
        return True

    def _look_at(self, shard: ShardState, now: float) -> None:
        """Read one shard's status: its watermarks and tables, or why it is down."""
        try:
            self.client.verify((shard.index,))  # cheap once checked; again after an outage
            status = self.client.status(shard.index)
        except ShardError as exc:
            self._shard_down(shard, exc, now)
            return
        if not status.ready:
            self._shard_down(shard, ConnectionError("not ready (still loading its checkpoint)"), now)
            return
        shard.marks = {(w.table, w.producer): (w.generation, w.sequence) for w in status.watermarks}
        self._dims.update({t.name: t.dim for t in status.tables})
        if not shard.up and shard.down_since is not None:
            log.warning("shard %d (%s) answers again after %.1f s: catching up from storage",
                        shard.index, shard.address, now - shard.down_since)
        shard.up, shard.seen, shard.error, shard.failures = True, True, None, 0
        shard.down_since = None
        self.metrics.shard_up.labels(self.model, str(shard.index)).set(1)

    def _shard_down(self, shard: ShardState, exc: BaseException, now: float) -> None:
        """Mark `shard` down after `exc` (a failed look or apply): counted every time, logged
        with its address at most every `unreachable_log_interval_s`, looked at again after a
        backoff. A ShardIdentityError (the server list is in the wrong order) is an ERROR."""
        shard.up = False
        shard.error = exc
        shard.failures += 1
        if shard.down_since is None:
            shard.down_since = now
        shard.retry_at = now + daemon_delay_s(exc, shard.failures,
                                              loader_retry_policy(self.settings.retry_backoff_s))
        self._must_check = True
        why = "wrong_shard" if isinstance(exc, ShardIdentityError) else "unreachable"
        self.metrics.shard_unreachable.labels(self.model, str(shard.index), shard.address, why).inc()
        self.metrics.shard_up.labels(self.model, str(shard.index)).set(0)
        if now - shard.logged_at >= self.settings.unreachable_log_interval_s:
            shard.logged_at = now
            log.error("SHARD %d (%s) %s for %.1f s (%d failures): %s; the other shards still get "
                      "their slices, this one catches up from storage when it is back (logged at "
                      "most every %.0f s)", shard.index, shard.address,
                      "refuses its identity" if why == "wrong_shard" else "unreachable",
                      now - shard.down_since, shard.failures, exc,
                      self.settings.unreachable_log_interval_s)

    def _held_everywhere(self, stream: Stream) -> Position | None:
        """What every shard holds of `stream` (shards that are down count with their last
        known marks; None if some shard was never seen or holds nothing of it)."""
        if not all(shard.seen for shard in self._shards):
            return None
        return lowest([shard.marks.get(stream) for shard in self._shards])

    def _publish_report(self) -> None:
        """A fresh snapshot for `streams()`, `health()` and `/streams` (read by other threads)."""
        down = [shard.index for shard in self._shards if not shard.up]
        streams = []
        for stream in sorted(self.ordering.streams):
            everywhere = self._held_everywhere(stream)
            reachable = self.ordering.watermark(stream)
            held = self.ordering.held_jump(stream)
            skipped, last = self._skipped.get(stream, (0, ""))
            streams.append({
                "table": stream[0], "producer": stream[1],
                "watermark": None if everywhere is None else list(everywhere),
                "reachable_watermark": None if reachable is None else list(reachable),
                "pending": len(self.ordering.state(stream).pending),
                "skipped_below_watermark": skipped, "last_skipped": last,
                "generation_jump_held": None if held is None else held.key,
                "generation_jumps_passed": self._jumps_passed.get(stream, 0),
                "shards_unreachable": down,
            })
        shards = [{"shard": sh.index, "address": sh.address, "up": sh.up,
                   "error": "" if sh.error is None else str(sh.error), "failures": sh.failures}
                  for sh in self._shards]
        self._report = {"model": self.model, "shards": shards, "streams": streams}

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
        if outcome is Offer.SKIPPED:
            self._skipped_below(stream, packet_id, candidate)
            return
        if outcome is Offer.STALE:
            self.metrics.skipped.labels(self.model, "watermark").inc()
            everywhere = self._held_everywhere(stream)
            if candidate.settle and packet_id.position not in self.ordering.state(stream).bad \
                    and (everywhere is None or packet_id.position > everywhere):
                # applied where the shards answer, not yet on one that is down: commit later
                self._settlers.setdefault((stream, packet_id.position), []).append(candidate.settle)
            elif candidate.settle:
                candidate.settle()
            return
        if outcome is Offer.DUPLICATE:
            self.metrics.skipped.labels(self.model, "duplicate").inc()
        elif self._servers_ok:
            self._prefetch(stream)  # fetch while earlier packets apply, not after
        ident = (stream, packet_id.position)
        if candidate.settle:
            self._settlers.setdefault(ident, []).append(candidate.settle)
        self._seen[ident] = min(self._seen.get(ident, candidate.seen_at_ns), candidate.seen_at_ns)

    def _skipped_below(self, stream: Stream, packet_id: PacketId, candidate: Candidate) -> None:
        """A packet below the watermark inside a leap of it: it was never applied and never
        will be (applying it over newer rows would be worse). Loud: an ERROR, a metric, a flag."""
        if candidate.settle:
            candidate.settle()
        count, last = self._skipped.get(stream, (0, ""))
        if last == packet_id.key:  # the same late packet again (another event, a redelivery)
            self.metrics.skipped.labels(self.model, "watermark").inc()
            return
        self._skipped[stream] = (count + 1, packet_id.key)
        self.metrics.skipped_below.labels(self.model, stream[0]).inc()
        log.error("SKIPPED %s: it arrived (from %s) below the watermark %s of %s/%s/%s, which had "
                  "already leapt past it (a gap or generation jump passed); it was never applied "
                  "and will not be: its rows on the servers may be stale",
                  self.store.uri(packet_id.key), candidate.source or "a source",
                  self.ordering.watermark(stream), self.model, *stream)
        self._publish_report()

    def _held_jump(self, stream: Stream, head: PacketId, known: int) -> None:
        """Log (once per held packet) and count a generation jump being held."""
        if self._jump_logged.get(stream) == head.position:
            return
        self._jump_logged[stream] = head.position
        self.metrics.generation_jumps.labels(self.model, stream[0], "held").inc()
        log.error("GENERATION JUMP in %s/%s/%s: %s is generation %d, but the highest known "
                  "generation of producer %s is %d (watermark %s): held, not applied, while "
                  "storage is listed for generations %d..%d; passed after %.1f s if none shows",
                  self.model, *stream, self.store.uri(head.key), head.generation, stream[1], known,
                  self.ordering.watermark(stream), known + 1, head.generation - 1,
                  self.settings.gap_timeout_s)
        self._publish_report()

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
                if decision.jump_from is not None and decision.head is not None:
                    self._held_jump(stream, decision.head, decision.jump_from)
                self._list_stream(stream)
                did = True
                decision = self.ordering.decide(stream, now=self.clock())
            if decision.jump_from is not None and decision.head is not None:
                self._held_jump(stream, decision.head, decision.jump_from)
            if decision.action in (Action.APPLY, Action.PASS_GAP) and decision.head is not None:
                if decision.action is Action.PASS_GAP and decision.jump_from is not None:
                    log.error("GENERATION JUMP in %s/%s/%s passed: no generation between %d and "
                              "%d showed within %.1f s; applying %s over watermark %s",
                              self.model, *stream, decision.jump_from, decision.head.generation,
                              self.settings.gap_timeout_s, self.store.uri(decision.head.key),
                              decision.missing_after)
                    self.metrics.generation_jumps.labels(self.model, stream[0], "passed").inc()
                    self.metrics.gaps.labels(self.model, stream[0]).inc()
                    self._jumps_passed[stream] = self._jumps_passed.get(stream, 0) + 1
                elif decision.action is Action.PASS_GAP:
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
        self._publish_report()
        return did

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
        targets = [shard.index for shard in self._shards if shard.up]
        # each shard applies only on top of what we last saw it hold: one that restarted since
        # (empty, or from an older checkpoint) refuses instead of taking this packet over a gap
        expect = {i: self._shards[i].marks.get(stream) for i in targets}
        outcome = self.client.apply_cut_shards(packet, targets, expect)
        moved = {i: r for i, r in outcome.items() if isinstance(r, WatermarkMovedError)}
        if moved:
            for index, refusal in moved.items():
                log.info("shard %d holds %s/%s at %s, not %s as last seen: looking again before "
                         "%s goes there", index, *stream, refusal.held, expect[index],
                         packet_id.key)
            self._must_check = True  # the next pass reads the watermarks (and rewinds)
            outcome = {i: r for i, r in outcome.items() if i not in moved}
        failed = {i: r for i, r in outcome.items() if isinstance(r, ShardError)}
        acked = {i: r for i, r in outcome.items() if not isinstance(r, ShardError)}
        rejected = [exc for exc in failed.values() if _packet_rejected(exc)]
        if rejected:
            self.quarantine.put(packet_id.key, f"rejected by the servers: {rejected[0]}")
            self.metrics.quarantined.labels(self.model, "server_rejected").inc()
            self.ordering.reject(packet_id, now=self.clock())
            self._settle(ident)
            return
        for index, exc in failed.items():  # down (or the wrong shard): out until it answers
            self._shard_down(self._shards[index], exc, self.clock())
        if failed:
            self._count_error("apply")
        if not acked:
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
        for index in acked:
            marks = self._shards[index].marks
            marks[stream] = max(marks.get(stream, packet_id.position), packet_id.position)
        done = self.clock()
        h = packet.header
        m = self.metrics
        seen_ns = self._seen.pop(ident, 0)
        if not any(acked.values()):
            m.skipped.labels(self.model, "servers_held").inc()
        else:
            m.packets.labels(self.model, h.lane).inc()
            for table in packet.tables:
                m.rows.labels(self.model, table.name).inc(table.row_count)
            m.bytes.labels(self.model, h.lane).inc(fetched.nbytes)
            m.apply_latency.labels(self.model).observe(done - started)
            self._observe_stages(h.created_at_ns, seen_ns, fetched.fetched_at_ns)
        self.applied += 1
        for table in packet.tables:
            self._dims.setdefault(table.name, table.dim)
        self.ordering.applied(packet_id, now=done)
        self._failures.pop(stream, None)
        self._publish_position(stream)
        everywhere = self._held_everywhere(stream)
        if everywhere is not None:  # Kafka commits only what every shard holds
            self._settle_upto(stream, everywhere)


    def _observe_stages(self, created_ns: int, seen_ns: int, fetched_ns: int) -> None:
        """The latency budget of one applied packet: flush -> seen -> fetched -> applied."""
        applied_ns = time.time_ns()
        stages = self.metrics.stages
        for stage, at_ns in (("seen", seen_ns), ("fetched", fetched_ns),
                             ("applied", applied_ns)):
            if at_ns:
                stages.labels(self.model, stage).observe(max(0.0, (at_ns - created_ns) / 1e9))
        self.metrics.freshness.labels(self.model).observe(max(0.0, (applied_ns - created_ns) / 1e9))


_SERVERS, _DISPATCH = "servers", "dispatch"  # failure counters that are not a stream's


def _source_name(source: Any) -> str:
    """A source's name in health and logs: watch, kafka, or the poller's name."""
    if isinstance(source, DirectoryWatcher):
        return "watch"
    if isinstance(source, KafkaSource):
        return "kafka"
    return str(getattr(source, "name", type(source).__name__))


def _source_alive(source: Any) -> bool:
    """Whether a source's threads run (a source without `is_alive` is taken as alive)."""
    alive = getattr(source, "is_alive", None)
    return True if alive is None else bool(alive())


def _servers_down() -> ConnectionError:
    """What an unreachable or unready server set is, to the retry rule: no answer (retriable)."""
    return ConnectionError("embedding servers unreachable or not ready")


def _done_future(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
