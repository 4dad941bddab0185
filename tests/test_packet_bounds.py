"""Bounded packets: `max_packet_rows` / `max_packet_bytes` hold through outages (merges stop at
the bound), a flush over the bound goes out as several packets with consecutive sequences, and
nothing is lost on the way."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from test_producer_support import (
    NumpyModel,
    OutageStore,
    TablePacket,
    producer_config,
    read_packets,
    replay,
)

from persia_inc.config import ConfigError
from persia_inc.producer.snapshot import Snapshot, packet_row_limit
from persia_inc.producer.writer import PacketWriter
from persia_inc.storage import open_store
from persia_inc.wiring import producer_from_config

MiB = 1024 * 1024


def _rows(packet: TablePacket) -> int:
    return int(packet.signs.size + packet.deleted.size)


def _check_stream(packets: list[TablePacket], max_rows: int) -> None:
    """Every packet within `max_rows`, the producer's sequences 0, 1, 2, ..."""
    assert packets
    assert all(_rows(p) <= max_rows for p in packets), [_rows(p) for p in packets]
    sequences = sorted({p.header.sequence for p in packets})
    assert sequences == list(range(len(sequences)))


def _snapshot(signs: list[int] | np.ndarray, deleted: list[int] | np.ndarray = (),
              dim: int = 2) -> Snapshot:
    signs = np.asarray(signs, np.uint64)
    rows = np.repeat(signs.astype(np.float32)[:, None], dim, axis=1)
    return Snapshot("t", signs, rows, np.asarray(deleted, np.uint64), dim, "size")


def test_a_merge_stops_at_the_bound_counting_the_rows_it_would_hold() -> None:
    older = _snapshot(np.arange(200))
    overlapping = _snapshot(np.arange(100, 200), deleted=[0, 1])  # 200 + 102 rows, 200 merged
    assert older.merge(overlapping, max_rows=200)
    assert older.row_count == 200 and older.deleted.tolist() == [0, 1]
    fresh = _snapshot(np.arange(1000, 1001))  # one new row: 201 > 200, refused untouched
    assert not older.merge(fresh, max_rows=200)
    assert older.row_count == 200 and fresh.row_count == 1
    assert sorted(older.signs.tolist()) == list(range(2, 200))


def test_split_cuts_contiguous_sign_ranges_with_their_deletes() -> None:
    signs = np.arange(0, 2000, 2, dtype=np.uint64)  # 1000 upserts
    deleted = np.arange(1, 1000, 2, dtype=np.uint64)  # 500 deletes among the first half
    snapshot = _snapshot(signs, deleted, dim=3)
    pieces = [snapshot, *snapshot.split(400)]
    assert [p.row_count for p in pieces] == [400, 400, 400, 300]
    every = [np.concatenate([p.signs, p.deleted]) for p in pieces]
    for before, after in itertools.pairwise(every):
        assert before.max() < after.min()  # contiguous ranges, in order
    assert np.array_equal(np.concatenate([p.signs for p in pieces]), signs)
    assert np.array_equal(np.concatenate([p.deleted for p in pieces]), deleted)
    for piece in pieces:
        np.testing.assert_array_equal(piece.rows[:, 0], piece.signs.astype(np.float32))
    assert _snapshot(np.arange(10)).split(10) == []


def test_a_flush_of_three_times_the_bound_goes_out_as_consecutive_packets(tmp_path: Path) -> None:
    model = NumpyModel(rows=10_000, dim=4)
    config = producer_config(str(tmp_path / "inc"), buffer_size=100_000, max_packet_rows=1000)
    with producer_from_config(config, generation=1) as producer:
        producer.register_table("emb", model.read)
        producer.record("emb", np.arange(0, 6000, 2))  # 3000 upserts
        producer.evict("emb", np.arange(1, 401, 2))  # and 200 deletes: 3200 rows
        assert producer.flush(timeout_s=20)
        assert producer.writer.pending_bytes == 0 and producer.writer.pending_rows == 0
        producer.record("emb", np.arange(6000, 6010))
        assert producer.flush(timeout_s=20)
        packets = read_packets(producer.store)
    _check_stream(packets, 1000)
    split, after = packets[:-1], packets[-1]
    assert len(split) >= 3 and sum(_rows(p) for p in split) == 3200
    assert {p.header.flush_reason for p in split} == {"explicit"}
    assert after.header.sequence == len(split)  # the next flush takes the next sequence
    for before, later in itertools.pairwise(split):
        assert np.concatenate([before.signs, before.deleted]).max() < \
            np.concatenate([later.signs, later.deleted]).min()
    state = replay(packets, 4)
    assert sum(row is None for row in state.values()) == 200
    for sign, row in state.items():
        if row is not None:
            np.testing.assert_array_equal(row, model.weight[sign])


