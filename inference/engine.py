"""`PersiaInference`: request bytes -> embedding lookup -> dense model -> scores, in plain Python.

This is the whole serving logic, with no TorchServe in it, so tests, benchmarks and other
model servers call it directly; `inference.handler.PersiaHandler` is one front end of it.

Per batch of requests: decode each (a bad one becomes a `BatchError` for that request only);
gather every table's signs over all good requests; look them all up in one call
(`EmbeddingClient.lookup_unique`: each table's signs deduplicated, every shard reached once
for all tables, shards concurrently, each distinct row once in one matrix per width); sum-pool
them per sample and feature as PERSIA does (`torch.nn.functional.embedding_bag(mode="sum")`,
one call for all the tables of one width, reading the rows through the lookup's index rather
than copying them into request order); run the TorchScript model once over all rows under
`torch.no_grad()`; split the scores back per request.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn.functional import embedding_bag

from persia_inc.embedding_server.lookup_plan import UniqueRows, warm_up
from persia_inc.inference.batch import BatchError, DecodedBatch, PersiaBatch, SparseInput, decode_batch
from persia_inc.inference.spec import ModelSpec

if TYPE_CHECKING:
    from persia_inc.embedding_server.client import EmbeddingClient

log = logging.getLogger(__name__)

# lookup(table, signs: uint64[n]) -> float32[n, dim]; EmbeddingClient.lookup is one.
LookupFn = Callable[[str, np.ndarray], np.ndarray]
# lookup_tables({table: uint64[n_t]}) -> {table: float32[n_t, dim_t]}, rows in request order;
# EmbeddingClient.lookup_tables is one (it deduplicates and calls each shard once).
LookupTablesFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]
# lookup_unique({table: uint64[n_t]}) -> UniqueRows; EmbeddingClient.lookup_unique is one.
LookupUniqueFn = Callable[[Mapping[str, np.ndarray]], UniqueRows]


def per_table(lookup: LookupFn) -> LookupTablesFn:
    """A `LookupTablesFn` calling a one-table `lookup` per table (for fakes in tests)."""
    return lambda signs_by_table: {t: lookup(t, s) for t, s in signs_by_table.items()}


def unique_rows(lookup_tables: LookupTablesFn) -> LookupUniqueFn:
    """A `LookupUniqueFn` over a `LookupTablesFn` (rows in request order, no deduplication):
    each width's rows concatenated, the index counting through them."""

    def lookup(signs_by_table: Mapping[str, np.ndarray]) -> UniqueRows:
        got = lookup_tables(signs_by_table)
        by_dim: dict[int, list[np.ndarray]] = {}
        index, dims, starts = [], {}, [0]
        for table, signs in signs_by_table.items():
            rows = np.asarray(got[table])
            if rows.ndim != 2 or rows.shape[0] != signs.size:
                raise EmbeddingShapeError(f"table {table!r} returned rows of shape {rows.shape} "
                                          f"for {signs.size} signs")
            dims[table] = rows.shape[1]
            held = by_dim.setdefault(rows.shape[1], [])
            index.append(np.arange(signs.size, dtype=np.int64) + sum(r.shape[0] for r in held))
            held.append(rows)
            starts.append(starts[-1] + signs.size)
        return UniqueRows({d: np.concatenate(r).astype(np.float32, copy=False) for d, r in by_dim.items()},
                          np.concatenate(index) if index else np.empty(0, np.int64),
                          np.asarray(starts, np.int64), dims)

    return lookup


@dataclass(slots=True)
class Timings:
    """Seconds spent in each stage of the last call (monotonic clock)."""

    decode_s: float = 0.0
    dedup_s: float = 0.0  # deduplicating and routing the signs (the lookup's plan)
    lookup_s: float = 0.0  # the rest of the lookup: the shards' calls and their answers' assembly
    pool_s: float = 0.0
    forward_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.decode_s + self.dedup_s + self.lookup_s + self.pool_s + self.forward_s


def serving_threads() -> int:
    """Give torch one intra-op thread unless `OMP_NUM_THREADS` names a count; returns the count.

    A served batch's MLP takes well under a millisecond on one thread, and torch's idle
    OpenMP threads spin on the cores that the embedding servers, the frontend and the other
    workers need: on two cores, two threads per worker made the in-process p99 several times
    its p50 (bench/results/inference.json against inference_torch_threads_2.json)."""
    wanted = os.environ.get("OMP_NUM_THREADS", "").strip()
    count = int(wanted) if wanted.isdigit() and int(wanted) > 0 else 1
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


class EmbeddingShapeError(RuntimeError):
    """The embedding table's rows do not have the width the model was built for."""


