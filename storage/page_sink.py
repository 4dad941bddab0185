"""`PageSink`: gathers an object's bytes for one direct-I/O `writev`, copying as little as it can.

Small writes (headers, metadata, unaligned buffers) are copied into a page-aligned scratch
block. A large write whose memory starts on a page boundary, arriving at a page-aligned offset
of the object, is kept by reference instead: its whole pages go to the disk straight from the
caller's memory, and only its last partial page is copied. The producer lays packets out so
that the rows it read into page-aligned buffers land on such offsets, which saves a copy of
every row (and the cache traffic of that copy) per packet.

The sink does not own the referenced memory: the caller keeps it unchanged until `segments`
has been written.
"""

from __future__ import annotations

import io

import numpy as np

from persia_inc.storage.blockpool import PAGE

BY_REFERENCE_MIN_BYTES = 64 * 1024  # below this a copy costs less than the bookkeeping


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class PageSink(io.RawIOBase):
    """A write-only binary sink over `scratch` (page-aligned uint8 memory).

    `write` raises OSError when the copied bytes outgrow the scratch (as Arrow's fixed-size
    buffer writer does), so callers can fall back to streaming.
    """

    def __init__(self, scratch: np.ndarray) -> None:
        if scratch.ctypes.data % PAGE or scratch.size % PAGE:
            raise ValueError("scratch must be page aligned and whole pages long")
        super().__init__()
        self._scratch = scratch
        self._used = 0  # bytes of scratch taken (closed runs are padded to whole pages)
        self._run_start = 0  # scratch offset where the open run of copied bytes begins
        self._parts: list[memoryview] = []  # closed runs and references, in object order
        self.position = 0
        self.referenced_bytes = 0

    # --- the file-like face Arrow and the writers use -----------------------------------

    def write(self, data: object) -> int:
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        size = view.nbytes
        whole = size - size % PAGE
        if (size >= BY_REFERENCE_MIN_BYTES and self.position % PAGE == 0
                and _address(view) % PAGE == 0):
            self._close_run()
            self._parts.append(view[:whole])
            self.referenced_bytes += whole
            self.position += whole
            view = view[whole:]
        self._copy(view)
        return size

    def tell(self) -> int:
        return self.position

    def writable(self) -> bool:
        return True

    # --- what the store writes ----------------------------------------------------------

    def segments(self) -> list[memoryview]:
        """The object as page-aligned buffers, each a whole number of pages long (the last
        padded with unspecified bytes up to its page: truncate the file to `position`)."""
        self._close_run()
        return list(self._parts)

    def _copy(self, view: memoryview) -> None:
        size = view.nbytes
        if not size:
            return
        end = self._used + size
        if end > self._scratch.size:
            raise OSError(f"write out of bounds: past the end of the {self._scratch.size}-byte "
                          "scratch block")
        self._scratch[self._used:end] = np.frombuffer(view, dtype=np.uint8)
        self._used = end
        self.position += size

    def _close_run(self) -> None:
        """End the open run of copied bytes at a page boundary of the scratch."""
        if self._used == self._run_start:
            return
        padded = min(self._scratch.size, -(-self._used // PAGE) * PAGE)
        self._parts.append(memoryview(self._scratch[self._run_start:padded]).cast("B"))
        self._used = self._run_start = padded
