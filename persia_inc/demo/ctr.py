"""The demo's training side: a small CTR model over Criteo-shaped synthetic data.

Table `C{i}` holds feature i's embeddings; the sign of row r is r (as the producer hook reads it).
`example_model`, `example_batch` and `make_producer` build the wider example of
examples/train_ctr.py (also what bench/producer.py measures).
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from persia_inc.demo.clicks import DENSE_FEATURES, SPARSE_FEATURES, table_names
from persia_inc.inference.model import DenseHead
from persia_inc.inference.spec import ModelSpec, spec_from_module

if TYPE_CHECKING:
    from persia_inc.producer import IncrementalProducer


class CTRModel(nn.Module):
    """26 embedding tables (sparse gradients) + an MLP over them and 13 dense features.

    hidden: the MLP's hidden widths (the demo's (128,); examples/train_ctr.py uses (256, 64))."""

    def __init__(self, vocab: int, dim: int = 16, seed: int = 0,
                 hidden: tuple[int, ...] = (128,)) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tables = nn.ModuleList(
            nn.Embedding(vocab, dim, sparse=True) for _ in range(SPARSE_FEATURES))
        layers: list[nn.Module] = []
        width = DENSE_FEATURES + SPARSE_FEATURES * dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """dense: float32[b, 13]; sparse: int64[b, 26] row ids -> logits float32[b]."""
        embedded = [table(sparse[:, i]) for i, table in enumerate(self.tables)]
        return self.mlp(torch.cat([dense, *embedded], dim=1)).squeeze(1)

    def named_tables(self) -> dict[str, nn.Embedding]:
        return {name: typing.cast(nn.Embedding, table)
                for name, table in zip(table_names(), self.tables, strict=True)}


def dense_part(model: CTRModel) -> DenseHead:
    """A copy of `model`'s dense part as it is now (later training does not change it): the
    served signature forward(dense: float32[b, 13], sparse: float32[b, 26, dim]) -> click
    probability float32[b]."""
    import copy

    return DenseHead(copy.deepcopy(model.mlp)).eval()


def serving_spec(model: CTRModel) -> ModelSpec:
    """What serving `model` takes: 13 dense features and sparse features C1..C26, each read
    from its own table (ids are signs)."""
    return spec_from_module(model, dense_dim=DENSE_FEATURES, tables=model.named_tables())


def synthetic_batch(rng: np.random.Generator, batch: int, vocab: int, zipf: float = 1.2
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dense float32[b, 13], sparse int64[b, 26] ids drawn from Zipf(`zipf`) folded into
    [0, vocab), click label float32[b]."""
    dense = torch.from_numpy(rng.standard_normal((batch, DENSE_FEATURES), dtype=np.float32))
    sparse = torch.from_numpy((rng.zipf(zipf, (batch, SPARSE_FEATURES)) % vocab).astype(np.int64))
    label = torch.from_numpy((rng.random(batch) < 0.25).astype(np.float32))
    return dense, sparse, label


EXAMPLE_HIDDEN = (256, 64)  # the example's MLP hidden widths
EXAMPLE_ZIPF = 1.1  # the example's id skew: heavier tails than the demo's 1.2, more distinct rows


def example_model(vocab: int = 100_000, dim: int = 16) -> CTRModel:
    """The demo's CTR model (26 sparse-gradient tables C1..C26 + an MLP) with a wider MLP."""
    return CTRModel(vocab, dim, hidden=EXAMPLE_HIDDEN)


def example_batch(rng: np.random.Generator, batch: int, vocab: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Criteo-shaped: 13 dense features, 26 Zipf(1.1) sparse ids, a click label."""
    return synthetic_batch(rng, batch, vocab, zipf=EXAMPLE_ZIPF)


def make_producer(incremental_dir: str, buffer_size: int = 100_000,
                  flush_interval_s: float = 30.0) -> IncrementalProducer:
    """A producer to local `incremental_dir`: every table flushes, as one cut, when the tables
    hold `buffer_size` distinct rows together (all tables, as `incremental_buffer_size`) or
    when the oldest unflushed row is `flush_interval_s` old."""
    from persia_inc.config import config_from_mapping
    from persia_inc.wiring import producer_from_config

    config = config_from_mapping({
        "enable_incremental_update": True, "incremental_buffer_size": buffer_size,
        "incremental_dir": incremental_dir, "storage": "local",
        "persia_inc": {"model": "ctr", "producer": {"flush_interval_s": flush_interval_s}},
    }, "<example>")
    return producer_from_config(config, producer_id="trainer-0")
