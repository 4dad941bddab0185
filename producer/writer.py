"""The background writer: encode flush cuts as packets, store them, then announce them.

One queue of cuts (bounded in bytes), one writer thread that takes them in flush order,
reads rows still unread, and freezes each (sign order, sequence), and `max_inflight` store
threads that encode and store frozen cuts concurrently. Sequences follow flush order and
announcements go out in sequence order as the stores complete, so a loader never hears of
packet n+1 before packet n (listing loaders may see it first: they wait for the gap).

A cut leaves memory only after the `ObjectStore.writer` block of its packet exited cleanly,
i.e. the packet is durably stored. During a storage outage the store threads retry retriable
errors with capped, jittered backoff and no deadline (`foundation.retry`; back-pressure bounds
memory) and the queue keeps growing; a newer cut is merged into the last one still waiting
in the queue (latest values win, table by table), so memory grows with distinct rows, not
with flushes.

Packets are bounded (`max_packet_rows`, `max_packet_bytes`): a merge that would pass the bound
is not made (the newer cut is queued as its own next packet), and a cut over the bound (one
large flush) is cut, when the writer takes it, into consecutive packets (`FlushCut.split`).
A frozen cut's content never changes: its key may already be visible.
An error storage says is not retriable stops the writer: the packet stays unstored, and the
training thread gets a `WriterFailedError` naming it at its next call.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from persia_inc.foundation.retry import RetryPolicy, retry_delay_s, stop_waits_on
from persia_inc.foundation.threads import ServiceThread, lower_thread_priority
from persia_inc.packet_format import Announcement, CutHeader, cut_key, write_cut
from persia_inc.producer.announce import Announcer, DirectoryAnnouncer
from persia_inc.producer.errors import (
    BackpressureError,
    NonFiniteRowsWarning,
    WriterFailedError,
    warn_caller,
)
from persia_inc.producer.generation import next_generation
from persia_inc.producer.kernels import all_finite, strictly_ascending
from persia_inc.producer.settings import (
    DEFAULT_MAX_PACKET_BYTES,
    DEFAULT_MAX_PACKET_ROWS,
    MIN_MAX_PACKET_BYTES,
)
from persia_inc.producer.snapshot import FlushCut, Snapshot
from persia_inc.storage import ObjectStore

log = logging.getLogger(__name__)

_JOIN_S = 10.0  # at close, how long the thread may take to leave a store call after its stop
_INTERVAL_RETRY_S = 0.05  # a due interval the training thread kept busy is tried again after this


def writer_retry_policy(max_backoff_s: float = 5.0) -> RetryPolicy:
    """The writer's retries: retriable errors forever (storage outages must never drop data;
    back-pressure bounds memory), waits doubling from 50 ms up to `max_backoff_s`."""
    return RetryPolicy(max_attempts=None, initial_backoff_s=min(0.05, max_backoff_s),
                       max_backoff_s=max_backoff_s, deadline_s=0)


@dataclass(frozen=True, slots=True)
class StoredPacket:
    """What the writer stored: the key, the header as written and the size in bytes."""

    key: str
    header: CutHeader
    size: int


class PacketWriter:
    """Stores flush cuts as packets `{model}/~cuts/{producer}/{generation}-{sequence}.arrow`.

    Sequences are contiguous within the generation, in flush order, so a loader can tell a gap
    from a quiet producer. `generation` None asks storage for the next one (in the writer
    thread, retried through outages). `nice`: run the writer threads this much nicer than the
    caller (Linux). `read_guard` is held while rows still unread are read, and
    `on_read_failed` takes back the snapshot of a read that failed. `retry`: how failed puts
    are retried (default `writer_retry_policy(max_backoff_s)`). owns_store: close() closes
    the store too; else the store is left as it was (its other users keep it).
    max_packet_rows, max_packet_bytes: no packet holds more rows or bytes (`ProducerSettings`).
    max_inflight: packets being stored at once (`ProducerSettings.max_inflight`).
    interval_wait, on_interval: the time-driven flush interval. The writer thread waits at
    most `interval_wait()` seconds (None: no interval runs) and then calls `on_interval()`,
    which flushes unless the training thread is busy (False: tried again shortly); `wake()`
    makes it look again at once (the producer calls it when an interval starts).
    """

    def __init__(
        self,
        store: ObjectStore,
        model: str,
        producer: str,
        announcer: Announcer,
        *,
        dtype: str = "float32",
        max_pending_bytes: int = 1 << 30,
        backpressure: str = "block",
        max_backoff_s: float = 5.0,
        generation: int | None = None,
        metrics: Any = None,
        on_stored: Any = None,
        nice: int = 0,
        read_guard: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        on_read_failed: Callable[[Snapshot, Exception], None] | None = None,
        retry: RetryPolicy | None = None,
        owns_store: bool = False,
        max_packet_rows: int = DEFAULT_MAX_PACKET_ROWS,
        max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
        max_inflight: int = 1,
        interval_wait: Callable[[], float | None] | None = None,
        on_interval: Callable[[], bool] | None = None,
    ) -> None:
        if isinstance(max_packet_rows, bool) or max_packet_rows <= 0:
            raise ValueError(f"max_packet_rows must be a positive integer, got {max_packet_rows!r}")
        if isinstance(max_packet_bytes, bool) or max_packet_bytes < MIN_MAX_PACKET_BYTES:
            raise ValueError(f"max_packet_bytes must be at least {MIN_MAX_PACKET_BYTES}, "
                             f"got {max_packet_bytes!r}")
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
            raise ValueError(f"max_inflight must be a positive integer, got {max_inflight!r}")
        self.max_packet_rows = max_packet_rows
        self.max_packet_bytes = max_packet_bytes
        self.max_inflight = max_inflight
        self.store = store
        self.model = model
        self.producer = producer
        self.announcer = announcer
        self.dtype = dtype
        self.max_pending_bytes = max_pending_bytes
        self.backpressure = backpressure
        self.max_backoff_s = max_backoff_s
        self.retry = retry or writer_retry_policy(max_backoff_s)
        self.owns_store = owns_store
        self.metrics = metrics
        self.on_stored = on_stored
        self.nice = nice
        self.read_guard = read_guard
        self.on_read_failed = on_read_failed
        self.generation = generation
        self.interval_wait = interval_wait
        self.on_interval = on_interval
        self.stored: list[StoredPacket] = []  # the last few, for tests and tools
        self.objects_stored = 0  # packets stored since start
        self._non_finite_tables: set[str] = set()  # tables whose NaN/Inf rows were logged
        self._warnings: collections.deque[str] = collections.deque()  # for the training thread
        self.failure: WriterFailedError | None = None  # set once, by a writer thread
        self._next_sequence = 0
        self._queue: collections.deque[FlushCut] = collections.deque()  # not frozen yet
        self._preparing: FlushCut | None = None  # taken by the writer thread, not frozen yet
        self._frozen: collections.deque[FlushCut] = collections.deque()  # waiting for a store thread
        self._storing: dict[int, FlushCut] = {}  # sequence -> cut a store thread holds
        self._done: dict[int, StoredPacket] = {}  # stored, waiting for their turn to announce
        self._announce_next: int | None = None  # the sequence to announce next
        self._pending_bytes = 0
        self._cond = threading.Condition()
        self._announce_lock = threading.Lock()
        self._closing = False
        self._generation_ready = threading.Event()
        if generation is not None:
            self._generation_ready.set()
        self._thread = ServiceThread("writer", lambda: self._guarded(self._loop), wake=self._wake)
        self._stop = self._thread.stop  # cuts the writer's waits, and its store calls' waits
        self._store_threads = [
            ServiceThread(f"store-{i}", lambda: self._guarded(self._store_loop), wake=self._wake,
                          stop=self._stop)
            for i in range(max_inflight)]
        self._thread.start()
        for thread in self._store_threads:
            thread.start()

    # --- training-thread side -------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Bytes of rows snapshotted and not yet stored."""
        return self._pending_bytes

    @property
    def pending_rows(self) -> int:
        with self._cond:
            return self._pending_rows_locked()

    def _unstored(self) -> list[FlushCut]:
        """Every cut not stored yet (under `_cond`)."""
        preparing = [self._preparing] if self._preparing is not None else []
        return [*self._storing.values(), *self._frozen, *preparing, *self._queue]

    def _pending_rows_locked(self) -> int:
        return sum(cut.row_count for cut in self._unstored())

    def check_failure(self) -> None:
        """Raise WriterFailedError (naming the packet and the cause) if the writer stopped on an
        error it cannot retry."""
        failure = self.failure
        if failure is not None:  # a fresh error per call: a raised one keeps its traceback
            raise WriterFailedError(str(failure), uri=failure.uri,
                                    cause=failure.cause) from failure.cause

    def admit(self) -> None:
        """Apply back-pressure before a new snapshot: block or raise while pending data is
        over `max_pending_bytes`. Called on the training thread, before swapping buffers."""
        self.check_failure()
        if self._pending_bytes <= self.max_pending_bytes:
            return
        if self.metrics is not None:
            self.metrics.of(self.metrics.backpressure).inc()
        if self.backpressure == "raise":
            raise BackpressureError(
                f"{self._pending_bytes} bytes of snapshots wait for storage "
                f"({self.store.root_uri}), over max_pending_bytes={self.max_pending_bytes}; "
                "the touched signs stay buffered, nothing was dropped"
            )
        log.warning("back-pressure: %d bytes wait for %s (bound %d); blocking the training thread",
                    self._pending_bytes, self.store.root_uri, self.max_pending_bytes)
        with self._cond:
            while (self._pending_bytes > self.max_pending_bytes and self.failure is None
                   and not self._stop.is_set()):
                self._cond.wait(0.5)
        self.check_failure()

    def submit(self, snapshot: Snapshot) -> None:
        """Queue one table's snapshot as a cut of its own (see `submit_cut`)."""
        self.submit_cut(FlushCut([snapshot], snapshot.reason))

    def submit_many(self, snapshots: list[Snapshot]) -> None:
        """Queue the snapshots of one flush as one cut (see `submit_cut`)."""
        if snapshots:
            self.submit_cut(FlushCut(list(snapshots), snapshots[-1].reason))

    def submit_cut(self, cut: FlushCut) -> None:
        """Queue a flush's cut: merged into the last cut still queued when the merged one
        stays within the packet bound, else queued as the next packet. After a failure it is
        queued all the same (close() reports it unstored), then WriterFailedError is raised:
        rows are never dropped on the way."""
        with self._cond:
            last = self._queue[-1] if self._queue else None
            before = last.nbytes if last is not None else 0
            if last is not None and last.merge(cut, self.max_packet_rows, self.max_packet_bytes):
                self._pending_bytes += last.nbytes - before
            else:
                self._queue.append(cut)
                self._pending_bytes += cut.nbytes
            self._gauges()
            self._cond.notify_all()
        self.check_failure()

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted cut is stored and announced to the announcer; False on
        timeout or abort."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._unstored() or self._done:
                if self.failure is not None or self._stop.is_set():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.5 if left is None else min(left, 0.5))
        return True

    def wait_reads(self, timeout_s: float) -> bool:
        """Wait until every submitted cut's rows are read and its update policy's select has
        run (deferred reads, in flush order); False on timeout or abort. A final flush plans
        after this: a select still queued could otherwise hold rows back after it."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (any(cut.pending_read for cut in self._queue)
                   or (self._preparing is not None and self._preparing.pending_read)):
                left = deadline - time.monotonic()
                if self.failure is not None or self._stop.is_set() or left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, timeout_s: float) -> tuple[int, list[str]]:
        """Store what is queued within `timeout_s`, then stop the threads (their retries and
        the waits of their store calls end at once); safe to call twice. Closes the store only
        when `owns_store`.

        Returns (rows left unstored, their tables); (0, []) when everything is stored.
        """
        self.drain(timeout_s)
        with self._cond:
            self._closing = True
        self._thread.close(_JOIN_S)  # the queue is empty or time is up: stop retrying
        for thread in self._store_threads:
            thread.close(_JOIN_S)
        if self.owns_store:
            self.store.close()
        with self._cond:
            left = self._unstored()
        return (sum(cut.row_count for cut in left),
                sorted({table for cut in left for table in cut.tables}))

    # --- the writer thread: take cuts in flush order, read, freeze ----------------------------

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.of(self.metrics.pending_bytes).set(self._pending_bytes)
            self.metrics.of(self.metrics.pending_rows).set(self._pending_rows_locked())

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _fail(self, message: str, uri: str, cause: BaseException) -> None:
        """Stop for good: the training thread raises WriterFailedError at its next call."""
        log.error("%s", message)
        with self._cond:
            if self.failure is None:
                self.failure = WriterFailedError(message, uri=uri, cause=cause)
            self._cond.notify_all()

    def _guarded(self, loop: Callable[[], None]) -> None:
        """Run a writer thread's loop; a bug escaping it fails the writer, loudly, on the
        training thread."""
        try:
            with stop_waits_on(self._stop):
                loop()
        except BaseException as exc:
            log.exception("the packet writer failed")
            self._fail(f"the packet writer failed: {type(exc).__name__}: {exc}", "", exc)

    def _loop(self) -> None:
        lower_thread_priority(self.nice)
        self._discover_generation()
        retry_at = 0.0  # monotonic: when an interval flush refused as busy is tried again
        while not self._stop.is_set() and self.failure is None:
            with self._cond:
                cut = None
                # freeze ahead only as far as the store threads can take
                while (not self._stop.is_set() and self.failure is None
                       and (not self._queue or len(self._frozen) >= self.max_inflight)
                       and not (self._closing and not self._queue)):
                    wait = self._interval_wait_s(retry_at)
                    if wait is not None and wait <= 0:
                        break  # the interval is due: flush, outside the lock
                    self._cond.wait(wait)
                else:
                    if not self._queue or self._stop.is_set() or self.failure is not None:
                        return
                    cut = self._queue.popleft()
                    self._preparing = cut
            if cut is None:
                if self.on_interval is not None and not self.on_interval():
                    retry_at = time.monotonic() + _INTERVAL_RETRY_S
                continue
            if not self._read(cut):
                with self._cond:
                    self._preparing = None
                    self._pending_bytes -= cut.nbytes
                    self._gauges()
                    self._cond.notify_all()
                continue
            self._freeze(cut)

    def _interval_wait_s(self, retry_at: float) -> float | None:
        """Seconds until the interval flush is due (<= 0: now), at the earliest at `retry_at`
        (monotonic); None when no interval runs."""
        wait = self.interval_wait() if self.interval_wait is not None else None
        return None if wait is None else max(wait, retry_at - time.monotonic())

    def wake(self) -> None:
        """Look at the interval again now (it started, or an injected clock moved)."""
        self._wake()

    def _read(self, cut: FlushCut) -> bool:
        """Read the rows of `cut` still to be read, under `read_guard`. A part whose read fails
        goes back to the producer (`on_read_failed`) and leaves the cut; False when no part
        is left to store."""
        if not cut.pending_read:
            return True
        kept = []
        with self._cond:
            before = cut.nbytes
        for part in cut.parts:
            try:
                if part.read is not None or part.select is not None:
                    with self.read_guard():  # no optimizer step runs while the rows are read
                        part.read_rows()
                    # checked now, while they are in cache (`_freeze` then skips them)
                    part.finite = all_finite(part.rows)
            except Exception as exc:  # the reader's failure: the producer keeps the signs
                if self.on_read_failed is None:
                    raise
                self.on_read_failed(part, exc)
                continue
            if part.row_count:  # an update policy may have held every row of it back
                kept.append(part)
        with self._cond:
            cut.parts = kept
            self._pending_bytes += cut.nbytes - before
            self._cond.notify_all()  # wait_reads
        return bool(kept)

    def _discover_generation(self) -> None:
        attempt, started = 0, time.monotonic()
        while self.generation is None and not self._stop.is_set():
            try:
                self.generation = next_generation(self.store, self.model, self.producer)
                log.info("producer %s of model %s takes generation %d",
                         self.producer, self.model, self.generation)
            except Exception as exc:  # storage down: keep trying, training keeps buffering
                attempt += 1
                wait = retry_delay_s(exc, attempt, time.monotonic() - started, self.retry)
                if wait is None:
                    self._fail(f"finding the generation of producer {self.producer} in "
                               f"{self.store.root_uri} failed and cannot be retried: "
                               f"{type(exc).__name__}: {exc}", self.store.root_uri, exc)
                    self._generation_ready.set()  # waiters see the failure, not a timeout
                    return
                log.warning("finding the generation of %s in %s failed (%s); retrying in %.2fs",
                            self.producer, self.store.root_uri, exc, wait)
                if self.metrics is not None:
                    self.metrics.of(self.metrics.retries, what="generation").inc()
                self._stop.wait(wait)
        self._generation_ready.set()

    def _freeze(self, cut: FlushCut) -> None:
        """Freeze the cut: put each table's rows in sign order and take sequences, once. A cut
        over the packet bound goes out as consecutive packets (`FlushCut.split`). The frozen
        packets go to the store threads, in sequence order."""
        if self.generation is None:
            raise RuntimeError("writing before the generation is known")
        for part in cut.parts:
            _sort_by_sign(part)
            if not part.finite and part.table not in self._non_finite_tables:
                self._warn_non_finite(part)
        rows = cut.row_count
        with self._cond:  # pending_rows reads the cuts in flight and the queue
            pieces = [cut, *cut.split(self.max_packet_rows, self.max_packet_bytes)]
            pending = _pending_fields(pieces)
            for piece in pieces:
                piece.sequence = self._next_sequence
                if self._announce_next is None:
                    self._announce_next = piece.sequence
                self._next_sequence += 1
                piece.header = CutHeader(
                    model=self.model, producer=self.producer, generation=self.generation,
                    sequence=piece.sequence, created_at_ns=piece.created_ns,
                    flush_reason=piece.reason, dtype=self.dtype,  # type: ignore[arg-type]
                    pending_rows=pending[0], max_staleness_ms=pending[1],
                )
            self._preparing = None
            self._frozen.extend(pieces)
            self._cond.notify_all()
        if len(pieces) > 1:
            log.info("cut of %d tables (%d rows) over the packet bound: stored as %d packets, "
                     "sequences %d-%d", len({t for p in pieces for t in p.tables}), rows,
                     len(pieces), pieces[0].sequence, pieces[-1].sequence)

    def _warn_non_finite(self, snapshot: Snapshot) -> None:
        """Log, once per table, the first sign whose row holds NaN or Inf. The packet still
        ships: training is the truth, the loaders decide (they refuse such rows unless
        `persia_inc.loader.allow_non_finite`). One compiled pass when all is finite."""
        rows = snapshot.rows
        if rows.size == 0 or all_finite(rows):
            return
        bad = ~np.isfinite(rows).all(axis=1)
        self._non_finite_tables.add(snapshot.table)
        message = (f"table {snapshot.table!r} of producer {self.producer}: {int(bad.sum())} of "
                   f"{len(rows)} rows hold NaN or Inf, the first at sign "
                   f"{int(snapshot.signs[int(np.argmax(bad))])}; shipped anyway, but loaders "
                   "refuse such packets unless persia_inc.loader.allow_non_finite (warned once "
                   "per table)")
        log.warning("%s", message)
        self._warnings.append(message)  # warned by the training thread's next call

    def warn_pending(self) -> None:
        """On the training thread: `NonFiniteRowsWarning` for each table newly found with
        NaN or Inf rows (a warning raised on the writer thread would reach no one)."""
        while self._warnings:
            warn_caller(NonFiniteRowsWarning(self._warnings.popleft()))

    # --- the store threads: encode, store, announce in sequence order ----------------------

    def _store_loop(self) -> None:
        lower_thread_priority(self.nice)
        self.store.warm_up()  # the first packet then costs what the others do
        while True:
            with self._cond:
                while (not self._frozen and not self._stop.is_set() and self.failure is None
                       and not (self._closing and not self._queue and self._preparing is None)):
                    self._cond.wait()
                if not self._frozen or self._stop.is_set() or self.failure is not None:
                    return
                cut = self._frozen.popleft()
                assert cut.sequence is not None
                self._storing[cut.sequence] = cut
                self._cond.notify_all()  # the writer thread may freeze the next one
            stored = self._store(cut)
            with self._cond:
                if stored is None:
                    return  # stopped or failed: the cut stays in `_storing`, reported unstored
                del self._storing[cut.sequence]
                self._pending_bytes -= cut.nbytes
                self._done[cut.sequence] = stored
                self._gauges()
            self._announce_ready()
            with self._cond:
                self._cond.notify_all()

    def _store(self, cut: FlushCut) -> StoredPacket | None:
        """Store one frozen cut, retrying retriable errors until it is stored, or None when the
        writer stops or fails (an error that cannot be retried fails it: the cut stays in
        flight, unstored, and is reported by close()). The packet is encoded straight into the
        store's sink; a retry encodes the frozen cut again, to the same bytes."""
        header = cut.header
        assert header is not None
        key = cut_key(self.model, self.producer, header.generation, header.sequence)
        parts = [part.table_rows() for part in cut.parts]
        attempt, started = 0, time.monotonic()
        while True:
            try:
                with self.store.writer(key, size_hint=cut.encoded_size_bound) as sink:
                    written = write_cut(sink, header, parts)
                    size = sink.tell()
                break
            except Exception as exc:  # an outage is retried, a refusal stops: never dropped
                uri = self.store.location(key)
                if self._stop.is_set():
                    log.error("gave up storing %s at close: %s", uri, exc)
                    return None
                attempt += 1
                wait = retry_delay_s(exc, attempt, time.monotonic() - started, self.retry)
                if wait is None:
                    self._fail(f"storing packet {uri} ({cut.row_count} rows of tables "
                               f"{', '.join(cut.tables)}) failed with an error that retrying "
                               f"cannot fix: {type(exc).__name__}: {exc}; the writer stopped, "
                               "the rows are kept unstored", uri, exc)
                    return None
                log.warning("storing %s failed (attempt %d): %s: %s; retrying in %.2fs",
                            uri, attempt, type(exc).__name__, exc, wait)
                if self.metrics is not None:
                    self.metrics.of(self.metrics.retries, what="store").inc()
                if self._stop.wait(wait):
                    return None
        if self.metrics is not None:
            m = self.metrics
            for part in cut.parts:
                m.of(m.rows, table=part.table).inc(part.row_count)
            m.of(m.packets, reason=cut.reason).inc()
            m.of(m.bytes).inc(size)
            m.of(m.dump_latency).observe(time.monotonic() - cut.taken_s)
            m.of(m.stage_latency, stage="stored").observe(
                max(0.0, (time.time_ns() - header.created_at_ns) / 1e9))
        log.debug("stored %s (%d rows, %d deletes, %d bytes)", key, written.rows,
                  written.deleted_rows, size)
        return StoredPacket(key, written, size)

    def _announce_ready(self) -> None:
        """Announce the stored packets whose turn has come, in sequence order. One thread at a
        time, so two store threads never announce out of order."""
        with self._announce_lock:
            while True:
                with self._cond:
                    stored = self._done.pop(self._announce_next, None)  # type: ignore[arg-type]
                    if stored is None:
                        return
                    self._announce_next = stored.header.sequence + 1
                self.stored.append(stored)
                del self.stored[:-1000]
                self.objects_stored += 1
                self.announcer.announce(
                    Announcement.for_cut(self.store.root_uri, stored.header, stored.size))
                if self.metrics is not None and isinstance(self.announcer, DirectoryAnnouncer):
                    self.metrics.of(self.metrics.stage_latency, stage="announced").observe(
                        max(0.0, (time.time_ns() - stored.header.created_at_ns) / 1e9))
                if self.on_stored is not None:
                    self.on_stored(stored)


def _pending_fields(pieces: list[FlushCut]) -> tuple[int, int]:
    """(rows held back after a cut, the staleness bound in ms) under the prioritized update
    policy, for its header; (0, 0), not written, under the default policy."""
    marks = [part.pending for piece in pieces for part in piece.parts if part.pending]
    return marks[-1] if marks else (0, 0)


def _sort_by_sign(part: Snapshot) -> None:
    """Put a snapshot's rows in sign order (packets are sorted by sign; a dense buffer's
    already are), here, off the training thread."""
    signs = part.signs
    if signs.size > 1 and not strictly_ascending(signs):
        order = np.argsort(signs)
        part.signs, part.rows = signs[order], part.rows[order]
        if part.state is not None:
            part.state = part.state[order]
    if part.deleted.size > 1:
        part.deleted = np.sort(part.deleted)
