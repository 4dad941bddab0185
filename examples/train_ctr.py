"""Train a small CTR model on synthetic Criteo-shaped data (13 dense, 26 sparse features) and
ship its embedding updates with the incremental producer.

    PYTHONPATH=. python examples/train_ctr.py --dir /tmp/inc --steps 200 [--no-hook]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from persia_inc.config import config_from_mapping
from producer import IncrementalProducer
from producer.torch_hook import IncrementalUpdateHook

DENSE, SPARSE = 13, 26


class CTRModel(nn.Module):
    """26 sparse embedding tables (sparse gradients) + an MLP over them and 13 dense features."""

    def __init__(self, vocab: int = 100_000, dim: int = 16) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(vocab, dim, sparse=True) for _ in range(SPARSE))
        self.mlp = nn.Sequential(nn.Linear(DENSE + SPARSE * dim, 256), nn.ReLU(),
                                 nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """dense: float32[b, 13]; sparse: int64[b, 26] row ids -> logits float32[b]."""
        embedded = [table(sparse[:, i]) for i, table in enumerate(self.tables)]
        return self.mlp(torch.cat([dense, *embedded], dim=1)).squeeze(1)


def synthetic_batch(rng: np.random.Generator, batch: int, vocab: int) -> tuple[torch.Tensor, ...]:
    """Criteo-shaped: 13 dense, 26 Zipf-distributed sparse ids, a click label."""
    dense = torch.from_numpy(rng.standard_normal((batch, DENSE)).astype(np.float32))
    sparse = torch.from_numpy((rng.zipf(1.1, (batch, SPARSE)) % vocab).astype(np.int64))
    label = torch.from_numpy((rng.random(batch) < 0.25).astype(np.float32))
    return dense, sparse, label


def make_producer(incremental_dir: str, buffer_size: int = 100_000,
                  flush_interval_s: float = 30.0) -> IncrementalProducer:
    """A producer to local `incremental_dir`: a table flushes at `buffer_size` distinct rows
    or when its oldest unflushed row is `flush_interval_s` old."""
    config = config_from_mapping({
        "enable_incremental_update": True, "incremental_buffer_size": buffer_size,
        "incremental_dir": incremental_dir, "storage": "local",
        "persia_inc": {"model": "ctr", "producer": {"flush_interval_s": flush_interval_s}},
    }, "<example>")
    return IncrementalProducer(config, producer_id="trainer-0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--no-hook", action="store_true")
    args = parser.parse_args()
    vocab = 100_000
    model = CTRModel(vocab)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    producer = None
    if not args.no_hook:
        producer = make_producer(args.dir)
        IncrementalUpdateHook(producer, {f"C{i + 1}": t for i, t in enumerate(model.tables)}, optimizer)
    rng = np.random.default_rng(0)
    loss_fn = nn.BCEWithLogitsLoss()
    started = time.perf_counter()
    for _ in range(args.steps):
        dense, sparse, label = synthetic_batch(rng, args.batch, vocab)
        optimizer.zero_grad()
        loss = loss_fn(model(dense, sparse), label)
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - started
    print(f"{args.steps} steps in {elapsed:.2f}s, loss {loss.item():.4f}")
    if producer is not None:
        producer.close()


if __name__ == "__main__":
    main()
