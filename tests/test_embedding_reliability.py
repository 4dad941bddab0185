"""Embedding-server reliability against real server processes: shard identity (a server list
in the wrong order is refused at connect and on reconnect; a server refuses signs it does not
own), chunked applies committed all or nothing, and empty packets.

Every server is a `persia-inc embedding-server` child process on 127.0.0.1 (the
`embedding_cluster_factory` fixture); fixtures stop exactly the PIDs they started.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from persia_inc.config import load_config
from persia_inc.embedding_server.client import EmbeddingClient, apply_chunks
from persia_inc.embedding_server.errors import ModelIdentityError, ShardError, ShardIdentityError
from persia_inc.embedding_server.protos import embedding_pb2 as pb
from persia_inc.embedding_server.protos import embedding_pb2_grpc as pb_grpc
from persia_inc.embedding_server.sharding import shard_of
from persia_inc.local_services import EMBEDDING_MAX_MESSAGE, EMBEDDING_TOKEN, write_test_config
from persia_inc.local_services import EmbeddingCluster as Cluster
from persia_inc.packet_format import Packet, PacketHeader, Watermark, decode_packet, encode_packet
from persia_inc.wiring import embedding_client

AUTH = (("authorization", f"Bearer {EMBEDDING_TOKEN}"),)
MIB = 1024 * 1024


def packet(table: str, sequence: int, signs: np.ndarray, rows: np.ndarray,
           deleted: np.ndarray | None = None, dim: int = 0) -> Packet:
    header = PacketHeader(model="m", table=table, producer="p0", generation=0, sequence=sequence,
                          dim=dim)
    return decode_packet(encode_packet(header, signs, rows, deleted=deleted))


def rows_for(signs: np.ndarray, dim: int, version: float = 0.0) -> np.ndarray:
    return np.repeat(((signs % 1000).astype(np.float32) + version)[:, None], dim, axis=1)


def table_rows(client: EmbeddingClient, shard: int, table: str) -> int:
    return sum(t.rows for t in client.status(shard).tables if t.name == table)


def stub(address: str) -> tuple[grpc.Channel, pb_grpc.EmbeddingServiceStub]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * MIB)])
    return channel, pb_grpc.EmbeddingServiceStub(channel)


# ---------------------------------------------------------------------------- identity


def test_swapped_server_list_is_refused_at_connect_naming_both(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    cluster = embedding_cluster_factory(2)
    a, b = cluster.servers
    signs = np.arange(1, 1001, dtype=np.uint64)
    with EmbeddingClient([b, a], token=EMBEDDING_TOKEN) as swapped:
        with pytest.raises(ShardIdentityError) as info:
            swapped.apply(packet("t", 1, signs, rows_for(signs, 4)))
        error = info.value
        assert isinstance(error, ShardError) and not error.retriable
        assert error.address == b and error.expected == (0, 2) and error.reported == (1, 2)
        assert b in str(error) and "shard 0 of 2" in str(error) and "shard 1 of 2" in str(error)
        with pytest.raises(ShardIdentityError, match="shard 1 of 2"):
            swapped.lookup("t", signs)
        with pytest.raises(ShardIdentityError):
            swapped.verify([1])  # the client's shard 1 is the server of shard 0
    with cluster.client() as client:
        assert all(not client.status(s).tables for s in range(2)), "nothing may be written"
        assert client.watermarks() == []
        client.verify()  # the right order passes
        client.apply(packet("t", 1, signs, rows_for(signs, 4)))
        assert np.array_equal(client.lookup("t", signs), rows_for(signs, 4))
    # a list of another length is refused too (every server reports its count)
    with EmbeddingClient([a], token=EMBEDDING_TOKEN) as short, \
            pytest.raises(ShardIdentityError, match=r"shard 0 of 1.*shard 0 of 2"):
        short.lookup("t", signs)


def test_servers_know_their_model_and_a_client_of_another_model_refuses_them(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    cluster = embedding_cluster_factory(1, model="ctr")
    signs = np.arange(1, 101, dtype=np.uint64)
    with cluster.client(model="ctr") as client:
        assert client.status(0).model == "ctr"
        client.apply(packet("t", 1, signs, rows_for(signs, 4)))
    with cluster.client(model="other") as other:
        with pytest.raises(ModelIdentityError) as info:
            other.lookup("t", signs)
        assert not info.value.retriable and cluster.servers[0] in str(info.value)
        assert "'other'" in str(info.value) and "'ctr'" in str(info.value)
        with pytest.raises(ModelIdentityError):
            other.apply(packet("t", 2, signs, rows_for(signs, 4)))
    with embedding_client(load_config(cluster.config_path)) as configured:  # the config's model
        assert configured.model == "ctr" and configured.lookup("t", signs).shape == (100, 4)


def test_identity_is_checked_again_after_a_restart(
        embedding_cluster_factory: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = embedding_cluster_factory(2)
    signs = np.arange(1, 501, dtype=np.uint64)
    with cluster.client(timeout_s=5) as client:
        client.apply(packet("t", 1, signs, rows_for(signs, 4)))
        cluster.stop_all()
        with pytest.raises(ShardError) as info:
            client.lookup("t", signs)
        assert info.value.code == "UNAVAILABLE" and info.value.retriable
        # the same two ports come back as each other's shard (a config in the other order)
        swapped = list(reversed(cluster.servers))
        config = write_test_config(tmp_path / "swapped.yaml", swapped, str(tmp_path / "inc"))
        (tmp_path / "swapped").mkdir()
        other = Cluster(config, swapped, tmp_path / "swapped")
        try:
            for shard in range(2):
                other.start(shard)
            other.wait_ready()
            with pytest.raises(ShardIdentityError) as info:
                client.lookup("t", signs)
            assert info.value.reported[1] == 2 and info.value.expected != info.value.reported
            with pytest.raises(ShardIdentityError):
                client.apply(packet("t", 2, signs, rows_for(signs, 4, 1)))
            with pytest.raises(ShardIdentityError):
                client.watermarks()
        finally:
            other.stop_all()


def test_servers_refuse_signs_and_requests_of_other_shards(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    cluster = embedding_cluster_factory(2)
    signs = np.arange(1, 2001, dtype=np.uint64)
    owners = shard_of(signs, 2)
    mine, theirs = signs[owners == 0], signs[owners == 1]
    with cluster.client() as client:
        client.apply(packet("t", 1, signs, rows_for(signs, 4)))
        before = client.lookup("t", signs)
    channel, shard0 = stub(cluster.servers[0])
    try:
        # a client that skipped every check (no identity in the request): foreign signs
        mixed = np.concatenate([mine[:10], theirs[3:5], mine[10:20]])
        request = pb.ApplyRequest(table="t", producer="p0", generation=0, sequence=2, dim=4,
                                  signs=mixed.tobytes(), rows=rows_for(mixed, 4, 5).tobytes())
        with pytest.raises(grpc.RpcError) as info:
            shard0.Apply(request, metadata=AUTH, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"sign {int(theirs[3])} belongs to shard 1 of 2" in info.value.details()
        assert "2 foreign sign(s)" in info.value.details()
        assert dict(info.value.trailing_metadata())["persia-shard"] == "0"
        # deletes of foreign signs too
        request = pb.ApplyRequest(table="t", producer="p0", generation=0, sequence=2, dim=4,
                                  deleted_signs=theirs[:1].tobytes())
        with pytest.raises(grpc.RpcError) as info:
            shard0.Apply(request, metadata=AUTH, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # a request that says it is for shard 1 of 2
        request = pb.ApplyRequest(table="t", producer="p0", generation=0, sequence=2, dim=4,
                                  signs=mine[:1].tobytes(), rows=rows_for(mine[:1], 4).tobytes(),
                                  shard=1, num_shards=2)
        with pytest.raises(grpc.RpcError) as info:
            shard0.Apply(request, metadata=AUTH, timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "shard 0 of 2" in info.value.details() and "shard 1 of 2" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            shard0.Lookup(pb.LookupRequest(table="t", signs=mine.tobytes(), shard=1, num_shards=2),
                          timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # a lookup without identity that reaches the wrong shard is answered, and counted
        assert shard0.Status(pb.StatusRequest(), timeout=10).foreign_lookup_signs == 0
        shard0.Lookup(pb.LookupRequest(table="t", signs=theirs[:7].tobytes()), timeout=10)
        assert shard0.Status(pb.StatusRequest(), timeout=10).foreign_lookup_signs == 7
    finally:
        channel.close()
    with cluster.client() as client:
        assert np.array_equal(client.lookup("t", signs), before), "nothing was written"
        assert client.watermarks() == [Watermark("t", "p0", 0, 1)]
        assert table_rows(client, 0, "t") == mine.size


# ---------------------------------------------------------------------------- chunking


def test_apply_chunks_fit_the_budget() -> None:
    assert apply_chunks(0, 0, 8, 1000) == [(slice(0, 0), slice(0, 0))]
    pieces = apply_chunks(100, 30, 8, 1000)  # 40 bytes a row: 25 rows a chunk
    assert [p[0] for p in pieces][:4] == [slice(0, 25), slice(25, 50), slice(50, 75),
                                          slice(75, 100)]
    assert sum(p[1].stop - p[1].start for p in pieces) == 30
    for rows, deletes in pieces:
        assert (rows.stop - rows.start) * 40 + (deletes.stop - deletes.start) * 8 <= 1000
    with pytest.raises(ValueError, match="cannot carry one row"):
        apply_chunks(1, 0, 1000, 100)


def test_a_packet_many_times_the_message_limit_applies_completely(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    # the servers accept 1 MiB messages; the client learns it from Status and chunks
    cluster = embedding_cluster_factory(2, max_message_bytes=MIB)
    dim = 64
    signs = np.arange(1, 40_001, dtype=np.uint64)  # 40k rows of 264 bytes: about 10 MiB
    with cluster.client() as client:
        client.apply(packet("t", 1, signs, rows_for(signs, dim)))
        first = packet("t", 2, signs[:30_000], rows_for(signs[:30_000], dim, 1),
                       deleted=signs[30_000:])
        assert first.nbytes > 6 * MIB
        result = client.apply(first)
        assert result.applied == (True, True)
        assert result.updated == 30_000 and result.deleted == 10_000
        got = client.lookup("t", signs)
        assert np.array_equal(got[:30_000], rows_for(signs[:30_000], dim, 1))
        assert not got[30_000:].any()
        assert client.watermarks() == [Watermark("t", "p0", 0, 2)]
        assert client.apply(first).skipped  # redelivery: the first chunk is acknowledged unapplied
        assert all(client.status(s).staged_applies == 0 for s in range(2))


def chunk_request(signs: np.ndarray, dim: int, sequence: int, apply_id: str, chunk: int,
                  chunks: int, version: float) -> pb.ApplyRequest:
    return pb.ApplyRequest(table="t", producer="p0", generation=0, sequence=sequence, dim=dim,
                           signs=signs.tobytes(), rows=rows_for(signs, dim, version).tobytes(),
                           shard=0, num_shards=1, apply_id=apply_id, chunk=chunk, chunks=chunks)


def test_an_interrupted_chunked_apply_leaves_the_shard_as_before(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    cluster = embedding_cluster_factory(1, max_message_bytes=MIB)
    dim = 16
    signs = np.arange(1, 3001, dtype=np.uint64)
    with cluster.client() as client:
        client.apply(packet("t", 1, signs, rows_for(signs, dim)))
        channel, shard = stub(cluster.servers[0])
        try:
            # the client stops after the first of three chunks: nothing is visible
            reply = shard.Apply(chunk_request(signs[:1000], dim, 2, "a", 0, 3, 7), metadata=AUTH,
                                timeout=10)
            assert reply.staged and not reply.applied
            assert np.array_equal(client.lookup("t", signs), rows_for(signs, dim))
            assert client.watermarks() == [Watermark("t", "p0", 0, 1)]
            status = client.status(0)
            assert status.staged_applies == 1 and status.staged_bytes >= 1000 * (8 + 4 * dim)
            # a newer apply of the stream replaces it; the old one's next chunk is refused
            shard.Apply(chunk_request(signs[:1000], dim, 3, "b", 0, 2, 8), metadata=AUTH,
                        timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                shard.Apply(chunk_request(signs[1000:2000], dim, 2, "a", 1, 3, 7),
                            metadata=AUTH, timeout=10)
            assert info.value.code() == grpc.StatusCode.ABORTED
            assert client.status(0).staged_applies == 1
            # the server dies with "b" half staged and comes back: the staged chunk is gone
            cluster.stop(0, signal.SIGKILL)
            cluster.start(0)
            cluster.wait_ready()
            channel.close()
            channel, shard = stub(cluster.servers[0])
            assert client.status(0).staged_applies == 0
            with pytest.raises(grpc.RpcError) as info:
                shard.Apply(chunk_request(signs[1000:2000], dim, 3, "b", 1, 2, 8),
                            metadata=AUTH, timeout=10)
            assert info.value.code() == grpc.StatusCode.ABORTED
            assert "restart the apply" in info.value.details()
        finally:
            channel.close()
        # (the restarted shard starts empty: no checkpoint) and nothing of "b" shows
        assert client.watermarks() == [] and not client.status(0).tables
        # a whole apply in chunks works again
        big = np.arange(1, 20_001, dtype=np.uint64)
        assert client.apply(packet("t", 4, big, rows_for(big, dim, 2))).applied == (True,)
        assert np.array_equal(client.lookup("t", big), rows_for(big, dim, 2))


# ---------------------------------------------------------------------------- empty packets


def test_empty_packets_encode_decode_and_apply_as_no_ops(
        embedding_cluster_factory: Callable[..., Cluster]) -> None:
    header = PacketHeader(model="m", table="t", producer="p0", generation=0, sequence=5, dim=8)
    data = encode_packet(header, np.empty(0, np.uint64), np.empty((0, 8), np.float32))
    empty = decode_packet(data)
    assert empty.header.rows == 0 and empty.header.dim == 8 and empty.header.deleted_rows == 0
    assert empty.signs.shape == (0,) and empty.embeddings.shape == (0, 8)
    assert empty.deleted.shape == (0,)
    deletes_only = decode_packet(encode_packet(header, np.empty(0, np.uint64),
                                               np.empty((0, 8), np.float32),
                                               deleted=np.array([3], np.uint64)))
    assert deletes_only.deleted.tolist() == [3] and deletes_only.signs.size == 0

    cluster = embedding_cluster_factory(2, max_message_bytes=EMBEDDING_MAX_MESSAGE)
    signs = np.arange(1, 101, dtype=np.uint64)
    with cluster.client() as client:
        client.apply(packet("t", 4, signs, rows_for(signs, 8)))
        result = client.apply(empty)
        assert result.applied == (True, True) and result.inserted == result.updated == 0
        assert client.watermarks() == [Watermark("t", "p0", 0, 5)]
        assert np.array_equal(client.lookup("t", signs), rows_for(signs, 8))
        assert client.apply(empty).skipped
        # an empty first packet of a new table creates it, empty, at its watermark
        fresh = PacketHeader(model="m", table="u", producer="p0", generation=0, sequence=0, dim=4)
        client.apply(decode_packet(encode_packet(fresh, np.empty(0, np.uint64),
                                                 np.empty((0, 4), np.float32))))
        assert Watermark("u", "p0", 0, 0) in client.watermarks()
        assert not client.lookup("u", signs).any()
