"""Reusable row buffers for snapshots: the training thread reads flushed rows into memory it
used before instead of fresh allocations.

A flush of 100k rows x 16 dims needs 6.4 MB; allocated fresh, every page of it faults on
first touch, on the training thread, at each flush (about 7 ms per table on the VMs we
measured). A buffer comes back to the pool once the writer has stored its packet (or copied
its rows elsewhere), so a steady training loop reads into the same few buffers over and over.
"""

from __future__ import annotations

import numpy as np

from persia_inc.storage.blockpool import BlockPool, aligned_empty

_GRANULE_SHIFT = 3  # capacities step by 1/8 of a power of two: at most 12.5% unused


def _capacity(rows: int) -> int:
    """`rows` rounded up to its size class, so flushes of nearby sizes share buffers."""
    if rows <= 1024:
        return 1024
    step = 1 << max(0, rows.bit_length() - 1 - _GRANULE_SHIFT)
    return -(-rows // step) * step


def _row_block(rows: int, tail: tuple[int, ...]) -> np.ndarray:
    """Page-aligned, so a local store can write the rows to disk straight from the buffer."""
    shape = (_capacity(rows), *tail)
    return aligned_empty(int(np.prod(shape)) * 4).view(np.float32).reshape(shape)


def row_buffer_pool(max_idle_bytes: int) -> BlockPool:
    """float32 row buffers: `take(n, (dim,))` gives a block of at least n rows; the caller
    reads into `block[:n]` and hands the block back with `give_back(block)`."""
    return BlockPool(max_idle_bytes, _row_block)
