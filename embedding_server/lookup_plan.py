"""A multi-table lookup's plan and its answer, for `EmbeddingClient.lookup_unique`.

`plan_tables` does in one compiled pass over a request's signs what per-table `np.unique`,
`group_by_shard` and fancy indexing did in about 30 numpy calls per table: deduplicate each
table's signs with a hash set, route every distinct sign to its shard (splitmix64, as
`sharding.shard_of`), lay the distinct signs out shard-major and table-minor (so a shard's
request is one contiguous slice of them, and its answer one contiguous block of rows), and
give every asked sign the position of its row. The answer, `UniqueRows`, keeps the distinct
rows of every table of one width in one matrix (with one width, each shard's answer block is
one slice of it), which the caller pools with one `embedding_bag` per width, reading rows
through `index` instead of copying them into request order.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numba as nb
import numpy as np

from persia_inc.embedding_server._wire import _LEN, BlocksReply, _fields, _varint

_jit = nb.njit(cache=True, nogil=True, boundscheck=False)
_COUNTS_TAG, _SIGNS_TAG = bytes([2 << 3 | _LEN]), bytes([3 << 3 | _LEN])


@functools.lru_cache(maxsize=256)
def _tables_field(tables: tuple[str, ...]) -> bytes:
    """A `LookupBlocksRequest`'s tables field (repeated string)."""
    parts: list[bytes | memoryview] = []
    for name in tables:
        _fields(parts, ((1, name),))
    return b"".join(parts)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64, as sharding.py
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


@_jit
def _mix(sign: np.uint64) -> np.uint64:
    """splitmix64's finalizer: its remainder by the shard count is the sign's shard
    (`sharding.shard_of`), its top bits the sign's slot in the plan's hash set."""
    z = sign + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


