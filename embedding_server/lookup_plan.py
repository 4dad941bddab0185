"""A multi-table lookup's plan and its answer, for `EmbeddingClient.lookup_unique`.

`plan_tables` does in one compiled pass over a request's signs what per-table `np.unique`,
`group_by_shard` and fancy indexing did in about 30 numpy calls per table: deduplicate each
table's signs with a hash set, route every distinct sign to its shard (splitmix64, as
`sharding.shard_of`), lay the distinct signs out table-major and shard-minor (so every
(table, shard) share is one contiguous slice of the request, and its rows one contiguous slice
of the answer), and give every asked sign the position of its row. The answer, `UniqueRows`,
keeps the distinct rows of every table of one width in one matrix, which the caller pools
with one `embedding_bag` per width, reading rows through `index` instead of copying them into
request order.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numba as nb
import numpy as np

from persia_inc.embedding_server._wire import _LEN, LookupTablesReply, _fields, _varint

_jit = nb.njit(cache=True, nogil=True, boundscheck=False)
_ENTRY_TAG, _SIGNS_TAG = bytes([1 << 3 | _LEN]), bytes([2 << 3 | _LEN])  # TableSigns; its signs


@functools.lru_cache(maxsize=4096)
def _name_field(name: str) -> bytes:
    """A `TableSigns`' table field."""
    parts: list[bytes | memoryview] = []
    _fields(parts, ((1, name),))
    return b"".join(parts)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64, as sharding.py
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_F1 = np.uint64(0xFF51AFD7ED558CCD)  # murmur3 fmix64, for the hash set's slots
_F2 = np.uint64(0xC4CEB9FE1A85EC53)


@_jit
def _shard(sign: np.uint64, num_shards: np.uint64) -> np.int64:
    z = sign + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    z = z ^ (z >> np.uint64(31))
    return np.int64(z % num_shards)


@_jit
def _slot(sign: np.uint64, mask: np.uint64) -> np.int64:
    h = sign
    h = (h ^ (h >> np.uint64(33))) * _F1
    h = (h ^ (h >> np.uint64(33))) * _F2
    h = h ^ (h >> np.uint64(33))
    return np.int64(h & mask)


