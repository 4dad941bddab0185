"""Embedding servers as real processes on loopback: lookup, apply, delete, watermarks,
checkpoint save / restart / re-shard, torn-row freedom under heavy applies, and malformed
requests answered with clear errors while the server keeps serving.

Every server is a `persia-inc embedding-server` child process on 127.0.0.1; fixtures stop
exactly the PIDs they started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from persia_inc.embedding_server.errors import ShardError
from persia_inc.embedding_server.protos import embedding_pb2 as pb
from persia_inc.embedding_server.protos import embedding_pb2_grpc as pb_grpc
from persia_inc.embedding_server.sharding import shard_of
from persia_inc.local_services import EMBEDDING_MAX_MESSAGE as MAX_MESSAGE
from persia_inc.local_services import EMBEDDING_TOKEN as TOKEN
from persia_inc.local_services import EMBEDDING_TOKEN_ENV as TOKEN_ENV
from persia_inc.local_services import EmbeddingCluster as Cluster
from persia_inc.local_services import free_port
from persia_inc.packet_format import Packet, PacketHeader, Watermark, decode_packet, encode_packet


@pytest.fixture
def cluster_factory(embedding_cluster_factory: Callable[..., Cluster]) -> Callable[..., Cluster]:
    """The shared cluster fixture, with small checkpoint parts so saves produce several."""

    def make(num: int, checkpoint: str = "", name: str = "c", **settings: object) -> Cluster:
        settings.setdefault("dump_chunk_rows", 1000)
        return embedding_cluster_factory(num, name=name, checkpoint=checkpoint, **settings)

    return make


def packet(table: str, generation: int, sequence: int, signs: np.ndarray, rows: np.ndarray,
           deleted: np.ndarray | None = None, producer: str = "p0") -> Packet:
    header = PacketHeader(model="m", table=table, producer=producer, generation=generation,
                          sequence=sequence)
    return decode_packet(encode_packet(header, signs, rows, deleted=deleted))


def rows_for(signs: np.ndarray, dim: int, version: float = 0.0) -> np.ndarray:
    return np.repeat(((signs % 1000).astype(np.float32) + version)[:, None], dim, axis=1)


# ------------------------------------------------------------------------------ happy path


def test_lookup_apply_delete_and_watermarks(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(2)
    rng = np.random.default_rng(1)
    signs = np.unique(rng.integers(0, 2**64, 5000, dtype=np.uint64, endpoint=False))
    with cluster.client() as client:
        result = client.apply(packet("emb", 0, 1, signs, rows_for(signs, 8)))
        assert result.applied == (True, True) and result.inserted == signs.size
        query = np.concatenate([signs[::-1], np.array([12345], np.uint64)])  # a miss at the end
        got = client.lookup("emb", query)
        assert got.shape == (query.size, 8) and got.dtype == np.float32
        assert np.array_equal(got[:-1], rows_for(signs[::-1], 8))
        assert not got[-1].any()
        # rows are really on their shards
        for shard in range(2):
            table = {t.name: t for t in client.status(shard).tables}["emb"]
            assert table.rows == int((shard_of(signs, 2) == shard).sum())

        # a redelivered packet changes nothing; an older one neither
        again = client.apply(packet("emb", 0, 1, signs, rows_for(signs, 8, 50)))
        assert again.skipped
        assert np.array_equal(client.lookup("emb", signs), rows_for(signs, 8))
        # an update with deletes
        upd = client.apply(packet("emb", 0, 2, signs[:100], rows_for(signs[:100], 8, 7),
                                  deleted=signs[100:200]))
        assert upd.updated == 100 and upd.deleted == 100
        got = client.lookup("emb", signs[:300])
        assert np.array_equal(got[:100], rows_for(signs[:100], 8, 7))
        assert not got[100:200].any()
        assert np.array_equal(got[200:], rows_for(signs[200:300], 8))
        assert client.watermarks() == [Watermark("emb", "p0", 0, 2)]
        assert client.delete("emb", signs[200:250]) == 50
        assert not client.lookup("emb", signs[200:250]).any()
        status = client.status(0)
        assert status.ready and status.num_shards == 2 and status.uptime_s > 0
        assert status.tables[0].misses > 0
        with pytest.raises(ShardError) as info:
            client.lookup("never-created", signs[:3])
        assert info.value.code == "NOT_FOUND" and "never-created" in info.value.details


# -------------------------------------------------------------------------- checkpoints


def test_checkpoint_save_restart_and_reshard(cluster_factory: Callable[..., Cluster],
                                             tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    signs = np.unique(rng.integers(0, 2**64, 4000, dtype=np.uint64, endpoint=False))
    small = np.arange(10, 60, dtype=np.uint64)
    two = cluster_factory(2, name="two")
    with two.client() as client:
        client.apply(packet("big", 3, 7, signs, rows_for(signs, 16)))
        client.apply(packet("small", 0, 0, small, rows_for(small, 4), producer="p1"))
    ckpt = tmp_path / "ckpt"
    cli = [sys.executable, "-m", "persia_inc.cli", "checkpoint"]
    env = {**os.environ, TOKEN_ENV: TOKEN}
    done = subprocess.run([*cli, "save", "--config", str(two.config_path), "--to", str(ckpt)],
                          env=env, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (ckpt / "manifest.json").exists() and list((ckpt / "big").glob("part-*.arrow"))
    inspected = subprocess.run([sys.executable, "-m", "persia_inc.cli", "inspect", str(ckpt)],
                               check=False, capture_output=True, text=True, timeout=60)
    assert inspected.returncode == 0, inspected.stderr
    two.stop_all()

    # restart as three shards, loading the checkpoint at start
    three = cluster_factory(3, checkpoint=str(ckpt), name="three")
    with three.client() as client:
        assert np.array_equal(client.lookup("big", signs), rows_for(signs, 16))
        assert np.array_equal(client.lookup("small", small), rows_for(small, 4))
        assert client.watermarks() == [Watermark("big", "p0", 3, 7), Watermark("small", "p1", 0, 0)]
        assert client.apply(packet("big", 3, 7, signs, rows_for(signs, 16, 1))).skipped
        total = sum(t.rows for s in range(3) for t in client.status(s).tables if t.name == "big")
        assert total == signs.size
        # and the LoadCheckpoint RPC replaces state on a running cluster
        client.apply(packet("big", 3, 8, signs[:10], rows_for(signs[:10], 16, 9)))
        assert client.load_checkpoint(str(ckpt)) == signs.size + small.size
        assert np.array_equal(client.lookup("big", signs[:10]), rows_for(signs[:10], 16))


def test_bad_initial_checkpoint_exits_nonzero(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "manifest.json").write_text("{not json")
    config = {"PersiaInferConfig": {"servers": [f"127.0.0.1:{free_port()}"],
                                    "initial_sparse_checkpoint": str(tmp_path / "ckpt")},
              "incremental_dir": str(tmp_path / "inc")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "persia_inc.cli", "embedding-server",
                           "--config", str(path), "--shard", "0"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "not JSON" in done.stderr


# -------------------------------------------------------------------------- concurrency


def test_no_torn_rows_during_heavy_applies(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(2)
    dim = 64
    signs = np.arange(1, 20_001, dtype=np.uint64)
    stop = threading.Event()
    problems: list[str] = []
    seen_versions: set[float] = set()
    written: list[int] = [0]

    def read() -> None:
        with cluster.client() as client:
            while not stop.is_set():
                rows = client.lookup("t", signs)
                first = rows[:, :1]
                torn = (rows != first).any(axis=1)
                if torn.any():
                    problems.append(f"torn row: {rows[torn][0][:8]}...")
                    return
                versions = set(np.unique(first).tolist())
                seen_versions.update(versions)
                if not versions <= set(range(written[0] + 2)):
                    problems.append(f"a version never written: {sorted(versions)[-1]}")
                    return

    with cluster.client() as writer:
        writer.apply(packet("t", 0, 0, signs, np.zeros((signs.size, dim), np.float32)))
        readers = [threading.Thread(target=read) for _ in range(2)]
        for thread in readers:
            thread.start()
        for version in range(1, 40):
            written[0] = version
            writer.apply(packet("t", 0, version, signs, np.full((signs.size, dim), version,
                                                                 np.float32)))
        stop.set()
        for thread in readers:
            thread.join(30)
        final = writer.lookup("t", signs)
    assert not problems, problems
    assert (final == 39).all()
    assert len(seen_versions) > 1, "readers should have overlapped the writer"


# ----------------------------------------------------------------------- bad requests


def test_malformed_requests_get_clear_errors_and_the_server_keeps_serving(
        cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(1)
    signs = np.arange(5, dtype=np.uint64)
    channel = grpc.insecure_channel(cluster.servers[0], options=[
        ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    stub = pb_grpc.EmbeddingServiceStub(channel)
    auth = (("authorization", f"Bearer {TOKEN}"),)

    def apply(metadata: tuple = auth, **fields: object) -> grpc.RpcError:
        request = {"table": "t", "producer": "p", "generation": 0, "sequence": 1, "dim": 4,
                   "signs": signs.tobytes(), "rows": np.zeros((5, 4), np.float32).tobytes()}
        request.update(fields)
        with pytest.raises(grpc.RpcError) as info:
            stub.Apply(pb.ApplyRequest(**request), metadata=metadata, timeout=10)
        return info.value

    def still_serving() -> None:
        with cluster.client() as client:
            client.apply(packet("t", 0, still_serving.seq, signs, rows_for(signs, 4)))
            assert np.array_equal(client.lookup("t", signs), rows_for(signs, 4))
        still_serving.seq += 1

    still_serving.seq = 1  # type: ignore[attr-defined]
    still_serving()
    cases = [
        (apply(signs=b"\x00" * 7), grpc.StatusCode.INVALID_ARGUMENT, "multiple of 8"),
        (apply(rows=b"\x00" * 12), grpc.StatusCode.INVALID_ARGUMENT, "5 signs of dim 4 need 80"),
        (apply(dim=3, rows=np.zeros((5, 3), np.float32).tobytes()),
         grpc.StatusCode.INVALID_ARGUMENT, "has dim 4, the request has dim 3"),
        (apply(dim=0), grpc.StatusCode.INVALID_ARGUMENT, "dim must be set"),
        (apply(producer="a/b"), grpc.StatusCode.INVALID_ARGUMENT, "producer"),
        (apply(table=""), grpc.StatusCode.INVALID_ARGUMENT, "table"),
        (apply(metadata=()), grpc.StatusCode.UNAUTHENTICATED, "needs 'authorization"),
        (apply(metadata=(("authorization", "Bearer wrong"),)), grpc.StatusCode.PERMISSION_DENIED,
         "wrong token"),
        (apply(signs=b"\x00" * (MAX_MESSAGE + 8)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ]
    for error, code, text in cases:
        assert error.code() == code, (error.code(), error.details())
        assert text in (error.details() or ""), error.details()
        still_serving()
    for bad in (lambda: stub.Lookup(pb.LookupRequest(table="t", signs=b"123"), timeout=10),
                lambda: stub.Delete(pb.DeleteRequest(table="t", signs=signs.tobytes()), timeout=10),
                lambda: stub.LoadCheckpoint(pb.LoadCheckpointRequest(uri="/nonexistent/ckpt"),
                                            metadata=auth, timeout=10),
                lambda: list(stub.Dump(pb.DumpRequest(table="t"), timeout=10))):
        with pytest.raises(grpc.RpcError) as info:
            bad()
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                     grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND)
        still_serving()
    with cluster.client(token="") as anonymous, pytest.raises(ShardError) as info:
        anonymous.apply(packet("t", 9, 9, signs, rows_for(signs, 4)))
    assert info.value.code == "UNAUTHENTICATED" and not info.value.retriable
    channel.close()
    still_serving()


def test_second_server_on_a_taken_port_fails_to_start(cluster_factory: Callable[..., Cluster]
                                                      ) -> None:
    cluster = cluster_factory(1)
    done = subprocess.run([sys.executable, "-m", "persia_inc.cli", "embedding-server",
                           "--config", str(cluster.config_path), "--shard", "0"],
                          env={**os.environ, TOKEN_ENV: TOKEN}, check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "cannot bind" in done.stderr
    with cluster.client() as client:
        client.wait_ready(5)
    started = time.monotonic()
    code = cluster.stop(0)  # on a hang, the server's log ends with every thread's stack
    assert code == 0 and time.monotonic() - started < 10, cluster.log_text()[-6000:]
