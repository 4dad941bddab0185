"""Lookup regions (embedding_server/regions.py): a client on its servers' host lends them a
memory file per multi-table lookup for the signs and rows. Real shard processes on loopback:
the same rows as through gRPC, bit for bit; a server that takes none, or cannot use one, is
asked in the message; hostile regions are refused while the server keeps serving; a client's
regions close with it, and a forked child never shares its parent's.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from persia_inc.embedding_server import regions
from persia_inc.embedding_server._wire import decode_lookup_blocks_reply
from persia_inc.embedding_server.protos import embedding_pb2 as pb
from persia_inc.embedding_server.regions import MEMFD_NAME, REGION_KEY, RegionPool, rows_offset
from persia_inc.local_services import EmbeddingCluster as Cluster
from persia_inc.local_services import free_port
from persia_inc.packet_format import PacketHeader, decode_packet, encode_packet

WIDTHS = {"a": 8, "b": 8, "w": 4}


def fill(client, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows for three tables (two widths); table -> its signs."""
    signs = {}
    for seq, (table, dim) in enumerate(WIDTHS.items()):
        signs[table] = np.unique(rng.integers(1, 2**63, 3000, dtype=np.uint64))
        rows = rng.standard_normal((signs[table].size, dim)).astype(np.float32)
        client.apply(decode_packet(encode_packet(PacketHeader(
            model="m", table=table, producer="p", generation=0, sequence=seq), signs[table], rows)))
    return signs


def query(signs: dict[str, np.ndarray], rng: np.random.Generator, tables: str) -> dict[str, np.ndarray]:
    """Each table's signs shuffled, some twice, with signs no table holds."""
    out = {}
    for table in tables:
        picked = rng.choice(signs[table], 2500)
        out[table] = np.concatenate([picked, rng.integers(2**63, 2**64 - 1, 50, dtype=np.uint64)])
    return out


def region_lookups(metrics_port: int) -> dict[str, float]:
    """A shard's persia_inc_embedding_region_lookups_total, by where the rows went."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {sample.labels["rows"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "persia_inc_embedding_region_lookups"
            for sample in family.samples if sample.name.endswith("_total")}


def my_regions() -> set[str]:
    """The descriptors of this process's lookup regions."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{MEMFD_NAME} "):
                found.add(fd)
        except OSError:  # the listing's own descriptor
            pass
    return found


