"""The background writer: encode snapshots as packets, store them, then announce them.

One thread, fed by one queue of snapshots (bounded in bytes). A snapshot leaves memory only
after the `ObjectStore.writer` block of its packet exited cleanly, i.e. the packet is durably
stored. During a storage outage the writer retries retriable errors with capped, jittered
backoff and no deadline (`foundation.retry`; back-pressure bounds memory) and the queue keeps
growing; a newer snapshot of a table still waiting in the queue is merged into the older
one (latest values win), so memory grows with distinct rows, not with flushes.

Packets are bounded (`max_packet_rows`, `max_packet_bytes`): a merge that would pass the bound
is not made (the newer snapshot is queued as its own next packet), and a snapshot over the
bound (one large flush) is cut, when the writer takes it, into packets of contiguous sign
ranges with consecutive sequences, stored one after the other before anything later of its
table. A snapshot whose store was attempted is frozen: its key may already be visible, so its
content never changes.
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
from persia_inc.packet_format import Announcement, PacketHeader, packet_key, write_packet
from persia_inc.producer.announce import Announcer
from persia_inc.producer.errors import BackpressureError, WriterFailedError
from persia_inc.producer.generation import next_generation
from persia_inc.producer.settings import (
    DEFAULT_MAX_PACKET_BYTES,
    DEFAULT_MAX_PACKET_ROWS,
    MIN_MAX_PACKET_BYTES,
)
from persia_inc.producer.snapshot import Snapshot, packet_row_limit
from persia_inc.storage import ObjectStore

log = logging.getLogger(__name__)

_JOIN_S = 10.0  # at close, how long the thread may take to leave a store call after its stop


def writer_retry_policy(max_backoff_s: float = 5.0) -> RetryPolicy:
    """The writer's retries: retriable errors forever (storage outages must never drop data;
    back-pressure bounds memory), waits doubling from 50 ms up to `max_backoff_s`."""
    return RetryPolicy(max_attempts=None, initial_backoff_s=min(0.05, max_backoff_s),
                       max_backoff_s=max_backoff_s, deadline_s=0)


@dataclass(frozen=True, slots=True)
class StoredPacket:
    """What the writer stored: the key, the header as written and the size in bytes."""

    key: str
    header: PacketHeader
    size: int


class PacketWriter:
    """Stores snapshots as packets `{model}/{table}/{producer}/{generation}-{sequence}.arrow`.

    Sequences are contiguous per table within the generation, in store order, so a loader can
    tell a gap from a quiet table. `generation` None asks storage for the next one (in the
    writer thread, retried through outages). `nice`: run the writer thread this much nicer
    than the caller (Linux). `read_guard` is held while rows still unread are read, and
    `on_read_failed` takes back the snapshot of a read that failed. `retry`: how failed puts
    are retried (default `writer_retry_policy(max_backoff_s)`). owns_store: close() closes
    the store too; else the store is left as it was (its other users keep it).
    max_packet_rows, max_packet_bytes: no packet holds more rows or bytes (`ProducerSettings`).
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
    ) -> None:
        if isinstance(max_packet_rows, bool) or max_packet_rows <= 0:
            raise ValueError(f"max_packet_rows must be a positive integer, got {max_packet_rows!r}")
        if isinstance(max_packet_bytes, bool) or max_packet_bytes < MIN_MAX_PACKET_BYTES:
            raise ValueError(f"max_packet_bytes must be at least {MIN_MAX_PACKET_BYTES}, "
                             f"got {max_packet_bytes!r}")
        self.max_packet_rows = max_packet_rows
        self.max_packet_bytes = max_packet_bytes
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
        self.stored: list[StoredPacket] = []  # the last few, for tests and tools
        self._non_finite_tables: set[str] = set()  # tables whose NaN/Inf rows were logged
        self.failure: WriterFailedError | None = None  # set once, by the writer thread
        self._next_sequence: dict[str, int] = collections.defaultdict(int)
        self._queue: collections.deque[Snapshot] = collections.deque()
        self._inflight: Snapshot | None = None
        self._pending_bytes = 0
        self._cond = threading.Condition()
        self._closing = False
        self._generation_ready = threading.Event()
        if generation is not None:
            self._generation_ready.set()
        self._thread = ServiceThread("writer", self._run, wake=self._wake)
        self._stop = self._thread.stop  # cuts the writer's waits, and its store calls' waits
        self._thread.start()

    # --- training-thread side -------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Bytes of rows snapshotted and not yet stored."""
        return self._pending_bytes

    @property
    def pending_rows(self) -> int:
        with self._cond:
            return self._pending_rows_locked()

    def _pending_rows_locked(self) -> int:
        inflight = self._inflight.row_count if self._inflight is not None else 0
        return inflight + sum(s.row_count for s in self._queue)

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
        """Queue a snapshot; merged into a queued snapshot of the same table when possible."""
        self.submit_many([snapshot])

    def submit_many(self, snapshots: list[Snapshot]) -> None:
        """Queue snapshots (in order) under one lock and one wake-up of the writer thread.
        A snapshot merges into the last one queued of its table when that one is not frozen
        and the merged rows stay within the packet bound; else it is queued as the next packet.
        After a failure they are queued all the same (close() reports them unstored), then
        WriterFailedError is raised: rows are never dropped on the way."""
        with self._cond:
            for snapshot in snapshots:
                for queued in reversed(self._queue):
                    if queued.table == snapshot.table:
                        before = queued.nbytes
                        if queued.can_merge(snapshot) and queued.merge(
                                snapshot, self.row_limit(queued)):
                            self._pending_bytes += queued.nbytes - before
                            break
                        self._append(snapshot)
                        break
                else:
                    self._append(snapshot)
            self._gauges()
            self._cond.notify_all()
        self.check_failure()

    def row_limit(self, snapshot: Snapshot) -> int:
        """The most rows a packet of `snapshot`'s width may hold (rows not read yet count
        no optimizer state: the writer splits what turns out wider)."""
        return packet_row_limit(snapshot.dim, snapshot.state_dim, self.max_packet_rows,
                                self.max_packet_bytes)

    def _append(self, snapshot: Snapshot) -> None:
        self._queue.append(snapshot)
        self._pending_bytes += snapshot.nbytes

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted snapshot is stored; False on timeout or abort."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._inflight is not None:
                if self.failure is not None or self._stop.is_set():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.5 if left is None else min(left, 0.5))
        return True

    def close(self, timeout_s: float) -> tuple[int, list[str]]:
        """Store what is queued within `timeout_s`, then stop the thread (its retries and the
        waits of its store calls end at once); safe to call twice. Closes the store only when
        `owns_store`.

        Returns (rows left unstored, their tables); (0, []) when everything is stored.
        """
        self.drain(timeout_s)
        with self._cond:
            self._closing = True
        self._thread.close(_JOIN_S)  # the queue is empty or time is up: stop retrying
        if self.owns_store:
            self.store.close()
        with self._cond:
            left = list(self._queue) + ([self._inflight] if self._inflight is not None else [])
        return sum(s.row_count for s in left), sorted({s.table for s in left})

    # --- the writer thread ----------------------------------------------------------------

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
            self.failure = WriterFailedError(message, uri=uri, cause=cause)
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            with stop_waits_on(self._stop):
                self._loop()
        except BaseException as exc:  # a bug: make it loud on the training thread
            log.exception("the packet writer failed")
            self._fail(f"the packet writer failed: {type(exc).__name__}: {exc}", "", exc)

    def _loop(self) -> None:
        lower_thread_priority(self.nice)
        self._discover_generation()
        while not self._stop.is_set() and self.failure is None:
            with self._cond:
                while not self._queue and not self._closing and not self._stop.is_set():
                    self._cond.wait()
                if not self._queue or self._stop.is_set():
                    return
                snapshot = self._queue.popleft()
                self._inflight = snapshot
            stored = self._write(snapshot)
            with self._cond:
                if stored:
                    self._inflight = None
                    self._pending_bytes -= snapshot.nbytes
                self._gauges()
                self._cond.notify_all()

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

    def _freeze(self, snapshot: Snapshot) -> PacketHeader:
        """Freeze the snapshot: put its rows in sign order and take its sequence, once. One
        over the packet bound is cut into packets of consecutive sequences (`Snapshot.split`);
        it keeps the first, the others go to the head of the queue, to be stored next."""
        if self.generation is None:
            raise RuntimeError("writing before the generation is known")
        signs = snapshot.signs  # packets are sorted by sign; a dense buffer's already are
        if signs.size > 1 and not bool(np.all(signs[1:] > signs[:-1])):
            order = np.argsort(signs)  # here, off the training thread
            snapshot.signs, snapshot.rows = signs[order], snapshot.rows[order]
            if snapshot.state is not None:
                snapshot.state = snapshot.state[order]
        if snapshot.deleted.size > 1:
            snapshot.deleted = np.sort(snapshot.deleted)
        rows = snapshot.row_count
        with self._cond:  # pending_rows reads the snapshot in flight and the queue
            rest = snapshot.split(self.row_limit(snapshot))
            headers = []
            for piece in (snapshot, *rest):
                piece.sequence = self._next_sequence[piece.table]
                self._next_sequence[piece.table] += 1
                piece.header = header = PacketHeader(
                    model=self.model, table=piece.table, producer=self.producer,
                    generation=self.generation, sequence=piece.sequence,
                    created_at_ns=piece.created_ns, flush_reason=piece.reason,
                    dtype=self.dtype, dim=piece.dim,  # type: ignore[arg-type]
                )
                headers.append(header)
            self._queue.extendleft(reversed(rest))
        if rest:
            log.info("snapshot of table %r (%d rows) over the packet bound: stored as %d packets, "
                     "sequences %d-%d", snapshot.table, rows, 1 + len(rest), snapshot.sequence,
                     rest[-1].sequence)
        return headers[0]

    def _warn_non_finite(self, snapshot: Snapshot) -> None:
        """Log, once per table, the first sign whose row holds NaN or Inf. The packet still
        ships: training is the truth, the loaders decide (they refuse such rows unless
        `persia_inc.loader.allow_non_finite`). One vectorized pass when all is finite."""
        rows = snapshot.rows
        if rows.size == 0 or bool(np.isfinite(rows).all()):
            return
        bad = ~np.isfinite(rows).all(axis=1)
        self._non_finite_tables.add(snapshot.table)
        log.warning("table %r of producer %s: %d of %d rows hold NaN or Inf, the first at sign "
                    "%d; shipped anyway, but loaders refuse such packets unless "
                    "persia_inc.loader.allow_non_finite (logged once per table)", snapshot.table,
                    self.producer, int(bad.sum()), len(rows),
                    int(snapshot.signs[int(np.argmax(bad))]))

    def _write(self, snapshot: Snapshot) -> bool:
        """Store one snapshot, retrying retriable errors until it is stored (True) or the writer
        stops (False). An error that cannot be retried fails the writer (False): the snapshot
        stays in flight, unstored, and is reported by close().
        Rows still to be read are read first, under `read_guard`; if that fails the producer
        takes the snapshot's signs back (`on_read_failed`) and this returns True.

        The packet is encoded straight into the store's sink (on local disk: reused memory,
        written by direct I/O). A retry encodes the frozen snapshot again, to the same bytes.
        """
        if snapshot.read is not None:
            try:
                with self.read_guard():  # no optimizer step runs while the rows are read
                    snapshot.read_rows()
            except Exception as exc:  # the reader's failure: the producer keeps the signs
                if self.on_read_failed is None:
                    raise
                self.on_read_failed(snapshot, exc)
                return True  # done with it: nothing to store
        header = snapshot.header if snapshot.header is not None else self._freeze(snapshot)
        if snapshot.table not in self._non_finite_tables:
            self._warn_non_finite(snapshot)
        key = packet_key(self.model, snapshot.table, self.producer, header.generation,
                         header.sequence)
        attempt, started = 0, time.monotonic()
        while True:
            try:
                with self.store.writer(key, size_hint=snapshot.encoded_size_bound) as sink:
                    written = write_packet(sink, header, snapshot.signs, snapshot.rows,
                                           deleted=snapshot.deleted, state=snapshot.state)
                    size = sink.tell()
                break
            except Exception as exc:  # an outage is retried, a refusal stops: never dropped
                uri = self.store.location(key)
                if self._stop.is_set():
                    log.error("gave up storing %s at close: %s", uri, exc)
                    return False
                attempt += 1
                wait = retry_delay_s(exc, attempt, time.monotonic() - started, self.retry)
                if wait is None:
                    self._fail(f"storing packet {uri} ({snapshot.row_count} rows of table "
                               f"{snapshot.table!r}) failed with an error that retrying cannot "
                               f"fix: {type(exc).__name__}: {exc}; the writer stopped, the rows "
                               "are kept unstored", uri, exc)
                    return False
                log.warning("storing %s failed (attempt %d): %s: %s; retrying in %.2fs",
                            uri, attempt, type(exc).__name__, exc, wait)
                if self.metrics is not None:
                    self.metrics.of(self.metrics.retries, what="store").inc()
                if self._stop.wait(wait):
                    return False
        stored = StoredPacket(key, written, size)
        self.stored.append(stored)
        del self.stored[:-1000]
        if self.metrics is not None:
            m = self.metrics
            m.of(m.packets, table=snapshot.table, reason=snapshot.reason).inc()
            m.of(m.rows, table=snapshot.table).inc(snapshot.row_count)
            m.of(m.bytes, table=snapshot.table).inc(size)
            m.of(m.dump_latency).observe(time.monotonic() - snapshot.taken_s)
        log.debug("stored %s (%d rows, %d deletes, %d bytes)", key, written.rows,
                  written.deleted_rows, size)
        self.announcer.announce(Announcement.for_packet(self.store.root_uri, written, size))
        if self.on_stored is not None:
            self.on_stored(stored)
        return True
