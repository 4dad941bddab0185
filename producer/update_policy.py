"""Which touched rows a flush ships: the prioritized update policy and its staleness bound.

Policy "all" (the default) is no object at all: the producer ships every touched row, as it
always did. `PrioritizedUpdates` ships, at each flush, the touched rows whose change since
they were last shipped matters most, within a budget, and holds the others back, pending,
until they matter more or their deadline comes: a row deferred at a flush is shipped by a
flush no later than `max_staleness_s` after the oldest sign that flush took (so after the
row's own change). Deletes are never deferred, and `close()` ships everything.

Per flush and table, in two steps:

* `plan` (training thread, at the flush): the signs to read are the touched ones plus, of the
  pending ones not touched, those whose deadline comes before the next flush and the `budget`
  best by their last score (a row's score only changes when it is touched, so no other
  pending row can win). The rows read are at most what "all" reads plus the budget.
* `select` (where the rows are read: at once, or on the writer thread with deferred reads):
  score the touched rows, ship the due rows and the best of the rest up to the budget, keep
  the others pending, and cut the snapshot down to the shipped rows. Selects run in flush
  order (a queued cut whose select has not run is never merged), so the per-row state is only
  changed in that order.

Ranks (`update_rank`): "delta", the L2 norm of the row's change against an int8 copy of what
was shipped (`quantize_rows`, dim + 4 bytes a row); "touches", the number of flushes that
touched the row since it was shipped. A row whose shipped value is unknown (never shipped
since this producer started and not given by `mark_served`) ranks first. Memory per row:
flags 1 byte, deadline clock 8, score 4, plus the copy for "delta" (`bytes_per_row`);
tables registered without `rows` also pay the sign-to-slot map (16 bytes a slot, half full).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

from persia_inc.packet_format.cut_codec import dequantize_rows, quantize_rows
from persia_inc.producer.settings import ProducerSettings
from persia_inc.producer.signset import rehash
from persia_inc.producer.snapshot import Snapshot

_PENDING = np.uint8(1)
_KNOWN = np.uint8(2)  # the shipped copy holds what serving has
_EMPTY = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


@numba.njit(cache=True, nogil=True)
def _slots_of(keys: np.ndarray, slots: np.ndarray, signs: np.ndarray, add: bool, next_slot: int,
              shift: np.uint64) -> tuple[np.ndarray, int]:
    """The slot of each of signs: uint64[n] in the open-addressing map (keys, slots), -1 when
    absent and not `add`; added signs take slots from `next_slot` on. Returns (int64[n],
    the next free slot). The caller keeps the map under half full."""
    mask = np.uint64(keys.size - 1)
    golden = np.uint64(0x9E37_79B9_7F4A_7C15)
    empty = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    out = np.empty(signs.size, np.int64)
    for i in range(signs.size):
        sign = signs[i]
        at = (sign * golden) >> shift
        while True:
            key = keys[at]
            if key == sign:
                out[i] = slots[at]
                break
            if key == empty:
                if add:
                    keys[at] = sign
                    slots[at] = next_slot
                    out[i] = next_slot
                    next_slot += 1
                else:
                    out[i] = -1
                break
            at = (at + np.uint64(1)) & mask
    return out, next_slot


class _SlotMap:
    """sign -> slot for a table of any uint64 signs (the sign 2**64-1 is kept aside)."""

    def __init__(self) -> None:
        self.size = 0  # slots given out, the sign 2**64-1's included
        self.top = -1  # slot of the sign 2**64-1
        self._alloc(1024)

    def _alloc(self, capacity: int) -> None:
        self.keys = np.full(capacity, _EMPTY, np.uint64)
        self.slots = np.zeros(capacity, np.int64)
        self.shift = np.uint64(64 - (capacity.bit_length() - 1))

    def find(self, signs: np.ndarray, add: bool) -> np.ndarray:
        """int64[n] slots of signs: uint64[n] (-1: absent, when not `add`)."""
        if add and 2 * (self.size + signs.size + 1) > self.keys.size:
            capacity = self.keys.size
            while 2 * (self.size + signs.size + 1) > capacity:
                capacity *= 2
            keys, slots = self.keys, self.slots
            self._alloc(capacity)
            rehash(keys, slots, self.keys, self.slots, self.shift)
        top = signs == _EMPTY
        if not top.any():
            out, self.size = _slots_of(self.keys, self.slots, np.ascontiguousarray(signs), add,
                                       self.size, self.shift)
            return out
        if self.top < 0 and add:
            self.top, self.size = self.size, self.size + 1
        full = np.empty(signs.size, np.int64)
        full[~top], self.size = _slots_of(self.keys, self.slots,
                                          np.ascontiguousarray(signs[~top]), add, self.size,
                                          self.shift)
        full[top] = self.top
        return full


class _TableState:
    """A table's per-row state, by slot (the row id when the table has `rows`)."""

    def __init__(self, dim: int, capacity: int | None, rank: str) -> None:
        self.dim = dim
        self.rank = rank
        self.map = None if capacity is not None else _SlotMap()
        self.pending = 0
        self.sign_of = np.empty(0, np.uint64)  # slot -> sign, map tables only
        self._grow(capacity or 0)

    def _grow(self, slots: int) -> None:
        old = getattr(self, "flags", np.empty(0, np.uint8)).size
        if slots <= old:
            return
        slots = max(slots, 2 * old)
        self.flags = _extend(getattr(self, "flags", None), slots, np.uint8)
        self.since = _extend(getattr(self, "since", None), slots, np.float64)
        self.score = _extend(getattr(self, "score", None), slots, np.float32)
        if self.rank == "delta":
            self.q = _extend(getattr(self, "q", None), slots, np.uint8, self.dim)
            self.scale = _extend(getattr(self, "scale", None), slots, np.float16)
            self.offset = _extend(getattr(self, "offset", None), slots, np.float16)
        if self.map is not None:
            self.sign_of = _extend(self.sign_of, slots, np.uint64)

    def slots(self, signs: np.ndarray, add: bool = True) -> np.ndarray:
        """int64[n] slots of signs: uint64[n] (-1: never seen, when not `add`)."""
        if self.map is None:
            slots = signs.astype(np.int64)
            if slots.size and int(slots.max()) >= self.flags.size:
                raise ValueError(f"sign {int(slots.max())} is beyond the table's rows "
                                 f"({self.flags.size})")
            return slots
        slots = self.map.find(signs, add)
        if add and slots.size:
            self._grow(self.map.size)
            self.sign_of[slots] = signs
        return slots

    def signs(self, slots: np.ndarray) -> np.ndarray:
        return slots.astype(np.uint64) if self.map is None else self.sign_of[slots]

    @property
    def bytes_per_row(self) -> int:
        per = 1 + 8 + 4 + (self.dim + 4 if self.rank == "delta" else 0)
        return per + (0 if self.map is None else 8 + 32)


