"""A flush on its way to a packet: each table's snapshot, the cut of them all, the bounds.

One flush reads every table that holds signs into `Snapshot`s, one per table, and hands them
to the writer as one `FlushCut`: one packet (a v2 cut), one object, one announcement. A cut
still queued merges a newer one (latest rows win, per table) only while the merged cut stays
within the packet bound; a cut over it goes out as consecutive packets: its tables packed in
order, and a table over the bound by itself cut into contiguous sign ranges. The writer
(producer/writer.py) freezes, stores and releases them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from persia_inc.packet_format import CutHeader, FlushReason, TableRows

_FRAMING_BYTES = 64 * 1024  # a packet's bytes besides its rows: schema (twice), header, IPC framing
_TABLE_FRAMING_BYTES = 256  # each table's entry in the header's table list, at most


def packet_row_bytes(dim: int, state_dim: int = 0) -> int:
    """Bytes one row takes in a packet, at most: its sign, float32 values and optimizer state
    (float16 and int8 packets take less), their list offsets, the table index, the int8
    scale and offset, and the op byte."""
    return 8 + 4 * (dim + state_dim) + 8 + 2 + 4 + 1


def packet_row_limit(dim: int, state_dim: int, max_rows: int, max_bytes: int) -> int:
    """The most rows (upserts and deletes) a packet of width `dim` (+ `state_dim`) may hold
    under `max_rows` and `max_bytes`; at least 1."""
    by_bytes = (max_bytes - _FRAMING_BYTES) // packet_row_bytes(dim, state_dim)
    return max(1, min(max_rows, by_bytes))


class RowBlock:
    """One float32 block a flush cuts the rows of every deferred-read table from, end to end:
    the packet's values column is then this block, not a copy of the tables' rows
    (packet_format.cut_codec `_joined`)."""

    __slots__ = ("used", "values")

    def __init__(self, size: int) -> None:
        self.values = np.empty(size, np.float32)
        self.used = 0

    def take(self, n: int, dim: int) -> np.ndarray:
        """float32[n, dim], uninitialized: the next part of the block, or fresh memory when it
        is full (the update policy may read more rows than were buffered)."""
        end = self.used + n * dim
        if end > self.values.size:
            return np.empty((n, dim), np.float32)
        rows = self.values[self.used:end].reshape(n, dim)
        self.used = end
        return rows


@dataclass(slots=True, eq=False)
class Snapshot:
    """One table's flushed rows, read on the training thread.

    signs: uint64[n] upserted signs; rows: float32[n, dim] their values at flush time;
    state: float32[n, k] optimizer state or None; deleted: uint64[d] evicted signs;
    taken_s: monotonic time of the (oldest merged) read; created_ns: wall time of the latest;
    oldest_s: when the oldest of its signs was buffered, on the producer's clock (given back
    with the signs if a deferred read fails).
    read: when set, `rows` is not read yet: read() fills it and returns the state (or None);
    the writer calls it through `read_rows` (deferred reads, see `IncrementalProducer`).
    select: when set (the prioritized update policy, producer/update_policy.py), `read_rows`
    calls select(self) once the rows are read: it cuts the snapshot down to the rows to ship.
    pending: (rows held back over all tables, the staleness bound in ms) after the select,
    for the cut's header; None under the default policy.
    finite: the writer found every value of `rows` finite (checked once read; False: not
    checked, or not finite).
    """

    table: str
    signs: np.ndarray
    rows: np.ndarray
    deleted: np.ndarray
    dim: int
    reason: FlushReason
    state: np.ndarray | None = None
    taken_s: float = field(default_factory=time.monotonic)
    created_ns: int = field(default_factory=time.time_ns)
    oldest_s: float | None = None
    read: Callable[[], np.ndarray | None] | None = None
    select: Callable[[Snapshot], None] | None = None
    pending: tuple[int, int] | None = None
    finite: bool = False

    def read_rows(self) -> None:
        """Fill `rows` (and `state`) if they are still to be read, then run the select; at
        most once."""
        read, self.read = self.read, None
        if read is not None:
            self.state = read()
        select, self.select = self.select, None
        if select is not None:
            select(self)

    @property
    def nbytes(self) -> int:
        state = 0 if self.state is None else self.state.nbytes
        return self.signs.nbytes + self.rows.nbytes + self.deleted.nbytes + state

    def table_rows(self) -> TableRows:
        """This table's share of its packet (rows read)."""
        return TableRows(self.table, self.signs, self.rows.reshape(-1, self.dim), self.deleted,
                         self.state)

    @property
    def state_dim(self) -> int:
        """Width of the optimizer state (0: none, or not read yet)."""
        return 0 if self.state is None else int(self.state.shape[1])

    @property
    def encoded_size_bound(self) -> int:
        """More bytes than its packet takes: every row's sign, float32 values (deleted rows
        carry zeros), state and op byte, plus room for the schema (written twice, with the
        header) and the IPC framing."""
        return self.row_count * packet_row_bytes(self.dim, self.state_dim) + _FRAMING_BYTES

    @property
    def row_count(self) -> int:
        return int(self.signs.size + self.deleted.size)

    def can_merge(self, newer: Snapshot) -> bool:
        same_state = (self.state is None) == (newer.state is None) and (
            self.state is None or self.state.shape[1] == newer.state.shape[1])  # type: ignore[union-attr]
        return self.dim == newer.dim and same_state

    def merged_row_count(self, newer: Snapshot) -> int:
        """Rows this snapshot would hold with `newer` folded in (latest wins)."""
        touched = np.concatenate([newer.signs, newer.deleted])
        return (int(np.count_nonzero(~np.isin(self.signs, touched)))
                + int(np.count_nonzero(~np.isin(self.deleted, touched))) + newer.row_count)

    def merge(self, newer: Snapshot, max_rows: int) -> bool:
        """Fold `newer` into this snapshot: its upserts and deletes replace ours (latest wins),
        unless the result would hold more than `max_rows` rows: then nothing changes (False).
        The rows are copied. Runs where `submit` is called,
        between training steps, so rows still to be read are read here (after the bound check:
        a refused merge reads nothing)."""
        if self.merged_row_count(newer) > max_rows:
            return False
        self.read_rows()
        newer.read_rows()
        touched = np.concatenate([newer.signs, newer.deleted])
        keep = ~np.isin(self.signs, touched)
        keep_deleted = ~np.isin(self.deleted, touched)
        self.signs = np.concatenate([self.signs[keep], newer.signs])
        self.rows = np.concatenate([self.rows[keep], newer.rows])
        if self.state is not None and newer.state is not None:
            self.state = np.concatenate([self.state[keep], newer.state])
        self.deleted = np.concatenate([self.deleted[keep_deleted], newer.deleted])
        self.reason = newer.reason
        self.created_ns = newer.created_ns
        self.finite = self.finite and newer.finite
        if self.oldest_s is None:
            self.oldest_s = newer.oldest_s
        return True

    def split(self, max_rows: int) -> list[Snapshot]:
        """Cut a snapshot in sign order (frozen by the writer, rows read) into packets of at
        most `max_rows` rows, each a contiguous range of signs with its upserts and deletes:
        this snapshot keeps the first range, the others are returned in sign order (views of
        these arrays). [] when it already fits."""
        n = self.row_count
        if n <= max_rows:
            return []
        signs, deleted = self.signs, self.deleted
        if deleted.size:  # piece k starts at the (k * max_rows)-th sign of both, in order
            starts = np.sort(np.concatenate([signs, deleted]), kind="stable")[max_rows::max_rows]
            upsert_cuts = np.searchsorted(signs, starts)
            delete_cuts = np.searchsorted(deleted, starts)
        else:
            upsert_cuts = np.arange(max_rows, n, max_rows)
            delete_cuts = np.zeros(upsert_cuts.size, np.int64)
        ub = [0, *upsert_cuts.tolist(), signs.size]
        db = [0, *delete_cuts.tolist(), deleted.size]
        rows, state = self.rows, self.state
        pieces = [Snapshot(self.table, signs[ub[k]:ub[k + 1]], rows[ub[k]:ub[k + 1]],
                           deleted[db[k]:db[k + 1]], self.dim, self.reason,
                           None if state is None else state[ub[k]:ub[k + 1]],
                           taken_s=self.taken_s, created_ns=self.created_ns,
                           oldest_s=self.oldest_s)
                  for k in range(1, len(ub) - 1)]
        self.signs, self.rows, self.deleted = signs[:ub[1]], rows[:ub[1]], deleted[:db[1]]
        if state is not None:
            self.state = state[:ub[1]]
        return pieces


