"""The PyTorch hook: nn.Embedding and nn.EmbeddingBag, sparse and dense gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from test_producer_support import producer_config, read_packets, replay
from torch import nn

from producer import IncrementalProducer
from producer.torch_hook import IncrementalUpdateHook


def test_hook_ships_the_rows_each_step_touched(tmp_path: Path) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(500, 4, sparse=True)
    bag = nn.EmbeddingBag(300, 4, mode="sum")  # dense gradients
    optimizer = torch.optim.SGD([*emb.parameters(), *bag.parameters()], lr=0.1)
    config = producer_config(str(tmp_path / "inc"), buffer_size=150)
    touched: dict[str, set[int]] = {"emb": set(), "bag": set()}
    with IncrementalProducer(config) as producer:
        hook = IncrementalUpdateHook(producer, {"emb": emb, "bag": bag}, optimizer)
        for _ in range(20):
            ids = torch.randint(0, 500, (32,))
            bag_ids = torch.randint(0, 300, (32, 3))
            touched["emb"].update(ids.tolist())
            touched["bag"].update(bag_ids.reshape(-1).tolist())
            optimizer.zero_grad()
            (emb(ids).sum() + bag(bag_ids).pow(2).sum()).backward()
            optimizer.step()
        with torch.no_grad():  # an evaluation forward records nothing
            emb(torch.tensor([499]))
        assert producer.flush()
        hook.remove()
        packets = read_packets(producer.store)
    for name, module in (("emb", emb), ("bag", bag)):
        state = replay([p for p in packets if p.header.table == name], 4)
        assert set(state) == touched[name]
        weight = module.weight.detach().numpy()
        for sign, row in state.items():
            np.testing.assert_array_equal(row, weight[sign])