def _extend(array: np.ndarray | None, n: int, dtype: type, width: int = 0) -> np.ndarray:
    shape = (n, width) if width else (n,)
    out: np.ndarray = np.zeros(shape, dtype)
    if array is not None and array.shape[0]:
        out[:array.shape[0]] = array
    return out


def _best(candidates: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """The `k` candidates of highest score (all when there are no more than k)."""
    if k <= 0:
        return candidates[:0]
    if candidates.size <= k:
        return candidates
    return candidates[np.argpartition(-score, k - 1)[:k]]


def _keep_copy(state: _TableState, slots: np.ndarray, rows: np.ndarray) -> None:
    """Store the int8 copy of rows: float32[n, dim] (what serving now holds) at `slots`
    (flagged known); a row int8 cannot hold (NaN, Inf, beyond float16) becomes unknown."""
    fits = np.isfinite(rows).all(axis=1) & (np.abs(rows).max(axis=1, initial=0.0) <= 65504.0)
    if not fits.all():
        state.flags[slots[~fits]] &= ~_KNOWN
        slots, rows = slots[fits], rows[fits]
    state.q[slots], state.scale[slots], state.offset[slots] = quantize_rows(rows)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one table's flush reads: signs uint64[n] (touched first, then pending) and the
    select to run once their rows are read."""

    signs: np.ndarray
    select: Callable[[Snapshot], None]


class PrioritizedUpdates:
    """The prioritized update policy of one producer (see the module docstring).

    settings: the producer's (`update_budget_fraction`, `update_budget_rows`,
    `max_staleness_s`, `update_rank`, `flush_interval_s`); times are on the producer's
    policy clock (seconds)."""

    def __init__(self, settings: ProducerSettings) -> None:
        self.fraction = settings.update_budget_fraction
        self.max_rows = settings.update_budget_rows
        self.max_staleness_s = settings.max_staleness_s
        self.interval_s = settings.flush_interval_s
        self.rank = settings.update_rank
        self._tables: dict[str, _TableState] = {}
        self._lock = threading.Lock()

    def register(self, table: str, dim: int, rows: int | None) -> None:
        """Track `table` (row ids in [0, rows) when `rows` is given, any uint64 sign else)."""
        with self._lock:
            state = self._tables.get(table)
            if state is None or state.dim != dim:
                self._tables[table] = _TableState(dim, rows, self.rank)

    @property
    def pending(self) -> int:
        """Rows held back over all tables (touched, changed, not shipped yet)."""
        return sum(t.pending for t in self._tables.values())

    def has_pending(self, table: str) -> bool:
        state = self._tables.get(table)
        return state is not None and state.pending > 0

    @property
    def bytes_per_row(self) -> dict[str, int]:
        """The policy's memory per tracked row, per table."""
        return {name: t.bytes_per_row for name, t in self._tables.items()}

    def budget(self, touched: int) -> int:
        """Rows a flush that touched `touched` rows of a table may ship (besides due rows)."""
        budget = math.ceil(self.fraction * touched)
        return min(budget, self.max_rows) if self.max_rows else budget

    def mark_served(self, table: str, signs: np.ndarray, rows: np.ndarray) -> None:
        """Serving holds rows: float32[n, dim] for signs: uint64[n] (e.g. the checkpoint the
        servers loaded): rank later changes of those rows against them."""
        with self._lock:
            state = self._tables.get(table)
            if state is None:
                raise KeyError(f"table {table!r} has no reader: call register_table({table!r}, "
                               "...) before mark_served")
            slots = state.slots(signs)
            state.flags[slots] |= _KNOWN
            if state.rank == "delta":
                _keep_copy(state, slots, np.asarray(rows, np.float32))

    # --- at the flush, on the training thread ---------------------------------------------

    def plan(self, table: str, upserts: np.ndarray, oldest_s: float, now_s: float,
             final: bool = False) -> Plan:
        """The rows to read for `table` at a flush at `now_s` whose oldest touched sign came at
        `oldest_s` (upserts: uint64[n] touched, distinct); `final` (close): every pending
        row."""
        with self._lock:
            state = self._tables[table]
            touched = state.slots(upserts)
            pending = np.flatnonzero(state.flags & _PENDING)
            if pending.size:
                pending = pending[~np.isin(pending, touched)]
            budget = self.budget(upserts.size)
            if not final and pending.size:
                due = state.since[pending] + self.max_staleness_s - self.interval_s <= now_s
                rest = pending[~due]
                rest = _best(rest, state.score[rest], budget)
                pending = np.concatenate([pending[due], rest])
            slots = np.concatenate([touched, pending])
            signs = np.concatenate([upserts, state.signs(pending)])

        def select(snapshot: Snapshot) -> None:
            self._select(table, snapshot, slots, upserts.size, budget, oldest_s, now_s, final)
        return Plan(signs, select)

    # --- once the rows are read -----------------------------------------------------------

    def _select(self, table: str, snapshot: Snapshot, slots: np.ndarray, touched: int,
                budget: int, oldest_s: float, now_s: float, final: bool) -> None:
        """Cut `snapshot` (rows read for `slots`: touched first) down to the rows to ship and
        update the per-row state (see the module docstring)."""
        with self._lock:
            state = self._tables[table]
            if snapshot.deleted.size:  # never deferred; serving will not hold them
                gone = state.slots(snapshot.deleted, add=False)
                gone = gone[gone >= 0]
                state.pending -= int(np.count_nonzero(state.flags[gone] & _PENDING))
                state.flags[gone] = 0
            flags = state.flags[slots]
            was_pending = (flags & _PENDING) != 0
            is_touched = np.arange(slots.size) < touched
            live = is_touched | was_pending  # a pending row shipped or deleted meanwhile: not here
            rows = snapshot.rows
            score = state.score[slots].copy()
            if self.rank == "delta":
                known = (flags & _KNOWN) != 0
                shipped = dequantize_rows(state.q[slots], state.scale[slots], state.offset[slots])
                change = np.sqrt(np.square(rows - shipped).sum(axis=1)).astype(np.float32)
                fresh = np.where(known, change, np.float32(np.inf))
                score = np.where(is_touched, fresh, score)
            else:
                score = np.where(is_touched, np.where(was_pending, score + 1, 1), score)
            since = np.where(was_pending, state.since[slots], oldest_s)
            due = live & (final | (since + self.max_staleness_s - self.interval_s <= now_s))
            ship = due.copy()  # the bound is kept on top of the budget: hot rows never wait
            rest = np.flatnonzero(live & ~due)
            ship[_best(rest, score[rest], budget)] = True
            hold = live & ~ship
            state.pending += int(np.count_nonzero(hold & ~was_pending)) - int(
                np.count_nonzero(was_pending & ~hold))
            sent = slots[ship]
            state.flags[sent] = _KNOWN
            state.score[sent] = 0
            if self.rank == "delta" and sent.size:
                _keep_copy(state, sent, rows[ship])
            kept = slots[hold]
            state.flags[kept] |= _PENDING
            state.since[kept] = since[hold]
            state.score[kept] = score[hold]
            snapshot.signs = snapshot.signs[ship]
            snapshot.rows = rows[ship]
            if snapshot.state is not None:
                snapshot.state = snapshot.state[ship]
            snapshot.pending = (self.pending, round(self.max_staleness_s * 1000))


__all__ = ["Plan", "PrioritizedUpdates"]
