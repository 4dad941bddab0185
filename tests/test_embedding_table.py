"""The in-process parts of the embedding server: sharding, the table, the shard, checkpoints
on local storage, and the generated gRPC modules being current. No processes here."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from persia_inc.embedding_server.checkpoint import load_shard, part_key
from persia_inc.embedding_server.shard import ChunkLostError, ForeignSignsError, Shard, TableNotFoundError
from persia_inc.embedding_server.sharding import group_by_shard, shard_of, splitmix64
from persia_inc.embedding_server.table import EmbeddingTable
from persia_inc.foundation.wait import wait_until
from persia_inc.packet_format import MANIFEST_NAME, CheckpointManifest, ManifestPart, ManifestTable, Watermark
from persia_inc.storage import open_store

ROOT = Path(__file__).resolve().parents[1]


def rows_for(signs: np.ndarray, dim: int, version: float = 0.0) -> np.ndarray:
    """Deterministic rows: each row is (sign % 1000 + version) in every element."""
    return np.repeat(((signs % 1000).astype(np.float32) + version)[:, None], dim, axis=1)


# ------------------------------------------------------------------------------- sharding


def test_splitmix64_matches_the_reference_sequence() -> None:
    # The first output of the reference generator seeded with 0 (Vigna's splitmix64.c).
    assert int(splitmix64(np.array([0], np.uint64))[0]) == 0xE220A8397B1DCDAF
    signs = np.array([1, 2, 2**64 - 1], np.uint64)
    before = signs.copy()
    splitmix64(signs)
    assert np.array_equal(signs, before), "must not modify its input"


def test_shard_of_is_balanced_and_group_by_shard_covers_everything() -> None:
    signs = np.arange(100_000, dtype=np.uint64)  # sequential ids must still spread evenly
    for n in (1, 2, 3, 7):
        shards = shard_of(signs, n)
        assert shards.dtype == np.int64 and shards.min() >= 0 and shards.max() < n
        counts = np.bincount(shards, minlength=n)
        assert counts.min() > 0.95 * signs.size / n
        order, bounds = group_by_shard(signs, n)
        assert np.array_equal(np.sort(order), np.arange(signs.size))
        for s in range(n):
            part = order[bounds[s]:bounds[s + 1]]
            assert (shards[part] == s).all() and np.all(np.diff(part) > 0)
    with pytest.raises(ValueError, match="num_shards"):
        shard_of(signs, 0)


# ---------------------------------------------------------------------------------- table


def test_insert_lookup_update_delete_and_row_reuse() -> None:
    table = EmbeddingTable(4)
    signs = np.array([5, 0, 2**64 - 1, 77], np.uint64)  # 0 and the top value are real signs
    result = table.upsert(signs, rows_for(signs, 4))
    assert (result.inserted, result.updated) == (4, 0) and len(table) == 4
    rows, misses = table.lookup(np.array([77, 9, 0], np.uint64))
    assert misses == 1
    assert np.array_equal(rows, np.array([[77] * 4, [0] * 4, [0] * 4], np.float32))
    assert table.upsert(signs[:1], np.full((1, 4), 3.5, np.float32)).updated == 1
    assert table.lookup(signs[:1])[0][0, 0] == 3.5
    high = table._high
    assert table.delete(np.array([5, 12345], np.uint64)) == 1
    assert len(table) == 3 and table.lookup(signs[:1])[1] == 1
    table.upsert(np.array([999], np.uint64), np.ones((1, 4), np.float32))
    assert table._high == high, "a deleted row is reused before the matrix grows"
    assert table.contains(np.array([999, 5], np.uint64)).tolist() == [True, False]


def test_matches_a_dict_model_through_growth_and_deletes() -> None:
    rng = np.random.default_rng(3)
    table = EmbeddingTable(3)
    model: dict[int, np.ndarray] = {}
    universe = rng.integers(0, 2**64, 5000, dtype=np.uint64, endpoint=False)
    for step in range(60):
        signs = np.unique(rng.choice(universe, rng.integers(1, 400)))
        if step % 3 == 2:
            table.delete(signs)
            for s in signs.tolist():
                model.pop(s, None)
        else:
            rows = rng.random((signs.size, 3), dtype=np.float32)
            table.upsert(signs, rows)
            model.update(zip(signs.tolist(), rows, strict=True))
        assert len(table) == len(model)
    got, misses = table.lookup(universe)
    want = np.array([model.get(s, np.zeros(3, np.float32)) for s in universe.tolist()])
    assert np.array_equal(got, want)
    assert misses == sum(s not in model for s in universe.tolist())
    dumped = {s: r for signs, rows in table.iter_rows(chunk_rows=333)
              for s, r in zip(signs.tolist(), rows, strict=True)}
    assert dumped.keys() == model.keys()
    assert all(np.array_equal(dumped[s], model[s]) for s in model)


def test_a_table_grows_ahead_so_the_next_writes_do_not_grow_inside_their_lock() -> None:
    table = EmbeddingTable(4, capacity=100_000)  # with LRU stamps: their array grows too
    written = np.arange(20_000, dtype=np.uint64) * 7 + 1  # a bulk load first
    table.upsert(written, rows_for(written, 4))
    table.grow_ahead()  # room for at most as many rows again as the table holds
    assert len(table) + 20_000 <= table._slots.shape[0] * 0.7
    while not table.needs_room():
        batch = np.arange(written.size, written.size + 500, dtype=np.uint64) * 7 + 1
        table.upsert(batch, rows_for(batch, 4))
        written = np.concatenate([written, batch])
    assert table.grow_ahead() and not table.needs_room()
    arrays = [table._slots, table._values, table._row_signs, table._ticks]
    for _ in range(3):  # AHEAD - 1 more writes like the last fit without growing
        batch = np.arange(written.size, written.size + 500, dtype=np.uint64) * 7 + 1
        table.upsert(batch, rows_for(batch, 4))
        written = np.concatenate([written, batch])
    assert all(a is b for a, b in zip(arrays, [table._slots, table._values, table._row_signs,
                                                table._ticks], strict=True))
    assert len(table) == written.size
    assert np.array_equal(table.lookup(written)[0], rows_for(written, 4))
    assert not table.grow_ahead() or not table.needs_room()


def test_a_shard_grows_its_tables_ahead_between_applies() -> None:
    shard = Shard()
    signs = np.empty(0, np.uint64)
    sequence = 0
    while True:  # applies until one leaves a table that two more would outgrow
        batch = np.arange(signs.size, signs.size + 2000, dtype=np.uint64) * 3 + 1
        signs = np.concatenate([signs, batch])
        shard.apply("t", "p", 1, sequence, 8, batch, rows_for(batch, 8), np.empty(0, np.uint64))
        sequence += 1
        if shard.table("t").needs_room() or sequence > 200:
            break
    assert sequence <= 200
    table = shard.table("t")
    wait_until(lambda: not table.needs_room(), "the table grown in the background", timeout_s=15)
    assert np.array_equal(shard.lookup("t", signs)[0], rows_for(signs, 8))


def test_shape_errors_change_nothing() -> None:
    table = EmbeddingTable(4)
    with pytest.raises(ValueError, match=r"float32\[2, 4\]"):
        table.upsert(np.array([1, 2], np.uint64), np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="uint64"):
        table.lookup(np.array([1.5]))
    assert len(table) == 0


def test_lru_capacity_evicts_least_recently_used() -> None:
    table = EmbeddingTable(2, capacity=100)
    first = np.arange(100, dtype=np.uint64)
    table.upsert(first, rows_for(first, 2))
    table.lookup(first[50:])  # 50..99 recently used
    newer = np.arange(1000, 1010, dtype=np.uint64)
    result = table.upsert(newer, rows_for(newer, 2))
    assert result.evicted >= 10 and len(table) <= 100
    assert table.contains(newer).all()
    assert table.contains(first[50:]).all(), "recently looked-up rows survive"
    assert not table.contains(first[:10]).any(), "the oldest rows go first"
    with pytest.raises(ValueError, match="capacity"):
        table.upsert(np.arange(5000, 5200, dtype=np.uint64), np.zeros((200, 2), np.float32))


def test_upsert_whose_eviction_takes_rows_of_the_same_batch() -> None:
    # 90 of the batch's signs exist and 10 are new: making room (1% overshoot) evicts one of
    # the 90 after it was found, so its write must not land on its freed row
    table = EmbeddingTable(2, capacity=100)
    first = np.arange(100, dtype=np.uint64)
    table.upsert(first, rows_for(first, 2))
    batch = np.concatenate([first[10:], np.arange(1000, 1010, dtype=np.uint64)])
    result = table.upsert(batch, rows_for(batch, 2, 0.5))
    assert result.evicted == 11 and result.inserted == 11 and len(table) == 100
    got, misses = table.lookup(batch)
    assert misses == 0 and np.array_equal(got, rows_for(batch, 2, 0.5))
    assert not table.contains(first[:10]).any()


def test_prefetched_probes_match_a_dict_across_block_edges_and_duplicates() -> None:
    # batch sizes around the pipelines' distances, repeated signs, misses mixed with hits
    rng = np.random.default_rng(11)
    table = EmbeddingTable(16)
    model: dict[int, np.ndarray] = {}
    universe = rng.integers(0, 2**64, 3000, dtype=np.uint64, endpoint=False)
    for n in (1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 500, 2000):
        signs = rng.choice(universe, n)  # with repeats: the last row of a sign wins
        rows = rng.random((n, 16), dtype=np.float32)
        table.upsert(signs, rows)
        model.update(zip(signs.tolist(), rows, strict=True))
        query = rng.choice(universe, n + 7)
        got, misses = table.lookup(query)
        want = np.array([model.get(s, np.zeros(16, np.float32)) for s in query.tolist()])
        assert np.array_equal(got, want)
        assert misses == sum(s not in model for s in query.tolist())
    assert len(table) == len(model)


def test_lookups_never_see_a_torn_row_in_process() -> None:
    table = EmbeddingTable(32)
    signs = np.arange(20_000, dtype=np.uint64)
    table.upsert(signs, np.zeros((signs.size, 32), np.float32))
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            rows, _ = table.lookup(signs)
            torn = (rows != rows[:, :1]).any(axis=1)
            if torn.any():
                bad.append(f"torn row {rows[torn][0]}")
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for version in range(1, 60):
        table.upsert(signs, np.full((signs.size, 32), version, np.float32))
    stop.set()
    for t in threads:
        t.join(10)
    assert not bad


# ---------------------------------------------------------------------------------- shard


def test_shard_apply_is_idempotent_by_watermark_and_validates() -> None:
    shard = Shard()
    signs = np.array([1, 2, 3], np.uint64)
    out = shard.apply("t", "p0", 1, 5, 2, signs, rows_for(signs, 2), np.empty(0, np.uint64))
    assert out.applied and out.inserted == 3
    again = shard.apply("t", "p0", 1, 5, 2, signs, rows_for(signs, 2, 9), np.array([1], np.uint64))
    assert not again.applied and again.watermark == (1, 5)
    assert shard.lookup("t", signs)[0][:, 0].tolist() == [1, 2, 3]
    older = shard.apply("t", "p0", 0, 99, 2, signs, rows_for(signs, 2, 9), np.empty(0, np.uint64))
    assert not older.applied, "an older generation never overwrites a newer one"
    newer = shard.apply("t", "p0", 2, 0, 2, signs[:1], rows_for(signs[:1], 2, 5),
                        np.array([3], np.uint64))
    assert newer.applied and newer.deleted == 1
    assert shard.lookup("t", signs)[0][:, 0].tolist() == [6, 2, 0]
    assert shard.watermarks() == [Watermark("t", "p0", 2, 0)]
    with pytest.raises(ValueError, match="dim 2, the request has dim 3"):
        shard.apply("t", "p1", 0, 0, 3, signs, np.zeros((3, 3), np.float32), np.empty(0, np.uint64))
    with pytest.raises(ValueError, match="producer"):
        shard.apply("t", "../x", 0, 0, 2, signs, np.zeros((3, 2), np.float32), np.empty(0, np.uint64))
    with pytest.raises(TableNotFoundError):
        shard.lookup("nope", signs)


def test_shard_refuses_foreign_signs_and_commits_chunks_all_or_nothing() -> None:
    now = [0.0]
    shard = Shard(shard_index=1, num_shards=2, stage_timeout_s=10.0, clock=lambda: now[0])
    signs = np.arange(1, 401, dtype=np.uint64)
    mine = signs[shard_of(signs, 2) == 1]
    theirs = signs[shard_of(signs, 2) == 0]
    none = np.empty(0, np.uint64)
    with pytest.raises(ForeignSignsError, match=f"sign {theirs[0]} belongs to shard 0 of 2"):
        shard.apply("t", "p", 0, 1, 2, signs, rows_for(signs, 2), none)
    with pytest.raises(ForeignSignsError):
        shard.apply("t", "p", 0, 1, 2, mine, rows_for(mine, 2), theirs[:1])
    assert shard.table_names() == [] and shard.watermarks() == []
    shard.apply("t", "p", 0, 1, 2, mine, rows_for(mine, 2), none)

    def chunk(i: int, apply_id: str = "x", sequence: int = 2) -> object:
        part = mine[i * 50:(i + 1) * 50]
        return shard.apply_chunk("t", "p", 0, sequence, 2, part, rows_for(part, 2, 5), none,
                                 apply_id=apply_id, chunk=i, chunks=3)

    assert chunk(0).staged and chunk(1).staged
    assert shard.lookup("t", mine)[0][:, 0].tolist() == rows_for(mine, 2)[:, 0].tolist()
    assert shard.watermarks() == [Watermark("t", "p", 0, 1)] and shard.staged()[0] == 1
    out = chunk(2)
    assert out.applied and not out.staged and out.updated == 150
    assert shard.lookup("t", mine[:150])[0][:, 0].tolist() == rows_for(mine[:150], 2, 5)[:, 0].tolist()
    assert shard.watermarks() == [Watermark("t", "p", 0, 2)] and shard.staged() == (0, 0)
    # an abandoned apply is dropped after the timeout; its next chunk is refused
    assert chunk(0, "y", 3).staged
    now[0] += 11
    assert shard.staged() == (0, 0)
    with pytest.raises(ChunkLostError, match="restart the apply"):
        chunk(1, "y", 3)
    # out of order, and a chunk at or below the watermark
    with pytest.raises(ChunkLostError):
        chunk(1, "z", 4)
    assert not chunk(0, "old", 2).applied and shard.staged() == (0, 0)
    assert shard.watermarks() == [Watermark("t", "p", 0, 2)]


# ---------------------------------------------------------------------------- checkpoints


def write_checkpoint(root: Path, tables: dict[str, tuple[np.ndarray, np.ndarray]],
                     saved_shards: int) -> None:
    """A checkpoint as `save_checkpoint` lays it out, written without servers."""
    from persia_inc.embedding_server.checkpoint import CHECKPOINT_PRODUCER
    from persia_inc.packet_format import PacketHeader, encode_packet, read_packet_header

    store = open_store(str(root))
    entries = {}
    for name, (signs, rows) in tables.items():
        parts = []
        shards = shard_of(signs, saved_shards)
        for s in range(saved_shards):
            mine = shards == s
            header = PacketHeader(model="m", table=name, producer=CHECKPOINT_PRODUCER,
                                  generation=s, sequence=0, flush_reason="checkpoint")
            data = encode_packet(header, signs[mine], rows[mine])
            key = part_key(name, s, saved_shards, 0)
            store.put(key, data)
            parts.append(ManifestPart(key, int(mine.sum()), len(data),
                                      read_packet_header(data).checksum))
        entries[name] = ManifestTable(dim=rows.shape[1], rows=signs.size, parts=tuple(parts))
    manifest = CheckpointManifest(model="m", tables=entries,
                                  watermarks=(Watermark("a", "p", 3, 4),))
    store.put(MANIFEST_NAME, manifest.to_json())


def test_load_shard_reshards_a_checkpoint(tmp_path: Path) -> None:
    signs = np.arange(1, 3001, dtype=np.uint64)
    write_checkpoint(tmp_path / "ckpt", {"a": (signs, rows_for(signs, 4))}, saved_shards=2)
    store = open_store(str(tmp_path / "ckpt"))
    seen = np.zeros(0, np.uint64)
    for shard in range(3):
        tables, marks, loaded = load_shard(store, shard, 3)
        assert marks == {("a", "p"): (3, 4)}
        table = tables["a"]
        assert loaded == len(table)
        mine = signs[shard_of(signs, 3) == shard]
        assert len(table) == mine.size
        assert np.array_equal(table.lookup(mine)[0], rows_for(mine, 4))
        seen = np.concatenate([seen, mine])
    assert np.array_equal(np.sort(seen), signs)


# ------------------------------------------------------------------------ generated code


def test_generated_grpc_modules_are_current(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "embedding_server/protos/generate.sh"), str(tmp_path)],
                   check=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    for name in ("embedding_pb2.py", "embedding_pb2_grpc.py", "embedding_pb2.pyi"):
        fresh = (tmp_path / "embedding_server/protos" / name).read_text()
        committed = (ROOT / "embedding_server/protos" / name).read_text()
        assert fresh == committed, f"{name} is stale: run embedding_server/protos/generate.sh"


def test_hand_encoded_apply_request_matches_protobuf() -> None:
    from persia_inc.embedding_server._wire import ApplyChunk, decode_apply_request, encode_apply_request
    from persia_inc.embedding_server.protos import embedding_pb2 as pb

    rng = np.random.default_rng(5)
    for n, d, generation, sequence in ((0, 4, 0, 0), (3, 4, 1, 300), (200, 16, 2**33, 10**12 - 1)):
        signs = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
        rows = rng.random((n, d), dtype=np.float32)
        deleted = np.arange(n // 2, dtype=np.uint64)
        place = ApplyChunk(shard=n % 3, num_shards=3, apply_id="a1" if n else "", chunk=n % 2,
                           chunks=2 if n else 0)
        ours = encode_apply_request("táble", "p", generation, sequence, d, signs, rows, deleted,
                                    place)
        theirs = pb.ApplyRequest(table="táble", producer="p", generation=generation,
                                 sequence=sequence, dim=d, signs=signs.tobytes(),
                                 rows=rows.tobytes(), deleted_signs=deleted.tobytes(),
                                 shard=place.shard, num_shards=3, apply_id=place.apply_id,
                                 chunk=place.chunk, chunks=place.chunks)
        assert ours == theirs.SerializeToString()
        back = decode_apply_request(ours)
        assert (back.table, back.producer, back.generation, back.sequence, back.dim) == \
            ("táble", "p", generation, sequence, d)
        assert back.place == place and not back.error
        assert bytes(back.signs) == signs.tobytes() and bytes(back.rows) == rows.tobytes()
        assert bytes(back.deleted_signs) == deleted.tobytes()
    assert "truncated" in decode_apply_request(ours[:-1]).error


def test_lookup_reply_wire_format_matches_protobuf() -> None:
    from persia_inc.embedding_server._wire import LookupReply, decode_lookup_reply
    from persia_inc.embedding_server.protos import embedding_pb2 as pb

    rng = np.random.default_rng(6)
    for n, d, misses in ((0, 8, 0), (5, 8, 2), (1000, 16, 1000)):
        rows = rng.random((n, d), dtype=np.float32)
        ours = LookupReply(d, rows, misses).encode()
        assert ours == pb.LookupResponse(dim=d, rows=rows.tobytes(), misses=misses).SerializeToString()
        back = decode_lookup_reply(ours)
        assert (back.dim, back.misses) == (d, misses) and np.array_equal(back.rows, rows)
    with pytest.raises(ValueError, match="do not fit"):
        decode_lookup_reply(pb.LookupResponse(dim=3, rows=b"\x00" * 8).SerializeToString())
    with pytest.raises(ValueError, match="truncated"):
        decode_lookup_reply(pb.LookupResponse(dim=3, rows=b"\x00" * 12).SerializeToString()[:-1])
