"""One shard's state, without any RPC: its tables and its (table, producer) watermarks.

The gRPC servicer is a thin layer over `Shard`; tests and benchmarks use `Shard` directly.
Errors: `TableNotFoundError` (a lookup of a table never created) and `ValueError` (a request that
does not fit: wrong dim, mismatched lengths, bad names); both leave the shard unchanged.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from persia_inc.embedding_server.table import EmbeddingTable
from persia_inc.packet_format import Watermark
from persia_inc.packet_format.header import check_name, check_position


class TableNotFoundError(KeyError):
    """A request named a table this shard has never seen."""

    def __init__(self, table: str) -> None:
        super().__init__(table)
        self.table = table

    def __str__(self) -> str:
        return f"unknown table {self.table!r}"


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    """What one Apply did: `applied` False means it was at or below the watermark (skipped)."""

    applied: bool
    inserted: int
    updated: int
    deleted: int
    evicted: int
    watermark: tuple[int, int]


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
    """Tables and watermarks of one shard. Thread-safe."""

    def __init__(self, *, capacity: int = 0, max_dim: int = 4096) -> None:
        self.capacity = capacity
        self.max_dim = max_dim
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

    def lookup(self, name: str, signs: np.ndarray) -> tuple[np.ndarray, int]:
        """signs: uint64[n] -> (rows: float32[n, dim], misses); zeros for unknown signs."""
        table = self.table(name)
        rows, misses = table.lookup(signs)
        counters = self._counters[name]
        counters[0] += 1  # approximate under races: these feed Status only
        counters[1] += signs.shape[0]
        counters[2] += misses
        return rows, misses

    def watermarks(self) -> list[Watermark]:
        with self._lock:
            items = sorted(self._watermarks.items())
        return [Watermark(table=t, producer=p, generation=g, sequence=s) for (t, p), (g, s) in items]

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
        table = self._table_for_write(name, dim)
        key = (name, producer)
        position = (generation, sequence)
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
