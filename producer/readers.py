"""How the producer calls a table's reader, and checks what it returns."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from persia_inc.producer.row_id_signs import RowIdSignBuffer
from persia_inc.producer.signset import SignBuffer

Reader = Callable[[np.ndarray], "np.ndarray | tuple[np.ndarray, np.ndarray | None]"]
"""reader(signs: uint64[n]) -> rows: float32[n, dim], or (rows, state: float32[n, k] | None).

It must return copies (fancy indexing does), not views the optimizer keeps updating.
Registered with `reads_into=True` it is called as reader(signs, out) instead: it fills
out: float32[n, dim] (the snapshot's own buffer) and returns the state float32[n, k] or None."""


def _checked_state(state: object, n: int, table: str) -> np.ndarray | None:
    """A reader's optimizer state as float32[n, k], or None; ValueError naming the table."""
    if state is None:
        return None
    state = np.asarray(state, dtype=np.float32)
    if state.ndim != 2 or state.shape[0] != n:
        raise ValueError(f"reader of table {table!r} returned state of shape {state.shape} "
                         f"for {n} signs")
    return state


def call_reader(reader: Reader, signs: np.ndarray, table: str,
                keep_state: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows float32[n, dim], state float32[n, k] or None) of `signs`: uint64[n] read now
    through `reader`; ValueError naming the table for a wrong shape. keep_state: False drops
    the state (`ship_optimizer_state`)."""
    result = reader(signs)
    rows, state = result if isinstance(result, tuple) else (result, None)
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] != signs.size:
        raise ValueError(f"reader of table {table!r} returned shape {rows.shape} for "
                         f"{signs.size} signs; want ({signs.size}, dim)")
    if rows.dtype != np.float32:
        rows = rows.astype(np.float32)
    state = _checked_state(state, signs.size, table)
    return rows, state if keep_state else None


def read_into_later(reader: Reader, signs: np.ndarray, rows: np.ndarray, table: str,
                    keep_state: bool) -> Callable[[], np.ndarray | None]:
    """The read of a `reads_into` reader, to run later: it fills rows: float32[n, dim] and
    returns the state (None unless `keep_state`)."""
    def read() -> np.ndarray | None:
        state = _checked_state(reader(signs, rows), signs.size, table)  # type: ignore[call-arg]
        return state if keep_state else None
    return read


class TableEntry:
    """A registered table: its reader, width and buffer of touched signs (`rows`: a
    `RowIdSignBuffer` over row ids, else a `SignBuffer`)."""

    __slots__ = ("buffer", "dim", "name", "reader", "reads_into")

    def __init__(self, name: str, reader: Reader, dim: int, rows: int | None,
                 reads_into: bool) -> None:
        self.name = name
        self.reader = reader
        self.reads_into = reads_into
        self.dim = dim
        self.buffer: SignBuffer | RowIdSignBuffer = (
            SignBuffer() if rows is None else RowIdSignBuffer(rows))
