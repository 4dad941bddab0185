"""One embedding table on one shard: a hash index sign -> row and a float32 row matrix.

* Vectorized: insert, lookup and delete each run one numba kernel over the whole batch.
* Memory: the row matrix (float32[capacity, dim]) and `row_signs` (uint64[capacity]) grow by
  1.25x; the index is 12 bytes a slot, a power of two of slots kept at most 70% full. At 10M
  rows of dim 16 that is 64 + 8 + 20 = 92 bytes a row against the raw 72 (1.28x).
  `grow_ahead` grows them before `AHEAD` more writes like the last would have to (the shard
  calls it between applies), so a write rarely pays a rehash and a row copy under its lock.
* Deleted rows go on a free list and are reused by later inserts.
* Optional `capacity` (rows): when an upsert would exceed it, the least recently used rows
  (by a per-call stamp written on lookup and upsert) are evicted in one batch, like PERSIA's
  `capacity`. Batches of evictions overshoot by 1% so eviction cost stays amortized.
* Concurrency: a writer-preferring readers-writer lock. Lookups share it (the kernels release
  the GIL, so they run in parallel); an upsert/delete holds it exclusively, so a lookup sees
  each row entirely before or entirely after a write, and a whole `apply` at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from persia_inc.embedding_server import _kernels as kern

MAX_LOAD = 0.7
GROWTH = 1.25
AHEAD = 4  # a table grows ahead of need when this many more writes like its last would not fit
MAX_ROWS = 2**31 - 1  # row ids are int32
CACHE_LINE = 64  # bytes
_TICK_FREE = np.iinfo(np.int64).max


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(frozen=True, slots=True)
class UpsertResult:
    inserted: int  # new signs
    updated: int  # signs that already had a row
    evicted: int  # rows evicted to stay within capacity


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """np.empty starting on a 64-byte cache line, so a 64-byte row (dim 16) is one line,
    not two: a random row read or prefetched then costs one cache miss."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + CACHE_LINE, np.uint8)
    skip = -raw.ctypes.data % CACHE_LINE
    return raw[skip:skip + nbytes].view(dtype).reshape(shape)


def _empty_slots(n: int) -> np.ndarray:
    slots = _aligned_empty((n,), kern.SLOT_DTYPE)
    slots["key"] = 0
    slots["row"] = kern.EMPTY
    return slots


