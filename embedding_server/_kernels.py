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


BLOCK = 32  # signs whose slots are loaded together, so their cache misses overlap


@_jit
def _probe_block(slots, shift, signs, base, m, homes, out_rows):
    """Rows of signs[base:base+m] into out_rows[:m] (-1: unknown); returns the misses.

    Group prefetching: the home slot of every sign in the block is read in one branch-free
    pass of independent loads (the CPU overlaps their cache misses); only then are probe
    chains followed, over lines now in cache, so a mispredicted branch no longer waits on
    memory. This is what makes lookups several times faster than a plain probe loop.
    """
    mask = slots.shape[0] - 1
    for b in range(m):
        homes[b] = _home(signs[base + b], shift)
    for b in range(m):
        out_rows[b] = slots[homes[b]].row  # read here, used below: the loads overlap
    misses = 0
    for b in range(m):
        key = signs[base + b]
        j = homes[b]
        r = out_rows[b]
        row = -1
        while r != EMPTY:
            if slots[j].key == key:
                row = r
                break
            j = (j + 1) & mask
            r = slots[j].row
        out_rows[b] = row
        if row < 0:
            misses += 1
    return misses


@_jit
def find_rows(slots, shift, signs, out_rows):
    """out_rows[i] = row of signs[i], or -1; returns the number of misses."""
    homes = np.empty(BLOCK, np.int64)
    misses = 0
    n = signs.shape[0]
    for base in range(0, n, BLOCK):
        m = min(BLOCK, n - base)
        misses += _probe_block(slots, shift, signs, base, m, homes, out_rows[base:base + m])
    return misses


@_jit
def gather(slots, shift, values, signs, out, ticks, tick):
    """out[i] = values[row of signs[i]], zeros for unknown signs; returns the misses.

    ticks: int64[rows] last-use stamps written for hits (LRU), or an empty array for none.
    Two passes (find every row, then copy): a copy that waits on its own probe serializes
    two cache misses per sign; split, each pass keeps many misses in flight.
    """
    n = signs.shape[0]
    dim = values.shape[1]
    rows = np.empty(n, np.int64)
    misses = find_rows(slots, shift, signs, rows)
    track = ticks.shape[0] > 0
    for i in range(n):
        row = rows[i]
        if row < 0:
            for d in range(dim):
                out[i, d] = 0.0
        else:
            for d in range(dim):
                out[i, d] = values[row, d]
            if track:
                ticks[row] = tick
    return misses


@_jit
def upsert(slots, shift, values, row_signs, free, n_free, high, signs, rows, ticks, tick):
    """Insert or overwrite `signs` with `rows`; returns (n_free, high, inserted).

    free: int32[f] stack of reusable rows, n_free its depth; high: rows ever handed out.
    The caller has made room: slots stay under the load limit and values has enough rows.
    A sign repeated within `signs` keeps its last row.
    """
    mask = slots.shape[0] - 1
    dim = values.shape[1]
    track = ticks.shape[0] > 0
    inserted = 0
    for i in range(signs.shape[0]):
        key = signs[i]
        j = _home(key, shift)
        row = -1
        while True:
            r = slots[j].row
            if r == EMPTY:
                break
            if slots[j].key == key:
                row = r
                break
            j = (j + 1) & mask
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
        j = _home(key, shift)
        found = False
        while True:
            r = slots[j].row
            if r == EMPTY:
                break
            if slots[j].key == key:
                found = True
                break
            j = (j + 1) & mask
        if not found:
            continue
        row = slots[j].row
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
        j = _home(key, shift)
        while True:
            r = slots[j].row
            if r == EMPTY:
                break
            if slots[j].key == key:
                if r == row:
                    out_rows[n] = row
                    n += 1
                break
            j = (j + 1) & mask
    return n