@pytest.mark.parametrize("reads", ["returned", "deferred"])
def test_an_outage_queues_bounded_packets_and_recovery_loses_nothing(
        tmp_path: Path, reads: str) -> None:
    """While storage is down every flush queues; merges stop at max_packet_rows, so the packets
    after recovery are many, bounded, in consecutive sequences, and replay to the model."""
    bound = 250
    store = OutageStore(str(tmp_path / "inc"))
    model = NumpyModel(rows=3000, dim=4)
    config = producer_config(str(tmp_path / "inc"), buffer_size=100, max_pending_bytes=10**8,
                             max_packet_rows=bound)
    with producer_from_config(config, generation=1, store=store) as producer:
        if reads == "returned":
            producer.register_table("emb", model.read, dim=4)
        else:
            producer.register_table("emb", model.read_into, dim=4, rows=3000, reads_into=True)
            producer.defer_reads()
        for step in range(60):  # ~118 distinct signs a step: every step flushes
            with producer.training_step():
                ids = model.step(120)
            producer.record("emb", ids)
            if step % 10 == 9:  # drop a few rows, as training's eviction does: deletes
                producer.evict("emb", np.unique(ids[:7]))
        producer.record("emb", np.arange(3000))  # one flush of 12x the bound, after the others
        assert not producer.flush(timeout_s=0.3)  # still down
        assert producer.writer.pending_rows > 6000  # queued, not merged into ~3000 rows
        assert store.attempts > 1
        store.down.clear()
        assert producer.flush(timeout_s=30)
        assert producer.writer.pending_bytes == 0
    packets = read_packets(open_store(str(tmp_path / "inc")))
    _check_stream(packets, bound)
    assert len(packets) >= 3000 // bound + 60 * 100 // bound  # the queue was not merged into one
    assert any(p.deleted.size for p in packets)
    state = replay(packets, 4)
    assert set(state) == set(range(3000))  # the last flush upserted every row
    for sign, row in state.items():
        np.testing.assert_array_equal(row, model.weight[sign])


def test_the_bytes_bound_holds_for_a_wide_dim_with_state(tmp_path: Path) -> None:
    dim, state_dim = 1024, 1024
    model = NumpyModel(rows=2000, dim=dim)

    def reader(signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = model.read(signs)
        return rows, rows * 2

    limit = packet_row_limit(dim, state_dim, 1_000_000, MiB)
    assert 50 < limit < 200
    store = OutageStore(str(tmp_path / "inc"))
    config = producer_config(str(tmp_path / "inc"), buffer_size=100_000, max_pending_bytes=10**9,
                             max_packet_bytes=MiB)
    with producer_from_config(config, generation=1, store=store) as producer:
        producer.register_table("wide", reader, dim=dim)
        for start in range(0, 400, 40):  # ten flushes of 40 rows queue: merges stop at the bound
            producer.record("wide", np.arange(start, start + 40))
            producer.flush(wait=False)
        producer.record("wide", np.arange(400, 1000))  # one flush of ~5x the bound
        producer.flush(wait=False)
        store.down.clear()
        assert producer.flush(timeout_s=30)
        sizes = [s.size for s in producer.writer.stored]
    infos = open_store(str(tmp_path / "inc")).list()
    assert max(i.size for i in infos) <= MiB and max(sizes) <= MiB
    packets = read_packets(open_store(str(tmp_path / "inc")))
    _check_stream(packets, limit)
    assert len(packets) >= 1000 // limit + 1
    assert all(p.state is not None and p.state.shape[1] == state_dim for p in packets)
    state = replay(packets, dim)
    assert set(state) == set(range(1000))
    for sign, row in state.items():
        np.testing.assert_array_equal(row, model.weight[sign])


def test_packet_bounds_are_checked(tmp_path: Path) -> None:
    uri = str(tmp_path / "inc")
    with pytest.raises(ConfigError, match=r"max_packet_rows.*positive"):
        producer_config(uri, max_packet_rows=0)
    with pytest.raises(ConfigError, match=r"max_packet_bytes.*at least"):
        producer_config(uri, max_packet_bytes=1000)
    with pytest.raises(ConfigError, match=r"max_packet_bytes.*limits\.max_bytes"):
        producer_config(uri, max_packet_bytes=5 * 1024**3)
    with pytest.raises(ValueError, match="max_packet_rows"):
        PacketWriter(OutageStore(uri), "m", "p", None, max_packet_rows=0)  # type: ignore[arg-type]
