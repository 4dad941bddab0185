"""When a producer flushes: by the size of its buffers, by the age of its oldest unflushed
sign, or on demand."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from persia_inc.foundation.fields import FieldError, coerce, positive
from persia_inc.packet_format import FlushReason


@dataclass(frozen=True, slots=True)
class FlushPolicy:
    """buffer_size: distinct buffered signs over all tables that start a flush (PERSIA's
    `incremental_buffer_size`); flush_interval_s: start a flush once the oldest unflushed sign
    of a table has waited this long (seconds of `clock`); clock: the monotonic clock ages are
    measured on (`time.monotonic`; tests inject their own to drive the interval trigger)."""

    buffer_size: int
    flush_interval_s: float
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    def __post_init__(self) -> None:
        coerce(int, self.buffer_size, "buffer_size")  # the rule `incremental_buffer_size` meets
        positive("buffer_size", self.buffer_size)
        object.__setattr__(self, "flush_interval_s",
                           coerce(float, self.flush_interval_s, "flush_interval_s"))
        positive("flush_interval_s", self.flush_interval_s)
        if not callable(self.clock):
            raise FieldError("clock", f"expected a callable returning seconds, got {self.clock!r}")

    def now(self) -> float:
        """The current time on `clock` (seconds)."""
        return self.clock()

    def due(self, size: int, oldest_s: float | None, now_s: float) -> FlushReason | None:
        """Why a table with `size` buffered signs, the oldest buffered since `oldest_s`
        (on `clock`; None when empty), must flush at `now_s`, or None if it need not."""
        if size >= self.buffer_size:
            return "size"
        if size and oldest_s is not None and now_s - oldest_s >= self.flush_interval_s:
            return "interval"
        return None
