"""A vectorized per-table buffer of touched signs: an open-addressing uint64 hash map in numba.

Each slot holds a sign and its last operation (0 upsert, 1 delete), so `record` then `evict`
of one sign leaves a delete and `evict` then `record` leaves an upsert: last write wins, as
the training side saw it. Inserting a whole batch is one compiled loop, no Python per sign.

Why not `np.unique` at swap time: the size trigger needs the distinct count after every
insert, and a hash map gives it for free; it is also 10x+ faster than Python's `set.update`.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

EMPTY = np.uint64(0xFFFF_FFFF_FFFF_FFFF)  # marks a free slot; the sign 2**64-1 itself is kept aside
_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)
_MIN_CAPACITY = 1024


@numba.njit(cache=True, nogil=True)
def _insert(keys: np.ndarray, ops: np.ndarray, signs: np.ndarray, op: np.uint8, track: bool,
            shift: np.uint64, size: int, max_size: int) -> tuple[int, int, bool]:
    """Insert `signs` with `op` into the table.

    Returns (new size, index reached, saw the sign 2**64-1): the index is `signs.size` when
    done, or where `max_size` was hit (the caller grows the table and resumes there)."""
    mask = np.uint64(keys.size - 1)
    empty = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    golden = np.uint64(0x9E37_79B9_7F4A_7C15)
    saw_top = False
    track_ops = track or op != np.uint8(0)  # upserts into an all-upsert table skip `ops`
    for i in range(signs.size):
        sign = signs[i]
        if sign == empty:
            saw_top = True  # kept outside the table
            continue
        slot = (sign * golden) >> shift
        while True:
            key = keys[slot]
            if key == sign:
                if track_ops:
                    ops[slot] = op
                break
            if key == empty:
                if size >= max_size:
                    return size, i, saw_top
                keys[slot] = sign
                if track_ops:
                    ops[slot] = op
                size += 1
                break
            slot = (slot + np.uint64(1)) & mask
    return size, signs.size, saw_top


@numba.njit(cache=True, nogil=True)
def rehash(old_keys: np.ndarray, old_values: np.ndarray, keys: np.ndarray, values: np.ndarray,
           shift: np.uint64) -> None:
    """Move every (sign, value) of an open-addressing map (uint64 keys, EMPTY free, Fibonacci
    hash `(sign * golden) >> shift`, linear probing) into a new, larger, empty one: the
    buffers' ops here and the update policy's slots (producer/update_policy.py)."""
    mask = np.uint64(keys.size - 1)
    empty = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    golden = np.uint64(0x9E37_79B9_7F4A_7C15)
    for i in range(old_keys.size):
        sign = old_keys[i]
        if sign == empty:
            continue
        slot = (sign * golden) >> shift
        while keys[slot] != empty:
            slot = (slot + np.uint64(1)) & mask
        keys[slot] = sign
        values[slot] = old_values[i]


def as_signs(values: object) -> np.ndarray:
    """View or convert `values` as uint64[n] without copying when it already is 64-bit.

    Signed int64 input is reinterpreted (embedding row ids are non-negative); other integer
    dtypes are converted. Raises ValueError for non-integer or non-1-D input.
    """
    array = np.asarray(values)
    if array.ndim != 1:
        array = array.reshape(-1)
    if array.dtype == np.uint64:
        return array
    if array.dtype == np.int64:
        return array.view(np.uint64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"signs must be an integer array, got dtype {array.dtype}")
    return array.astype(np.uint64)


class SignBuffer:
    """Distinct signs touched since the last swap, each with its last op (0 upsert, 1 delete).

    Thread-safe; `insert` costs one compiled loop per batch. Capacity doubles at load 1/2 and
    is kept across swaps, so a steady training loop allocates nothing.
    """

    UPSERT = np.uint8(0)
    DELETE = np.uint8(1)

    def __init__(self, capacity: int = _MIN_CAPACITY) -> None:
        cap = max(_MIN_CAPACITY, 1 << (int(capacity) - 1).bit_length())
        self._lock = threading.Lock()
        self._alloc(cap)
        self._size = 0
        self._top_op: int = -1  # op of the sign 2**64-1, -1 if absent (it marks free slots)
        self._has_deletes = False  # while False, `_ops` is all zeros and inserts skip it

    def _alloc(self, capacity: int) -> None:
        self._keys = np.full(capacity, EMPTY, dtype=np.uint64)
        self._ops = np.zeros(capacity, dtype=np.uint8)
        self._shift = np.uint64(64 - (capacity.bit_length() - 1))

    def __len__(self) -> int:
        return self._size + (self._top_op >= 0)

    @property
    def capacity(self) -> int:
        return int(self._keys.size)

    def insert(self, signs: np.ndarray, op: np.uint8 = UPSERT) -> int:
        """Add signs: uint64[n] (int64 is reinterpreted) with `op`; returns the distinct count."""
        signs = as_signs(signs)
        if not signs.flags.c_contiguous:
            signs = np.ascontiguousarray(signs)
        op = np.uint8(op)
        with self._lock:
            part = signs
            while True:
                size, reached, saw_top = _insert(self._keys, self._ops, part, op, self._has_deletes,
                                                 self._shift, self._size, self._keys.size // 2)
                if op:
                    self._has_deletes = True
                self._size = size
                if saw_top:
                    self._top_op = int(op)
                if reached == part.size:
                    break
                part = part[reached:]
                self._grow()
            return self._size + (self._top_op >= 0)

    def _grow(self) -> None:
        old_keys, old_ops = self._keys, self._ops
        self._alloc(old_keys.size * 2)
        rehash(old_keys, old_ops, self._keys, self._ops, self._shift)

    def swap(self) -> tuple[np.ndarray, np.ndarray]:
        """Take every buffered sign out and empty the buffer.

        Returns (signs: uint64[n], ops: uint8[n]) in no particular order.
        """
        with self._lock:
            used = self._keys != EMPTY
            signs = self._keys[used]
            ops = self._ops[used]
            if self._top_op >= 0:
                signs = np.append(signs, EMPTY)
                ops = np.append(ops, np.uint8(self._top_op))
            if self._size:
                self._keys.fill(EMPTY)
            if self._has_deletes:
                self._ops.fill(0)
                self._has_deletes = False
            self._size = 0
            self._top_op = -1
            return signs, ops

    def contains(self, signs: np.ndarray) -> np.ndarray:
        """bool[n]: whether each of signs: uint64[n] is buffered (for tests and tools)."""
        with self._lock:
            keys = self._keys[self._keys != EMPTY]
            found = np.isin(as_signs(signs), keys)
            if self._top_op >= 0:
                found |= as_signs(signs) == EMPTY
            return found
