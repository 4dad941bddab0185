"""Train a small CTR model on synthetic Criteo-shaped data (13 dense, 26 sparse features) and
ship its embedding updates with the incremental producer (the model, batches and producer come
from `persia_inc.demo.ctr`).

    python examples/train_ctr.py --dir /tmp/inc --steps 200 [--no-hook]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from persia_inc.demo.ctr import example_batch, example_model, make_producer
from persia_inc.producer import IncrementalUpdateHook


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
