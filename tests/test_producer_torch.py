"""The PyTorch hook: nn.Embedding and nn.EmbeddingBag, sparse and dense gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from test_producer_support import producer_config, read_packets, replay
from torch import nn

from persia_inc.producer.torch_hook import IncrementalUpdateHook
from persia_inc.storage import open_store
from persia_inc.wiring import producer_from_config


def test_hook_ships_the_rows_each_step_touched(tmp_path: Path) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(500, 4, sparse=True)
    bag = nn.EmbeddingBag(300, 4, mode="sum")  # dense gradients
    optimizer = torch.optim.SGD([*emb.parameters(), *bag.parameters()], lr=0.1)
    config = producer_config(str(tmp_path / "inc"), buffer_size=150)
    touched: dict[str, set[int]] = {"emb": set(), "bag": set()}
    with producer_from_config(config) as producer:
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


def test_hook_converts_rows_of_a_float64_table(tmp_path: Path) -> None:
    """Rows are gathered straight into the producer's float32 buffers only for float32 CPU
    weights; another dtype is gathered, then converted on the copy."""
    emb = nn.Embedding(100, 3, sparse=True, dtype=torch.float64)
    optimizer = torch.optim.SGD(emb.parameters(), lr=0.1)
    config = producer_config(str(tmp_path / "inc"), buffer_size=10_000)
    with producer_from_config(config) as producer:
        IncrementalUpdateHook(producer, {"emb": emb}, optimizer)
        ids = torch.tensor([5, 7, 5, 99])
        optimizer.zero_grad()
        emb(ids).sum().backward()
        optimizer.step()
        assert producer.flush()
        (packet,) = read_packets(producer.store)
    assert packet.signs.tolist() == [5, 7, 99]
    np.testing.assert_array_equal(packet.embeddings,
                                  emb.weight.detach()[[5, 7, 99]].numpy().astype(np.float32))


def test_example_training_script_ships_every_table(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "train_ctr.py"), "--dir", str(tmp_path / "inc"),
         "--steps", "5", "--batch", "256"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    packets = read_packets(open_store(str(tmp_path / "inc")))
    assert sorted(p.header.table for p in packets) == sorted(f"C{i}" for i in range(1, 27))
    assert all(p.header.rows > 0 and p.header.dim == 16 for p in packets)


def test_columns_of_one_id_matrix_are_recorded_from_the_matrix_itself() -> None:
    from persia_inc.producer.torch_hook import _columns_of_one_matrix

    sparse = torch.arange(40, dtype=torch.int64).reshape(8, 5)
    seen = {"c3": [sparse[:, 3]], "c1": [sparse[:, 1]], "c2": [sparse[:, 2]]}
    matrix, columns = _columns_of_one_matrix(seen)
    assert matrix.shape == (8, 3) and columns == {"c3": 2, "c1": 0, "c2": 1}
    for name, tensors in seen.items():
        assert np.array_equal(matrix[:, columns[name]], tensors[0].numpy())
    assert np.shares_memory(matrix, sparse.numpy())  # a view: no copy
    other = torch.arange(40, dtype=torch.int64).reshape(8, 5)
    for not_one_matrix in (
        {"a": [sparse[:, 0]], "b": [other[:, 1]]},  # two matrices
        {"a": [sparse[:, 0]], "b": []},  # a table without ids this step
        {"a": [sparse[:, 0], sparse[:, 0]], "b": [sparse[:, 1]]},  # two forwards
        {"a": [sparse[0]], "b": [sparse[1]]},  # rows, not columns
        {"a": [sparse[:, 0].to(torch.int32)]},
    ):
        assert _columns_of_one_matrix(not_one_matrix) is None


def test_hook_on_a_ctr_id_matrix_ships_every_touched_row(tmp_path: Path) -> None:
    from persia_inc.demo.ctr import CTRModel, synthetic_batch

    model = CTRModel(400, 4, hidden=(8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    touched = [set() for _ in model.tables]
    config = producer_config(str(tmp_path / "inc"), buffer_size=120)
    with producer_from_config(config) as producer:
        IncrementalUpdateHook(producer, model.named_tables(), optimizer)
        for _ in range(15):
            dense, sparse, label = synthetic_batch(rng, 32, 400)
            for i, ids in enumerate(sparse.T.tolist()):
                touched[i].update(ids)
            optimizer.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), label).backward()
            optimizer.step()
        assert list(producer._column_groups) == [tuple(model.named_tables())]  # one fused group
        assert producer.flush()
        packets = read_packets(producer.store)
    for (name, module), rows in zip(model.named_tables().items(), touched, strict=True):
        state = replay([p for p in packets if p.header.table == name], 4)
        assert set(state) == rows
        weight = module.weight.detach().numpy()
        for sign, row in state.items():
            np.testing.assert_array_equal(row, weight[sign])


def test_hook_warns_of_non_finite_rows_its_deferred_reads_found(tmp_path: Path) -> None:
    """With the hook the writer reads the rows and checks them right after (compiled, per
    table, `producer/kernels.py`): a NaN or Inf anywhere in a row is still named, once per
    table, and the rows still ship."""
    import warnings

    from persia_inc.producer import NonFiniteRowsWarning

    emb = nn.Embedding(300, 4, sparse=True)
    clean = nn.Embedding(300, 4, sparse=True)
    with torch.no_grad():
        emb.weight[7, 3] = float("nan")  # the last value of a row: a tail the loop must reach
        emb.weight[299, 0] = float("-inf")
    optimizer = torch.optim.SGD([*emb.parameters(), *clean.parameters()], lr=0.1)
    config = producer_config(str(tmp_path / "inc"), buffer_size=10_000)
    with warnings.catch_warnings(record=True) as caught, producer_from_config(config) as producer:
        warnings.simplefilter("always")
        hook = IncrementalUpdateHook(producer, {"emb": emb, "clean": clean}, optimizer)
        for _ in range(2):
            ids = torch.tensor([1, 7, 299, 5])
            optimizer.zero_grad()
            (emb(ids).sum() + clean(ids).sum()).backward()
            optimizer.step()
            assert producer.flush()
        producer.poll()  # the writer's warning reaches the training thread's next call
        hook.remove()
        packets = read_packets(producer.store)
    found = [w for w in caught if issubclass(w.category, NonFiniteRowsWarning)]
    assert len(found) == 1
    assert "'emb'" in str(found[0].message) and "2 of 4 rows" in str(found[0].message)
    assert "sign 7" in str(found[0].message)
    assert sum(p.header.table == "emb" for p in packets) == 2  # shipped all the same


def test_compiled_row_and_sign_checks_match_numpy() -> None:
    from persia_inc.producer.kernels import all_finite, strictly_ascending

    rows = np.random.default_rng(0).standard_normal((37, 16)).astype(np.float32)
    assert all_finite(rows) and all_finite(rows[:0]) and all_finite(rows[::2])
    for value in (np.nan, np.inf, -np.inf):
        for at in ((0, 0), (36, 15), (20, 7)):
            bad = rows.copy()
            bad[at] = value
            assert not all_finite(bad) and not all_finite(bad.T)
    signs = np.array([1, 5, 9, 2**63, 2**64 - 1], np.uint64)
    assert strictly_ascending(signs) and strictly_ascending(signs[:1])
    assert strictly_ascending(signs[:0])
    assert not strictly_ascending(np.array([1, 5, 5, 9], np.uint64))
    assert not strictly_ascending(np.array([1, 9, 5], np.uint64))
