"""The multi-table lookup's plan (deduplication, routing, request bytes) and the assembly of
the shards' answers, without servers (the servers' side: test_embedding_cuts.py)."""

from __future__ import annotations

import numpy as np
import pytest

from persia_inc.embedding_server._wire import BlocksReply
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
        mine = np.concatenate([plan.grouped[plan.bounds[s, t]:plan.bounds[s, t + 1]]
                               for s in range(num_shards)])
        assert np.array_equal(np.sort(mine), np.unique(signs))  # each distinct sign once
        for shard in range(num_shards):
            share = plan.grouped[plan.bounds[shard, t]:plan.bounds[shard, t + 1]]
            assert (shard_of(share, num_shards) == shard).all()
    # shard-major: each shard's signs are one block, the next shard's right after it
    assert plan.bounds[0, 0] == 0 and plan.bounds[-1, -1] == plan.grouped.size
    assert (plan.bounds[1:, 0] == plan.bounds[:-1, -1]).all()
    assert plan.shards() == [s for s in range(num_shards)
                             if any((shard_of(a, num_shards) == s).any() for a in arrays)]


def test_plan_request_bytes_are_protobufs_and_answers_assemble_per_width() -> None:
    names, arrays = tables_of_signs()
    dims = {"t0": 4, "t1": 8, "t2": 4, "t3": 8, "t4": 4, "t5": 8}
    plan = plan_tables(names, arrays, 2)
    for shard in (0, 1):
        bounds = plan.bounds[shard]
        want = pb.LookupBlocksRequest(tables=names, counts=np.diff(bounds).tolist(),
                                      signs=plan.grouped[bounds[0]:bounds[-1]].tobytes(),
                                      shard=shard, num_shards=2, allow_behind=shard == 1)
        assert plan.request(shard, 2, shard == 1) == want.SerializeToString()
        want.ClearField("signs")  # in a lookup region (regions.py) instead
        want.region = f"persia-inc-lookup-1-{'f' * 32}"
        assert plan.request(shard, 2, shard == 1, region=want.region) == want.SerializeToString()

    def row(sign: np.ndarray, dim: int) -> np.ndarray:  # a row that names its sign
        return (sign.astype(np.float64)[:, None] % 1000 + np.arange(dim)).astype(np.float32)

    def answer(shard: int, widths: dict[str, int]) -> BlocksReply:
        blocks = [row(plan.grouped[plan.bounds[shard, t]:plan.bounds[shard, t + 1]], widths[name])
                  for t, name in enumerate(names)]
        return BlocksReply(np.array([widths[n] for n in names]),
                                 np.concatenate([b.ravel() for b in blocks]),
                                 np.zeros(len(names), np.uint64))

    def error(shard: int, message: str) -> ValueError:
        return ValueError(f"{shard}: {message}")

    for widths in (dims, dict.fromkeys(names, 4)):  # several widths, and the one-width path
        found = plan.assemble({0: answer(0, widths), 1: answer(1, widths)}, error)
        assert found.dims == widths and set(found.rows) == set(widths.values())
        for t, (name, signs) in enumerate(zip(names, arrays, strict=True)):
            assert np.array_equal(found.table(t), row(signs, widths[name]))
    assert found.rows[4].shape[0] == plan.grouped.size
    several = plan.assemble({0: answer(0, dims), 1: answer(1, dims)}, error)
    assert several.rows[4].shape[0] == sum(np.unique(arrays[t]).size for t in (0, 2, 4))

    with pytest.raises(ValueError, match=r"1: table 't0'.*dims"):
        plan.assemble({0: answer(0, dims), 1: answer(1, {n: 2 * d for n, d in dims.items()})},
                      error)
    short = answer(1, dims)
    with pytest.raises(ValueError, match=r"1: answered .* floats, expected"):
        plan.assemble({0: answer(0, dims), 1: BlocksReply(short.dims, short.rows[:-1],
                                                                short.misses)}, error)
    with pytest.raises(ValueError, match=r"0: answered 5 tables, asked 6"):
        plan.assemble({0: BlocksReply(short.dims[:5], short.rows, short.misses),
                       1: answer(1, dims)}, error)


def test_blocks_placed_as_they_arrive_assemble_as_copied_ones() -> None:
    names, arrays = tables_of_signs()
    plan = plan_tables(names, arrays, 2)

    def answer(shard: int, dim: int) -> BlocksReply:
        share = plan.grouped[plan.bounds[shard, 0]:plan.bounds[shard, -1]]
        rows = (share.astype(np.float64)[:, None] % 1000 + np.arange(dim)).astype(np.float32)
        return BlocksReply(np.full(len(names), dim), rows.ravel(), np.zeros(len(names), np.uint64))

    def error(shard: int, message: str) -> ValueError:
        return ValueError(f"{shard}: {message}")

    replies = {0: answer(0, 4), 1: answer(1, 4)}
    copied = plan.assemble(replies, error)
    placing = plan.placing([4] * len(names))
    for shard, reply in replies.items():
        assert placing.take(shard, reply) is reply
    assert placing.done == {0, 1}
    placed = plan.assemble(replies, error, placing)
    assert placed.rows[4] is placing.rows and np.array_equal(placed.rows[4], copied.rows[4])
    # a width other than expected is not placed: assemble copies it, or refuses a mixed answer
    stale = plan.placing([8] * len(names))
    stale.take(0, replies[0])
    assert stale.done == set()
    assert np.array_equal(plan.assemble(replies, error, stale).rows[4], copied.rows[4])
    mixed = plan.placing([4] * len(names))
    mixed.take(0, replies[0])
    with pytest.raises(ValueError, match=r"1: table 't0'.*dims"):
        plan.assemble({0: replies[0], 1: answer(1, 8)}, error, mixed)
    assert plan.placing([4, None, 4, 4, 4, 4]).rows is None  # a width not yet known
    assert plan.placing([4, 8, 4, 4, 4, 4]).rows is None  # several widths
