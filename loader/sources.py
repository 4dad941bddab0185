"""Sources of candidate packets, all feeding one bounded queue of `Candidate`s.

* `StoragePoller`: lists each known stream after its position, and now and then the whole
  model (new streams), with list functions passed in, so it serves local disk, HDFS and S3.
* `DirectoryWatcher`: watchdog events on a local `incremental_dir`, plus a `StoragePoller`
  at `rescan_interval_s`, so a missed event costs at most one rescan. It listens to files
  closed after writing and renamed into place, never to creation (a file being written in
  place is not whole yet), and offers a path only if the store calls it an object, the same
  test the listing applies: symlinks (never followed), FIFOs, sockets and devices are skipped
  whichever path sees them first, logged and counted once by the store.
* `OtherModelsWatch`: now and then lists the top level of `incremental_dir` and says, once per
  model, that packets of another model are there (a loader whose `persia_inc.model` is wrong
  would otherwise apply nothing in silence).
* `KafkaSource`: a consumer group member; each announcement is validated (URI under
  `incremental_dir`, identity consistent with its key) and becomes a candidate whose
  `settle()` lets the offset be committed. Offsets are committed from the consumer thread,
  only up to the first message whose packet is not settled yet.

A source never dies on one bad item: it logs, counts (`on_reject(reason)`) and goes on.
Each runs on a `ServiceThread` (`persia-inc-loader-<name>`): `start()`, `close()`, `stop`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from persia_inc.foundation.kafka import KafkaSettings, import_kafka
from persia_inc.foundation.retry import RetryPolicy, daemon_delay_s
from persia_inc.foundation.threads import ServiceThread, thread_name
from persia_inc.loader.ordering import Stream
from persia_inc.loader.settings import LoaderSettings
from persia_inc.packet_format import (
    Announcement,
    PacketError,
    PacketId,
    parse_packet_path,
    stream_listings,
    stream_prefix,
)
from persia_inc.storage import ObjectInfo

log = logging.getLogger(__name__)

# A broker hiccup: poll again soon, then less and less often while it lasts.
KAFKA_RETRY = RetryPolicy(max_attempts=None, initial_backoff_s=0.1, max_backoff_s=5.0, deadline_s=0)
# How long one bootstrap of the consumer waits for a broker (kafka-python's default is 30 s,
# which would hold the loader's start): short, then retried by the rule above.
BOOTSTRAP_TIMEOUT_MS = 2000


@dataclass(slots=True)
class Candidate:
    """A packet some source says is stored. `settle` is called once the dispatcher is done with
    it (applied, skipped or rejected); Kafka commits its offset then. `seen_at_ns`: wall time
    the source saw it (the "seen" stage of the latency budget)."""

    packet_id: PacketId
    key: str
    announcement: Announcement | None = None
    settle: Callable[[], None] | None = None
    source: str = ""
    created_at_ns: int = 0
    seen_at_ns: int = field(default_factory=time.time_ns)


def packet_id_of_key(key: str, model: str) -> PacketId | None:
    """The packet a key names, if it is exactly `{model}/{table}/{producer}/G-S.arrow`."""
    if key.count("/") != 3 or not key.startswith(model + "/"):
        return None
    try:
        packet_id = parse_packet_path(key)
    except PacketError:
        return None
    return packet_id if packet_id.key == key else None


def offer(out: queue.Queue, candidate: Candidate, stop: threading.Event) -> bool:
    """Put `candidate` on the bounded queue, waiting while it is full; False if stopping."""
    while not stop.is_set():
        try:
            out.put(candidate, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


class StoragePoller:
    """Lists storage for new packets every `interval_s`.

    list_fn(prefix, start_after) -> [ObjectInfo] in key order; positions() -> {stream: key of
    the last applied packet or None}: each known stream is listed after its position, and every
    `discover_every`-th round the whole model is listed (streams nobody knows yet).
    """

    def __init__(self, list_fn: Callable[[str, str | None], list[ObjectInfo]], model: str,
                 out: queue.Queue, positions: Callable[[], dict[Stream, str | None]], *,
                 interval_s: float, discover_every: int = 10, name: str = "list",
                 on_error: Callable[[str], None] | None = None) -> None:
        self.list_fn = list_fn
        self.model = model
        self.out = out
        self.positions = positions
        self.interval_s = interval_s
        self.discover_every = discover_every
        self.name = name
        self.on_error = on_error or (lambda stage: None)
        self.rounds = 0
        self._thread = ServiceThread(f"loader-{name}", self._run)
        self.stop = self._thread.stop

    def start(self) -> StoragePoller:
        self._thread.start()
        return self

    def poll_once(self) -> int:
        """One round; returns how many candidates were queued."""
        found = 0
        discover = self.rounds % self.discover_every == 0
        self.rounds += 1
        positions = self.positions()
        listings: list[tuple[str, str | None]]
        if discover:
            listings = [(stream_prefix(self.model), None)]
        else:
            listings = [listing for (t, p), after in positions.items()
                        for listing in stream_listings(self.model, t, p, after)]
        known = {stream: parse_packet_path(key).position
                 for stream, key in positions.items() if key is not None}
        for prefix, after in listings:
            for info in self.list_fn(prefix, after):
                packet_id = packet_id_of_key(info.key, self.model)
                if packet_id is None:
                    continue
                position = known.get((packet_id.lane, packet_id.producer))
                if position is not None and packet_id.position <= position:
                    continue
                if not offer(self.out, Candidate(packet_id, info.key, source=self.name), self.stop):
                    return found
                found += 1
        return found

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # an outage: log, count, try again next round
                log.warning("%s: listing %s failed: %s", self.name, self.model, exc)
                self.on_error("list")
            self.stop.wait(self.interval_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop polling (bounded, safe to call twice)."""
        self._thread.close(timeout_s)

    def is_alive(self) -> bool:
        """Whether its thread runs (for the loader's health)."""
        return self._thread.is_alive()


