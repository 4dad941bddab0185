"""A snapshot: one table's flushed rows on their way to a packet, and the packet bounds.

Snapshots of a table still queued merge (latest rows win) only while the merged one stays
within the packet bound; a snapshot over it is cut into contiguous sign ranges. The writer
(producer/writer.py) freezes, stores and releases them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from persia_inc.packet_format import FlushReason, PacketHeader

_FRAMING_BYTES = 64 * 1024  # a packet's bytes besides its rows: schema (twice), header, IPC framing


def packet_row_bytes(dim: int, state_dim: int = 0) -> int:
    """Bytes one row takes in a packet, at most: its sign, float32 values (deleted rows carry
    zeros; float16 packets take less), optimizer state and op byte."""
    return 8 + 4 * (dim + state_dim) + 1


def packet_row_limit(dim: int, state_dim: int, max_rows: int, max_bytes: int) -> int:
    """The most rows (upserts and deletes) a packet of width `dim` (+ `state_dim`) may hold
    under `max_rows` and `max_bytes`; at least 1."""
    by_bytes = (max_bytes - _FRAMING_BYTES) // packet_row_bytes(dim, state_dim)
    return max(1, min(max_rows, by_bytes))


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
    sequence: int | None = None  # set at the first put attempt, then frozen
    header: PacketHeader | None = None  # set with `sequence`
    read: Callable[[], np.ndarray | None] | None = None

    def read_rows(self) -> None:
        """Fill `rows` (and `state`) if they are still to be read; at most once."""
        read, self.read = self.read, None
        if read is not None:
            self.state = read()

    @property
    def nbytes(self) -> int:
        state = 0 if self.state is None else self.state.nbytes
        return self.signs.nbytes + self.rows.nbytes + self.deleted.nbytes + state

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
        return self.sequence is None and self.dim == newer.dim and same_state

    def merge(self, newer: Snapshot, max_rows: int) -> bool:
        """Fold `newer` into this snapshot: its upserts and deletes replace ours (latest wins),
        unless the result would hold more than `max_rows` rows: then nothing changes (False).
        The rows are copied. Runs where `submit` is called,
        between training steps, so rows still to be read are read here (after the bound check:
        a refused merge reads nothing)."""
        touched = np.concatenate([newer.signs, newer.deleted])
        keep = ~np.isin(self.signs, touched)
        keep_deleted = ~np.isin(self.deleted, touched)
        merged = int(np.count_nonzero(keep)) + int(np.count_nonzero(keep_deleted)) + newer.row_count
        if merged > max_rows:
            return False
        self.read_rows()
        newer.read_rows()
        self.signs = np.concatenate([self.signs[keep], newer.signs])
        self.rows = np.concatenate([self.rows[keep], newer.rows])
        if self.state is not None and newer.state is not None:
            self.state = np.concatenate([self.state[keep], newer.state])
        self.deleted = np.concatenate([self.deleted[keep_deleted], newer.deleted])
        self.reason = newer.reason
        self.created_ns = newer.created_ns
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
