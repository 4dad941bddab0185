"""When a table's buffer is flushed: by size, by age of its oldest unflushed sign, or on demand."""

from __future__ import annotations

from dataclasses import dataclass

from persia_inc.packet_format import FlushReason


@dataclass(frozen=True, slots=True)
class FlushPolicy:
    """buffer_size: distinct buffered signs of one table that start a flush (PERSIA's
    `incremental_buffer_size`); flush_interval_s: start a flush once the oldest unflushed sign
    of a table has waited this long (monotonic seconds)."""

    buffer_size: int
    flush_interval_s: float

    def __post_init__(self) -> None:
        if isinstance(self.buffer_size, bool) or self.buffer_size <= 0:
            raise ValueError(f"buffer_size must be a positive integer, got {self.buffer_size!r}")
        if not self.flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be positive, got {self.flush_interval_s!r}")

    def due(self, size: int, oldest_s: float | None, now_s: float) -> FlushReason | None:
        """Why a table with `size` buffered signs, the oldest buffered since `oldest_s`
        (monotonic; None when empty), must flush at `now_s`, or None if it need not."""
        if size >= self.buffer_size:
            return "size"
        if size and oldest_s is not None and now_s - oldest_s >= self.flush_interval_s:
            return "interval"
        return None