def test_lookups_through_regions_are_the_rows_grpc_answers(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    metrics_base = free_port()
    cluster = embedding_cluster_factory(2, metrics_port_base=metrics_base)
    rng = np.random.default_rng(3)
    before = my_regions()
    with cluster.client() as lender, cluster.client(shared_memory=False) as plain:
        signs = fill(plain, rng)
        assert lender.status(0).shared_memory == regions.memory_id() != ""
        for tables in ("ab", "abw", "w"):  # one width (placed as each shard answers), two widths
            asked = query(signs, rng, tables)
            for _ in range(2):  # the first answer teaches the widths a region is sized by
                got, want = lender.lookup_tables(asked), plain.lookup_tables(asked)
                for table in asked:
                    assert got[table].shape == want[table].shape == (2550, WIDTHS[table])
                    np.testing.assert_array_equal(got[table], want[table])
                    assert not got[table][-50:].any()  # unknown signs read as zeros
        # 2 shards; through the message only while a table's width was unknown ("ab" and
        # "abw" once each), so 2 rounds of 3 - 2 = 4 lookups through regions
        assert lender.counters()["region_answers"] == 8
        seen = [region_lookups(metrics_base + shard) for shard in range(2)]
        assert sum(c.get("in_region", 0) for c in seen) == 8, seen  # the servers count them too
        assert sum(c.get("in_message", 0) for c in seen) == 0, seen
        assert plain.counters()["region_answers"] == 0
        assert len(my_regions() - before) >= 2  # kept for the next calls
    assert my_regions() == before  # closing closed them


def test_a_server_that_takes_no_regions_is_never_lent_one(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    cluster = embedding_cluster_factory(1, shared_memory_lookups=False)
    rng = np.random.default_rng(4)
    with cluster.client() as client:
        signs = fill(client, rng)
        assert client.status(0).shared_memory == ""
        asked = query(signs, rng, "abw")
        first = client.lookup_tables(asked)
        again = client.lookup_tables(asked)
        for table in asked:
            np.testing.assert_array_equal(first[table], again[table])
        assert client.counters()["region_answers"] == 0


def test_a_region_the_server_cannot_open_is_asked_again_in_the_message(
        embedding_cluster_factory: Callable[..., Cluster], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """As when the server runs in another user's name, or a descriptor was reused: the lookup
    is answered through gRPC, and that server is not lent regions again."""
    cluster = embedding_cluster_factory(1)
    rng = np.random.default_rng(5)
    with cluster.client() as client, cluster.client(shared_memory=False) as plain:
        signs = fill(plain, rng)
        asked = query(signs, rng, "abw")
        want = plain.lookup_tables(asked)
        client.lookup_tables(asked)  # widths learned

        taken = RegionPool.take

        def gone(pool: RegionPool, nbytes: int) -> regions.Region:
            region = taken(pool, nbytes)
            region.memory[:16] = bytes(16)  # another token than its name's
            return region

        monkeypatch.setattr(RegionPool, "take", gone)
        with caplog.at_level(logging.WARNING, "persia_inc.embedding_server.regions"):
            got = client.lookup_tables(asked)
        for table in asked:
            np.testing.assert_array_equal(got[table], want[table])
        assert f"{cluster.servers[0]} cannot use lookup regions" in caplog.text
        assert "its token is another" in caplog.text
        assert not client._regions.lends_to(0)
        monkeypatch.undo()
        client.lookup_tables(asked)
        assert client.counters()["region_answers"] == 0


def raw_lookup(client, request: pb.LookupBlocksRequest):
    call = client._channels[0].unary_unary(
        "/persia_inc.embedding.v1.EmbeddingService/LookupBlocks",
        pb.LookupBlocksRequest.SerializeToString, decode_lookup_blocks_reply)
    return call(request, timeout=10)


def test_hostile_regions_are_refused_and_the_server_keeps_serving(
        embedding_cluster_factory: Callable[..., Cluster], tmp_path: Path) -> None:
    metrics_base = free_port()
    cluster = embedding_cluster_factory(1, metrics_port_base=metrics_base)
    rng = np.random.default_rng(6)
    with cluster.client() as client:
        signs = fill(client, rng)
        mine = signs["a"][:100]
        victim = tmp_path / "victim"
        victim.write_bytes(b"\x00" * 4096)
        pool = RegionPool()
        real = pool.take(100)
        token = real.name.rsplit(":", 1)[1]
        small = os.memfd_create(MEMFD_NAME)  # a lookup region's file, too small for 100 signs
        os.ftruncate(small, 80)
        os.pwrite(small, bytes.fromhex(token), 0)
        with victim.open("r+b") as handle:
            for name, reason in [
                    ("../../etc/passwd", "not a region's place"),
                    (f"999999999:3:{token}", "cannot open it"),  # no such process
                    (f"{os.getpid()}:{handle.fileno()}:{token}", "not a lookup region"),  # a file
                    (f"{os.getpid()}:{real.fd}:{'0' * 32}", "its token is another"),
                    (f"{os.getpid()}:{small}:{token}", "cannot hold 100 signs")]:
                with pytest.raises(grpc.RpcError) as raised:
                    raw_lookup(client, pb.LookupBlocksRequest(tables=["a"], counts=[100], region=name))
                assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert reason in raised.value.details()
                assert REGION_KEY in dict(raised.value.trailing_metadata())
        os.close(small)
        assert victim.read_bytes() == b"\x00" * 4096  # never written

        # a region with room for the signs only: the rows come back in the message
        count = 40_000  # 320 KB of signs, 1.28 MB of rows at width 8: over 1 MiB
        region = pool.take(rows_offset(count))
        assert region.size < rows_offset(count) + 32 * count
        many = np.resize(mine, count)
        region.signs(count)[:] = many
        reply = raw_lookup(client, pb.LookupBlocksRequest(tables=["a"], counts=[count],
                                                          region=region.name))
        assert not reply.in_region
        np.testing.assert_array_equal(reply.rows.reshape(count, 8), client.lookup("a", many))
        assert region_lookups(metrics_base) == {"in_region": 0, "in_message": 1}
        pool.close()

        asked = query(signs, rng, "ab")  # and real lookups still answer
        assert client.lookup_tables(asked)["a"].shape == (2550, 8)


def test_a_pool_reuses_and_discards_regions_and_a_fork_never_shares_them() -> None:
    pool = RegionPool()
    first = pool.take(100)
    assert first.size == 1 << 20 and first.name.startswith(f"{os.getpid()}:{first.fd}:")
    assert bytes.fromhex(first.name.rsplit(":", 1)[1]) == first.memory[:16]
    pool.give_back(first)
    assert pool.take(1000).name == first.name  # reused
    bigger = pool.take(3 << 20)
    assert bigger.size == 4 << 20 and bigger.name != first.name
    pool.discard(bigger)  # a call on it failed: never used again
    with pytest.raises(OSError):
        os.fstat(bigger.fd)
    pool.give_back(first)

    child = os.fork()
    if child == 0:  # a forked child makes its own regions
        os._exit(0 if pool.take(10).name != first.name else 1)
    assert os.waitpid(child, 0)[1] == 0
    assert pool.take(10).name == first.name  # the parent's still its own
    pool.give_back(first)
    before = my_regions()
    pool.close()
    assert str(first.fd) not in my_regions() and str(first.fd) in before
    late = RegionPool()
    held = late.take(10)
    late.close()
    late.give_back(held)  # given back after close: closed, not kept
    with pytest.raises(OSError):
        os.fstat(held.fd)
