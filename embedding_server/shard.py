"""One shard's state, without any RPC: its tables and its (table, producer) watermarks.

The gRPC servicer is a thin layer over `Shard`; tests and benchmarks use `Shard` directly.
Errors: `TableNotFoundError` (a lookup of a table never created), `ForeignSignsError` (an
apply carrying signs another shard owns), `ChunkLostError` (a chunk whose earlier chunks are no
longer staged) and `ValueError` (a request that does not fit: wrong dim, mismatched lengths,
bad names); all leave the shard unchanged.

Chunked applies: a slice too big for one message arrives as chunks 0..k-1 under one apply id.
Chunks are checked and staged in memory (one staged apply per (table, producer) stream; a
newer apply id for the stream or `stage_timeout_s` without a chunk drops it) and the last one
commits them all as one apply: watermark and rows change together or not at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from persia_inc.embedding_server.sharding import shard_of
from persia_inc.embedding_server.table import EmbeddingTable
from persia_inc.packet_format import Watermark
from persia_inc.packet_format.header import check_name, check_position

log = logging.getLogger(__name__)

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


class ChunkLostError(RuntimeError):
    """A chunk arrived whose earlier chunks are not staged (the server restarted, the apply
    timed out or a newer one replaced it, or chunks came out of order): restart the apply."""


@dataclass(slots=True)
class _Staged:
    """The chunks of one chunked apply received so far."""

    apply_id: str
    position: tuple[int, int]
    dim: int
    chunks: int
    touched: float
    signs: list[np.ndarray] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    deleted: list[np.ndarray] = field(default_factory=list)
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
                 clock: Callable[[], float] = time.monotonic) -> None:
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
        self._counters: dict[str, list[int]] = {}  # table -> [lookups, rows, misses]
        self._lock = threading.Lock()  # guards the dicts, never held during a kernel
        self.started = time.monotonic()

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
        counters = self._counters[name]
        counters[0] += 1  # approximate under races: these feed Status only
        counters[1] += signs.shape[0]
        counters[2] += misses
        if check_owner and misses and self.num_shards > 1:
            foreign = int(np.count_nonzero(shard_of(signs, self.num_shards) != self.shard_index))
            if foreign:
                self.foreign_lookup_signs += foreign
                log.warning("lookup of table %r sent %d sign(s) that other shards own to shard "
                            "%d of %d (a client routing by another server list?)", name, foreign,
                            self.shard_index, self.num_shards)
        return rows, misses

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
                            self.stage_timeout_s, len(stage.signs), stage.chunks)

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
        check_name("producer", producer)
        check_position(generation, sequence)
        if rows.shape != (signs.shape[0], dim):
            raise ValueError(f"rows must be float32[{signs.shape[0]}, {dim}], got {rows.shape}")
        self.check_owned(signs, deleted)
        return self._commit(name, producer, (generation, sequence), dim, signs, rows, deleted)

    def apply_chunk(
        self, name: str, producer: str, generation: int, sequence: int, dim: int,
        signs: np.ndarray, rows: np.ndarray, deleted: np.ndarray, *, apply_id: str,
        chunk: int, chunks: int,
    ) -> ApplyOutcome:
        """Stage chunk `chunk` of `chunks` of one apply; the last one commits them all.

        Arrays as in `apply` (this chunk's share). Chunk 0 starts the apply (dropping any
        other staged apply of the stream); a later chunk must follow the one before under
        the same apply_id and position, or ChunkLostError. A position at or below the
        watermark is acknowledged unapplied at any chunk, and its staged chunks dropped.
        """
        if chunks <= 1:
            return self.apply(name, producer, generation, sequence, dim, signs, rows, deleted)
        check_name("table", name)
        check_name("producer", producer)
        check_position(generation, sequence)
        if not apply_id:
            raise ValueError("a chunked apply needs an apply_id")
        if not 0 <= chunk < chunks:
            raise ValueError(f"chunk {chunk} is outside [0, {chunks})")
        if not 0 < dim <= self.max_dim:
            raise ValueError(f"dim must be in [1, {self.max_dim}], got {dim}")
        if rows.shape != (signs.shape[0], dim):
            raise ValueError(f"rows must be float32[{signs.shape[0]}, {dim}], got {rows.shape}")
        self.check_owned(signs, deleted)
        existing = self._tables.get(name)
        if existing is not None and existing.dim != dim:
            raise ValueError(f"table {name!r} has dim {existing.dim}, the request has dim {dim}")
        self.expire_staged()
        key, position = (name, producer), (generation, sequence)
        with self._stage_lock:
            current = self._watermarks.get(key)
            if current is not None and position <= current:
                self._staged.pop(key, None)
                return ApplyOutcome(False, 0, 0, 0, 0, current)
            stage = self._staged.get(key)
            if chunk == 0:
                if stage is not None:
                    log.info("chunked apply %s of %s/%s at %s replaces unfinished %s at %s",
                             apply_id, name, producer, position, stage.apply_id, stage.position)
                stage = _Staged(apply_id, position, dim, chunks, self._clock())
                self._staged[key] = stage
            elif (stage is None or stage.apply_id != apply_id or stage.position != position
                  or stage.chunks != chunks or stage.dim != dim or len(stage.signs) != chunk):
                raise ChunkLostError(
                    f"chunk {chunk} of {chunks} of apply {apply_id} ({name}/{producer} at "
                    f"{position}): its earlier chunks are not staged here (server restarted, "
                    "timed out, replaced by a newer apply, or out of order); restart the apply")
            # the request's bytes are kept (views on them, no copy) until the commit
            stage.signs.append(signs)
            stage.rows.append(rows)
            stage.deleted.append(deleted)
            stage.nbytes += signs.nbytes + rows.nbytes + deleted.nbytes
            stage.touched = self._clock()
            if len(stage.signs) < chunks:
                return ApplyOutcome(False, 0, 0, 0, 0, current or (0, 0), staged=True)
            del self._staged[key]
        return self._commit(name, producer, position, dim, np.concatenate(stage.signs),
                            np.concatenate(stage.rows), np.concatenate(stage.deleted))

    def _commit(self, name: str, producer: str, position: tuple[int, int], dim: int,
                signs: np.ndarray, rows: np.ndarray, deleted: np.ndarray) -> ApplyOutcome:
        table = self._table_for_write(name, dim)
        key = (name, producer)
        with table.lock.write():
            current = self._watermarks.get(key)
            if current is not None and position <= current:
                return ApplyOutcome(False, 0, 0, 0, 0, current)
            result = table._upsert_locked(signs, rows) if signs.size else None
            removed = table._delete_locked(deleted) if deleted.size else 0
            with self._lock:
                self._watermarks[key] = position
        inserted = result.inserted if result else 0
        updated = result.updated if result else 0
        evicted = result.evicted if result else 0
        return ApplyOutcome(True, inserted, updated, removed, evicted, position)

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