class PersiaInference:
    """Serve `model` (forward(dense: float32[B, dense_dim], sparse) -> float32[B], sparse as
    `ModelSpec.sparse_shape(B)` says) with rows from `lookup_unique` (default: `lookup_tables`,
    through `unique_rows`). Thread-compatible: one instance per worker."""

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], spec: ModelSpec,
                 lookup_tables: LookupTablesFn, *, lookup_unique: LookupUniqueFn | None = None) -> None:
        self.model = model
        self.spec = spec
        self.lookup_tables = lookup_tables
        self.lookup_unique = lookup_unique or unique_rows(lookup_tables)
        self.last_timings = Timings()
        # per table: its features (model order) and where their pooled rows go
        self._groups: list[tuple[str, list[int], int, torch.Tensor]] = []
        columns = np.concatenate([[0], np.cumsum(spec.dims)])
        for table in spec.tables:
            features = spec.features_of(table.name)
            if spec.uniform_dim is not None:
                where = torch.tensor(features, dtype=torch.int64)
            else:  # the columns of its features in [B, sum(dims)]
                where = torch.from_numpy(np.concatenate(
                    [np.arange(columns[f], columns[f + 1]) for f in features]).astype(np.int64))
            self._groups.append((table.name, features, table.dim, where))
        # per width: its tables' positions, and where their pooled bags go (None: in order,
        # the whole [B, F, dim] input)
        self._widths: list[tuple[int, list[int], torch.Tensor | None]] = []
        for dim in dict.fromkeys(spec.dims):
            positions = [p for p, group in enumerate(self._groups) if group[2] == dim]
            where = torch.cat([self._groups[p][3] for p in positions])
            in_order = (spec.uniform_dim is not None
                        and torch.equal(where, torch.arange(len(spec.sparse))))
            self._widths.append((dim, positions, None if in_order else where))
        # one width, tables reading runs of features in model order (the table-per-feature and
        # shared-table layouts): one request's decoded signs and bags are already the lookup's
        # and the pooling's, in order (`_features_in_order`)
        self._in_order = (len(self._widths) == 1 and self._widths[0][2] is None
                          and [f for g in self._groups for f in g[1]] == list(range(len(spec.sparse))))
        self._cuts = np.cumsum([0, *(len(g[1]) for g in self._groups)])  # first feature per table

    @classmethod
    def from_client(cls, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], spec: ModelSpec,
                    client: EmbeddingClient) -> PersiaInference:
        """An engine reading rows through `client.lookup_unique` (its plan's kernel compiled
        here, not in the first request)."""
        warm_up()
        return cls(model, spec, client.lookup_tables, lookup_unique=client.lookup_unique)

    # ------------------------------------------------------------------------ stages

    def decode(self, data: bytes | bytearray | memoryview) -> DecodedBatch:
        """Validate one request body; raises `BatchError` naming the column."""
        return decode_batch(data, self.spec)

    def _table_bags(self, batches: Sequence[DecodedBatch], features: list[int]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(signs: uint64[n], offsets: int64[k * B + 1]) of one table's k features over all
        `batches`, bag j = position * B + global sample (B: samples of all batches)."""
        parts, offsets, base = [], [np.zeros(1, np.int64)], 0
        for f in features:
            for batch in batches:
                bags = batch.bag_offsets[f * batch.rows:(f + 1) * batch.rows + 1]
                parts.append(batch.signs[bags[0]:bags[-1]])
                offsets.append(bags[1:] - bags[0] + base)
                base += int(bags[-1] - bags[0])
        signs = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return signs, np.concatenate(offsets)

    def features(self, batches: Sequence[DecodedBatch], timings: Timings | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model inputs of `batches`, rows concatenated in order.

        Returns (dense: float32[B, dense_dim], sparse: `spec.sparse_shape(B)`) with B the
        total samples; a feature's entry for a sample is the sum of the rows of the sample's
        signs of that feature (zeros for an empty list, and for signs no server holds).
        """
        timings = timings or Timings()
        if self._in_order and len(batches) == 1:
            return self._features_in_order(batches[0], timings)
        start = time.monotonic()
        total = sum(b.rows for b in batches)
        bags = [self._table_bags(batches, features) for _, features, _, _ in self._groups]
        found = self.lookup_unique({group[0]: signs for group, (signs, _) in zip(self._groups, bags,
                                                                               strict=True)})
        lookup_done = time.monotonic()
        timings.dedup_s += found.plan_s
        timings.lookup_s += lookup_done - start - found.plan_s
        for (table, _, dim, _), (signs, _) in zip(self._groups, bags, strict=True):
            if found.dims.get(table) != dim:
                raise EmbeddingShapeError(
                    f"table {table!r} returned rows of width {found.dims.get(table)}, the model "
                    f"needs [{signs.size}, {dim}]")

        sparse = torch.empty(self.spec.sparse_shape(total), dtype=torch.float32)
        starts = found.starts
        for dim, positions, where in self._widths:
            first, last = positions[0], positions[-1]
            if positions == list(range(first, last + 1)):  # one slice of the index, no copy
                index = found.index[starts[first]:starts[last + 1]]
            else:
                index = np.concatenate([found.index[starts[p]:starts[p + 1]] for p in positions])
            offsets, shift = [], 0
            for p in positions:
                offsets.append(bags[p][1][:-1] + shift)
                shift += bags[p][0].size
            offsets.append(np.array([shift], np.int64))
            rows = found.rows[dim]
            weight = (torch.from_numpy(np.require(rows, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
                      if rows.shape[0] else torch.zeros((1, dim), dtype=torch.float32))
            pooled = embedding_bag(torch.from_numpy(index), weight,
                                   torch.from_numpy(np.concatenate(offsets)), mode="sum",
                                   include_last_offset=True)
            # bags are table-major, then feature-major: [K * B, dim] -> [B, K, dim]
            per_sample = pooled.view(-1, total, dim).transpose(0, 1)
            if where is None:
                sparse.copy_(per_sample)
            elif sparse.dim() == 3:
                sparse[:, where] = per_sample
            else:
                sparse[:, where] = per_sample.reshape(total, -1)
        dense = (torch.cat([torch.from_numpy(b.dense) for b in batches]) if len(batches) > 1
                 else torch.from_numpy(batches[0].dense))
        timings.pool_s += time.monotonic() - lookup_done
        return dense, sparse

    def _features_in_order(self, batch: DecodedBatch, timings: Timings) -> tuple[torch.Tensor, torch.Tensor]:
        """`features` of one request when its signs and bags are already table-major in model
        order with one width (`_in_order`): each table's signs a view on the request's, its
        bag offsets the pooling's, with none of the per-table slicing and concatenating of
        the general path (about 0.1 ms of 26 tables)."""
        start = time.monotonic()
        cuts = batch.bag_offsets[self._cuts * batch.rows].tolist()
        found = self.lookup_unique({group[0]: batch.signs[lo:hi] for group, lo, hi
                                    in zip(self._groups, cuts, cuts[1:], strict=False)})
        lookup_done = time.monotonic()
        timings.dedup_s += found.plan_s
        timings.lookup_s += lookup_done - start - found.plan_s
        dim = self._widths[0][0]
        for table, _, _, _ in self._groups:
            if found.dims.get(table) != dim:
                raise EmbeddingShapeError(
                    f"table {table!r} returned rows of width {found.dims.get(table)}, the model "
                    f"needs {dim}")
        rows = found.rows[dim]
        weight = (torch.from_numpy(np.require(rows, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
                  if rows.shape[0] else torch.zeros((1, dim), dtype=torch.float32))
        pooled = embedding_bag(torch.from_numpy(found.index), weight, torch.from_numpy(batch.bag_offsets),
                               mode="sum", include_last_offset=True)
        # bags are feature-major: [F * B, dim] -> [B, F, dim]
        sparse = pooled.view(-1, batch.rows, dim).transpose(0, 1).contiguous()
        timings.pool_s += time.monotonic() - lookup_done
        return torch.from_numpy(batch.dense), sparse

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """float32[B] scores of the dense model, without autograd."""
        with torch.no_grad():
            return self.model(dense, sparse).reshape(-1)

    # ------------------------------------------------------------------------ whole calls

    def run(self, batches: Sequence[DecodedBatch | BatchError]) -> list[np.ndarray | BatchError]:
        """Scores for each decoded request (float32[B_r]); errors pass through in place."""
        timings = Timings()
        good = [b for b in batches if isinstance(b, DecodedBatch)]
        out: list[np.ndarray | BatchError] = []
        if good:
            dense, sparse = self.features(good, timings)
            start = time.monotonic()
            scores = self.forward(dense, sparse).numpy()
            timings.forward_s = time.monotonic() - start
            pieces = iter(np.split(scores, np.cumsum([b.rows for b in good])[:-1]))
        for item in batches:
            out.append(next(pieces) if isinstance(item, DecodedBatch) else item)
        self.last_timings = timings
        return out

    def predict_many(self, requests: Sequence[bytes | bytearray | memoryview]
                     ) -> list[np.ndarray | BatchError]:
        """Scores (float32[B_r]) or a `BatchError` per request body, in order."""
        start = time.monotonic()
        decoded: list[DecodedBatch | BatchError] = []
        for data in requests:
            try:
                decoded.append(self.decode(data))
            except BatchError as exc:
                decoded.append(exc)
        decode_s = time.monotonic() - start
        out = self.run(decoded)
        self.last_timings.decode_s = decode_s
        return out

    def predict(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        """float32[B] scores of one request; raises `BatchError` for a bad one."""
        (result,) = self.predict_many([data])
        if isinstance(result, BatchError):
            raise result
        return result

    def score(self, dense: np.ndarray, sparse: Sequence[tuple[str, SparseInput]]) -> np.ndarray:
        """float32[B] scores of arrays, through the same path as a served request.

        dense: float32[B, dense_dim]; sparse: (feature, ids) pairs as `PersiaBatch.add_sparse`
        takes them (per sample uint64 arrays, or uint64[B, k])."""
        return self.predict(PersiaBatch().add_dense([dense]).add_sparse(sparse).to_bytes())


__all__ = ["EmbeddingShapeError", "LookupFn", "LookupTablesFn", "LookupUniqueFn", "PersiaInference",
           "Timings", "per_table", "serving_threads", "unique_rows"]