class EmbeddingTable:
    """A growable sign -> float32[dim] map. Thread-safe; see the module docstring."""

    def __init__(self, dim: int, *, capacity: int = 0, reserve: int = 0) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 (0: unbounded), got {capacity}")
        self.dim = int(dim)
        self.capacity = int(capacity)
        self.lock = RWLock()
        self._tick = 0
        bits = 4
        while (1 << bits) * MAX_LOAD < max(reserve, 8):
            bits += 1
        self._slots = _empty_slots(1 << bits)
        self._shift = np.uint64(64 - bits)
        cap = max(reserve, 16)
        self._values = _aligned_empty((cap, self.dim), np.float32)
        self._row_signs = np.empty(cap, np.uint64)
        self._free = np.empty(16, np.int32)
        self._n_free = 0
        self._high = 0  # rows ever handed out; live rows = high - n_free
        self._ticks = np.full(cap, _TICK_FREE, np.int64) if capacity else np.empty(0, np.int64)
        self._last_new = 0  # new rows the last upsert could add (what the next may add too)

    # ------------------------------------------------------------------------------ facts

    def __len__(self) -> int:
        return self._high - self._n_free

    @property
    def nbytes(self) -> int:
        """Bytes held by the table's arrays (allocated, including growth headroom)."""
        return (self._slots.nbytes + self._values.nbytes + self._row_signs.nbytes
                + self._free.nbytes + self._ticks.nbytes)

    # ---------------------------------------------------------------------------- reading

    def lookup(self, signs: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Rows of `signs`; unknown signs read as zeros.

        signs: uint64[n] -> (rows: float32[n, dim], misses). `out`, if given, must be
        float32[n, dim] C-contiguous and is filled and returned.
        """
        with self.lock.read():
            return self._lookup_locked(signs, out)

    def _lookup_locked(self, signs: np.ndarray, out: np.ndarray | None = None
                       ) -> tuple[np.ndarray, int]:
        """`lookup` for a caller holding the read (or write) lock, e.g. across several tables."""
        signs = _as_signs(signs)
        if out is None:
            out = np.empty((signs.shape[0], self.dim), np.float32)
        elif out.shape != (signs.shape[0], self.dim) or out.dtype != np.float32:
            raise ValueError(f"out must be float32[{signs.shape[0]}, {self.dim}]")
        self._tick += 1  # a racy stamp is fine: LRU order is approximate across threads
        misses = kern.gather(self._slots, self._shift, self._values, signs, out, self._ticks,
                             self._tick)
        return out, int(misses)

    def _find_locked(self, signs: np.ndarray) -> tuple[np.ndarray, int]:
        """The first half of `_lookup_locked`: (rows: int64[n] each sign's row, -1 for an
        unknown sign; misses). `_copy_locked` then copies them, under the same lock."""
        signs = _as_signs(signs)
        rows = np.empty(signs.shape[0], np.int64)
        return rows, int(kern.find_rows(self._slots, self._shift, signs, rows))

    def _copy_locked(self, rows: np.ndarray, out: np.ndarray) -> None:
        """out (float32[n, dim], C-contiguous) = the rows `_find_locked` found, zeros for -1."""
        if out.shape != (rows.shape[0], self.dim) or out.dtype != np.float32:
            raise ValueError(f"out must be float32[{rows.shape[0]}, {self.dim}]")
        self._tick += 1
        kern.copy_rows(self._values, rows, out, self._ticks, self._tick)

    def contains(self, signs: np.ndarray) -> np.ndarray:
        """signs: uint64[n] -> bool[n], whether each sign has a row."""
        signs = _as_signs(signs)
        rows = np.empty(signs.shape[0], np.int64)
        with self.lock.read():
            kern.find_rows(self._slots, self._shift, signs, rows)
        return rows >= 0

    def iter_rows(self, chunk_rows: int = 1 << 20) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (signs: uint64[k], rows: float32[k, dim]) copies covering every live row.

        Each chunk is read under a short shared lock, so writers interleave. Row ids never
        move, so a row not written during the walk is yielded exactly once; a row written
        during it may appear with either value (callers take the watermark before the walk).
        """
        start = 0
        while True:
            with self.lock.read():
                stop = min(self._high, start + chunk_rows)
                if start >= stop:
                    return
                picked = np.empty(stop - start, np.int64)
                n = kern.live_rows(self._slots, self._shift, self._row_signs, start, stop, picked)
                picked = picked[:n]
                signs = self._row_signs[picked]
                rows = self._values[picked]
            start = stop
            if n:
                yield signs, rows

    # ---------------------------------------------------------------------------- writing

    def upsert(self, signs: np.ndarray, rows: np.ndarray) -> UpsertResult:
        """Insert or overwrite rows. signs: uint64[n]; rows: float32[n, dim].

        Raises ValueError (before changing anything) for mismatched shapes, or when more new
        signs arrive at once than `capacity` allows.
        """
        signs = _as_signs(signs)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape != (signs.shape[0], self.dim):
            raise ValueError(
                f"rows must be float32[{signs.shape[0]}, {self.dim}], got shape {rows.shape}")
        with self.lock.write():
            return self._upsert_locked(signs, rows)

    def apply(self, signs: np.ndarray, rows: np.ndarray, deleted: np.ndarray) -> UpsertResult:
        """Upsert then delete, atomically for readers (one exclusive section)."""
        signs, deleted = _as_signs(signs), _as_signs(deleted)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape != (signs.shape[0], self.dim):
            raise ValueError(
                f"rows must be float32[{signs.shape[0]}, {self.dim}], got shape {rows.shape}")
        with self.lock.write():
            result = self._upsert_locked(signs, rows) if signs.size else UpsertResult(0, 0, 0)
            if deleted.size:
                self._delete_locked(deleted)
        return result

    def delete(self, signs: np.ndarray) -> int:
        """Delete signs (unknown ones are ignored); returns how many rows were freed."""
        signs = _as_signs(signs)
        with self.lock.write():
            return self._delete_locked(signs)

    # ---------------------------------------------------------------------------- internals

    def _upsert_locked(self, signs: np.ndarray, rows: np.ndarray) -> UpsertResult:
        n = signs.shape[0]
        live = len(self)
        self._tick += 1
        # one prefetched probe pass finds the rows to overwrite; the write pass then probes
        # only for signs that were new
        found = np.empty(n, np.int64)
        kern.find_rows(self._slots, self._shift, signs, found)
        hit = found >= 0
        new_bound = int(n - np.count_nonzero(hit))  # upper bound: a new sign may repeat
        if self.capacity:
            self._ticks[found[hit]] = self._tick  # what is written now is not evicted
        evicted = 0
        if self.capacity and live + new_bound > self.capacity:
            if new_bound > self.capacity:
                raise ValueError(
                    f"{new_bound} new signs in one batch exceed the table capacity {self.capacity}")
            evicted = self._evict_locked(live + new_bound - self.capacity + self.capacity // 100)
            if evicted:  # an evicted row may be one found above
                kern.find_rows(self._slots, self._shift, signs, found)
                new_bound = int(n - np.count_nonzero(found >= 0))
        if live + new_bound > MAX_ROWS:
            raise ValueError(f"a table holds at most {MAX_ROWS} rows per shard")
        self._reserve_locked(len(self) + new_bound, new_bound)
        self._last_new = new_bound
        self._n_free, self._high, inserted = kern.upsert(
            self._slots, self._shift, self._values, self._row_signs, self._free, self._n_free,
            self._high, signs, rows, found, self._ticks, self._tick)
        return UpsertResult(int(inserted), n - int(inserted), evicted)

    def _spare_rows(self) -> int:
        return self._n_free + self._values.shape[0] - self._high

    def _reserve_locked(self, live_after: int, new_rows: int) -> None:
        """Grow the index and the row arrays so `new_rows` more rows fit."""
        size = self._slots.shape[0]
        if live_after > size * MAX_LOAD:
            while live_after > size * MAX_LOAD:
                size *= 2
            new = _empty_slots(size)
            shift = np.uint64(64 - (size.bit_length() - 1))
            kern.rehash(self._slots, new, shift)
            self._slots, self._shift = new, shift
        short = new_rows - self._spare_rows()
        if short > 0:
            cap = max(self._values.shape[0] + short, int(self._values.shape[0] * GROWTH))
            values = _aligned_empty((cap, self.dim), np.float32)
            values[: self._high] = self._values[: self._high]
            row_signs = np.empty(cap, np.uint64)
            row_signs[: self._high] = self._row_signs[: self._high]
            self._values, self._row_signs = values, row_signs
            if self.capacity:
                ticks = np.full(cap, _TICK_FREE, np.int64)
                ticks[: self._high] = self._ticks[: self._high]
                self._ticks = ticks

    def _ahead(self) -> int:
        """Rows to keep room for: `AHEAD` upserts like the last, at most as many rows as the
        table holds (a bulk load's batches would otherwise reserve several times the table)."""
        return min(AHEAD * self._last_new, max(len(self), 1))

    def needs_room(self) -> bool:
        """Whether `AHEAD` more upserts like the last one would have to grow the table (each
        growth costs its write a rehash and a row copy)."""
        ahead = self._ahead()
        return bool(self._last_new) and (len(self) + ahead > self._slots.shape[0] * MAX_LOAD
                                         or ahead > self._spare_rows())

    def grow_ahead(self) -> bool:
        """Make room for `AHEAD` more upserts like the last one before they come, under the
        write lock (lookups of this table wait for it, as they would for the write that had
        to grow). True if the table grew."""
        with self.lock.write():
            slots, values = self._slots, self._values
            self._reserve_locked(len(self) + self._ahead(), self._ahead())
            return self._slots is not slots or self._values is not values

    def _delete_locked(self, signs: np.ndarray) -> int:
        if self._n_free + signs.shape[0] > self._free.shape[0]:
            free = np.empty(max(self._n_free + signs.shape[0], self._free.shape[0] * 2), np.int32)
            free[: self._n_free] = self._free[: self._n_free]
            self._free = free
        self._n_free, removed = kern.remove(self._slots, self._shift, self._free, self._n_free,
                                         signs, self._ticks)
        return int(removed)

    def _evict_locked(self, count: int) -> int:
        """Delete the `count` least recently used rows."""
        ticks = self._ticks[: self._high]
        count = min(count, len(self))
        if count <= 0:
            return 0
        victims = np.argpartition(ticks, count - 1)[:count] if count < ticks.size else \
            np.arange(ticks.size)
        victims = victims[ticks[victims] != _TICK_FREE]
        return self._delete_locked(self._row_signs[victims])


def _as_signs(signs: np.ndarray) -> np.ndarray:
    signs = np.asarray(signs)
    if signs.ndim != 1:
        raise ValueError(f"signs must be uint64[n], got shape {signs.shape}")
    if signs.dtype != np.uint64:
        if signs.size and not np.issubdtype(signs.dtype, np.integer):
            raise ValueError(f"signs must be uint64, got dtype {signs.dtype}")
        signs = signs.astype(np.uint64)
    return np.ascontiguousarray(signs)


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel now, so the first request is fast."""
    table = EmbeddingTable(2, capacity=4)
    signs = np.arange(6, dtype=np.uint64)
    table.upsert(signs[:3], np.ones((3, 2), np.float32))
    table.upsert(signs[3:], np.ones((3, 2), np.float32))  # evicts
    table.lookup(signs)
    table.contains(signs)
    table.delete(signs[:2])
    for _ in table.iter_rows():
        pass
    plain = EmbeddingTable(2)
    plain.upsert(signs, np.ones((6, 2), np.float32))
    plain.lookup(signs)