@_jit
def _plan(signs: np.ndarray, starts: np.ndarray, num_shards: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = signs.shape[0]
    tables = starts.shape[0] - 1
    shards = np.uint64(num_shards)
    local = np.empty(n, np.int64)  # per sign: its distinct sign's id (first-occurrence order)
    distinct = np.empty(n, np.uint64)
    owner = np.empty(n, np.int64)
    counts = np.zeros((tables, num_shards), np.int64)
    first = np.zeros(tables + 1, np.int64)  # distinct signs before table t
    longest = 1
    for t in range(tables):
        longest = max(longest, starts[t + 1] - starts[t])
    size = 16
    while size < 2 * longest:
        size *= 2
    keys = np.empty(size, np.uint64)
    slots = np.empty(size, np.int64)
    u = 0
    for t in range(tables):
        lo, hi = starts[t], starts[t + 1]
        width = 16
        while width < 2 * (hi - lo):
            width *= 2
        mask = np.uint64(width - 1)
        slots[:width] = -1
        for i in range(lo, hi):
            sign = signs[i]
            h = _slot(sign, mask)
            while True:
                held = slots[h]
                if held < 0:
                    slots[h] = u
                    keys[h] = sign
                    distinct[u] = sign
                    s = _shard(sign, shards) if num_shards > 1 else 0
                    owner[u] = s
                    counts[t, s] += 1
                    local[i] = u
                    u += 1
                    break
                if keys[h] == sign:
                    local[i] = held
                    break
                h = (h + 1) & np.int64(mask)
        first[t + 1] = u
    bounds = np.empty((tables, num_shards + 1), np.int64)
    cursor = np.empty((tables, num_shards), np.int64)
    for t in range(tables):
        bounds[t, 0] = first[t]
        for s in range(num_shards):
            cursor[t, s] = bounds[t, s]
            bounds[t, s + 1] = bounds[t, s] + counts[t, s]
    position = np.empty(u, np.int64)
    grouped = np.empty(u, np.uint64)
    for t in range(tables):
        for j in range(first[t], first[t + 1]):
            s = owner[j]
            p = cursor[t, s]
            cursor[t, s] = p + 1
            position[j] = p
            grouped[p] = distinct[j]
    index = np.empty(n, np.int64)
    for i in range(n):
        index[i] = position[local[i]]
    return grouped, bounds, index


@dataclass(frozen=True, slots=True)
class LookupPlan:
    """What to ask each shard for several tables' signs at once.

    grouped: uint64[u] every table's distinct signs, table-major, shard-minor; bounds:
    int64[T, S + 1], table t's signs for shard s are grouped[bounds[t, s]:bounds[t, s + 1]];
    index: int64[n] per asked sign (the tables' signs concatenated in request order), the
    position of its distinct sign in `grouped`; starts: int64[T + 1], table t's asked signs are
    index[starts[t]:starts[t + 1]].
    """

    tables: tuple[str, ...]
    grouped: np.ndarray
    bounds: np.ndarray
    index: np.ndarray
    starts: np.ndarray
    plan_s: float = 0.0

    def shards(self) -> list[int]:
        """The shards holding any of the signs (shard 0 when there are none)."""
        counts = (self.bounds[:, 1:] - self.bounds[:, :-1]).sum(axis=0)
        return [int(s) for s in np.flatnonzero(counts)] or [0]

    def request(self, shard: int, num_shards: int, allow_behind: bool = False) -> bytes:
        """`LookupTablesRequest` wire bytes for `shard`: every table, its share of the signs
        (allow_behind: a replica that is catching up answers too), the signs copied once."""
        parts: list[bytes | memoryview] = []
        bounds = self.bounds[:, shard:shard + 2].tolist()
        for name, (lo, hi) in zip(self.tables, bounds, strict=True):
            head = _name_field(name)
            if hi > lo:
                size = _varint(8 * (hi - lo))
                parts += [_ENTRY_TAG, _varint(len(head) + 1 + len(size) + 8 * (hi - lo)), head,
                          _SIGNS_TAG, size, self.grouped[lo:hi].data]
            else:
                parts += [_ENTRY_TAG, _varint(len(head)), head]
        _fields(parts, ((2, shard), (3, num_shards), (4, int(allow_behind))))
        return b"".join(parts)

    def assemble(self, replies: Mapping[int, LookupTablesReply],
                 error: Callable[[int, str], Exception]) -> UniqueRows:
        """The shards' answers (shard -> reply, for every shard of `shards()`) as `UniqueRows`:
        each (table, shard) share copied once, whole, into its width's matrix. A reply that
        does not answer the tables asked, or answers another width than its siblings, raises
        `error(shard, message)`."""
        used = sorted(replies)
        answers = {}
        for shard in used:
            named = replies[shard].tables
            if tuple(name for name, _ in named) != self.tables:
                raise error(shard, f"answered tables {[n for n, _ in named]}, asked {list(self.tables)}")
            answers[shard] = [reply for _, reply in named]
        dims: dict[str, int] = {}
        for t, name in enumerate(self.tables):
            answered = {answers[s][t].dim for s in used}
            if len(answered) != 1:
                raise error(used[0], f"table {name!r}: the shards answered dims {sorted(answered)}")
            dims[name] = answered.pop()
        index = self.index
        widths: list[int] = list(dims.values())
        # per width, where each table's distinct rows start in that width's matrix
        base = np.zeros(len(widths), np.int64)
        sizes: dict[int, int] = {}
        for t, dim in enumerate(widths):
            base[t] = sizes.get(dim, 0)
            sizes[dim] = int(base[t] + self.bounds[t, -1] - self.bounds[t, 0])
        if len(sizes) > 1:  # the positions count within each width's matrix, not over all
            index = index.copy()
            for t in range(len(widths)):
                index[self.starts[t]:self.starts[t + 1]] += base[t] - self.bounds[t, 0]
        rows = {dim: np.empty((size, dim), np.float32) for dim, size in sizes.items()}
        for t, dim in enumerate(widths):
            shift = base[t] - self.bounds[t, 0]
            for shard in used:
                lo, hi = self.bounds[t, shard], self.bounds[t, shard + 1]
                if hi > lo:
                    got = answers[shard][t].rows
                    if got.shape != (hi - lo, dim):
                        raise error(shard, f"table {self.tables[t]!r}: {got.shape[0]} rows for "
                                           f"{hi - lo} signs")
                    rows[dim][lo + shift:hi + shift] = got
        return UniqueRows(rows, index, self.starts, dims, self.plan_s)


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


__all__ = ["LookupPlan", "UniqueRows", "plan_tables", "warm_up"]
