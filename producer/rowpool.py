"""Reusable row buffers for snapshots: the training thread reads flushed rows into memory it
used before instead of fresh allocations.

A flush of 100k rows x 16 dims needs 6.4 MB; allocated fresh, every page of it faults on
first touch, on the training thread, at each flush (several ms per table on the VMs we
measured). A buffer comes back to the pool once the writer has stored its packet (or copied
its rows elsewhere), so a steady training loop reads into the same few buffers over and over.
"""

from __future__ import annotations

import threading

import numpy as np

_GRANULE_SHIFT = 3  # capacities step by 1/8 of a power of two: at most 12.5% unused


def _capacity(rows: int) -> int:
    """`rows` rounded up to its size class."""
    if rows <= 1024:
        return 1024
    step = 1 << max(0, rows.bit_length() - 1 - _GRANULE_SHIFT)
    return -(-rows // step) * step


class RowBufferPool:
    """Idle float32 row blocks, by dim, up to `max_idle_bytes` in all (0: keep none).

    `take` is called on the training thread and `give_back` on the writer's; both are cheap
    and thread-safe. A block is handed out whole; callers read into `block[:rows]`.
    """

    def __init__(self, max_idle_bytes: int) -> None:
        self.max_idle_bytes = max(0, int(max_idle_bytes))
        self._idle: dict[int, list[np.ndarray]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()
        self.allocated = 0  # blocks made, for tests and metrics
        self.reused = 0  # blocks handed out again

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self, rows: int, dim: int) -> np.ndarray:
        """A float32[capacity, dim] block with capacity >= rows (the smallest idle one that fits)."""
        with self._lock:
            blocks = self._idle.get(dim, [])
            fitting = [i for i, b in enumerate(blocks) if b.shape[0] >= rows]
            if fitting:
                block = blocks.pop(min(fitting, key=lambda i: blocks[i].shape[0]))
                self._idle_bytes -= block.nbytes
                self.reused += 1
                return block
            self.allocated += 1
        return np.empty((_capacity(rows), dim), dtype=np.float32)

    def give_back(self, block: np.ndarray) -> None:
        """Return a block from `take`; kept for reuse if the idle bound allows, else freed.

        When over the bound, the smallest idle blocks make room first: the big ones are the
        costly ones to fault in again."""
        if self.max_idle_bytes == 0 or block.nbytes > self.max_idle_bytes:
            return
        dim = int(block.shape[1])
        with self._lock:
            blocks = self._idle.setdefault(dim, [])
            blocks.append(block)
            self._idle_bytes += block.nbytes
            while self._idle_bytes > self.max_idle_bytes:
                smallest_dim, index = min(
                    ((d, i) for d, bs in self._idle.items() for i in range(len(bs))),
                    key=lambda item: self._idle[item[0]][item[1]].nbytes)
                self._idle_bytes -= self._idle[smallest_dim].pop(index).nbytes
