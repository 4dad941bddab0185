"""Multi-table applies (a producer's cut) and multi-table lookups against real server processes:
one Apply per shard for all of a cut's tables, idempotence and all-or-nothing under one
(lane, producer) watermark, chunked cuts whose tables span chunks, cut watermarks through a
checkpoint, and multi-table lookups: LookupBlocks, the one call per shard clients make
(deduplicated, identity-checked), and LookupTables, the form older clients still call.

Servers are `persia-inc embedding-server` child processes on 127.0.0.1 (the
`embedding_cluster_factory` fixture); cuts are built directly from the `packet_format.cut`
dataclasses, without the codec.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from persia_inc.embedding_server._wire import (
    ApplyChunk,
    Expect,
    LookupReply,
    LookupTablesReply,
    SliceArrays,
    decode_apply_request,
    decode_lookup_blocks_reply,
    decode_lookup_tables_reply,
    encode_apply_request,
    lookup_blocks_reply,
    lookup_tables_reply,
)
from persia_inc.embedding_server.checkpoint import save_checkpoint
from persia_inc.embedding_server.client import EmbeddingClient, cut_chunks
from persia_inc.embedding_server.errors import ShardError, ShardIdentityError, WatermarkMovedError
from persia_inc.embedding_server.protos import embedding_pb2 as pb
from persia_inc.embedding_server.protos import embedding_pb2_grpc as pb_grpc
from persia_inc.embedding_server.shard import ForeignSignsError, Shard, TableSlice
from persia_inc.embedding_server.sharding import shard_of
from persia_inc.foundation.net import free_port
from persia_inc.local_services import EMBEDDING_TOKEN
from persia_inc.local_services import EmbeddingCluster as Cluster
from persia_inc.packet_format import Watermark
from persia_inc.packet_format.cut import CUT_LANE, Cut, CutHeader, CutTable, TableRows
from persia_inc.storage import open_store

AUTH = (("authorization", f"Bearer {EMBEDDING_TOKEN}"),)
MIB = 1024 * 1024
DIMS = {"a": 4, "b": 16, "c": 64}
NONE = np.empty(0, np.uint64)


def rows_for(signs: np.ndarray, dim: int, version: float = 0.0) -> np.ndarray:
    return np.repeat(((signs % 1000).astype(np.float32) + version)[:, None], dim, axis=1)


def make_cut(sequence: int, signs: dict[str, np.ndarray], version: float = 0.0,
             deleted: dict[str, np.ndarray] | None = None, dims: dict[str, int] = DIMS,
             producer: str = "p0") -> Cut:
    deleted = deleted or {}
    tables = tuple(TableRows(name, s, rows_for(s, dims[name], version), deleted.get(name, NONE))
                   for name, s in signs.items())
    header = CutHeader(model="m", producer=producer, generation=0, sequence=sequence,
                       tables=tuple(CutTable(t.name, t.dim, int(t.signs.size),
                                             int(t.deleted.size)) for t in tables))
    return Cut(header, tables)


def random_signs(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.unique(rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False))


def apply_calls(metrics_port: int) -> dict[str, float]:
    """Apply calls a shard served (by its latency histogram) and its applies by outcome."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    match = re.search(r'persia_inc_embedding_rpc_seconds_count\{method="Apply"\} (\S+)', text)
    out["calls"] = float(match[1]) if match else 0.0
    for outcome in ("applied", "skipped", "staged"):
        match = re.search(
            rf'persia_inc_embedding_applies_total\{{outcome="{outcome}",table="~cuts"\}} (\S+)', text)
        out[outcome] = float(match[1]) if match else 0.0
    return out


def table_rows(client: EmbeddingClient, shard: int) -> dict[str, int]:
    return {t.name: t.rows for t in client.status(shard).tables}


def stub(address: str) -> tuple[grpc.Channel, pb_grpc.EmbeddingServiceStub]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * MIB)])
    return channel, pb_grpc.EmbeddingServiceStub(channel)


