"""One shard's state, without any RPC: its tables and its (table, producer) watermarks.

The gRPC servicer is a thin layer over `Shard`; tests and benchmarks use `Shard` directly.
Errors: `TableNotFoundError` (a lookup of a table never created), `ForeignSignsError` (an
apply carrying signs another shard owns), `ChunkLostError` (a chunk whose earlier chunks are no
longer staged) and `ValueError` (a request that does not fit: wrong dim, mismatched lengths,
bad names); all leave the shard unchanged.

Multi-table applies (a producer's cut): `apply_tables` writes several tables' slices under one
watermark, keyed (lane, producer) where the lane is `CUT_LANE` (or, for a v1 packet read as a
cut, its one table). Every slice is checked (names, dims, shapes, ownership) before any is
written; the tables' write locks are then taken in sorted name order (after the stream's
own lock), so readers of the tables (`lookup_tables` holds their read locks together) see
all of the apply or none of it. A single-table apply is the one-slice case of the same path.

Chunked applies: a slice too big for one message arrives as chunks 0..k-1 under one apply id.
Chunks are checked and staged in memory (one staged apply per (lane, producer) stream; a
newer apply id for the stream or `stage_timeout_s` without a chunk drops it) and the last one
commits them all as one apply: watermark and rows change together or not at all. A table may
span chunks; its pieces are concatenated at the commit.

Conditional applies: an apply may carry `expect`, the position of its stream the caller
believes the shard holds; a shard holding another refuses (`PositionConflictError`), checked
under the same locks as the write. The loader relies on it to never write a packet over a gap
on a shard that restarted behind it, without reading the watermarks before every apply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np

from persia_inc.embedding_server._wire import Expect
from persia_inc.embedding_server.sharding import shard_of
from persia_inc.embedding_server.table import EmbeddingTable
from persia_inc.foundation.threads import thread_name
from persia_inc.packet_format import Watermark
from persia_inc.packet_format.cut import CUT_LANE, check_lane
from persia_inc.packet_format.header import check_name, check_position

log = logging.getLogger(__name__)

# given each table's (signs, dim, misses), the float32[signs, dim] arrays to write its rows to
Into = Callable[[Sequence[tuple[int, int, int]]], Sequence[np.ndarray]]

STAGE_TIMEOUT_S = 300.0  # a chunked apply with no new chunk for this long is dropped


class TableNotFoundError(KeyError):
    """A request named a table this shard has never seen."""

    def __init__(self, table: str) -> None:
        super().__init__(table)
        self.table = table

    def __str__(self) -> str:
        return f"unknown table {self.table!r}"


class ForeignSignsError(ValueError):
    """A write carried signs another shard owns (the client routes by another server list)."""

    def __init__(self, sign: int, owner: int, shard: int, num_shards: int, count: int) -> None:
        super().__init__(
            f"sign {sign} belongs to shard {owner} of {num_shards}, not to this shard {shard} "
            f"({count} foreign sign(s) in the request; nothing was written)")
        self.sign, self.owner, self.count = sign, owner, count


class PositionConflictError(RuntimeError):
    """A conditional apply found the shard holding another position of the stream than its
    caller expected (the shard restarted from a checkpoint, or another writer moved it):
    nothing was written; `held` is what it holds (None: nothing). The server answers it as
    ABORTED with the held position, which the client raises as `errors.WatermarkMovedError`."""

    def __init__(self, lane: str, producer: str, expected: tuple[int, int] | None,
                 held: tuple[int, int] | None) -> None:
        self.held = held

        def name(position: tuple[int, int] | None) -> str:
            return "nothing" if position is None else f"{position[0]}-{position[1]}"

        super().__init__(f"stream {lane}/{producer}: the caller expected this shard to hold "
                         f"{name(expected)}, it holds {name(held)}; nothing applied (look at the "
                         "shard's watermarks, then apply what it lacks)")


class ChunkLostError(RuntimeError):
    """A chunk arrived whose earlier chunks are not staged (the server restarted, the apply
    timed out or a newer one replaced it, or chunks came out of order): restart the apply."""


@dataclass(frozen=True, slots=True)
class TableSlice:
    """One table's share of an apply on this shard: signs uint64[n], rows float32[n, dim],
    deleted uint64[d]."""

    table: str
    dim: int
    signs: np.ndarray
    rows: np.ndarray
    deleted: np.ndarray


@dataclass(slots=True)
class _StagedTable:
    """One table's pieces of a chunked apply (views on the received messages)."""

    dim: int
    signs: list[np.ndarray] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    deleted: list[np.ndarray] = field(default_factory=list)

    def pieces(self, name: str) -> list[TableSlice]:
        return [TableSlice(name, self.dim, signs, rows, deleted)
                for signs, rows, deleted in zip(self.signs, self.rows, self.deleted, strict=True)]


