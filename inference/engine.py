"""`PersiaInference`: request bytes -> embedding lookup -> dense model -> scores, in plain Python.

This is the whole serving logic, with no TorchServe in it, so tests, benchmarks and other
model servers call it directly; `inference.handler.PersiaHandler` is one front end of it.

Per batch of requests: decode each (a bad one becomes a `BatchError` for that request only),
deduplicate the table signs of all good requests together, look the unique rows up once (one
Lookup per shard), sum-pool them per sample and feature as PERSIA does
(`torch.nn.functional.embedding_bag(mode="sum")`), run the TorchScript model once over all
rows under `torch.no_grad()`, and split the scores back per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.functional import embedding_bag

from persia_inc.inference.batch import BatchError, DecodedBatch, decode_batch
from persia_inc.inference.spec import ModelSpec

log = logging.getLogger(__name__)

# lookup(table, signs: uint64[n]) -> float32[n, dim]; EmbeddingClient.lookup is one.
LookupFn = Callable[[str, np.ndarray], np.ndarray]


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
    """Serve `model` (forward(dense: float32[B, D], sparse: float32[B, F, dim]) -> float32[B])
    with rows from `lookup`. Thread-compatible: one instance per worker."""

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], spec: ModelSpec,
                 lookup: LookupFn) -> None:
        self.model = model
        self.spec = spec
        self.lookup = lookup
        self.last_timings = Timings()

    # ------------------------------------------------------------------------ stages

    def decode(self, data: bytes | bytearray | memoryview) -> DecodedBatch:
        """Validate one request body; raises `BatchError` naming the column."""
        return decode_batch(data, self.spec)

    def features(self, batches: Sequence[DecodedBatch], timings: Timings | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model inputs of `batches`, rows concatenated in order.

        Returns (dense: float32[B, dense_dim], sparse: float32[B, F, dim]) with B the total
        samples; sparse[i, f] is the sum of the rows of sample i's signs of feature f (zeros
        for an empty list, and for signs no server holds).
        """
        timings = timings or Timings()
        start = time.monotonic()
        all_signs = np.concatenate([b.signs for b in batches]) if len(batches) > 1 else batches[0].signs
        unique, inverse = np.unique(all_signs, return_inverse=True)
        if unique.size:
            rows = np.asarray(self.lookup(self.spec.table, unique))
            if rows.shape != (unique.size, self.spec.dim):
                raise EmbeddingShapeError(
                    f"table {self.spec.table!r} returned rows of shape {rows.shape}, the model "
                    f"needs [{unique.size}, {self.spec.dim}]")
        else:
            rows = np.zeros((1, self.spec.dim), np.float32)
        lookup_done = time.monotonic()
        timings.lookup_s += lookup_done - start

        # writable: a one-shard lookup returns a read-only view of the reply, which torch warns on
        weight = torch.from_numpy(np.require(rows, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
        indices = torch.from_numpy(inverse.reshape(-1).astype(np.int64, copy=False))
        num_features = len(self.spec.sparse)
        denses, sparses, base = [], [], 0
        for batch in batches:
            offsets = torch.from_numpy(batch.bag_offsets)
            count = batch.signs.size
            pooled = embedding_bag(indices[base:base + count], weight, offsets - offsets[0],
                                     mode="sum", include_last_offset=True)
            base += count
            # bags are feature-major: [F * B, dim] -> [B, F, dim]
            sparses.append(pooled.view(num_features, batch.rows, self.spec.dim).transpose(0, 1))
            denses.append(torch.from_numpy(batch.dense))
        dense = torch.cat(denses) if len(denses) > 1 else denses[0]
        sparse = torch.cat(sparses) if len(sparses) > 1 else sparses[0].contiguous()
        timings.pool_s += time.monotonic() - lookup_done
        return dense, sparse.contiguous()

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


__all__ = ["EmbeddingShapeError", "LookupFn", "PersiaInference", "Timings"]