def cut_size_bound(rows_by_width: list[tuple[int, int, int]]) -> int:
    """More bytes than a cut takes whose tables hold (rows, dim, state_dim) each."""
    return _FRAMING_BYTES + sum(
        rows * packet_row_bytes(dim, state_dim) + _TABLE_FRAMING_BYTES
        for rows, dim, state_dim in rows_by_width)


@dataclass(slots=True, eq=False)
class FlushCut:
    """One flush of a producer: a snapshot per table that held signs, one packet (a v2 cut).

    `sequence` and `header` are set when the writer freezes it (first store attempt); from
    then on its content never changes (its key may already be visible).
    """

    parts: list[Snapshot]
    reason: FlushReason
    sequence: int | None = None
    header: CutHeader | None = None

    @property
    def tables(self) -> list[str]:
        return [part.table for part in self.parts]

    @property
    def row_count(self) -> int:
        return sum(part.row_count for part in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    @property
    def taken_s(self) -> float:
        """Monotonic time of the oldest read it holds."""
        return min(part.taken_s for part in self.parts)

    @property
    def created_ns(self) -> int:
        """Wall time of the newest flush it holds: the cut's time in its header."""
        return max(part.created_ns for part in self.parts)

    @property
    def encoded_size_bound(self) -> int:
        return cut_size_bound([(p.row_count, p.dim, p.state_dim) for p in self.parts])

    @property
    def pending_read(self) -> bool:
        return any(part.read is not None or part.select is not None for part in self.parts)

    def read_rows(self) -> None:
        """Read every part's rows still to be read (deferred reads)."""
        for part in self.parts:
            part.read_rows()

    def merge(self, newer: FlushCut, max_rows: int, max_bytes: int) -> bool:
        """Fold `newer` into this cut, table by table (latest wins), unless this cut is frozen,
        a table changed width, or the merged cut would pass `max_rows` or `max_bytes`: then
        nothing changes (False)."""
        if self.sequence is not None:
            return False
        if any(part.select is not None for part in (*self.parts, *newer.parts)):
            return False  # selects run in flush order, on the writer thread (update_policy.py)
        mine = {part.table: part for part in self.parts}
        widths: list[tuple[int, int, int]] = []
        for part in newer.parts:
            old = mine.get(part.table)
            if old is None:
                widths.append((part.row_count, part.dim, part.state_dim))
            elif not old.can_merge(part):
                return False
            else:
                widths.append((old.merged_row_count(part), old.dim, old.state_dim))
        merged_tables = set(newer.tables)
        widths += [(p.row_count, p.dim, p.state_dim) for p in self.parts
                   if p.table not in merged_tables]
        if sum(w[0] for w in widths) > max_rows or cut_size_bound(widths) > max_bytes:
            return False
        for part in newer.parts:
            old = mine.get(part.table)
            if old is None:
                self.parts.append(part)
            else:
                old.merge(part, max_rows)
        self.reason = newer.reason
        return True

    def split(self, max_rows: int, max_bytes: int) -> list[FlushCut]:
        """Cut a frozen cut (rows read, each part in sign order) into packets within
        `max_rows` and `max_bytes`: its tables packed in order, a table too big by itself cut
        into contiguous sign ranges (`Snapshot.split`). This cut keeps the first packet's
        parts; the others are returned in order. [] when it already fits."""
        if (self.row_count <= max_rows
                and self.encoded_size_bound <= max_bytes):
            return []
        pieces: list[Snapshot] = []
        for part in self.parts:
            limit = packet_row_limit(part.dim, part.state_dim, max_rows,
                                     max_bytes - _TABLE_FRAMING_BYTES)
            pieces += [part, *part.split(limit)]
        groups: list[list[Snapshot]] = [[]]
        rows, size = 0, _FRAMING_BYTES
        for piece in pieces:
            piece_bytes = piece.row_count * packet_row_bytes(piece.dim, piece.state_dim)
            piece_bytes += _TABLE_FRAMING_BYTES
            if groups[-1] and (rows + piece.row_count > max_rows or size + piece_bytes > max_bytes):
                groups.append([])
                rows, size = 0, _FRAMING_BYTES
            groups[-1].append(piece)
            rows += piece.row_count
            size += piece_bytes
        self.parts = groups[0]
        return [FlushCut(group, self.reason) for group in groups[1:]]