def cut_request(sequence: int, slices: list[tuple[str, np.ndarray, int]], *, shard: int,
                num_shards: int, version: float = 1.0, apply_id: str = "", chunk: int = 0,
                chunks: int = 0) -> pb.ApplyRequest:
    return pb.ApplyRequest(
        table=CUT_LANE, producer="p0", generation=0, sequence=sequence, shard=shard,
        num_shards=num_shards, apply_id=apply_id, chunk=chunk, chunks=chunks,
        tables=[pb.TableSlice(table=name, dim=dim, signs=s.tobytes(),
                              rows=rows_for(s, dim, version).tobytes()) for name, s, dim in slices])


# ------------------------------------------------------------------------------- apply


def test_a_three_table_cut_is_one_apply_per_shard_and_applies_once(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    metrics_base = free_port()
    cluster = embedding_cluster_factory(3, metrics_port_base=metrics_base)
    signs = {name: random_signs(i, 3000) for i, name in enumerate(DIMS)}
    with cluster.client() as client:
        result = client.apply_cut(make_cut(1, signs))
        assert result.applied == (True, True, True)
        assert result.inserted == sum(s.size for s in signs.values())
        for shard in range(3):
            calls = apply_calls(metrics_base + shard)
            assert calls["calls"] == 1 and calls["applied"] == 1, calls
            counts = table_rows(client, shard)
            for name, s in signs.items():  # every table's rows are on their shards
                assert counts[name] == int((shard_of(s, 3) == shard).sum())
        for name, s in signs.items():
            assert np.array_equal(client.lookup(name, s), rows_for(s, DIMS[name]))
        assert client.watermarks() == [Watermark(CUT_LANE, "p0", 0, 1)]
        assert all(w.table == CUT_LANE for s in range(3) for w in client.shard_watermarks(s))

        # redelivery: applied False everywhere, nothing changes
        again = make_cut(1, signs, version=9)
        assert client.apply_cut(again).skipped
        assert client.apply_cut_shards(again, range(3)) == {0: False, 1: False, 2: False}
        assert np.array_equal(client.lookup("b", signs["b"]), rows_for(signs["b"], 16))

        # the next cut updates two tables and deletes from the third; other producers and
        # single-table streams keep their own watermarks
        upd = make_cut(2, {"a": signs["a"][:100], "b": signs["b"][:50], "c": NONE}, version=3,
                       deleted={"c": signs["c"][:70]})
        result = client.apply_cut(upd)
        assert result.updated == 150 and result.deleted == 70
        assert np.array_equal(client.lookup("a", signs["a"][:100]),
                              rows_for(signs["a"][:100], 4, 3))
        assert not client.lookup("c", signs["c"][:70]).any()
        assert np.array_equal(client.lookup("c", signs["c"][70:]), rows_for(signs["c"][70:], 64))
        assert client.apply_cut_shards(make_cut(1, {"a": signs["a"]}, producer="p1"), [0, 2]) \
            == {0: True, 2: True}
        assert client.shard_watermarks(0) == [Watermark(CUT_LANE, "p0", 0, 2),
                                                      Watermark(CUT_LANE, "p1", 0, 1)]
        assert client.watermarks() == [Watermark(CUT_LANE, "p0", 0, 2)]  # p1 is not on shard 1


def test_a_v1_packet_read_as_a_cut_keeps_its_table_stream(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    cluster = embedding_cluster_factory(2)
    signs = random_signs(7, 500)
    cut = make_cut(4, {"b": signs})
    v1 = Cut(CutHeader(model="m", producer="p0", generation=0, sequence=4, lane="b",
                       tables=cut.header.tables, format_version=1), cut.tables)
    with cluster.client() as client:
        assert client.apply_cut(v1).applied == (True, True)
        assert client.watermarks() == [Watermark("b", "p0", 0, 4)]
        assert np.array_equal(client.lookup("b", signs), rows_for(signs, 16))
        with pytest.raises(ShardError) as info:  # a table's stream carries only that table
            client.apply_cut(Cut(v1.header, (*v1.tables, make_cut(5, {"a": signs}).tables[0])))
        assert info.value.code == "INVALID_ARGUMENT" and "own" in info.value.details


def test_a_cut_with_a_bad_slice_writes_nothing_of_any_table(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    cluster = embedding_cluster_factory(2)
    signs = {name: random_signs(10 + i, 1000) for i, name in enumerate(DIMS)}
    fresh = {name: random_signs(20 + i, 200) for i, name in enumerate(DIMS)}
    with cluster.client() as client:
        client.apply_cut(make_cut(1, signs))
        before = [table_rows(client, s) for s in range(2)]
        # a wrong dim in the last table: the two good tables are not written either
        bad = make_cut(2, fresh, version=5, dims={"a": 4, "b": 16, "c": 32})
        with pytest.raises(ShardError) as info:
            client.apply_cut(bad)
        assert info.value.code == "INVALID_ARGUMENT" and "'c' has dim 64" in info.value.details
        assert [table_rows(client, s) for s in range(2)] == before
        for name in DIMS:
            assert not client.lookup(name, fresh[name]).any()
        assert client.watermarks() == [Watermark(CUT_LANE, "p0", 0, 1)]

        # a sign of another shard in one slice (sent by hand: the client routes correctly)
        mine, theirs = (fresh["c"][shard_of(fresh["c"], 2) == s] for s in (0, 1))
        good = fresh["a"][shard_of(fresh["a"], 2) == 0]
        channel, shard0 = stub(cluster.servers[0])
        try:
            with pytest.raises(grpc.RpcError) as rpc:
                shard0.Apply(cut_request(2, [("a", good, 4), ("c", np.concatenate(
                    [mine, theirs[:1]]), 64)], shard=0, num_shards=2), metadata=AUTH, timeout=10)
            assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"sign {theirs[0]} belongs to shard 1" in rpc.value.details()
            # a table named twice in one message, and a slice whose rows do not fit
            for request in (cut_request(2, [("a", good, 4), ("a", good, 4)], shard=0,
                                        num_shards=2),
                            pb.ApplyRequest(table=CUT_LANE, producer="p0", sequence=2, tables=[
                                pb.TableSlice(table="a", dim=4, signs=good.tobytes()),
                                pb.TableSlice(table="b", dim=16, signs=good.tobytes(),
                                              rows=b"\0" * 12)])):
                with pytest.raises(grpc.RpcError) as rpc:
                    shard0.Apply(request, metadata=AUTH, timeout=10)
                assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            channel.close()
        assert [table_rows(client, s) for s in range(2)] == before
        assert not client.lookup("a", good).any()
        assert client.watermarks() == [Watermark(CUT_LANE, "p0", 0, 1)]
        # the same cut, well formed, applies
        assert client.apply_cut(make_cut(2, fresh, version=5)).applied == (True, True)
        assert np.array_equal(client.lookup("c", fresh["c"]), rows_for(fresh["c"], 64, 5))


def test_cut_chunks_split_tables_across_messages() -> None:
    budget = 4096
    pieces = cut_chunks([(10, 0, 4), (100, 20, 16), (0, 0, 8), (0, 3, 64)], budget)
    assert len(pieces) > 1
    for chunk in pieces:
        size = sum(256 + (r.stop - r.start) * 8 + (r.stop - r.start) * 4 * dim
                   + (d.stop - d.start) * 8
                   for t, r, d in chunk for dim in [(4, 16, 8, 64)[t]])
        assert size <= budget
    for table, (rows, deletes) in enumerate([(10, 0), (100, 20), (0, 0), (0, 3)]):
        mine = [(r, d) for chunk in pieces for t, r, d in chunk if t == table]
        assert mine, "every table appears at least once"
        assert sum(r.stop - r.start for r, _ in mine) == rows
        assert sum(d.stop - d.start for _, d in mine) == deletes
    assert len({i for i, chunk in enumerate(pieces) for t, *_ in chunk if t == 1}) > 1
    assert cut_chunks([], budget) == [[]]
    with pytest.raises(ValueError, match="one row of dim"):
        cut_chunks([(1, 0, 4096)], budget)


def test_a_cut_over_the_message_limit_goes_in_chunks_committed_together(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    metrics_base = free_port()
    cluster = embedding_cluster_factory(2, max_message_bytes=MIB, metrics_port_base=metrics_base)
    signs = {"a": random_signs(30, 2000), "b": random_signs(31, 3000),
             "c": random_signs(32, 12_000)}  # c: about 3 MiB, split over several chunks
    with cluster.client() as client:
        result = client.apply_cut(make_cut(1, signs))
        assert result.applied == (True, True)
        for shard in range(2):
            calls = apply_calls(metrics_base + shard)
            assert calls["calls"] >= 2 and calls["staged"] == calls["calls"] - 1, calls
            assert calls["applied"] == 1
            assert client.status(shard).staged_applies == 0
        for name, s in signs.items():
            assert np.array_equal(client.lookup(name, s), rows_for(s, DIMS[name]))
        assert client.watermarks() == [Watermark(CUT_LANE, "p0", 0, 1)]
        assert client.apply_cut(make_cut(1, signs, version=2)).skipped


def test_a_lost_chunk_is_aborted_and_nothing_is_written(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    cluster = embedding_cluster_factory(1)
    a, c = random_signs(40, 300), random_signs(41, 300)
    with cluster.client() as client:
        client.apply_cut(make_cut(1, {"a": a, "c": c}))
        channel, shard = stub(cluster.servers[0])
        try:
            first = cut_request(2, [("a", a, 4), ("c", c[:100], 64)], shard=0, num_shards=1,
                                apply_id="x", chunk=0, chunks=3)
            reply = shard.Apply(first, metadata=AUTH, timeout=10)
            assert reply.staged and not reply.applied
            assert client.status(0).staged_applies == 1
            # chunk 1 never arrives; chunk 2 does
            lost = cut_request(2, [("c", c[200:], 64)], shard=0, num_shards=1, apply_id="x",
                               chunk=2, chunks=3)
            with pytest.raises(grpc.RpcError) as info:
                shard.Apply(lost, metadata=AUTH, timeout=10)
            assert info.value.code() == grpc.StatusCode.ABORTED
            assert "restart the apply" in info.value.details()
            # a chunk of the same table with another dim is refused, the stage kept
            with pytest.raises(grpc.RpcError) as info:
                shard.Apply(cut_request(2, [("c", c[100:200], 32)], shard=0, num_shards=1,
                                        apply_id="x", chunk=1, chunks=3), metadata=AUTH,
                            timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            channel.close()
        assert np.array_equal(client.lookup("a", a), rows_for(a, 4))
        assert np.array_equal(client.lookup("c", c), rows_for(c, 64))
        assert client.watermarks() == [Watermark(CUT_LANE, "p0", 0, 1)]
        # the whole cut again, from the client: it commits
        assert client.apply_cut(make_cut(2, {"a": a, "c": c}, version=1)).applied == (True,)
        assert np.array_equal(client.lookup("c", c), rows_for(c, 64, 1))
        assert client.status(0).staged_applies == 0


def test_a_conditional_apply_writes_only_on_top_of_the_expected_watermark(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    """The loader's guard against a shard that restarted behind it: an apply that expects
    another position than the shard holds is refused whole (ABORTED, what it holds in the
    error), nothing written, whether it fits one message or comes in chunks."""
    cluster = embedding_cluster_factory(2, max_message_bytes=MIB)
    signs = {"a": random_signs(50, 500), "c": random_signs(51, 500)}
    big = {"c": random_signs(52, 12_000)}  # about 3 MiB: chunks, judged at the commit
    with cluster.client() as client:
        # nothing held yet: expecting nothing applies; expecting a position is refused
        refused = client.apply_cut_shards(make_cut(1, signs), [0, 1], {0: (0, 0), 1: (0, 0)})
        assert all(isinstance(r, WatermarkMovedError) and r.held is None and r.code == "ABORTED"
                   and "expected this shard to hold 0-0, it holds nothing" in r.details
                   for r in refused.values()), refused
        assert client.watermarks() == [] and not client.lookup("a", signs["a"]).any()
        assert client.apply_cut_shards(make_cut(1, signs), [0, 1], {0: None, 1: None}) \
            == {0: True, 1: True}
        # shard 1 is taken for one that lost its last apply: it is refused, shard 0 applies
        outcome = client.apply_cut_shards(make_cut(2, signs, version=1), [0, 1],
                                          {0: (0, 1), 1: (0, 0)})
        assert outcome[0] is True and isinstance(outcome[1], WatermarkMovedError)
        assert outcome[1].held == (0, 1) and outcome[1].shard == 1
        assert client.shard_watermarks(0) == [Watermark(CUT_LANE, "p0", 0, 2)]
        assert client.shard_watermarks(1) == [Watermark(CUT_LANE, "p0", 0, 1)]
        on_1 = signs["a"][shard_of(signs["a"], 2) == 1]
        assert np.array_equal(client.lookup("a", on_1), rows_for(on_1, 4))  # unchanged
        # a chunked apply expecting the wrong position: staged, then refused at the commit
        outcome = client.apply_cut_shards(make_cut(2, big, version=2), [1], {1: (0, 5)})
        assert isinstance(outcome[1], WatermarkMovedError) and outcome[1].held == (0, 1)
        assert client.status(1).staged_applies == 0
        assert not client.lookup("c", big["c"][shard_of(big["c"], 2) == 1]).any()
        # a redelivery below the watermark is acknowledged unapplied whatever it expects
        assert client.apply_cut_shards(make_cut(1, signs), [0], {0: (0, 7)}) == {0: False}
        # the right expectation applies, chunks and all
        assert client.apply_cut_shards(make_cut(2, big, version=2), [1], {1: (0, 1)}) == {1: True}
        assert client.watermarks() == [Watermark(CUT_LANE, "p0", 0, 2)]


def test_a_checkpoint_keeps_the_cut_watermark(
        embedding_cluster_factory: Callable[..., Cluster], tmp_path: Path) -> None:
    signs = {name: random_signs(50 + i, 800) for i, name in enumerate(DIMS)}
    two = embedding_cluster_factory(2, name="two")
    with two.client() as client, open_store(str(tmp_path / "ckpt")) as store:
        client.apply_cut(make_cut(3, signs))
        manifest = save_checkpoint(client, store, model="m")
    assert Watermark(CUT_LANE, "p0", 0, 3) in manifest.watermarks
    three = embedding_cluster_factory(3, name="three", checkpoint=str(tmp_path / "ckpt"))
    with three.client() as client:
        assert client.watermarks() == [Watermark(CUT_LANE, "p0", 0, 3)]
        assert client.apply_cut(make_cut(3, signs, version=1)).skipped
        got = client.lookup_tables(signs)
        for name, s in signs.items():
            assert np.array_equal(got[name], rows_for(s, DIMS[name]))


# ------------------------------------------------------------------------------ lookup


def test_lookup_tables_matches_lookup_dedups_and_checks_identity(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    cluster = embedding_cluster_factory(2)
    signs = {name: random_signs(60 + i, 2000) for i, name in enumerate(DIMS)}
    rng = np.random.default_rng(3)
    with cluster.client() as client:
        client.apply_cut(make_cut(1, signs))
        # duplicates, unknown signs and request order
        query = {name: np.concatenate([rng.choice(s, 300), s[:5], s[:5], [np.uint64(7)]])
                 for name, s in signs.items()}
        query["a"] = np.empty(0, np.uint64)
        before = {s: {t.name: t.lookup_rows for t in client.status(s).tables} for s in range(2)}
        got = client.lookup_tables(query)
        assert list(got) == list(query)
        for name, q in query.items():
            assert got[name].shape == (q.size, DIMS[name]) and got[name].dtype == np.float32
            assert np.array_equal(got[name], client.lookup(name, q))
        assert not got["c"][-1].any()
        # each shard was asked each table's distinct signs once
        after = {s: {t.name: t.lookup_rows for t in client.status(s).tables} for s in range(2)}
        for name in ("b", "c"):
            distinct = np.unique(query[name])
            asked = {s: after[s][name] - before[s][name] for s in range(2)}
            # lookup_rows counts the comparison Lookup too (query order, duplicates kept)
            assert {s: asked[s] - int((shard_of(query[name], 2) == s).sum())
                    for s in range(2)} == {s: int((shard_of(distinct, 2) == s).sum())
                                           for s in range(2)}
        assert client.lookup_tables({}) == {}

        with pytest.raises(ShardError) as info:
            client.lookup_tables({"b": signs["b"][:3], "never-made": signs["a"][:3]})
        assert info.value.code == "NOT_FOUND" and "never-made" in info.value.details

    channel, shard0 = stub(cluster.servers[0])
    try:
        request = pb.LookupTablesRequest(tables=[pb.TableSigns(table="b",
                                                               signs=signs["b"][:4].tobytes())],
                                         shard=1, num_shards=2)
        with pytest.raises(grpc.RpcError) as rpc:
            shard0.LookupTables(request, timeout=10)
        assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert dict(rpc.value.trailing_metadata())["persia-shard"] == "0"
        with pytest.raises(grpc.RpcError) as rpc:
            shard0.LookupTables(pb.LookupTablesRequest(tables=[
                pb.TableSigns(table="b"), pb.TableSigns(table="b")]), timeout=10)
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # the per-table form, as clients from before LookupBlocks send it, still answers
        mine = signs["c"][shard_of(signs["c"], 2) == 0][:3]
        reply = shard0.LookupTables(pb.LookupTablesRequest(tables=[
            pb.TableSigns(table="c", signs=mine.tobytes()), pb.TableSigns(table="a")],
            shard=0, num_shards=2), timeout=10)  # generated classes read the hand encoding
        assert [(t.table, t.dim) for t in reply.tables] == [("c", 64), ("a", 4)]
        assert reply.tables[0].rows == rows_for(mine, 64).tobytes()

        def blocks(tables: dict[str, np.ndarray], **kw: object) -> pb.LookupBlocksRequest:
            return pb.LookupBlocksRequest(tables=list(tables), counts=[s.size for s in tables.values()],
                                          signs=b"".join(s.tobytes() for s in tables.values()),
                                          **kw)  # type: ignore[arg-type]

        reply = shard0.LookupBlocks(blocks({"c": mine, "a": NONE, "b": signs["b"][:1]}, shard=0,
                                           num_shards=2), timeout=10)
        assert list(reply.dims) == [64, 4, 16]
        mine_b = signs["b"][:1] if shard_of(signs["b"][:1], 2)[0] == 0 else np.zeros(16, np.float32)
        assert reply.rows == rows_for(mine, 64).tobytes() + (
            rows_for(mine_b, 16).tobytes() if mine_b.dtype == np.uint64 else mine_b.tobytes())
        assert list(reply.misses) == [0, 0, int(mine_b.dtype != np.uint64)]
        with pytest.raises(grpc.RpcError) as rpc:
            shard0.LookupBlocks(blocks({"b": signs["b"][:4]}, shard=1, num_shards=2), timeout=10)
        assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        for bad, reason in ((pb.LookupBlocksRequest(tables=["b", "b"], counts=[0, 0]), "once"),
                            (pb.LookupBlocksRequest(tables=["b"], counts=[3],
                                                    signs=signs["b"][:2].tobytes()), "adding up"),
                            (pb.LookupBlocksRequest(), "0 tables"),
                            (blocks({"never-made": NONE}), "never-made")):
            with pytest.raises(grpc.RpcError) as rpc:
                shard0.LookupBlocks(bad, timeout=10)
            assert reason in (rpc.value.details() or "")
            assert rpc.value.code() == (grpc.StatusCode.NOT_FOUND if reason == "never-made"
                                        else grpc.StatusCode.INVALID_ARGUMENT)
    finally:
        channel.close()
    with EmbeddingClient(cluster.servers[::-1], token=EMBEDDING_TOKEN) as swapped, \
            pytest.raises(ShardIdentityError):
        swapped.lookup_tables({"b": signs["b"][:10]})


# ------------------------------------------------------------------------- in process


def test_shard_applies_tables_all_or_nothing_and_reads_them_together() -> None:
    shard = Shard(shard_index=0, num_shards=2)
    signs = np.arange(1, 2001, dtype=np.uint64)
    mine = signs[shard_of(signs, 2) == 0]
    theirs = signs[shard_of(signs, 2) == 1]

    def piece(name: str, s: np.ndarray, dim: int, version: float = 0.0) -> TableSlice:
        return TableSlice(name, dim, s, rows_for(s, dim, version), NONE)

    out = shard.apply_tables(CUT_LANE, "p", 0, 1, [piece("x", mine, 4), piece("y", mine, 8)])
    assert out.applied and out.inserted == 2 * mine.size
    assert {t: n for t, n, _ in out.per_table} == {"x": mine.size, "y": mine.size}
    with pytest.raises(ForeignSignsError):
        shard.apply_tables(CUT_LANE, "p", 0, 2, [piece("x", mine, 4, 1), piece("z", theirs, 2)])
    with pytest.raises(ValueError, match="'y' has dim 8"):
        shard.apply_tables(CUT_LANE, "p", 0, 2, [piece("x", mine, 4, 1), piece("y", mine, 3)])
    with pytest.raises(ValueError, match="table"):
        shard.apply_tables("_bad", "p", 0, 2, [])
    assert shard.table_names() == ["x", "y"]
    assert [w.position for w in shard.watermarks()] == [(0, 1)]
    (x, misses), = shard.lookup_tables([("x", mine)])
    assert misses == 0 and np.array_equal(x, rows_for(mine, 4))
    # an empty cut still advances the watermark; an older one is skipped
    assert shard.apply_tables(CUT_LANE, "p", 0, 3, []).applied
    assert not shard.apply_tables(CUT_LANE, "p", 0, 2, [piece("x", mine, 4, 9)]).applied
    assert shard.watermarks() == [Watermark(CUT_LANE, "p", 0, 3)]
    # chunks: a table spans two chunks; the tables are written on the last one
    first = shard.apply_tables_chunk(CUT_LANE, "p", 0, 4, [piece("x", mine[:10], 4, 2)],
                                     apply_id="k", chunk=0, chunks=2)
    assert first.staged
    assert np.array_equal(shard.lookup("x", mine[:10])[0], rows_for(mine[:10], 4))
    last = shard.apply_tables_chunk(CUT_LANE, "p", 0, 4, [piece("x", mine[10:20], 4, 2),
                                                          piece("y", mine[:5], 8, 2)],
                                    apply_id="k", chunk=1, chunks=2)
    assert last.applied and last.updated == 25
    assert np.array_equal(shard.lookup("x", mine[:20])[0], rows_for(mine[:20], 4, 2))
    assert shard.staged() == (0, 0)


def test_hand_encoded_multi_table_messages_match_protobuf() -> None:
    rng = np.random.default_rng(8)
    slices = [SliceArrays(name, dim, s, rng.random((s.size, dim), dtype=np.float32), d)
              for name, dim, s, d in (("a", 4, np.arange(3, dtype=np.uint64), NONE),
                                      ("b", 16, NONE, np.arange(2, dtype=np.uint64)),
                                      ("c", 8, NONE, NONE))]
    place = ApplyChunk(shard=1, num_shards=3, apply_id="id", chunk=1, chunks=2)
    ours = encode_apply_request(CUT_LANE, "p", 1, 2, 0, NONE, np.empty((0, 0), np.float32), NONE,
                                place, tables=slices)
    theirs = pb.ApplyRequest(table=CUT_LANE, producer="p", generation=1, sequence=2, shard=1,
                             num_shards=3, apply_id="id", chunk=1, chunks=2, tables=[
                                 pb.TableSlice(table=s.table, dim=s.dim, signs=s.signs.tobytes(),
                                               rows=s.rows.tobytes(),
                                               deleted_signs=s.deleted.tobytes())
                                 for s in slices])
    assert ours == theirs.SerializeToString()
    back = decode_apply_request(ours)
    assert not back.error and back.place == place and back.table == CUT_LANE
    assert back.expect is None
    # conditional: field numbers past 15 take two-byte tags
    for expect, fields in ((Expect((3, 0)), {"expect_held": True, "expect_generation": 3}),
                           (Expect((0, 9)), {"expect_held": True, "expect_sequence": 9}),
                           (Expect(None), {})):
        theirs.conditional = True
        theirs.expect_held = theirs.expect_generation = theirs.expect_sequence = 0
        for name, value in fields.items():
            setattr(theirs, name, value)
        ours = encode_apply_request(CUT_LANE, "p", 1, 2, 0, NONE, np.empty((0, 0), np.float32),
                                    NONE, place, tables=slices, expect=expect)
        assert ours == theirs.SerializeToString()
        assert decode_apply_request(ours).expect == expect
    assert [(t.table, t.dim, bytes(t.signs), bytes(t.rows), bytes(t.deleted_signs))
            for t in back.tables] == [(s.table, s.dim, s.signs.tobytes(), s.rows.tobytes(),
                                       s.deleted.tobytes()) for s in slices]
    assert decode_apply_request(ours[:-3]).error

    rows = rng.random((5, 8), dtype=np.float32)
    reply = LookupTablesReply((("t", LookupReply(8, rows, 2)),
                               ("u", LookupReply(4, np.empty((0, 4), np.float32), 0))))
    expected = pb.LookupTablesResponse(tables=[
        pb.TableLookup(table="t", dim=8, rows=rows.tobytes(), misses=2),
        pb.TableLookup(table="u", dim=4)]).SerializeToString()
    assert reply.encode() == expected
    # the server writes the same bytes in place, the rows gathered into them
    data, views = lookup_tables_reply(["t", "u"], [(5, 8, 2), (0, 4, 0)])
    views[0][...] = rows
    assert isinstance(data, bytes) and data == expected and views[1].shape == (0, 4)
    (t, got_t), (u, got_u) = decode_lookup_tables_reply(expected).tables
    assert (t, u, got_t.misses, got_u.dim) == ("t", "u", 2, 4)
    assert np.array_equal(got_t.rows, rows) and got_u.rows.shape == (0, 4)

    # LookupBlocks: the same in place, every table's rows in one block
    expected = pb.LookupBlocksResponse(dims=[8, 4], rows=rows.tobytes(), misses=[2, 0]).SerializeToString()
    data, views, misses, in_region = lookup_blocks_reply([(5, 8, 2), (0, 4, 0)])
    assert not in_region
    views[0][...] = rows
    misses[:] = [2, 0]
    assert isinstance(data, bytes) and data == expected and views[1].shape == (0, 4)
    got = decode_lookup_blocks_reply(expected)
    assert got.dims.tolist() == [8, 4] and got.misses.tolist() == [2, 0]
    assert np.array_equal(got.rows, rows.ravel())
    wide = pb.LookupBlocksResponse(dims=[300, 4], misses=[0, 0]).SerializeToString()
    assert decode_lookup_blocks_reply(wide).dims.tolist() == [300, 4]  # two-byte varints
    data, _, misses, _ = lookup_blocks_reply([(0, 300, 0), (0, 4, 0)])
    misses[:] = 0
    assert data == wide
    with pytest.raises(ValueError, match="whole values"):
        decode_lookup_blocks_reply(pb.LookupBlocksResponse(dims=[1], rows=b"abc").SerializeToString())
    # the rows into a lookup region (regions.py): the message says so and carries none
    space = bytearray(4 * 40 + 12)
    data, views, misses, in_region = lookup_blocks_reply([(5, 8, 2), (0, 4, 0)], memoryview(space))
    assert in_region
    views[0][...] = rows
    misses[:] = [2, 0]
    assert data == pb.LookupBlocksResponse(dims=[8, 4], misses=[2, 0],
                                           rows_in_region=True).SerializeToString()
    assert bytes(space[:160]) == rows.tobytes() and not any(space[160:])
    got = decode_lookup_blocks_reply(data)
    assert got.in_region and got.rows.size == 0 and got.misses.tolist() == [2, 0]
    data, views, _, in_region = lookup_blocks_reply([(5, 8, 2)], memoryview(space)[:159])  # no room
    assert not in_region and not decode_lookup_blocks_reply(data).in_region and views[0].shape == (5, 8)