@dataclass(slots=True)
class _Staged:
    """The chunks of one chunked apply received so far."""

    apply_id: str
    position: tuple[int, int]
    chunks: int
    touched: float
    received: int = 0
    tables: dict[str, _StagedTable] = field(default_factory=dict)
    nbytes: int = 0


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    """What one Apply did: `applied` False means it was at or below the watermark (skipped)."""

    applied: bool
    inserted: int
    updated: int
    deleted: int
    evicted: int
    watermark: tuple[int, int]
    staged: bool = False  # a chunk was staged; nothing is visible until the last one
    per_table: tuple[tuple[str, int, int], ...] = ()  # applied: (table, rows upserted, deletes)


@dataclass(frozen=True, slots=True)
class TableStats:
    name: str
    dim: int
    rows: int
    bytes: int
    lookups: int
    lookup_rows: int
    misses: int


class Shard:
    """Tables and watermarks of shard `shard_index` of `num_shards`. Thread-safe.

    Writes of signs the shard does not own (`shard_of(sign, num_shards) != shard_index`) are
    refused; `clock` (monotonic seconds) times staged chunks out after `stage_timeout_s`.
    """

    def __init__(self, *, capacity: int = 0, max_dim: int = 4096, shard_index: int = 0,
                 num_shards: int = 1, stage_timeout_s: float = STAGE_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic, grow_ahead: bool = True) -> None:
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} is outside [0, {num_shards})")
        self.capacity = capacity
        self.max_dim = max_dim
        self.shard_index, self.num_shards = shard_index, num_shards
        self.stage_timeout_s = stage_timeout_s
        self._clock = clock
        self._staged: dict[tuple[str, str], _Staged] = {}
        self._stage_lock = threading.Lock()
        self.foreign_lookup_signs = 0  # signs looked up here that another shard owns
        self._tables: dict[str, EmbeddingTable] = {}
        self._watermarks: dict[tuple[str, str], tuple[int, int]] = {}
        self._stream_locks: dict[tuple[str, str], threading.Lock] = {}  # check-and-set of a mark
        self._counters: dict[str, list[int]] = {}  # table -> [lookups, rows, misses]
        self._count_lock = threading.Lock()  # the counters' (one acquire per lookup call)
        self._lock = threading.Lock()  # guards the dicts, never held during a kernel
        self.started = time.monotonic()
        self.grow_ahead = grow_ahead
        self._growing: set[int] = set()  # id() of tables a grow-ahead is queued for
        self._writing = 0  # commits under way; growing ahead waits for none
        self._no_writes = threading.Condition(self._lock)
        self._grower = ThreadPoolExecutor(1, thread_name_prefix=thread_name("grow-ahead"))

    # ---------------------------------------------------------------------------- tables

    def table(self, name: str) -> EmbeddingTable:
        """The table `name`; TableNotFoundError if it was never created."""
        try:
            return self._tables[name]
        except KeyError:
            raise TableNotFoundError(name) from None

    def _table_for_write(self, name: str, dim: int, reserve: int = 0) -> EmbeddingTable:
        check_name("table", name)
        if not 0 < dim <= self.max_dim:
            raise ValueError(f"dim must be in [1, {self.max_dim}], got {dim}")
        with self._lock:
            table = self._tables.get(name)
            if table is None:
                table = EmbeddingTable(dim, capacity=self.capacity, reserve=reserve)
                self._tables[name] = table
                self._counters[name] = [0, 0, 0]
        if table.dim != dim:
            raise ValueError(f"table {name!r} has dim {table.dim}, the request has dim {dim}")
        return table

    def table_names(self) -> list[str]:
        with self._lock:
            return sorted(self._tables)

    # ---------------------------------------------------------------------------- reads

    def lookup(self, name: str, signs: np.ndarray, *, check_owner: bool = False
               ) -> tuple[np.ndarray, int]:
        """signs: uint64[n] -> (rows: float32[n, dim], misses); zeros for unknown signs.

        check_owner: when there were misses, count the signs another shard owns (a caller
        that did not say which shard it meant to reach may have routed them here) in
        `foreign_lookup_signs`, and log them.
        """
        table = self.table(name)
        rows, misses = table.lookup(signs)
        with self._count_lock:
            counters = self._counters[name]
            counters[0] += 1
            counters[1] += signs.shape[0]
            counters[2] += misses
        if check_owner and misses and self.num_shards > 1:
            self._count_foreign(name, signs)
        return rows, misses

    def lookup_tables(self, requests: Sequence[tuple[str, np.ndarray]], *,
                      check_owner: bool = False, into: Into | None = None
                      ) -> list[tuple[np.ndarray, int]]:
        """Several tables' rows at one consistent point: (table, signs: uint64[n]) pairs ->
        (rows: float32[n, dim], misses) each, in request order; zeros for unknown signs.

        The tables' read locks are held together (taken in sorted name order, as writers take
        theirs), so a multi-table apply is seen whole or not at all. TableNotFoundError names
        the first unknown table; a table named twice is a ValueError. check_owner as `lookup`.
        into: given every table's (signs, dim, misses) once the rows are found, the arrays to
        copy them into (float32[n, dim] each, e.g. views on a reply's bytes); default new ones.
        """
        names, tables = self._tables_of(requests)
        with self._read_locked(names, tables):
            found = [table._find_locked(signs) for table, (_, signs) in
                     zip(tables, requests, strict=True)]
            shapes = [(rows.shape[0], table.dim, misses)
                      for table, (rows, misses) in zip(tables, found, strict=True)]
            outs = (into(shapes) if into is not None
                    else [np.empty((n, dim), np.float32) for n, dim, _ in shapes])
            for table, (rows, _), out in zip(tables, found, outs, strict=True):
                table._copy_locked(rows, out)
        self._counted(requests, shapes, check_owner)
        return [(out, misses) for out, (_, _, misses) in zip(outs, shapes, strict=True)]

    def lookup_blocks(self, requests: Sequence[tuple[str, np.ndarray]], into: Into, *,
                      check_owner: bool = False) -> list[int]:
        """`lookup_tables` into the arrays `into` gives for every table's (signs, dim, 0) before
        any row is found (e.g. views on a reply's bytes whose misses are written afterwards),
        each table's rows found and copied in one kernel call: about 0.12 ms less than finding
        every table's first, of a 26-table, 27k-row LookupBlocks. Returns each table's misses."""
        names, tables = self._tables_of(requests)
        outs = into([(signs.shape[0], table.dim, 0) for table, (_, signs) in
                     zip(tables, requests, strict=True)])
        with self._read_locked(names, tables):
            misses = [table._lookup_locked(signs, out)[1] for table, (_, signs), out
                      in zip(tables, requests, outs, strict=True)]
        self._counted(requests, [(signs.shape[0], 0, m) for (_, signs), m
                                 in zip(requests, misses, strict=True)], check_owner)
        return misses

    def _tables_of(self, requests: Sequence[tuple[str, np.ndarray]]
                   ) -> tuple[list[str], list[EmbeddingTable]]:
        names = [name for name, _ in requests]
        if len(set(names)) != len(names):
            raise ValueError(f"a LookupTables request names each table once, got {names}")
        return names, [self.table(name) for name in names]

    @contextmanager
    def _read_locked(self, names: list[str], tables: list[EmbeddingTable]) -> Iterator[None]:
        """The tables' read locks, taken in sorted name order (as writers take theirs)."""
        with ExitStack() as stack:
            for position in sorted(range(len(names)), key=names.__getitem__):
                stack.enter_context(tables[position].lock.read())
            yield

    def _counted(self, requests: Sequence[tuple[str, np.ndarray]],
                 shapes: Sequence[tuple[int, int, int]], check_owner: bool) -> None:
        """Count a multi-table lookup's (signs, _, misses) `shapes` per table."""
        names = [name for name, _ in requests]
        with self._count_lock:
            for name, (n, _, misses) in zip(names, shapes, strict=True):
                counters = self._counters[name]
                counters[0] += 1
                counters[1] += n
                counters[2] += misses
        if check_owner and self.num_shards > 1:
            for (name, signs), (_, _, misses) in zip(requests, shapes, strict=True):
                if misses:
                    self._count_foreign(name, signs)

    def _count_foreign(self, name: str, signs: np.ndarray) -> None:
        foreign = int(np.count_nonzero(shard_of(signs, self.num_shards) != self.shard_index))
        if foreign:
            self.foreign_lookup_signs += foreign
            log.warning("lookup of table %r sent %d sign(s) that other shards own to shard "
                        "%d of %d (a client routing by another server list?)", name, foreign,
                        self.shard_index, self.num_shards)

    def check_owned(self, *arrays: np.ndarray) -> None:
        """Raise ForeignSignsError naming the first sign (of uint64[k] arrays) this shard does
        not own."""
        if self.num_shards == 1:
            return
        for signs in arrays:
            if not signs.size:
                continue
            owners = shard_of(signs, self.num_shards)
            foreign = np.flatnonzero(owners != self.shard_index)
            if foreign.size:
                first = int(foreign[0])
                raise ForeignSignsError(int(signs[first]), int(owners[first]), self.shard_index,
                                        self.num_shards, int(foreign.size))

    def watermarks(self) -> list[Watermark]:
        with self._lock:
            items = sorted(self._watermarks.items())
        return [Watermark(table=t, producer=p, generation=g, sequence=s) for (t, p), (g, s) in items]

    def staged(self) -> tuple[int, int]:
        """(chunked applies waiting for their last chunk, bytes they hold)."""
        self.expire_staged()
        with self._stage_lock:
            return len(self._staged), sum(s.nbytes for s in self._staged.values())

    def expire_staged(self) -> None:
        """Drop staged applies that received no chunk for `stage_timeout_s`."""
        if not self._staged:
            return
        now = self._clock()
        with self._stage_lock:
            old = [k for k, s in self._staged.items() if now - s.touched > self.stage_timeout_s]
            for key in old:
                stage = self._staged.pop(key)
                log.warning("dropping chunked apply %s of %s/%s at %s: no chunk for %.0f s "
                            "(%d of %d staged)", stage.apply_id, key[0], key[1], stage.position,
                            self.stage_timeout_s, stage.received, stage.chunks)

    def stats(self) -> list[TableStats]:
        with self._lock:
            tables = sorted(self._tables.items())
        return [
            TableStats(name, t.dim, len(t), t.nbytes, *self._counters[name]) for name, t in tables
        ]

    # ---------------------------------------------------------------------------- writes

    def apply(
        self, name: str, producer: str, generation: int, sequence: int, dim: int,
        signs: np.ndarray, rows: np.ndarray, deleted: np.ndarray,
    ) -> ApplyOutcome:
        """Apply one packet's slice for this shard, once.

        signs: uint64[n]; rows: float32[n, dim]; deleted: uint64[d]. A (generation, sequence)
        at or below the (table, producer) watermark is acknowledged without changes. The
        watermark check, the row writes and the watermark update happen under the table's
        write lock, so readers see the whole apply or none of it, and two deliveries of one
        packet apply it once.
        """
        check_name("table", name)
        return self.apply_tables(name, producer, generation, sequence,
                                 [TableSlice(name, dim, signs, rows, deleted)])

    def apply_tables(self, lane: str, producer: str, generation: int, sequence: int,
                     slices: Sequence[TableSlice], *, expect: Expect | None = None
                     ) -> ApplyOutcome:
        """Apply several tables' slices for this shard, once, under the (lane, producer)
        watermark; all or nothing.

        lane: `CUT_LANE`, or a table name whose own stream this is (then every slice is of that
        table). Every slice is checked before any is written (ValueError, ForeignSignsError:
        nothing changes); the writes and the watermark update happen under all the tables'
        write locks. An empty `slices` still advances the watermark. `expect`: a position
        not yet held is written only if the shard holds exactly `expect.position` of the
        stream, else PositionConflictError (checked under the same locks as the write).
        """
        self._check_slices(lane, producer, generation, sequence, slices)
        return self._commit(lane, producer, (generation, sequence), slices, expect)

    def apply_chunk(
        self, name: str, producer: str, generation: int, sequence: int, dim: int,
        signs: np.ndarray, rows: np.ndarray, deleted: np.ndarray, *, apply_id: str,
        chunk: int, chunks: int,
    ) -> ApplyOutcome:
        """Stage chunk `chunk` of `chunks` of one single-table apply (`apply_tables_chunk`
        with one slice). Arrays as in `apply` (this chunk's share)."""
        check_name("table", name)
        return self.apply_tables_chunk(name, producer, generation, sequence,
                                       [TableSlice(name, dim, signs, rows, deleted)],
                                       apply_id=apply_id, chunk=chunk, chunks=chunks)

    def apply_tables_chunk(self, lane: str, producer: str, generation: int, sequence: int,
                           slices: Sequence[TableSlice], *, apply_id: str, chunk: int,
                           chunks: int, expect: Expect | None = None) -> ApplyOutcome:
        """Stage chunk `chunk` of `chunks` of one apply; the last one commits them all.

        `slices`: this chunk's share, a table at most once (a table may continue in later
        chunks). Chunk 0 starts the apply (dropping any other staged apply of the stream); a
        later chunk must follow the one before under the same apply_id and position, or
        ChunkLostError. A position at or below the watermark is acknowledged unapplied at any
        chunk, and its staged chunks dropped. chunks <= 1: `apply_tables`. `expect` (as in
        `apply_tables`) is judged at the commit, with the last chunk's.
        """
        if chunks <= 1:
            return self.apply_tables(lane, producer, generation, sequence, slices, expect=expect)
        if not apply_id:
            raise ValueError("a chunked apply needs an apply_id")
        if not 0 <= chunk < chunks:
            raise ValueError(f"chunk {chunk} is outside [0, {chunks})")
        self._check_slices(lane, producer, generation, sequence, slices)
        self.expire_staged()
        key, position = (lane, producer), (generation, sequence)
        with self._stage_lock:
            current = self._watermarks.get(key)
            if current is not None and position <= current:
                self._staged.pop(key, None)
                return ApplyOutcome(False, 0, 0, 0, 0, current)
            stage = self._staged.get(key)
            if chunk == 0:
                if stage is not None:
                    log.info("chunked apply %s of %s/%s at %s replaces unfinished %s at %s",
                             apply_id, lane, producer, position, stage.apply_id, stage.position)
                stage = _Staged(apply_id, position, chunks, self._clock())
                self._staged[key] = stage
            elif (stage is None or stage.apply_id != apply_id or stage.position != position
                  or stage.chunks != chunks or stage.received != chunk):
                raise ChunkLostError(
                    f"chunk {chunk} of {chunks} of apply {apply_id} ({lane}/{producer} at "
                    f"{position}): its earlier chunks are not staged here (server restarted, "
                    "timed out, replaced by a newer apply, or out of order); restart the apply")
            for piece in slices:
                held = stage.tables.get(piece.table)
                if held is not None and held.dim != piece.dim:
                    raise ValueError(f"table {piece.table!r} has dim {held.dim} in an earlier "
                                     f"chunk of apply {apply_id} and {piece.dim} in chunk {chunk}")
            # the request's bytes are kept (views on them, no copy) until the commit
            for piece in slices:
                held = stage.tables.setdefault(piece.table, _StagedTable(piece.dim))
                held.signs.append(piece.signs)
                held.rows.append(piece.rows)
                held.deleted.append(piece.deleted)
                stage.nbytes += piece.signs.nbytes + piece.rows.nbytes + piece.deleted.nbytes
            stage.received += 1
            stage.touched = self._clock()
            if stage.received < chunks:
                return ApplyOutcome(False, 0, 0, 0, 0, current or (0, 0), staged=True)
            del self._staged[key]
        return self._commit(lane, producer, position,
                            [p for name, held in stage.tables.items() for p in held.pieces(name)],
                            expect)

    def _check_slices(self, lane: str, producer: str, generation: int, sequence: int,
                      slices: Sequence[TableSlice]) -> None:
        """Raise ValueError / ForeignSignsError unless every slice fits; writes nothing."""
        check_lane(lane)
        check_name("producer", producer)
        check_position(generation, sequence)
        names = [piece.table for piece in slices]
        if len(set(names)) != len(names):
            raise ValueError(f"an apply message lists each table once, got {names}")
        if lane != CUT_LANE and any(name != lane for name in names):
            raise ValueError(f"stream {lane!r} is that table's own: it cannot carry {names}")
        for piece in slices:
            check_name("table", piece.table)
            self._check_dim(piece.table, piece.dim)
            if piece.rows.shape != (piece.signs.shape[0], piece.dim):
                raise ValueError(f"table {piece.table!r}: rows must be float32"
                                 f"[{piece.signs.shape[0]}, {piece.dim}], got {piece.rows.shape}")
        self.check_owned(*[a for piece in slices for a in (piece.signs, piece.deleted)])

    def _check_dim(self, name: str, dim: int) -> None:
        if not 0 < dim <= self.max_dim:
            raise ValueError(f"table {name!r}: dim must be in [1, {self.max_dim}], got {dim}")
        existing = self._tables.get(name)
        if existing is not None and existing.dim != dim:
            raise ValueError(f"table {name!r} has dim {existing.dim}, the request has dim {dim}")

    def _commit(self, lane: str, producer: str, position: tuple[int, int],
                slices: Sequence[TableSlice], expect: Expect | None = None) -> ApplyOutcome:
        """Write checked slices and advance the (lane, producer) watermark, once. A table may
        come in several pieces (a chunked apply's, in order): they are written in order, each
        table's upserts before its deletes, as one concatenated slice would be (no copy)."""
        pieces = sorted(slices, key=lambda piece: piece.table)  # stable: chunk order kept
        for piece in pieces:  # again: a concurrent apply may have created a table since
            self._check_dim(piece.table, piece.dim)
        tables: dict[str, EmbeddingTable] = {}
        for piece in pieces:
            if piece.table not in tables:
                tables[piece.table] = self._table_for_write(piece.table, piece.dim)
        key = (lane, producer)
        with self._lock:
            stream_lock = self._stream_locks.setdefault(key, threading.Lock())
        inserted = updated = removed = evicted = 0
        per_table = []
        with self._commit_under_way(), stream_lock, ExitStack() as stack:
            for table in tables.values():  # sorted by name, as every writer and multi-table reader
                stack.enter_context(table.lock.write())
            current = self._watermarks.get(key)
            if current is not None and position <= current:
                return ApplyOutcome(False, 0, 0, 0, 0, current)
            if expect is not None and current != expect.position:
                raise PositionConflictError(lane, producer, expect.position, current)
            for name, table in tables.items():
                mine = [piece for piece in pieces if piece.table == name]
                upserts = gone = 0
                for piece in mine:
                    if piece.signs.size:
                        result = table._upsert_locked(piece.signs, piece.rows)
                        inserted += result.inserted
                        updated += result.updated
                        evicted += result.evicted
                        upserts += piece.signs.shape[0]
                for piece in mine:
                    gone += table._delete_locked(piece.deleted) if piece.deleted.size else 0
                removed += gone
                per_table.append((name, upserts, gone))
            with self._lock:
                self._watermarks[key] = position
        self._grow_ahead(tables.values())
        if self._staged:  # a chunked apply of the stream now at or below the mark never commits
            with self._stage_lock:
                stage = self._staged.get(key)
                if stage is not None and stage.position <= position:
                    del self._staged[key]
        return ApplyOutcome(True, inserted, updated, removed, evicted, position,
                            per_table=tuple(per_table))

    def _grow_ahead(self, tables: Iterable[EmbeddingTable]) -> None:
        """Grow, on a background thread, the tables that `AHEAD` more applies like this one
        would have to grow: their rehash and row copy then happen between applies instead of
        inside one (up to 200 ms for 26 tables growing together, the freshness tail in
        bench/results/loader.json)."""
        if not self.grow_ahead:
            return
        for table in tables:
            if not table.needs_room():
                continue
            with self._lock:
                if id(table) in self._growing:
                    continue
                self._growing.add(id(table))
            self._grower.submit(self._grow, table)

    @contextmanager
    def _commit_under_way(self) -> Iterator[None]:
        with self._lock:
            self._writing += 1
        try:
            yield
        finally:
            with self._lock:
                self._writing -= 1
                if not self._writing:
                    self._no_writes.notify_all()

    def _grow(self, table: EmbeddingTable) -> None:
        """Grow `table` ahead between commits: one taking every table's lock in turn would
        otherwise queue behind each growth still to come."""
        try:
            with self._lock:
                self._no_writes.wait_for(lambda: not self._writing)
            table.grow_ahead()
        except Exception:  # out of memory, say: the next apply grows (and fails) as before
            log.exception("growing a table ahead of its writes failed")
        finally:
            with self._lock:
                self._growing.discard(id(table))

    def delete(self, name: str, signs: np.ndarray) -> int:
        """Delete signs from a table (no watermark); returns the rows freed."""
        return self.table(name).delete(signs)

    def install(self, tables: dict[str, EmbeddingTable],
                watermarks: dict[tuple[str, str], tuple[int, int]]) -> None:
        """Replace every table and watermark at once (a checkpoint load built them aside)."""
        with self._lock:
            self._tables = dict(tables)
            self._counters = {name: [0, 0, 0] for name in tables}
            self._watermarks = dict(watermarks)
