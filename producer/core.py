"""`IncrementalProducer`: what a training job imports to ship its sparse updates.

The training thread only inserts signs into per-table hash buffers (vectorized) and, when a
flush starts, swaps the buffers and reads the flushed rows through the tables' readers. As in
PERSIA, the triggers are the producer's: `incremental_buffer_size` counts distinct signs over
all tables, and the interval runs from the oldest unflushed sign of any table; a flush takes
every table at once, one cut (one packet, one announcement). Encoding, storing and announcing
run on the writer's background threads (producer/writer.py).

Rows are read on the thread that calls `record`, `evict`, `poll`, `flush` or `close`: call
them between optimizer steps so a packet never holds a row the optimizer is half-way through
updating. The interval is time-driven: due while the training thread is idle (in none of
those calls nor in a marked step), the writer thread flushes (`_flush_idle`), never waiting
for a lock. In a loop that marks no steps such a read may meet an optimizer update; the sign's
next record ships the row again, whole. With `defer_reads()` (the torch hook turns it on)
the rows of `reads_into` tables are read on the writer thread, under a lock every optimizer
step holds: the training thread only swaps buffers, and the reads overlap its next step.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from persia_inc.foundation.kafka import KafkaSettings
from persia_inc.foundation.retry import RetryPolicy
from persia_inc.packet_format.header import check_name
from persia_inc.producer.announce import Announcer, DirectoryAnnouncer, KafkaAnnouncer
from persia_inc.producer.dense import DenseExporter, DenseVersion, publish_version
from persia_inc.producer.errors import ProducerClosedError, UnstoredDataError
from persia_inc.producer.metrics import ProducerMetrics
from persia_inc.producer.policy import FlushPolicy, FlushReason
from persia_inc.producer.readers import Reader, TableEntry, call_reader, read_into_later
from persia_inc.producer.row_id_signs import RowIdColumns, RowIdSignBuffer
from persia_inc.producer.settings import ProducerSettings, check_arguments
from persia_inc.producer.shutdown import ShutdownHooks
from persia_inc.producer.signset import SignBuffer
from persia_inc.producer.snapshot import RowBlock, Snapshot
from persia_inc.producer.update_policy import PrioritizedUpdates
from persia_inc.producer.writer import PacketWriter
from persia_inc.storage import ObjectStore

log = logging.getLogger(__name__)

DEFAULT_PRODUCER_ID = "producer-0"

class IncrementalProducer:
    """Buffers touched signs per table and ships their latest rows as packets to `store`.

    settings: `persia_inc.producer` (the producer id, the metrics port and every other
    setting: each is given there, once); buffer_size: distinct signs over all tables that
    trigger a flush (`incremental_buffer_size`); kafka: the broker announcements go to when
    `settings.announce` is "kafka"; retry: its `max_backoff_s` caps the waits between
    attempts; owns_store: `close()` also closes the store; generation forces a generation
    (default: 1 + the latest in storage); clock: the monotonic clock (seconds) the interval
    trigger measures ages on, `time.monotonic` unless a test drives its own (timeouts,
    retries and metrics stay on real time). Every argument is checked here, as the same value
    from YAML is at load (FieldError naming it). When `enabled` is false
    (`enable_incremental_update`) every method returns at once, nothing starts, and `store`
    may be None. `persia_inc.producer_from_config` builds one from global_config.yaml.
    """

    def __init__(
        self,
        store: ObjectStore | None,
        *,
        model: str = "default",
        settings: ProducerSettings | None = None,
        buffer_size: int = 1_000_000,
        enabled: bool = True,
        kafka: KafkaSettings | None = None,
        retry: RetryPolicy | None = None,
        owns_store: bool = False,
        generation: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        settings = settings if settings is not None else ProducerSettings()
        check_arguments(model, settings, enabled, generation)
        self.policy = FlushPolicy(buffer_size, settings.flush_interval_s, clock=clock)
        self.enabled = enabled
        self.closed = False
        self.settings = settings
        self.kafka = kafka
        self.retry = retry if retry is not None else RetryPolicy()
        self.model = model
        self.producer_id = settings.producer_id or DEFAULT_PRODUCER_ID
        self._tables: dict[str, TableEntry] = {}
        self._column_groups: dict[tuple[str, ...], RowIdColumns] = {}
        if not self.enabled:
            return
        if store is None:
            raise ValueError("an enabled producer needs a store")
        if settings.announce == "kafka" and kafka is None:
            raise ValueError("announce 'kafka' needs the Kafka settings (persia_inc.kafka)")
        self.metrics = ProducerMetrics(self.model, self.producer_id)
        self._owns_store = owns_store
        self.store = store
        self.announcer = self._make_announcer()
        self._lock = threading.RLock()  # held by the training thread's calls and every flush
        self._oldest_s: float | None = None  # when the oldest unflushed sign came (policy clock)
        self._interval_due_s = float("inf")  # when the interval trigger fires
        self._busy = 0  # >0 inside record/flush or a guarded training step
        self._deferred_reads = False
        self._step_lock = threading.Lock()  # held by the training thread inside an optimizer step
        self._step_owner: int | None = None  # thread id holding _step_lock
        self._read_error: Exception | None = None  # a deferred read's failure, raised next call
        self._returned: collections.deque[Snapshot] = collections.deque()  # failed reads' signs
        self.writer = PacketWriter(
            self.store, self.model, self.producer_id, self.announcer,
            dtype=settings.dtype, max_pending_bytes=settings.max_pending_bytes,
            backpressure=settings.backpressure, max_backoff_s=self.retry.max_backoff_s,
            generation=generation, metrics=self.metrics, nice=settings.writer_nice,
            read_guard=self._no_step_running, on_read_failed=self._take_back,
            max_packet_rows=settings.max_packet_rows, max_packet_bytes=settings.max_packet_bytes,
            max_inflight=settings.max_inflight or store.parallel_writes,
            interval_wait=self._interval_wait_s, on_interval=self._flush_idle,
        )
        self._updates = (PrioritizedUpdates(settings) if settings.update_policy == "prioritized"
                         else None)  # None: ship every touched row (policy "all")
        port = settings.metrics_port
        self.metrics_port = self.metrics.serve(port, settings.metrics_addr) if port else 0
        self._shutdown = ShutdownHooks(self.close, lambda: self._busy > 0,
                                       at_exit=settings.close_on_exit,
                                       on_sigterm=settings.close_on_sigterm)

    def _make_announcer(self) -> Announcer:
        if self.settings.announce == "kafka" and self.kafka is not None:
            return KafkaAnnouncer(self.kafka, self.kafka.topic_for(self.model), metrics=self.metrics,
                                  max_backoff_s=self.retry.max_backoff_s)
        return DirectoryAnnouncer()

    # --- tables ---------------------------------------------------------------------------

    def register_table(self, table: str, reader: Reader, *, dim: int | None = None,
                       rows: int | None = None, reads_into: bool = False) -> None:
        """Declare `table` and how to read its rows at flush time.

        reader(signs: uint64[n]) returns float32[n, dim] (or (rows, state float32[n, k]));
        dim defaults to what the reader returns for no signs. reads_into: the reader is
        reader(signs, out) and fills out: float32[n, dim], a buffer the producer reuses across
        flushes (no fresh memory to fault in on the training thread); dim is then required,
        and it returns the state or None. rows: when every sign of the
        table is a row id in [0, rows) (an embedding matrix), the buffer is one bit per row
        (`RowIdSignBuffer`), cheaper per insert than the hash map; None: any uint64 sign.
        Registering a table again replaces its reader and keeps its buffered signs.
        """
        if not self.enabled:
            return
        check_name("table", table)
        if dim is None and reads_into:
            raise ValueError(f"table {table!r}: a reads_into reader needs dim")
        if dim is None:
            probe, _ = call_reader(reader, np.empty(0, np.uint64), table, False)
            dim = int(probe.shape[1])
        if dim <= 0:
            raise ValueError(f"table {table!r}: dim must be positive, got {dim}")
        if rows is not None and rows <= 0:
            raise ValueError(f"table {table!r}: rows must be positive, got {rows}")
        with self._lock:
            if self._updates is not None:
                self._updates.register(table, dim, rows)
            entry = self._tables.get(table)
            if entry is None:
                self._tables[table] = TableEntry(table, reader, dim, rows, reads_into)
                return
            entry.reader = reader
            entry.reads_into = reads_into
            entry.dim = dim
            dense = isinstance(entry.buffer, RowIdSignBuffer)
            if dense != (rows is not None) or (dense and entry.buffer.capacity != rows):
                signs, ops = entry.buffer.swap()  # carry what is buffered into the new kind
                buffer = SignBuffer() if rows is None else RowIdSignBuffer(rows)
                try:
                    buffer.insert(signs[ops == 0], SignBuffer.UPSERT)
                    buffer.insert(signs[ops != 0], SignBuffer.DELETE)
                except ValueError:  # a buffered sign is out of the new range: keep the old
                    entry.buffer.insert(signs[ops == 0], SignBuffer.UPSERT)
                    entry.buffer.insert(signs[ops != 0], SignBuffer.DELETE)
                    raise
                entry.buffer = buffer
                self._column_groups.clear()  # they mark the buffer replaced

    @property
    def tables(self) -> list[str]:
        return list(self._tables)

    def mark_served(self, table: str, signs: np.ndarray, rows: np.ndarray) -> None:
        """Tell the prioritized update policy what serving holds of `table` (signs: uint64[n],
        rows: float32[n, dim], e.g. the checkpoint the servers loaded), so it ranks later
        changes against them; a no-op under the default policy."""
        if self.enabled and self._updates is not None:
            self._updates.mark_served(table, np.asarray(signs, np.uint64), rows)

    @property
    def pending_rows(self) -> int:
        """Rows the update policy holds back (touched, changed, not shipped yet); 0 under the
        default policy, which ships every touched row at its flush."""
        return self._updates.pending if self.enabled and self._updates is not None else 0

    def buffered(self, table: str) -> int:
        """Distinct signs of `table` waiting for the next flush."""
        return len(self._tables[table].buffer) if self.enabled else 0

    @property
    def generation(self) -> int | None:
        """This process's generation (None until storage has answered)."""
        return self.writer.generation if self.enabled else None

    def wait_generation(self, timeout_s: float | None = None) -> int | None:
        """Wait until the generation is known; returns it (None on timeout). Raises
        WriterFailedError if it cannot be found (e.g. it would overflow)."""
        if not self.enabled:
            return None
        self.writer._generation_ready.wait(timeout_s)
        self.writer.check_failure()
        return self.writer.generation

    # --- the training thread's calls ------------------------------------------------------

    def record(self, table: str, signs: np.ndarray) -> None:
        """Buffer signs: uint64[n] (int64 row ids are reinterpreted) that this step updated.

        Starts a flush of every table when they hold `incremental_buffer_size` distinct signs
        together, or when the oldest unflushed sign is `flush_interval_s` old.
        """
        if not self.enabled:
            return
        self._insert({table: signs}, SignBuffer.UPSERT)

    def record_many(self, signs_by_table: Mapping[str, np.ndarray]) -> None:
        """`record` for several tables at once ({table: uint64[n]}): one call per training step
        (the torch hook's), the triggers checked once."""
        if not self.enabled:
            return
        self._insert(signs_by_table, SignBuffer.UPSERT)

    def evict(self, table: str, signs: np.ndarray) -> None:
        """Buffer signs: uint64[n] the training side dropped; the next packet deletes them."""
        if not self.enabled:
            return
        self._insert({table: signs}, SignBuffer.DELETE)

    def record_columns(self, ids: np.ndarray, columns: Mapping[str, int]) -> None:
        """`record_many` for an id matrix: ids int64 or uint64 [batch, k] whose column
        `columns[table]` holds that table's ids for this step (a CTR model's sparse input).

        Tables registered with `rows` are marked in one pass over the matrix, row by row, which
        reads it far better than a pass per column; any other table is recorded as by `record`.
        The triggers are checked once.
        """
        if not self.enabled:
            return
        if self.closed:
            raise ProducerClosedError("the producer is closed")
        if ids.ndim != 2:
            raise ValueError(f"record_columns needs a [batch, k] id matrix, got shape {ids.shape}")
        tables = tuple(columns)
        self._busy += 1
        self._lock.acquire()  # the writer's interval flush waits for this call
        try:
            group = self._row_id_columns(tables)
            if group is None:
                self._record_sizes({t: self._tables[t].buffer.insert(ids[..., c].reshape(-1))
                                    for t, c in columns.items()})
                return
            index = group.index(tuple(columns.values()))
            self._record_sizes(dict(zip(tables, group.insert(ids, index), strict=True)))
        finally:
            self._lock.release()
            self._leave()

    def _row_id_columns(self, tables: tuple[str, ...]) -> RowIdColumns | None:
        """The `RowIdColumns` of `tables` (made once; remade when another group took its
        bitsets, and dropped when `register_table` replaces a buffer), or None when one of
        them has no row count (a hash buffer). KeyError for a table never registered."""
        cached = self._column_groups.get(tables)
        if cached is not None and cached.current():
            return cached
        self._check_tables(tables)
        buffers = [self._tables[t].buffer for t in tables]
        if not all(isinstance(b, RowIdSignBuffer) for b in buffers):
            return None
        group = RowIdColumns(buffers)  # type: ignore[arg-type]
        self._column_groups[tables] = group
        return group

    def _check_tables(self, tables: object) -> None:
        for table in tables:  # type: ignore[attr-defined]
            if table not in self._tables:
                raise KeyError(f"table {table!r} has no reader: call register_table({table!r}, ...) first")

    def _insert(self, signs_by_table: Mapping[str, np.ndarray], op: np.uint8) -> None:
        if self.closed:
            raise ProducerClosedError("the producer is closed")
        self._check_tables(signs_by_table)
        self._busy += 1
        self._lock.acquire()  # the writer's interval flush waits for this call
        try:
            tables = self._tables
            self._record_sizes({table: tables[table].buffer.insert(signs, op)
                                for table, signs in signs_by_table.items()})
        finally:
            self._lock.release()
            self._leave()

    def _record_sizes(self, sizes: Mapping[str, int]) -> None:
        """After an insert: start the interval clock if nothing was buffered, and flush every
        table when the buffers hold `incremental_buffer_size` distinct signs together or the
        interval has passed. A writer that stopped on an error it cannot retry is reported
        here, at the next record (the signs stay buffered)."""
        self.writer.check_failure()
        self._reclaim()
        now = self.policy.now()
        if self._oldest_s is None and any(sizes.values()):
            self._start_interval(now)
        reason = self._due(now)
        if reason is not None:
            self._flush(reason)
        self._raise_read_error()

    def _due(self, now: float) -> FlushReason | None:
        """Why every table must flush at `now` (policy clock), or None: the buffers' size and
        age, and rows the update policy holds back, which flush on the interval too."""
        reason = self.policy.due(self.buffered_total, self._oldest_s, now)
        held = self._updates is not None and self._updates.pending > 0
        if reason is None and held and self._oldest_s is not None:
            return "interval" if now - self._oldest_s >= self.policy.flush_interval_s else None
        return reason

    @property
    def buffered_total(self) -> int:
        """Distinct signs waiting for the next flush, over all tables."""
        return sum(len(t.buffer) for t in self._tables.values()) if self.enabled else 0

    def _start_interval(self, since: float) -> None:
        self._oldest_s = since
        self._interval_due_s = since + self.policy.flush_interval_s
        self.writer.wake()  # its wait now ends at the new deadline

    def _interval_wait_s(self) -> float | None:
        """(writer thread) Seconds (policy clock) until the interval is due; None: none runs."""
        if self._returned and not self.closed:
            return 0.0  # failed reads' signs wait outside the buffers: reclaim them now
        due = self._interval_due_s
        return None if due == float("inf") or self.closed else due - self.policy.now()

    def _flush_idle(self) -> bool:
        """(writer thread) The interval is due: flush now unless the training thread is in the
        producer or a marked step, or back-pressure holds (False: tried again shortly); never
        waits for a lock. A reader's failure is raised by the training thread's next call."""
        if not self._lock.acquire(blocking=False):
            return False
        stepped = self._step_lock.acquire(blocking=False)
        try:
            self._reclaim()
            now = self.policy.now()
            if self.closed or now < self._interval_due_s:
                return True
            if not stepped or self._busy or self.writer.pending_bytes > self.settings.max_pending_bytes:
                return False
            if self._due(now) is not None:
                try:
                    self._flush("interval", admit=False)
                    return True
                except Exception as exc:  # a reader failed: its signs stay buffered
                    log.exception("the interval flush on the writer thread failed")
                    self._read_error = exc
            self._interval_due_s = now + self.policy.flush_interval_s  # look again then
            return True
        finally:
            if stepped:
                self._step_lock.release()
            self._lock.release()

    def poll(self) -> None:
        """Start a due interval flush on this thread (the writer's does it when this is idle)."""
        if not self.enabled or self.closed:
            return
        now = self.policy.now()
        if now >= self._interval_due_s:
            self._busy += 1
            try:
                with self._lock:
                    self._reclaim()
                    if self._due(now) is not None:
                        self._flush("interval")
            finally:
                self._leave()
        self._raise_read_error()

    def flush(self, *, wait: bool = True, timeout_s: float | None = None) -> bool:
        """Flush every table now; with `wait`, return once their packets are stored (True)
        or `timeout_s` passed (False)."""
        if not self.enabled:
            return True
        if self.closed:
            raise ProducerClosedError("the producer is closed")
        self._busy += 1
        try:
            self._flush("explicit")
        finally:
            self._leave()
        stored = self.writer.drain(timeout_s) if wait else True
        self._raise_read_error()
        return stored

    def publish_dense(self, dense_module: Any, exporter: DenseExporter, *, version: int | None = None,
                      timeout_s: float | None = None) -> DenseVersion:
        """Publish the dense part as one version cut exactly against the sparse stream: flush
        and wait for the packets, export (TorchScript + `.mar`, by `exporter`), store the
        `.mar` and then its manifest (`producer.dense.publish_version`; the app's
        `persia_inc.dense.publish_mar` builds the exporter from a model spec)."""
        return publish_version(self, dense_module, exporter, version=version, timeout_s=timeout_s)

    @contextlib.contextmanager
    def training_step(self) -> Iterator[None]:
        """Mark an optimizer step: a SIGTERM arriving inside waits for its end before the
        producer reads rows, and deferred reads wait for it too (so no torn rows). The torch
        hook does this for you."""
        self._enter_step()
        try:
            yield
        finally:
            self._end_update()
            self._leave()

    def defer_reads(self, enabled: bool = True) -> None:
        """Read the rows of `reads_into` tables on the writer thread, never while an optimizer
        step runs, instead of on the training thread at flush time.

        Only for training loops that mark every step that changes those rows (`training_step`,
        or the torch hook, which turns this on): the rows are then read between two steps'
        updates, possibly a few steps after the flush, which ships them as fresh or fresher.
        A reader that fails there hands its signs back to the buffer and its error is raised
        by the next `record`, `evict`, `poll` or `flush`. Call those after a step's update,
        outside `training_step()` (a flush inside it raises RuntimeError instead of waiting
        for itself)."""
        if self.enabled:
            self._deferred_reads = bool(enabled)

    def _enter_step(self) -> None:
        self._busy += 1
        if self._step_owner is None:  # no flush reads rows while the step runs
            self._step_lock.acquire()
            self._step_owner = threading.get_ident()

    def _end_update(self) -> None:
        """The optimizer has updated the rows: deferred reads may go on."""
        if self._step_owner == threading.get_ident():
            self._step_owner = None
            self._step_lock.release()

    @contextlib.contextmanager
    def _no_step_running(self) -> Iterator[None]:
        with self._step_lock:
            yield

    def _take_back(self, snapshot: Snapshot, error: Exception) -> None:
        """(writer thread) A deferred read failed: its signs go back to the buffers, under the
        producer's lock, now if it is free, else at the training thread's next call or the
        writer's next interval look (`_reclaim`). Never waits for the lock: the training
        thread may hold it while it waits for this thread (back-pressure)."""
        log.error("reading rows of table %r failed; its %d signs stay buffered: %s: %s",
                  snapshot.table, snapshot.signs.size, type(error).__name__, error)
        self._returned.append(snapshot)
        self._read_error = error
        if self._lock.acquire(blocking=False):
            try:
                self._reclaim()
            finally:
                self._lock.release()

    def _reclaim(self) -> None:
        """(under `_lock`) Buffer again the signs of deferred reads that failed; they keep
        their age."""
        while self._returned:
            snapshot = self._returned.popleft()
            entry = self._tables[snapshot.table]
            entry.buffer.insert(snapshot.signs, SignBuffer.UPSERT)
            entry.buffer.insert(snapshot.deleted, SignBuffer.DELETE)
            oldest = snapshot.oldest_s if snapshot.oldest_s is not None else self.policy.now()
            if self._oldest_s is None or oldest < self._oldest_s:
                self._start_interval(oldest)

    def _raise_read_error(self) -> None:
        self.writer.warn_pending()
        error, self._read_error = self._read_error, None
        if error is not None:
            raise error

    def _leave(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._shutdown.leave_busy()

    # --- flushing -------------------------------------------------------------------------

    def _read_rows(self, entry: TableEntry,
                   signs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(rows, state) of `signs` in `entry`, now."""
        if not entry.reads_into:
            return call_reader(entry.reader, signs, entry.name, self.settings.ship_optimizer_state)
        rows, _, read = self._read_later(entry, signs)
        return rows, read()

    def _read_later(self, entry: TableEntry, signs: np.ndarray, block: RowBlock | None = None
                    ) -> tuple[np.ndarray, None, Callable[[], np.ndarray | None]]:
        """(rows still unread, no state yet, the read that fills them and returns the state);
        the rows are cut from `block` when it has room."""
        rows = (block.take(signs.size, entry.dim) if block is not None
                else np.empty((signs.size, entry.dim), np.float32))
        return rows, None, read_into_later(entry.reader, signs, rows, entry.name,
                                           self.settings.ship_optimizer_state)


    def _flush(self, reason: FlushReason, *, admit: bool = True) -> None:
        """Swap every table's buffer, read their rows, hand them to the writer as one cut.

        Every table is read before the writer hears of any: a writer woken by the first table
        would compete with the reads of the others for the GIL and the cores.
        """
        if self._deferred_reads and self._step_owner == threading.get_ident():
            raise RuntimeError("with deferred reads, record and flush after the optimizer step, "
                               "not inside training_step(): the writer waits for the step to end")
        with self._lock:
            self._reclaim()
            if admit:
                self.writer.admit()  # back-pressure: block or raise before taking more
            started = time.perf_counter()
            snapshots: list[Snapshot] = []
            oldest, self._oldest_s = self._oldest_s, None
            self._interval_due_s = float("inf")
            updates, now = self._updates, self.policy.now()
            block = (RowBlock(sum(len(t.buffer) * t.dim for t in self._tables.values()))
                     if self._deferred_reads else None)
            try:
                for entry in self._tables.values():
                    signs, ops = entry.buffer.swap()
                    if not signs.size and not (updates and updates.has_pending(entry.name)):
                        continue
                    if ops.any():
                        upserts, deleted = signs[ops == 0], signs[ops != 0]
                    else:
                        upserts, deleted = signs, np.empty(0, np.uint64)
                    read = select = None
                    wanted = upserts  # the rows to read: the policy adds pending ones
                    try:
                        if updates is not None:
                            plan = updates.plan(entry.name, upserts,
                                                now if oldest is None else oldest, now,
                                                final=reason == "close")
                            wanted, select = plan.signs, plan.select
                        if self._deferred_reads and entry.reads_into and wanted.size:
                            rows, state, read = self._read_later(entry, wanted, block)
                        else:
                            rows, state = self._read_rows(entry, wanted)
                    except BaseException:
                        entry.buffer.insert(upserts, SignBuffer.UPSERT)  # nothing leaves unstored
                        entry.buffer.insert(deleted, SignBuffer.DELETE)
                        self._keep_unflushed(oldest)
                        raise
                    snapshot = Snapshot(entry.name, wanted, rows, deleted, entry.dim, reason,
                                        state, read=read, oldest_s=oldest, select=select)
                    if read is None and select is not None:
                        snapshot.read_rows()  # the rows are read: select what ships now
                    if snapshot.row_count or snapshot.read is not None:
                        snapshots.append(snapshot)
            except BaseException:
                # the tables not reached keep their signs (they were not swapped)
                if self.buffered_total:
                    self._keep_unflushed(oldest)
                raise
            finally:
                if snapshots:  # the tables read before a failing reader are shipped all the same
                    self.writer.submit_many(snapshots)
                if updates is not None and self._oldest_s is None and (snapshots or updates.pending):
                    self._start_interval(now)  # held-back rows flush on the interval too
            if snapshots:
                m = self.metrics
                m.of(m.flushes, reason=reason).inc()
                m.of(m.snapshot_latency).observe(time.perf_counter() - started)

    def _keep_unflushed(self, oldest: float | None) -> None:
        """Signs stay buffered after a failed flush: their interval runs on from `oldest`."""
        if self._oldest_s is None:
            self._start_interval(oldest if oldest is not None else self.policy.now())

    # --- lifecycle ------------------------------------------------------------------------

    def close(self, timeout_s: float | None = None) -> None:
        """Flush everything, wait up to `timeout_s` (default `close_timeout_s`) for it to be
        stored and announced, and stop. Safe to call twice; a closed producer does not reopen.

        Raises UnstoredDataError if storage stayed down past the timeout (rows are named).
        """
        if not self.enabled:
            self.closed = True
            return
        with self._lock:
            if self.closed:
                return
            self.closed = True
        timeout = self.settings.close_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        read_error: BaseException | None = None
        self._end_update()  # a step that raised never reached its post-hook
        if self._updates is not None:  # the final plan must see every queued select's result
            self.writer.wait_reads(max(0.0, deadline - time.monotonic()))
        self._deferred_reads = False  # close runs between steps: read here
        try:
            self._flush("close", admit=False)
        except Exception as exc:  # still stop the threads; report below
            read_error = exc
            log.exception("reading rows at close failed")
        left, tables = self.writer.close(max(0.0, deadline - time.monotonic()))
        if self._read_error is not None and read_error is None:  # a deferred read failed
            read_error, self._read_error = self._read_error, None
        unannounced = self.announcer.close(max(1.0, deadline - time.monotonic()))
        self.metrics.close()
        if self._owns_store:
            self.store.close()
        self._shutdown.uninstall()
        self.writer.warn_pending()
        if unannounced:
            log.warning("%d stored packet(s) were not announced before close", unannounced)
        if left:
            failure = self.writer.failure  # the writer stopped on an error it cannot retry
            reason = (str(failure) if failure is not None else
                      f"storage {self.store.root_uri} did not take them within {timeout:.1f}s")
            error = UnstoredDataError(left, tables, reason)
            log.error("%s", error)
            raise error from failure
        if read_error is not None:
            raise read_error
        self.writer.check_failure()

    def __enter__(self) -> IncrementalProducer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
