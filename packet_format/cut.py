"""Packet v2, a flush cut: every table one producer flushed at one moment, in one packet.

A cut is one object, one announcement and one Apply per shard, whatever the number of tables,
and serving sees the producer's tables at one consistent point. Its stream is the producer's
cut lane (`CUT_LANE`): the key is `{model}/~cuts/{producer}/{generation}-{sequence}.arrow`, and
(generation, sequence) count the producer's cuts. A v1 packet reads as a cut of one table
whose lane is that table (its stream stays (table, producer)).

This module holds the data types; `cut_codec` encodes and decodes them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from persia_inc.packet_format.header import (
    FLUSH_REASONS,
    FlushReason,
    Position,
    check_name,
    check_position,
)

CUT_FORMAT_VERSION = 2
CUT_LANE = "~cuts"
"""The stream lane of v2 packets, and its folder. It cannot be a table name (names start with a
letter or a digit), so a (lane, producer) stream key never clashes with a v1 (table, producer)
one; and it starts with neither '_' nor '.', which dataset readers (pyarrow, Spark, Hadoop) skip
as hidden, so `pyarrow.dataset.dataset(incremental_dir, format="ipc")` reads every cut."""
LEGACY_CUT_LANE = "_cuts"
"""The cut lane's earlier folder. Cuts stored there still read, as the same lane: listings cover
both folders (`lane_folders`), and the name in a path, watermark or announcement reads as
`CUT_LANE`. A producer's cuts there all precede its cuts in `CUT_LANE` (a restarted producer
takes a new generation), and the folder sorts first ('_' < '~')."""

CutDtype = Literal["float32", "float16", "int8"]
CUT_DTYPES: tuple[str, ...] = ("float32", "float16", "int8")


def check_lane(value: object) -> str:
    """The lane `value` names: `CUT_LANE` for the cut lane (under either of its names), else
    `value` if it is a valid table name, else ValueError."""
    if value in (CUT_LANE, LEGACY_CUT_LANE):
        return CUT_LANE
    return check_name("table", value)


def lane_folders(lane: str) -> tuple[str, ...]:
    """The folders a lane's packets are stored under, in key order: the cut lane's legacy
    folder and its own; a table's own name."""
    return (LEGACY_CUT_LANE, CUT_LANE) if check_lane(lane) == CUT_LANE else (lane,)


@dataclass(frozen=True, slots=True)
class CutTable:
    """One table's entry in a cut header: its width and how many rows the cut holds."""

    name: str
    dim: int
    rows: int = 0
    deleted_rows: int = 0
    state_dim: int = 0

    def __post_init__(self) -> None:
        check_name("table", self.name)
        for what in ("dim", "rows", "deleted_rows", "state_dim"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"table {self.name!r}: {what} must be a non-negative integer, "
                                 f"got {value!r}")
        if self.dim == 0:
            raise ValueError(f"table {self.name!r}: dim must be positive")


@dataclass(frozen=True, slots=True)
class CutHeader:
    """Who wrote a cut, where it sits in the producer's stream, and which tables it holds.

    `tables` (in packet order), `checksum` and the row counts are filled in by `write_cut`;
    a writer passes the tables' names and dims. `lane` is `CUT_LANE` for a v2 packet and the
    table name for a v1 packet read as a cut.

    max_staleness_ms, pending_rows: under a prioritized update policy (producer/
    update_policy.py) the producer's staleness bound and the touched rows it still held back
    after this cut: serving, after this cut, differs from training in at most those rows
    (besides rows touched since the flush), each shipped within the bound. 0 and 0 (not
    written) under the default policy, which holds nothing back; older readers ignore them.
    """

    model: str
    producer: str
    generation: int
    sequence: int
    created_at_ns: int = field(default_factory=time.time_ns)
    flush_reason: FlushReason = "explicit"
    dtype: CutDtype = "float32"
    tables: tuple[CutTable, ...] = ()
    checksum: str = ""
    lane: str = CUT_LANE
    format_version: int = CUT_FORMAT_VERSION
    pending_rows: int = 0
    max_staleness_ms: int = 0

    def __post_init__(self) -> None:
        for what in ("pending_rows", "max_staleness_ms"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
        check_name("model", self.model)
        check_name("producer", self.producer)
        object.__setattr__(self, "lane", check_lane(self.lane))
        check_position(self.generation, self.sequence)
        if self.flush_reason not in FLUSH_REASONS:
            raise ValueError(f"flush_reason must be one of {FLUSH_REASONS}, got {self.flush_reason!r}")
        if self.dtype not in CUT_DTYPES:
            raise ValueError(f"dtype must be one of {CUT_DTYPES}, got {self.dtype!r}")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError(f"a cut lists each table once, got {names}")

    @property
    def position(self) -> Position:
        return (self.generation, self.sequence)

    @property
    def rows(self) -> int:
        """Upserted rows over all tables."""
        return sum(t.rows for t in self.tables)

    @property
    def deleted_rows(self) -> int:
        return sum(t.deleted_rows for t in self.tables)

    @property
    def table(self) -> str:
        """The stream lane, under the name v1 code reads a packet's stream by."""
        return self.lane


@dataclass(frozen=True, slots=True, eq=False)
class TableRows:
    """One table's share of a cut. signs: uint64[n] upserted; embeddings: float32[n, dim]
    (a view on the packet's bytes when stored as float32); deleted: uint64[d];
    state: float32[n, k] optimizer state or None."""

    name: str
    signs: np.ndarray
    embeddings: np.ndarray
    deleted: np.ndarray
    state: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def row_count(self) -> int:
        """Upserts plus deletes."""
        return int(self.signs.size + self.deleted.size)

    @property
    def nbytes(self) -> int:
        state = 0 if self.state is None else self.state.nbytes
        return self.signs.nbytes + self.embeddings.nbytes + self.deleted.nbytes + state


@dataclass(frozen=True, slots=True, eq=False)
class Cut:
    """A decoded cut: its header and each table's rows, in packet order."""

    header: CutHeader
    tables: tuple[TableRows, ...]

    def __iter__(self) -> Iterator[TableRows]:
        return iter(self.tables)

    def table(self, name: str) -> TableRows:
        for rows in self.tables:
            if rows.name == name:
                return rows
        raise KeyError(f"table {name!r} is not in this cut (it holds "
                       f"{[t.name for t in self.tables]})")

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables)
