"""`PersiaInference`: request bytes -> embedding lookup -> dense model -> scores, in plain Python.

This is the whole serving logic, with no TorchServe in it, so tests, benchmarks and other
model servers call it directly; `inference.handler.PersiaHandler` is one front end of it.

Per batch of requests: decode each (a bad one becomes a `BatchError` for that request only);
gather every table's signs over all good requests; look them all up in one call
(`EmbeddingClient.lookup_tables`: each table's signs deduplicated, every shard reached once
for all tables, shards concurrently); sum-pool them per sample and feature as PERSIA does
(`torch.nn.functional.embedding_bag(mode="sum")`, one call per table); run the TorchScript
model once over all rows under `torch.no_grad()`; split the scores back per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn.functional import embedding_bag

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


def per_table(lookup: LookupFn) -> LookupTablesFn:
    """A `LookupTablesFn` calling a one-table `lookup` per table (for fakes in tests)."""
    return lambda signs_by_table: {t: lookup(t, s) for t, s in signs_by_table.items()}


@dataclass(slots=True)
class Timings:
    """Seconds spent in each stage of the last call (monotonic clock)."""

    decode_s: float = 0.0
    lookup_s: float = 0.0
    pool_s: float = 0.0
    forward_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.decode_s + self.lookup_s + self.pool_s + self.forward_s


class EmbeddingShapeError(RuntimeError):
    """The embedding table's rows do not have the width the model was built for."""


class PersiaInference:
    """Serve `model` (forward(dense: float32[B, dense_dim], sparse) -> float32[B], sparse as
    `ModelSpec.sparse_shape(B)` says) with rows from `lookup_tables`. Thread-compatible: one
    instance per worker."""

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], spec: ModelSpec,
                 lookup_tables: LookupTablesFn) -> None:
        self.model = model
        self.spec = spec
        self.lookup_tables = lookup_tables
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

    @classmethod
    def from_client(cls, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], spec: ModelSpec,
                    client: EmbeddingClient) -> PersiaInference:
        """An engine reading rows through `client.lookup_tables`."""
        return cls(model, spec, client.lookup_tables)

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
        start = time.monotonic()
        total = sum(b.rows for b in batches)
        bags = {table: self._table_bags(batches, features) for table, features, _, _ in self._groups}
        rows_by_table = self.lookup_tables({table: signs for table, (signs, _) in bags.items()})
        lookup_done = time.monotonic()
        timings.lookup_s += lookup_done - start

        sparse = torch.empty(self.spec.sparse_shape(total), dtype=torch.float32)
        for table, features, dim, where in self._groups:
            signs, offsets = bags[table]
            rows = np.asarray(rows_by_table[table])
            if rows.shape != (signs.size, dim):
                raise EmbeddingShapeError(
                    f"table {table!r} returned rows of shape {rows.shape}, the model needs "
                    f"[{signs.size}, {dim}]")
            # writable: a one-shard lookup returns a read-only view of the reply, which torch warns on
            weight = torch.from_numpy(np.require(rows, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
            if not signs.size:
                weight = torch.zeros((1, dim), dtype=torch.float32)
            pooled = embedding_bag(torch.arange(signs.size, dtype=torch.int64), weight,
                                   torch.from_numpy(offsets), mode="sum", include_last_offset=True)
            # bags are feature-major: [k * B, dim] -> [B, k, dim]
            per_sample = pooled.view(len(features), total, dim).transpose(0, 1)
            if sparse.dim() == 3:
                sparse[:, where] = per_sample
            else:
                sparse[:, where] = per_sample.reshape(total, len(features) * dim)
        dense = (torch.cat([torch.from_numpy(b.dense) for b in batches]) if len(batches) > 1
                 else torch.from_numpy(batches[0].dense))
        timings.pool_s += time.monotonic() - lookup_done
        return dense, sparse

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


__all__ = ["EmbeddingShapeError", "LookupFn", "LookupTablesFn", "PersiaInference", "Timings", "per_table"]