@_jit
def _plan(signs: np.ndarray, starts: np.ndarray, num_shards: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = signs.shape[0]
    tables = starts.shape[0] - 1
    shards = np.uint64(num_shards)
    low = np.uint64(num_shards - 1)
    power_of_two = (num_shards & (num_shards - 1)) == 0  # z % n == z & (n - 1): no division
    local = np.empty(n, np.int64)  # per sign: its distinct sign's id (first-occurrence order)
    distinct = np.empty(n, np.uint64)
    owner = np.empty(n, np.int64)
    counts = np.zeros((num_shards, tables), np.int64)
    first = np.zeros(tables + 1, np.int64)  # distinct signs before table t
    longest = 1
    for t in range(tables):
        longest = max(longest, starts[t + 1] - starts[t])
    size = 16
    while size < 4 * longest:
        size *= 2
    keys = np.empty(size, np.uint64)
    slots = np.full(size, -1, np.int64)
    u = 0
    for t in range(tables):
        lo, hi = starts[t], starts[t + 1]
        width, bits = 16, 4  # a quarter full at most: short probes
        while width < 4 * (hi - lo):
            width *= 2
            bits += 1
        mask = width - 1
        down = np.uint64(64 - bits)
        fresh = u  # a slot holding an earlier table's id (< fresh) is free: no refill per table
        for i in range(lo, hi):
            sign = signs[i]
            z = _mix(sign)
            h = np.int64(z >> down)
            while True:
                held = slots[h]
                if held < fresh:
                    slots[h] = u
                    keys[h] = sign
                    distinct[u] = sign
                    s = np.int64(z & low) if power_of_two else np.int64(z % shards)
                    owner[u] = s
                    counts[s, t] += 1
                    local[i] = u
                    u += 1
                    break
                if keys[h] == sign:
                    local[i] = held
                    break
                h = (h + 1) & mask
        first[t + 1] = u
    bounds = np.empty((num_shards, tables + 1), np.int64)
    cursor = np.empty((num_shards, tables), np.int64)
    at = 0
    for shard in range(num_shards):
        for t in range(tables):
            bounds[shard, t] = at
            cursor[shard, t] = at
            at += counts[shard, t]
        bounds[shard, tables] = at
    position = np.empty(u, np.int64)
    grouped = np.empty(u, np.uint64)
    for t in range(tables):
        for j in range(first[t], first[t + 1]):
            s = owner[j]
            q = cursor[s, t]
            cursor[s, t] = q + 1
            position[j] = q
            grouped[q] = distinct[j]
    index = np.empty(n, np.int64)
    for i in range(n):
        index[i] = position[local[i]]
    return grouped, bounds, index


@dataclass(frozen=True, slots=True)
class LookupPlan:
    """What to ask each shard for several tables' signs at once.

    grouped: uint64[u] every table's distinct signs, shard-major, table-minor; bounds:
    int64[S, T + 1], shard s's signs of table t are grouped[bounds[s, t]:bounds[s, t + 1]] (so
    all of shard s's are grouped[bounds[s, 0]:bounds[s, T]], and bounds[s, T] ==
    bounds[s + 1, 0]); index: int64[n] per asked sign (the tables' signs concatenated in
    request order), the position of its distinct sign in `grouped`; starts: int64[T + 1],
    table t's asked signs are index[starts[t]:starts[t + 1]].
    """

    tables: tuple[str, ...]
    grouped: np.ndarray
    bounds: np.ndarray
    index: np.ndarray
    starts: np.ndarray
    plan_s: float = 0.0

    def shards(self) -> list[int]:
        """The shards holding any of the signs (shard 0 when there are none)."""
        return [int(s) for s in np.flatnonzero(self.bounds[:, -1] > self.bounds[:, 0])] or [0]

    def request(self, shard: int, num_shards: int, allow_behind: bool = False,
                region: str = "") -> bytes:
        """`LookupBlocksRequest` wire bytes for `shard`: every table, its count of signs, and
        the signs in one block (allow_behind: a replica that is catching up answers too),
        the signs copied once; with `region`, the lookup region holding them instead."""
        bounds = self.bounds[shard]
        counts = b"".join(_varint(c) for c in np.diff(bounds).tolist())
        parts: list[bytes | memoryview] = [_tables_field(self.tables)]
        if counts:
            parts += [_COUNTS_TAG, _varint(len(counts)), counts]
        lo, hi = int(bounds[0]), int(bounds[-1])
        if hi > lo and not region:
            parts += [_SIGNS_TAG, _varint(8 * (hi - lo)), self.grouped[lo:hi].data]
        _fields(parts, ((4, shard), (5, num_shards), (6, int(allow_behind)), (7, region)))
        return b"".join(parts)

    def placing(self, widths: Sequence[int | None]) -> Placing:
        """A `Placing` for the shards' blocks, with a matrix when every table's expected width
        (None: unknown) is known and one (else it places nothing)."""
        one = widths and None not in widths and len(set(widths)) == 1
        return Placing(self, np.empty((self.grouped.shape[0], widths[0] or 0), np.float32)
                       if one else None)

    def assemble(self, replies: Mapping[int, BlocksReply],
                 error: Callable[[int, str], Exception],
                 placed: Placing | None = None) -> UniqueRows:
        """The shards' answers (shard -> reply, for every shard of `shards()`) as `UniqueRows`:
        with one width, each shard's block copied once, whole, into the width's matrix (else
        each (shard, table) share into its width's), but for the blocks `placed` holds already.
        A reply that does not answer the tables asked, answers another width than its
        siblings, or the wrong number of rows, raises `error(shard, message)`."""
        used = sorted(replies)
        tables = len(self.tables)
        dims = replies[used[0]].dims
        for shard in used:
            got = replies[shard].dims
            if got.shape != (tables,):
                raise error(shard, f"answered {got.size} tables, asked {tables}")
            if not np.array_equal(got, dims):
                t = int(np.flatnonzero(got != dims)[0])
                raise error(shard, f"table {self.tables[t]!r}: the shards answered dims "
                                   f"{sorted({int(got[t]), int(dims[t])})}")
        widths = dims.tolist()
        counts = np.diff(self.bounds, axis=1)  # [S, T]
        for shard in used:
            expected = int(counts[shard] @ dims)
            if replies[shard].rows.size != expected:
                raise error(shard, f"answered {replies[shard].rows.size} floats, expected {expected} "
                                   f"for {int(counts[shard].sum())} signs")
        by_name = dict(zip(self.tables, widths, strict=True))
        if len(set(widths)) == 1:  # the one width: grouped's positions are the matrix's rows
            dim = widths[0]
            rows, done = ((placed.rows, placed.done) if placed is not None and placed.rows is not None
                          and placed.rows.shape[1] == dim
                          else (np.empty((self.grouped.shape[0], dim), np.float32), set()))
            for shard in used:
                if shard not in done:
                    rows[self.bounds[shard, 0]:self.bounds[shard, -1]] = replies[shard].rows.reshape(-1, dim)
            return UniqueRows({dim: rows}, self.index, self.starts, by_name, self.plan_s)
        # several widths: each width's matrix holds its tables' rows, shard-major as grouped
        where = np.empty(self.grouped.shape[0], np.int64)  # grouped position -> matrix row
        sizes = dict.fromkeys(widths, 0)
        for t, dim in enumerate(widths):
            sizes[dim] += int(counts[:, t].sum())
        matrices = {dim: np.empty((size, dim), np.float32) for dim, size in sizes.items()}
        filled = dict.fromkeys(widths, 0)
        for shard in used:
            block, offset = replies[shard].rows, 0
            for t, dim in enumerate(widths):
                lo, hi = int(self.bounds[shard, t]), int(self.bounds[shard, t + 1])
                if hi > lo:
                    at = filled[dim]
                    matrices[dim][at:at + hi - lo] = block[offset:offset + (hi - lo) * dim].reshape(-1, dim)
                    where[lo:hi] = np.arange(at, at + hi - lo)
                    filled[dim] = at + hi - lo
                    offset += (hi - lo) * dim
        return UniqueRows(matrices, where[self.index], self.starts, by_name, self.plan_s)


@dataclass(slots=True)
class Placing:
    """Shards' answer blocks copied into one matrix as each arrives, on the thread that
    received it (numpy lets the GIL go while it copies), so the copy overlaps another shard's
    answer still arriving. rows: float32[u, dim], or None (nothing is placed); done: the
    shards whose blocks are in it."""

    plan: LookupPlan
    rows: np.ndarray | None
    done: set[int] = field(default_factory=set)

    def take(self, shard: int, reply: BlocksReply) -> BlocksReply:
        """Place `shard`'s block if the reply answers every table with the matrix's width and
        the rows asked (else `assemble` checks it and copies it itself); returns the reply."""
        rows, plan = self.rows, self.plan
        if rows is not None and reply.dims.shape == (len(plan.tables),) and (
                reply.dims == rows.shape[1]).all():
            lo, hi = int(plan.bounds[shard, 0]), int(plan.bounds[shard, -1])
            if reply.rows.size == (hi - lo) * rows.shape[1]:
                rows[lo:hi] = reply.rows.reshape(hi - lo, rows.shape[1])
                self.done.add(shard)
        return reply


def plan_tables(tables: tuple[str, ...], arrays: list[np.ndarray], num_shards: int) -> LookupPlan:
    """Plan a lookup of `arrays[t]` (uint64[n_t]) of table `tables[t]` over `num_shards`."""
    started = time.perf_counter()
    sizes = np.fromiter((a.shape[0] for a in arrays), np.int64, len(arrays))
    starts = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum(sizes, out=starts[1:])
    signs = arrays[0] if len(arrays) == 1 else (
        np.concatenate(arrays) if arrays else np.empty(0, np.uint64))
    grouped, bounds, index = _plan(signs, starts, num_shards)
    return LookupPlan(tables, grouped, bounds, index, starts, time.perf_counter() - started)


def warm_up() -> None:
    """Compile the plan's kernel (or load it from numba's cache) now: a serving worker calls
    this at start, so its first request does not pay the compilation."""
    plan_tables(("warm-up",), [np.zeros(2, np.uint64)], 2)


@dataclass(frozen=True, slots=True)
class UniqueRows:
    """The rows of a multi-table lookup, each distinct sign's row once.

    rows: dim -> float32[u_d, dim], the distinct signs' rows of every table of that width
    (tables in request order); index: int64[n] per asked sign (the tables' signs concatenated in
    request order) its row in rows[dims[table]]; starts: int64[T + 1], table t's asked signs are
    index[starts[t]:starts[t + 1]]; dims: table -> width, in request order; plan_s: seconds
    this client spent deduplicating and routing the signs.
    """

    rows: dict[int, np.ndarray]
    index: np.ndarray
    starts: np.ndarray
    dims: dict[str, int]
    plan_s: float = 0.0

    def table(self, position: int) -> np.ndarray:
        """float32[n_t, dim] the rows of the `position`-th table's asked signs, in order."""
        dim = list(self.dims.values())[position]
        return self.rows[dim][self.index[self.starts[position]:self.starts[position + 1]]]


__all__ = ["LookupPlan", "Placing", "UniqueRows", "plan_tables", "warm_up"]
