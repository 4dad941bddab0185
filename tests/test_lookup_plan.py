"""The multi-table lookup's plan (deduplication, routing, request bytes) and the assembly of
the shards' answers, without servers (the servers' side: test_embedding_cuts.py)."""

from __future__ import annotations

import numpy as np
import pytest

from persia_inc.embedding_server._wire import LookupReply, LookupTablesReply
from persia_inc.embedding_server.lookup_plan import plan_tables
from persia_inc.embedding_server.protos import embedding_pb2 as pb
from persia_inc.embedding_server.sharding import shard_of


def tables_of_signs() -> tuple[tuple[str, ...], list[np.ndarray]]:
    rng = np.random.default_rng(7)
    arrays = [rng.integers(0, 500, 700, dtype=np.uint64) for _ in range(4)]
    arrays += [np.empty(0, np.uint64), np.array([2**64 - 1, 0, 2**64 - 1, 0], np.uint64)]
    return tuple(f"t{i}" for i in range(len(arrays))), arrays


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_plan_deduplicates_each_table_and_routes_as_shard_of(num_shards: int) -> None:
    names, arrays = tables_of_signs()
    plan = plan_tables(names, arrays, num_shards)
    for t, signs in enumerate(arrays):
        index = plan.index[plan.starts[t]:plan.starts[t + 1]]
        assert np.array_equal(plan.grouped[index], signs)  # every asked sign finds its own
        mine = plan.grouped[plan.bounds[t, 0]:plan.bounds[t, -1]]
        assert np.array_equal(np.sort(mine), np.unique(signs))  # each distinct sign once
        for shard in range(num_shards):
            share = plan.grouped[plan.bounds[t, shard]:plan.bounds[t, shard + 1]]
            assert (shard_of(share, num_shards) == shard).all()
    assert plan.shards() == [s for s in range(num_shards)
                             if any((shard_of(a, num_shards) == s).any() for a in arrays)]


def test_plan_request_bytes_are_protobufs_and_answers_assemble_per_width() -> None:
    names, arrays = tables_of_signs()
    dims = {"t0": 4, "t1": 8, "t2": 4, "t3": 8, "t4": 4, "t5": 8}
    plan = plan_tables(names, arrays, 2)
    for shard in (0, 1):
        want = pb.LookupTablesRequest(
            tables=[pb.TableSigns(table=name, signs=plan.grouped[plan.bounds[t, shard]:
                                                                 plan.bounds[t, shard + 1]].tobytes())
                    for t, name in enumerate(names)], shard=shard, num_shards=2)
        assert plan.request(shard, 2) == want.SerializeToString()

    def row(sign: np.ndarray, dim: int) -> np.ndarray:  # a row that names its sign
        return (sign.astype(np.float64)[:, None] % 1000 + np.arange(dim)).astype(np.float32)

    replies = {}
    for shard in (0, 1):
        answers = []
        for t, name in enumerate(names):
            share = plan.grouped[plan.bounds[t, shard]:plan.bounds[t, shard + 1]]
            answers.append((name, LookupReply(dims[name], row(share, dims[name]), 0)))
        replies[shard] = LookupTablesReply(tuple(answers))
    found = plan.assemble(replies, lambda shard, message: ValueError(f"{shard}: {message}"))
    assert found.dims == dims and set(found.rows) == {4, 8}
    for t, (name, signs) in enumerate(zip(names, arrays, strict=True)):
        assert np.array_equal(found.table(t), row(signs, dims[name]))
    assert found.rows[4].shape[0] == sum(np.unique(arrays[t]).size for t in (0, 2, 4))

    wrong = dict(replies)
    wrong[1] = LookupTablesReply(tuple((n, LookupReply(dims[n] * 2, r.rows, 0))
                                       for n, r in replies[1].tables))
    with pytest.raises(ValueError, match=r"t0.*dims"):
        plan.assemble(wrong, lambda shard, message: ValueError(f"{shard}: {message}"))
