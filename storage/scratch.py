"""Reused page-aligned memory to encode objects into before a direct-I/O write.

Fresh memory faults in page by page on first touch; a packet writer that allocates 7 MB per
packet pays that on every packet, on cores it shares with training. Lending the same aligned
blocks again avoids it, and page alignment is what O_DIRECT asks of the source buffer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

PAGE = 4096
_GRANULE = 1 << 20  # block sizes round up to whole MiB
MAX_KEPT_BYTES = 256 * 1024 * 1024  # a larger block is freed after use
MAX_IDLE = 2


def aligned_empty(size: int) -> np.ndarray:
    """An uninitialized uint8[size] whose first byte is page aligned."""
    raw = np.empty(size + PAGE, dtype=np.uint8)
    offset = (-raw.ctypes.data) % PAGE
    return raw[offset:offset + size]


class ScratchPool:
    """Lends page-aligned uint8 blocks of at least the asked size; keeps up to `MAX_IDLE`."""

    def __init__(self) -> None:
        self._idle: list[np.ndarray] = []
        self._lock = threading.Lock()

    @contextmanager
    def lend(self, size: int) -> Iterator[np.ndarray]:
        """`size` bytes rounded up to whole pages (a view of a pooled block), returned on exit."""
        need = -(-size // _GRANULE) * _GRANULE
        with self._lock:
            fitting = [i for i, b in enumerate(self._idle) if b.size >= need]
            block = self._idle.pop(min(fitting, key=lambda i: self._idle[i].size)) if fitting else None
        if block is None:
            block = aligned_empty(need)
        try:
            yield block[:-(-size // PAGE) * PAGE]
        finally:
            if block.size <= MAX_KEPT_BYTES:
                with self._lock:
                    self._idle.append(block)
                    if len(self._idle) > MAX_IDLE:
                        self._idle.pop(min(range(len(self._idle)), key=lambda i: self._idle[i].size))
