"""numba kernels of the embedding table: an open-addressing hash index (linear probing,
backward-shift deletion, no tombstones) from uint64 sign to int32 row.

A slot is a packed 12-byte record (key uint64, row int32); row -1 marks an empty slot. Keys sit
in the slot so a probe touches one cache line, and the row matrix is touched only on a hit.
The slot of a sign is the top bits of murmur3's fmix64 of the sign, a hash independent of the
splitmix64 that picks the shard (otherwise every sign on shard s of N would share low bits and
crowd a fraction of the slots).

Every kernel is compiled once (`cache=True`) and releases the GIL (`nogil=True`), so lookups
from several gRPC threads run in parallel. Callers hold the table's lock; kernels never
allocate except where they return new arrays.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from persia_inc.foundation.prefetch import prefetcher

SLOT_DTYPE = np.dtype([("key", "<u8"), ("row", "<i4")], align=False)
EMPTY = -1

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)

_jit = nb.njit(cache=True, nogil=True, fastmath=False, boundscheck=False)


@_jit
def _home(key: np.uint64, shift: np.uint64) -> np.int64:
    """The home slot of `key` in a table of 2**(64 - shift) slots."""
    h = key
    h ^= h >> _S33
    h *= _M1
    h ^= h >> _S33
    h *= _M2
    h ^= h >> _S33
    return np.int64(h >> shift)


PROBE_AHEAD = 24  # signs hashed ahead of the one being resolved (slot prefetch distance)
COPY_AHEAD = 64  # rows prefetched ahead of the one being copied
_RING = 64  # power of two > PROBE_AHEAD: the homes of signs in flight


_prefetch = prefetcher(0)
_prefetch_write = prefetcher(1)


@_jit
def _prefetch_slot(slots, j):
    """Both cache lines a 12-byte slot may straddle (usually the same one)."""
    _prefetch(slots, j)
    _prefetch(slots, (j + 1) & (slots.shape[0] - 1))


@_jit
def _prefetch_row(values, row, write):
    """Every cache line of values[row] (one for dim 16 on the table's 64-byte-aligned rows)."""
    dim = values.shape[1]
    for d in range(0, dim, 16):
        if write:
            _prefetch_write(values[row], d)
        else:
            _prefetch(values[row], d)
    if write:
        _prefetch_write(values[row], dim - 1)
    else:
        _prefetch(values[row], dim - 1)


@_jit
def _probe(slots, mask, key, j):
    """Follow the linear-probe chain of `key` from slot `j`: (slot, row) where it is, or
    (the empty slot that ends the chain, -1) when it is absent."""
    while True:
        r = slots[j].row
        if r == EMPTY:
            return j, -1
        if slots[j].key == key:
            return j, r
        j = (j + 1) & mask


@_jit
def find_rows(slots, shift, signs, out_rows):
    """out_rows[i] = row of signs[i], or -1; returns the number of misses.

    Software-pipelined: sign i is hashed and its home slot prefetched PROBE_AHEAD signs
    before its probe chain is followed, so about that many slot misses are in flight at
    once and the chain usually walks a line already in cache.
    """
    mask = slots.shape[0] - 1
    homes = np.empty(_RING, np.int64)
    n = signs.shape[0]
    misses = 0
    for i in range(n + PROBE_AHEAD):
        if i < n:
            h = _home(signs[i], shift)
            homes[i & (_RING - 1)] = h
            _prefetch_slot(slots, h)
        k = i - PROBE_AHEAD
        if k < 0:
            continue
        _, row = _probe(slots, mask, signs[k], homes[k & (_RING - 1)])
        out_rows[k] = row
        if row < 0:
            misses += 1
    return misses


@_jit
def gather(slots, shift, values, signs, out, ticks, tick):
    """out[i] = values[row of signs[i]], zeros for unknown signs; returns the misses.

    ticks: int64[rows] last-use stamps written for hits (LRU), or an empty array for none.
    Two passes, each keeping many misses in flight: find every row (prefetched probes), then
    copy them (`copy_rows`).
    """
    rows = np.empty(signs.shape[0], np.int64)
    misses = find_rows(slots, shift, signs, rows)
    copy_rows(values, rows, out, ticks, tick)
    return misses


@_jit
def copy_rows(values, rows, out, ticks, tick):
    """out[i] = values[rows[i]], zeros where rows[i] < 0, each row prefetched COPY_AHEAD rows
    before it is read; ticks[rows[i]] = tick for hits unless ticks is empty (no LRU)."""
    n = rows.shape[0]
    dim = values.shape[1]
    track = ticks.shape[0] > 0
    for i in range(n):
        if i + COPY_AHEAD < n:
            ahead = rows[i + COPY_AHEAD]
            if ahead >= 0:
                _prefetch_row(values, ahead, False)
        row = rows[i]
        if row < 0:
            for d in range(dim):
                out[i, d] = 0.0
        else:
            for d in range(dim):
                out[i, d] = values[row, d]
            if track:
                ticks[row] = tick


@_jit
def upsert(slots, shift, values, row_signs, free, n_free, high, signs, rows, found, ticks, tick):
    """Insert or overwrite `signs` with `rows`; returns (n_free, high, inserted).

    found: int64[n] the rows of `signs` by `find_rows` under the same exclusive lock (-1:
    not found then); a found row is written without probing again. free: int32[f] stack of
    reusable rows, n_free its depth; high: rows ever handed out. The caller has made room:
    slots stay under the load limit and values has enough rows. A sign repeated within
    `signs` keeps its last row.
    """
    mask = slots.shape[0] - 1
    dim = values.shape[1]
    track = ticks.shape[0] > 0
    n = signs.shape[0]
    inserted = 0
    for i in range(n):
        if i + COPY_AHEAD < n:
            ahead = found[i + COPY_AHEAD]
            if ahead >= 0:
                _prefetch_row(values, ahead, True)
            else:
                _prefetch_slot(slots, _home(signs[i + COPY_AHEAD], shift))
        row = found[i]
        if row < 0:
            key = signs[i]
            j, row = _probe(slots, mask, key, _home(key, shift))
            if row < 0:
                if n_free > 0:
                    n_free -= 1
                    row = free[n_free]
                else:
                    row = high
                    high += 1
                slots[j].key = key
                slots[j].row = row
                row_signs[row] = key
                inserted += 1
        for d in range(dim):
            values[row, d] = rows[i, d]
        if track:
            ticks[row] = tick
    return n_free, high, inserted


@_jit
def remove(slots, shift, free, n_free, signs, ticks):
    """Delete `signs` (unknown ones are ignored), pushing their rows on `free`.

    Returns (n_free, removed). Backward-shift deletion keeps every probe chain unbroken
    without tombstones, so deletes never slow later lookups.
    """
    mask = slots.shape[0] - 1
    track = ticks.shape[0] > 0
    removed = 0
    for i in range(signs.shape[0]):
        key = signs[i]
        j, row = _probe(slots, mask, key, _home(key, shift))
        if row < 0:
            continue
        free[n_free] = row
        n_free += 1
        if track:
            ticks[row] = np.iinfo(np.int64).max
        removed += 1
        # backward shift: pull later members of the cluster into the hole when allowed
        hole = j
        k = j
        while True:
            k = (k + 1) & mask
            if slots[k].row == EMPTY:
                break
            home = _home(slots[k].key, shift)
            # entry at k may move to hole unless its home lies cyclically in (hole, k]
            stays = (hole < home <= k) if hole <= k else (home > hole or home <= k)
            if not stays:
                slots[hole].key = slots[k].key
                slots[hole].row = slots[k].row
                hole = k
        slots[hole].row = EMPTY
        slots[hole].key = 0
    return n_free, removed


@_jit
def rehash(old, new, shift):
    """Insert every occupied slot of `old` into the empty `new` table."""
    mask = new.shape[0] - 1
    for i in range(old.shape[0]):
        r = old[i].row
        if r == EMPTY:
            continue
        key = old[i].key
        j = _home(key, shift)
        while new[j].row != EMPTY:
            j = (j + 1) & mask
        new[j].key = key
        new[j].row = r


@_jit
def live_rows(slots, shift, row_signs, start, stop, out_rows):
    """Rows in [start, stop) that are live (their sign's slot points back at them).

    Writes them to out_rows in ascending order and returns how many; row ids are stable, so a
    dump that walks row ranges under short locks misses no row older than its watermark.
    """
    mask = slots.shape[0] - 1
    n = 0
    for row in range(start, stop):
        key = row_signs[row]
        if _probe(slots, mask, key, _home(key, shift))[1] == row:
            out_rows[n] = row
            n += 1
    return n