class DirectoryWatcher:
    """watchdog on a local root (recursive), plus a rescan `StoragePoller`.

    is_object(key) -> whether the store holds an object there (the store's `exists`: a regular
    file reached without a symlink); paths it refuses are not offered."""

    def __init__(self, root: str, model: str, out: queue.Queue, rescan: StoragePoller,
                 on_reject: Callable[[str], None] | None = None,
                 is_object: Callable[[str], bool] | None = None) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        self.root = root.rstrip("/")
        self.model = model
        self.out = out
        self.rescan = rescan
        self.on_reject = on_reject or (lambda reason: None)
        self.is_object = is_object or (lambda key: True)
        self.stop = threading.Event()
        watcher = self

        class WatchEventHandler(FileSystemEventHandler):
            # not on_created: a file created in place is judged once its writer closed it
            def on_closed(self, event: FileSystemEvent) -> None:
                watcher._event(event.src_path, event.is_directory)

            def on_moved(self, event: FileSystemEvent) -> None:
                watcher._event(event.dest_path, event.is_directory)

        self._observer = Observer()
        self._observer.daemon = True
        self._observer.name = thread_name("loader-watch")  # seen by the tests' leak guard
        self._observer.schedule(WatchEventHandler(), self.root, recursive=True)

    def _event(self, path: bytes | str, is_directory: bool) -> None:
        try:
            path = path.decode() if isinstance(path, bytes) else path
            if is_directory or not path.endswith(".arrow") or not path.startswith(self.root + "/"):
                return
            key = path[len(self.root) + 1:]
            if key.rpartition("/")[2].startswith("."):
                return  # a temporary file of a put in flight
            packet_id = packet_id_of_key(key, self.model)
            if packet_id is None:
                return  # not a packet of this model (quarantine, another model, junk)
            if not self.is_object(key):
                return  # gone again, or a symlink, FIFO, ...: the store logged and counted it
            candidate = Candidate(packet_id, key, source="watch")
            try:
                self.out.put(candidate, timeout=1.0)
            except queue.Full:
                log.warning("watch: queue full, %s left to the next rescan", key)
        except Exception:  # watchdog #793: an exception here would kill the observer silently
            log.exception("watch: could not handle an event for %r", path)
            self.on_reject("watch_event")

    def start(self) -> DirectoryWatcher:
        import os
        import warnings

        # watchdog 7's inotify thread warns when nested folders appear quickly (a producer's
        # or the quarantine's makedirs); under -W error that warning would kill its thread
        warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)
        os.makedirs(self.root, exist_ok=True)
        self._observer.start()
        self.rescan.start()
        return self

    def is_alive(self) -> bool:
        """Whether the observer and the rescan both run (for the loader's health)."""
        return self._observer.is_alive() and self.rescan.is_alive()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the observer and the rescan (bounded, safe to call twice)."""
        self.stop.set()
        self.rescan.close(timeout_s)
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout_s)
            if self._observer.is_alive():
                log.warning("watch: the watchdog observer did not stop within %.1f s", timeout_s)


def find_other_models(store: Any, model: str, ignore: tuple[str, ...] = (),
                      fanout: int = 3) -> list[str]:
    """Models other than `model` with packets in `store`, sorted: the top-level folders (one
    level, `list_folders`) that hold a packet key `{name}/{table}/{producer}/G-S.arrow`, looked
    for in at most `fanout` tables x `fanout` producers each. `ignore`: top-level names that are
    not models (the quarantine prefix's first part)."""
    found = []
    for name in store.list_folders(""):
        if name == model or name in ignore:
            continue
        if _holds_packets(store, name, fanout):
            found.append(name)
    return found


def _holds_packets(store: Any, name: str, fanout: int) -> bool:
    for table in store.list_folders(f"{name}/")[:fanout]:
        for producer in store.list_folders(f"{name}/{table}/")[:fanout]:
            if any(packet_id_of_key(info.key, name) is not None
                   for info in store.list(f"{name}/{table}/{producer}/")):
                return True
    return False


class OtherModelsWatch:
    """Every `interval_s`, `find_other_models`; each model not seen before is logged once
    (WARNING, naming the models and where) and reported: on_found(all models seen so far)."""

    def __init__(self, store: Any, model: str, *, interval_s: float, ignore: tuple[str, ...] = (),
                 on_found: Callable[[list[str]], None] | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.model = model
        self.interval_s = interval_s
        self.ignore = ignore
        self.on_found = on_found or (lambda models: None)
        self.on_error = on_error or (lambda stage: None)
        self.seen: list[str] = []
        self.name = "other-models"
        self._thread = ServiceThread("loader-models", self._run)
        self.stop = self._thread.stop

    def start(self) -> OtherModelsWatch:
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        """Whether its thread runs (for the loader's health)."""
        return self._thread.is_alive()

    def check_once(self) -> list[str]:
        """One look; returns the models newly seen."""
        new = [m for m in find_other_models(self.store, self.model, self.ignore) if m not in self.seen]
        if new:
            self.seen = sorted({*self.seen, *new})
            log.warning("packets of other model(s) %s are under %s, which this loader ignores: "
                        "it applies model %r only (is persia_inc.model right?)",
                        ", ".join(repr(m) for m in new), self.store.location(""), self.model)
            self.on_found(list(self.seen))
        return new

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.check_once()
            except Exception as exc:  # an outage: log, count, look again next round
                log.warning("listing the models under %s failed: %s", self.store.location(""), exc)
                self.on_error("other_models")
            self.stop.wait(self.interval_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop looking (bounded, safe to call twice)."""
        self._thread.close(timeout_s)


class KafkaSource:
    """One member of the loaders' consumer group on the model's topic.

    key_of(uri) -> key raises ValueError for a URI outside `incremental_dir`. Offsets are
    committed (explicitly, auto-commit off) up to, not including, the first consumed message of
    each partition whose candidate has not been settled.
    """

    def __init__(self, settings: Any, topic: str, model: str, out: queue.Queue,
                 key_of: Callable[[str], str], *, on_reject: Callable[[str], None] | None = None,
                 commit_interval_s: float = 0.2) -> None:
        self.settings = settings
        self.topic = topic
        self.model = model
        self.out = out
        self.key_of = key_of
        self.on_reject = on_reject or (lambda reason: None)
        self.commit_interval_s = commit_interval_s
        self._lock = threading.Lock()
        self._outstanding: dict[Any, set[int]] = {}  # partition -> offsets not settled
        self._next: dict[Any, int] = {}  # partition -> offset after the last consumed
        self._committed: dict[Any, int] = {}
        self.assigned: set[Any] = set()
        self.error: BaseException | None = None
        self.unreachable = ""  # why the broker did not answer the last bootstrap ("" once it did)
        self._thread = ServiceThread("loader-kafka", self._run)
        self.stop = self._thread.stop
        self._ready = threading.Event()

    def start(self, timeout_s: float = 30.0) -> KafkaSource:
        self._thread.start()
        self._ready.wait(timeout_s)
        return self

    # ---------------------------------------------------------------- message handling

    def validate(self, value: bytes | None, where: str) -> Candidate | None:
        """An announcement -> a candidate, or None (logged and counted) if it is malformed or
        points anywhere but a packet key of this model under `incremental_dir`."""
        try:
            if value is None:
                raise PacketError(where, "empty message")
            announcement = Announcement.from_json(value, where=where)
            key = self.key_of(announcement.uri)
            packet_id = packet_id_of_key(key, self.model)
            if packet_id is None:
                raise PacketError(where, f"uri {announcement.uri!r} is not a packet of model "
                                  f"{self.model!r}")
            said = PacketId(announcement.model, announcement.table, announcement.producer,
                            announcement.generation, announcement.sequence)
            if said != packet_id:
                raise PacketError(where, f"announces {said} but its uri names {packet_id}")
        except ValueError as exc:  # PacketError/AnnouncementError are ValueErrors, as is key_of's
            log.warning("kafka: rejected announcement %s: %s", where, exc)
            self.on_reject("announcement")
            return None
        return Candidate(packet_id, key, announcement, source="kafka",
                         created_at_ns=announcement.created_at_ns)

    def _settler(self, partition: Any, offset: int) -> Callable[[], None]:
        def settle() -> None:
            with self._lock:
                pending = self._outstanding.get(partition)
                if pending is not None:
                    pending.discard(offset)
        return settle

    def committable(self) -> dict[Any, int]:
        """Partition -> offset safe to commit (everything before it settled)."""
        with self._lock:
            out = {}
            for partition, nxt in self._next.items():
                pending = self._outstanding.get(partition) or set()
                out[partition] = min(pending) if pending else nxt
            return out

    def _uncommitted(self) -> dict[Any, int]:
        """Partition -> offset to commit: the assigned ones whose safe offset moved."""
        return {p: o for p, o in self.committable().items()
                if p in self.assigned and self._committed.get(p) != o}

    def _commit(self, consumer: Any, kafka_structs: Any) -> None:
        offsets = self._uncommitted()
        if not offsets:
            return
        consumer.commit({p: kafka_structs.OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
        self._committed.update(offsets)

    def _run(self) -> None:
        kafka = import_kafka()
        from kafka import structs

        source = self
        s = self.settings

        class Rebalance(kafka.AsyncConsumerRebalanceListener):  # type: ignore[name-defined]
            """Runs on kafka-python's IO loop, where a blocking `consumer.commit` raises: the
            commit on revoke is awaited there instead, so a partition moves with its offsets."""

            async def on_partitions_revoked(self, revoked: Any) -> None:
                offsets = source._uncommitted()
                try:
                    if offsets and consumer is not None:
                        await consumer.commit_async(
                            {p: structs.OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
                        source._committed.update(offsets)
                except Exception as exc:
                    log.warning("kafka: commit on revoke failed (%s: %s); the partition's next "
                                "owner reads again from its last commit", type(exc).__name__, exc)
                with source._lock:
                    for partition in revoked:
                        source.assigned.discard(partition)
                        source._outstanding.pop(partition, None)
                        source._next.pop(partition, None)
                        source._committed.pop(partition, None)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                source.assigned.update(assigned)
                log.info("kafka: assigned %s", sorted(str(p) for p in assigned))

        consumer = None
        attempt = 0
        while consumer is None:
            try:
                consumer = kafka.KafkaConsumer(
                    bootstrap_servers=list(s.bootstrap_servers), group_id=s.group_id,
                    client_id=f"{s.client_id}-loader", enable_auto_commit=False,
                    auto_offset_reset="earliest", session_timeout_ms=s.session_timeout_ms,
                    heartbeat_interval_ms=s.heartbeat_interval_ms,
                    request_timeout_ms=max(s.request_timeout_ms, s.session_timeout_ms + 1000),
                    security_protocol=s.security_protocol,
                    fetch_max_wait_ms=50,  # a doorbell should ring now, not when 1 byte piles up
                    bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS,
                )
                consumer.subscribe([self.topic], listener=Rebalance())
            except kafka.errors.KafkaError as exc:  # no broker answers yet: flagged, retried
                consumer = None
                attempt += 1
                wait = daemon_delay_s(exc, attempt, KAFKA_RETRY)
                self.unreachable = f"{type(exc).__name__}: {exc}"
                log.error("kafka: no broker of %s answers (%s); the storage listing goes on, "
                          "retrying in %.2fs", ",".join(s.bootstrap_servers), exc, wait)
                self.on_reject("kafka_error")
                self._ready.set()
                if self.stop.wait(wait):
                    return
            except Exception as exc:  # a configuration the client refuses: cannot start
                log.error("kafka: cannot start the consumer: %s", exc)
                self.error = exc
                self._ready.set()
                return
        if self.unreachable:
            log.warning("kafka: a broker of %s answers again", ",".join(s.bootstrap_servers))
        self.unreachable = ""
        last_commit = 0.0
        failures = 0
        try:
            while not self.stop.is_set():
                try:
                    batches = consumer.poll(timeout_ms=100, max_records=500)
                    self._ready.set()
                    for partition, records in batches.items():
                        for record in records:
                            self._consume(partition, record)
                    now = time.monotonic()
                    if now - last_commit >= self.commit_interval_s:
                        last_commit = now
                        self._commit(consumer, structs)
                    failures = 0
                except Exception as exc:  # broker hiccup: log, count, keep polling
                    failures += 1
                    wait = daemon_delay_s(exc, failures, KAFKA_RETRY)
                    log.warning("kafka: poll/commit failed (%s: %s); polling again in %.2fs",
                                type(exc).__name__, exc, wait)
                    self.on_reject("kafka_error")
                    self.stop.wait(wait)
            try:
                self._commit(consumer, structs)
            except Exception as exc:
                log.warning("kafka: final commit failed: %s", exc)
        finally:
            self._ready.set()
            consumer.close(autocommit=False)

    def _consume(self, partition: Any, record: Any) -> None:
        where = f"{self.topic}[{partition.partition}]@{record.offset}"
        with self._lock:
            self._outstanding.setdefault(partition, set()).add(record.offset)
            self._next[partition] = record.offset + 1
        candidate = self.validate(record.value, where)
        settle = self._settler(partition, record.offset)
        if candidate is None:
            settle()
            return
        candidate.settle = settle
        if not offer(self.out, candidate, self.stop):
            return

    def close(self, timeout_s: float = 15.0) -> None:
        """Leave the group (final commit) and stop (bounded, safe to call twice)."""
        self._thread.close(timeout_s)

    def is_alive(self) -> bool:
        """Whether the consumer runs (for the loader's health): its thread is alive and it did
        not fail to start."""
        return self._thread.is_alive() and self.error is None


def pick_source(setting: str, kafka: KafkaSettings | None, store_kind: str) -> str:
    """The source `loader.source` means here: `auto` is kafka when the Kafka settings are given,
    else watch for a local store, else list. Raises ValueError for a source that cannot run."""
    if setting == "auto":
        if kafka is not None:
            return "kafka"
        return "watch" if store_kind == "local" else "list"
    if setting == "kafka" and kafka is None:
        raise ValueError("loader.source 'kafka' needs the Kafka settings (persia_inc.kafka)")
    if setting == "watch" and store_kind != "local":
        raise ValueError("loader.source 'watch' needs a local incremental_dir; use 'list'")
    return setting


def start_sources(kind: str, store: Any, model: str, out: queue.Queue,
                  positions: Callable[[], dict[Stream, str | None]], settings: LoaderSettings,
                  kafka: KafkaSettings | None, *, on_reject: Callable[[str], None],
                  on_error: Callable[[str], None],
                  on_other_models: Callable[[list[str]], None]) -> list[Any]:
    """Start the sources of `kind` (`pick_source`) feeding `out`, and the watch for other
    models' packets (a wrong persia_inc.model). Kafka comes with one storage listing round at
    start (storage stays the truth: it finds what Kafka missed)."""
    s = settings
    others = OtherModelsWatch(store, model, interval_s=s.other_models_interval_s,
                              ignore=(s.quarantine_prefix.strip("/").partition("/")[0],),
                              on_found=on_other_models, on_error=on_error)
    return [*_start_feeds(kind, store, model, out, positions, s, kafka, on_reject, on_error),
            others.start()]


def _start_feeds(kind: str, store: Any, model: str, out: queue.Queue,
                 positions: Callable[[], dict[Stream, str | None]], s: LoaderSettings,
                 kafka: KafkaSettings | None, on_reject: Callable[[str], None],
                 on_error: Callable[[str], None]) -> list[Any]:
    if kind == "watch":
        rescan = StoragePoller(store.list, model, out, positions, interval_s=s.rescan_interval_s,
                               discover_every=s.discover_every, name="rescan", on_error=on_error)
        return [DirectoryWatcher(str(store.root), model, out, rescan, on_reject=on_reject,
                                 is_object=store.exists).start()]
    if kind == "list":
        return [StoragePoller(store.list, model, out, positions, interval_s=s.list_interval_s,
                              discover_every=s.discover_every, on_error=on_error).start()]
    if kafka is None:  # pick_source refuses this; a guard for the type checker
        raise ValueError("loader.source 'kafka' needs the Kafka settings")
    return [StoragePoller(store.list, model, out, positions,
                          interval_s=max(s.rescan_interval_s, s.list_interval_s),
                          discover_every=s.discover_every, name="kafka-list",
                          on_error=on_error).start(),
            KafkaSource(kafka, kafka.topic_for(model), model, out, store.key_of,
                        on_reject=on_reject).start()]


def source_name(source: Any) -> str:
    """A source's name in health and logs: watch, kafka, or the poller's name."""
    if isinstance(source, DirectoryWatcher):
        return "watch"
    if isinstance(source, KafkaSource):
        return "kafka"
    return str(getattr(source, "name", type(source).__name__))


def source_alive(source: Any) -> bool:
    """Whether a source's threads run (a source without `is_alive` is taken as alive)."""
    alive = getattr(source, "is_alive", None)
    return True if alive is None else bool(alive())


def sources_health(sources: list[Any]) -> tuple[dict[str, bool], list[str], list[str]]:
    """Per source name, whether its threads run; the sources that cannot see packets yet (a
    Kafka consumer with no partition assigned); and problems (a Kafka broker that does not
    answer: the storage listing goes on meanwhile)."""
    alive = {source_name(source): source_alive(source) for source in sources}
    kafka = [source for source in sources if isinstance(source, KafkaSource)]
    waiting = [f"{source_name(source)}: no partition assigned" for source in kafka
               if not source.assigned]
    problems = [f"source {source_name(source)}: broker unreachable ({source.unreachable})"
                for source in kafka if source.unreachable]
    return alive, waiting, problems
