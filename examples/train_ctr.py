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
from persia_inc.demo import ctr
from persia_inc.producer import IncrementalProducer
from persia_inc.producer.torch_hook import IncrementalUpdateHook

HIDDEN = (256, 64)  # the MLP's hidden widths
ZIPF = 1.1  # id skew: heavier tails than the demo's 1.2, so more distinct rows per step


def example_model(vocab: int = 100_000, dim: int = 16) -> ctr.CTRModel:
    """The demo's CTR model (26 sparse-gradient tables C1..C26 + an MLP) with a wider MLP."""
    return ctr.CTRModel(vocab, dim, hidden=HIDDEN)


def example_batch(rng: np.random.Generator, batch: int, vocab: int) -> tuple[torch.Tensor, ...]:
    """Criteo-shaped: 13 dense features, 26 Zipf-distributed sparse ids, a click label."""
    return ctr.synthetic_batch(rng, batch, vocab, zipf=ZIPF)


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
    model = example_model(vocab)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    producer = None
    if not args.no_hook:
        producer = make_producer(args.dir)
        IncrementalUpdateHook(producer, model.named_tables(), optimizer)
    rng = np.random.default_rng(0)
    loss_fn = nn.BCEWithLogitsLoss()
    started = time.perf_counter()
    for _ in range(args.steps):
        dense, sparse, label = example_batch(rng, args.batch, vocab)
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
