"""The producer against local storage: triggers, flush/close, snapshots, evictions,
generations, back-pressure and a local outage."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.dataset as ds
import pytest
from test_producer_support import (
    NumpyModel,
    OutageStore,
    producer_config,
    read_cuts,
    read_packets,
    replay,
)

from persia_inc.foundation.wait import wait_until
from persia_inc.producer import (
    BackpressureError,
    IncrementalProducer,
    ProducerClosedError,
    UnstoredDataError,
)
from persia_inc.producer.row_id_signs import RowIdColumns, RowIdSignBuffer
from persia_inc.producer.signset import SignBuffer
from persia_inc.storage import open_store
from persia_inc.wiring import producer_from_config


def test_signbuffer_matches_python_set_with_last_op_winning() -> None:
    rng = np.random.default_rng(1)
    buffer = SignBuffer(capacity=16)
    expected: dict[int, int] = {}
    for _ in range(30):
        signs = rng.integers(0, 5000, 700).astype(np.uint64)
        op = int(rng.integers(0, 2))
        buffer.insert(signs, op)
        expected.update(dict.fromkeys(signs.tolist(), op))
    buffer.insert(np.array([2**64 - 1, 0], np.uint64))
    expected.update({2**64 - 1: 0, 0: 0})
    assert len(buffer) == len(expected)
    signs, ops = buffer.swap()
    assert dict(zip(signs.tolist(), ops.tolist(), strict=True)) == expected
    assert len(buffer) == 0 and buffer.swap()[0].size == 0


def test_disabled_producer_does_nothing(tmp_path: Path) -> None:
    config = producer_config(str(tmp_path / "inc"), enabled=False)
    producer = producer_from_config(config)
    producer.register_table("t", lambda s: np.zeros((s.size, 4), np.float32))
    started = time.perf_counter()
    for _ in range(10_000):
        producer.record("t", np.arange(10))
    assert time.perf_counter() - started < 0.5
    assert producer.flush()
    producer.close()
    assert not (tmp_path / "inc").exists()


def test_size_trigger_flushes_a_table_with_its_latest_rows(tmp_path: Path) -> None:
    model = NumpyModel()
    config = producer_config(str(tmp_path / "inc"), buffer_size=500)
    with producer_from_config(config, producer_id="p1") as producer:
        producer.register_table("emb", model.read)
        producer.record("emb", np.arange(400))
        assert producer.buffered("emb") == 400
        producer.record("emb", np.arange(300, 600))  # 600 distinct >= 500: flush
        assert producer.buffered("emb") == 0
        expected = model.weight[:600].copy()
        assert producer.writer.drain(10)
        packets = read_packets(producer.store)
    assert len(packets) == 1
    header = packets[0].header
    assert (header.model, header.table, header.producer, header.lane) == (
        "ctr", "emb", "p1", "~cuts")
    assert (header.generation, header.sequence, header.flush_reason) == (1, 0, "size")
    np.testing.assert_array_equal(packets[0].signs, np.arange(600, dtype=np.uint64))
    np.testing.assert_array_equal(packets[0].embeddings, expected)


class FakeClock:
    """A monotonic clock the test moves by hand (the producer's `clock`)."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def test_buffer_size_counts_signs_over_all_tables_and_flushes_them_as_one_cut(
        tmp_path: Path) -> None:
    model = NumpyModel()
    config = producer_config(str(tmp_path / "inc"), buffer_size=500)
    with producer_from_config(config) as producer:
        for name in ("a", "b", "c"):
            producer.register_table(name, model.read)
        producer.record_many({"a": np.arange(200), "b": np.arange(200)})
        assert producer.buffered_total == 400
        producer.record("c", np.arange(99))
        assert producer.buffered_total == 499  # one short: no table alone decides
        producer.record("c", np.arange(99, 100))
        assert producer.buffered_total == 0
        assert producer.writer.drain(10)
        cuts = read_cuts(producer.store)
    assert len(cuts) == 1 and len(producer.store.list()) == 1  # one object for three tables
    assert [(t.name, t.rows) for t in cuts[0].header.tables] == [("a", 200), ("b", 200), ("c", 100)]
    assert cuts[0].header.flush_reason == "size"


def test_interval_trigger_is_the_producers_and_flushes_every_table(tmp_path: Path) -> None:
    model = NumpyModel()
    clock = FakeClock()
    config = producer_config(str(tmp_path / "inc"), buffer_size=10_000, flush_interval_s=30.0)
    with producer_from_config(config, clock=clock) as producer:
        producer.register_table("a", model.read)
        producer.register_table("b", model.read)
        producer.record("a", np.arange(5))
        clock.advance(29.9)
        producer.poll()
        assert producer.buffered("a") == 5  # not yet: 29.9 s < 30 s
        producer.record("b", np.arange(3))  # b's signs are younger, but ride with a's
        clock.advance(0.1)
        producer.poll()
        assert producer.buffered("a") == 0 and producer.buffered("b") == 0
        assert producer.writer.drain(10)  # stored: a cut still queued would merge the next
        clock.advance(29.9)
        producer.record("b", np.arange(3, 4))
        clock.advance(29.9)
        producer.poll()
        assert producer.buffered("b") == 1  # the interval restarted with the first new sign
        clock.advance(0.1)
        producer.poll()
        assert producer.buffered("b") == 0
        assert producer.writer.drain(10)
        packets = read_packets(producer.store)
    assert [(p.header.sequence, p.header.table, p.header.flush_reason, p.header.rows)
            for p in packets] == [(0, "a", "interval", 5), (0, "b", "interval", 3),
                                  (1, "b", "interval", 1)]


def _stored_event(producer: IncrementalProducer) -> threading.Event:
    """An event the writer sets when it has stored a packet."""
    event = threading.Event()
    producer.writer.on_stored = lambda stored: event.set()
    return event


def test_interval_fires_on_the_writer_thread_while_the_training_thread_is_idle(
        tmp_path: Path) -> None:
    """Issue 22, defect 6: the interval was checked only on record/flush/poll, so rows recorded
    before a pause stayed unshipped. Now the writer thread flushes when the interval is due,
    with no call from the training thread (the injected clock moves; `wake` makes the writer
    look at it, as a real clock's deadline would)."""
    model = NumpyModel()
    clock = FakeClock()
    config = producer_config(str(tmp_path / "inc"), buffer_size=10_000, flush_interval_s=30.0)
    with producer_from_config(config, clock=clock) as producer:
        stored = _stored_event(producer)
        producer.register_table("a", model.read)
        producer.record("a", np.arange(5))
        clock.advance(29.9)
        producer.writer.wake()
        assert producer.buffered("a") == 5  # not due: 29.9 s < 30 s
        clock.advance(0.1)
        producer.writer.wake()
        assert stored.wait(10), "the writer did not flush the due interval"
        assert producer.buffered("a") == 0
        packets = read_packets(producer.store)
    assert [(p.header.table, p.header.flush_reason, p.header.rows) for p in packets] == [
        ("a", "interval", 5)]


def test_an_idle_producer_flushes_on_its_interval_in_real_time(tmp_path: Path) -> None:
    model = NumpyModel()
    config = producer_config(str(tmp_path / "inc"), buffer_size=10_000, flush_interval_s=0.2)
    with producer_from_config(config) as producer:
        stored = _stored_event(producer)
        producer.register_table("a", model.read)
        started = time.monotonic()
        producer.record("a", np.arange(7))
        assert stored.wait(10), "nothing was stored without a call from the training thread"
        assert time.monotonic() - started >= 0.2
        packets = read_packets(producer.store)
    assert [(p.header.flush_reason, p.header.rows) for p in packets] == [("interval", 7)]


def test_the_interval_waits_for_a_marked_step_to_end(tmp_path: Path) -> None:
    """No interval flush reads rows inside `training_step()`: the writer tries again after."""
    model = NumpyModel()
    clock = FakeClock()
    config = producer_config(str(tmp_path / "inc"), buffer_size=10_000, flush_interval_s=30.0)
    with producer_from_config(config, clock=clock) as producer:
        stored = _stored_event(producer)
        producer.register_table("a", model.read)
        producer.record("a", np.arange(3))
        with producer.training_step():
            clock.advance(31.0)
            producer.writer.wake()
            assert producer.buffered("a") == 3  # the step holds the lock the flush takes
        assert stored.wait(10), "the due interval was not flushed after the step"
        assert producer.buffered("a") == 0


def test_interval_restarts_after_a_flush_and_a_quiet_table_never_flushes(tmp_path: Path) -> None:
    model = NumpyModel()
    clock = FakeClock()
    config = producer_config(str(tmp_path / "inc"), buffer_size=10_000, flush_interval_s=10.0)
    with producer_from_config(config, clock=clock) as producer:
        producer.register_table("a", model.read)
        clock.advance(100.0)
        producer.poll()  # nothing buffered: no interval runs, however long it waits
        producer.record("a", np.arange(4))
        producer.flush()  # explicit: a's interval ends with its buffer
        clock.advance(6.0)
        producer.record("a", np.arange(4, 6))  # a new interval starts here
        clock.advance(6.0)
        producer.poll()
        assert producer.buffered("a") == 2  # 6 s since its oldest sign, 12 s since the flush
        clock.advance(4.0)
        producer.poll()
        assert producer.buffered("a") == 0
        assert producer.writer.drain(10)
        packets = read_packets(producer.store)
    assert [(p.header.flush_reason, p.header.rows) for p in packets] == [
        ("explicit", 4), ("interval", 2)]


def test_flush_and_close_store_everything_and_close_is_idempotent(tmp_path: Path) -> None:
    model = NumpyModel()
    config = producer_config(str(tmp_path / "inc"), buffer_size=10_000)
    producer = producer_from_config(config)
    producer.register_table("emb", model.read)
    producer.record("emb", model.step())
    assert producer.flush()  # waits until stored
    assert len(producer.store.list()) == 1
    touched = model.step()
    producer.record("emb", touched)
    producer.close()
    producer.close()
    with pytest.raises(ProducerClosedError):
        producer.record("emb", touched)
    store = open_store(str(tmp_path / "inc"))
    packets = read_packets(store)
    assert [p.header.flush_reason for p in packets] == ["explicit", "close"]
    assert [p.header.sequence for p in packets] == [0, 1]
    np.testing.assert_array_equal(np.sort(packets[1].signs), np.unique(touched).astype(np.uint64))


def test_every_packet_holds_the_rows_at_flush_time(tmp_path: Path) -> None:
    model = NumpyModel(rows=3000, dim=4)
    config = producer_config(str(tmp_path / "inc"), buffer_size=700)
    at_flush: list[np.ndarray] = []

    def reader(signs: np.ndarray) -> np.ndarray:
        at_flush.append(model.weight.copy())
        return model.read(signs)

    touched: set[int] = set()
    with producer_from_config(config) as producer:
        producer.register_table("emb", reader)
        for step in range(60):
            ids = model.step(200)
            touched.update(ids.tolist())
            producer.record("emb", ids)
            if step % 20 == 19:
                producer.flush()
            producer.writer.drain(10)  # one packet per flush: no merging to untangle
        store = producer.store
    packets = read_packets(open_store(str(tmp_path / "inc")))
    assert len(packets) == len(at_flush) - 1  # minus register_table's probe
    for packet, weights in zip(packets, at_flush[1:], strict=True):
        np.testing.assert_array_equal(packet.embeddings, weights[packet.signs.astype(np.int64)])
    state = replay(packets, 4)
    assert set(state) == touched
    for sign, row in state.items():
        np.testing.assert_array_equal(row, model.weight[sign])
    store.close()


def test_evict_ships_deletes_and_last_operation_wins(tmp_path: Path) -> None:
    model = NumpyModel()
    config = producer_config(str(tmp_path / "inc"))
    with producer_from_config(config) as producer:
        producer.register_table("emb", model.read)
        producer.record("emb", np.arange(10))
        producer.evict("emb", np.array([3, 4, 20]))
        producer.record("emb", np.array([4]))  # re-created after the eviction
        producer.flush()
        packets = read_packets(producer.store)
    packet = packets[0]
    assert packet.deleted.tolist() == [3, 20]
    assert packet.signs.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert packet.header.deleted_rows == 2


def test_restart_takes_a_new_generation_across_tables(tmp_path: Path) -> None:
    model = NumpyModel()
    config = producer_config(str(tmp_path / "inc"))
    for expected, table in ((1, "a"), (2, "b"), (3, "a")):
        with producer_from_config(config, producer_id="p") as producer:
            producer.register_table(table, model.read)
            assert producer.wait_generation(10) == expected
            producer.record(table, np.arange(3))
    with producer_from_config(config, producer_id="other") as producer:
        assert producer.wait_generation(10) == 1  # generations are per producer
    keys = [i.key for i in open_store(str(tmp_path / "inc")).list()]
    assert keys == ["ctr/~cuts/p/0000000001-000000000000.arrow",
                    "ctr/~cuts/p/0000000002-000000000000.arrow",
                    "ctr/~cuts/p/0000000003-000000000000.arrow"]


def test_datasets_over_incremental_dir_read_every_row_the_producer_wrote(tmp_path: Path) -> None:
    model = NumpyModel()
    config = producer_config(str(tmp_path / "inc"))
    for producer_id in ("p", "q"):
        with producer_from_config(config, producer_id=producer_id) as producer:
            producer.register_table("a", model.read)
            producer.register_table("b", model.read)
            producer.record("a", np.arange(50))
            producer.record("b", np.arange(20, 90))
            producer.flush()
            producer.record("a", np.arange(40, 70))
            producer.evict("b", np.array([1, 2, 3]))
    cuts = read_cuts(open_store(str(tmp_path / "inc")))
    written = sum(c.header.rows + c.header.deleted_rows for c in cuts)
    assert len(cuts) == 4 and written == 2 * (50 + 70 + 30 + 3)
    # the plain calls, over the whole incremental_dir: no folder of a cut is hidden from them
    assert ds.dataset(str(tmp_path / "inc"), format="ipc").count_rows() == written
    frame = pl.scan_ipc(str(tmp_path / "inc" / "**" / "*.arrow")).collect()
    assert frame.height == written and frame["op"].sum() == 2 * 3


@pytest.mark.parametrize("reads", ["returned", "pooled", "deferred"])
def test_local_outage_retries_merges_and_loses_nothing(tmp_path: Path, reads: str) -> None:
    """Puts fail with a transient error until the outage ends (OutageStore).
    With pooled row buffers, merging snapshots hands buffers back while later flushes reuse
    them: no packet may show another flush's rows. Deferred reads: merges read the rows
    still unread, the writer reads the others."""
    store = OutageStore(str(tmp_path / "inc"))
    model = NumpyModel(rows=2000, dim=4)
    config = producer_config(str(tmp_path / "inc"), buffer_size=300, max_pending_bytes=10**8)
    touched: set[int] = set()
    with producer_from_config(config, generation=1, store=store) as producer:
        if reads == "returned":
            producer.register_table("emb", model.read)
        else:
            producer.register_table("emb", model.read_into, dim=4, rows=2000, reads_into=True)
        producer.defer_reads(reads == "deferred")
        for _ in range(20):
            with producer.training_step():
                ids = model.step(100)
            touched.update(ids.tolist())
            producer.record("emb", ids)
        assert producer.writer.pending_rows > 0
        assert not producer.flush(timeout_s=0.3)  # still down
        assert store.attempts > 1  # retried, not given up
        store.down.clear()
        assert producer.flush(timeout_s=20)
    assert not store.stop.is_set()  # the producer does not own it: left as it was
    packets = read_packets(open_store(str(tmp_path / "inc")))
    assert [p.header.sequence for p in packets] == list(range(len(packets)))
    state = replay(packets, 4)
    assert set(state) == touched
    for sign, row in state.items():
        np.testing.assert_array_equal(row, model.weight[sign])


def test_backpressure_raise_keeps_the_signs(tmp_path: Path) -> None:
    store = OutageStore(str(tmp_path / "inc"))
    model = NumpyModel(rows=2000, dim=4)
    config = producer_config(str(tmp_path / "inc"), buffer_size=100, max_pending_bytes=2000,
                             backpressure="raise", close_timeout_s=0.5)
    producer = producer_from_config(config, generation=1, store=store)
    producer.register_table("emb", model.read)
    producer.record("emb", np.arange(100))  # flush 1: 100 rows x 24 bytes > 2000
    with pytest.raises(BackpressureError):
        producer.record("emb", np.arange(100, 200))
    assert producer.buffered("emb") == 100  # kept, not dropped
    with pytest.raises(UnstoredDataError) as info:
        producer.close()
    assert info.value.rows == 200 and info.value.tables == ["emb"]


def test_row_id_signbuffer_matches_python_set_with_last_op_winning() -> None:
    rng = np.random.default_rng(2)
    buffer = RowIdSignBuffer(5000)
    expected: dict[int, int] = {}
    for _ in range(30):
        signs = rng.integers(0, 5000, (700, 2))[:, 1]  # a strided int64 view, as from torch
        op = int(rng.integers(0, 2))
        assert buffer.insert(signs, op) == len(expected.keys() | set(signs.tolist()))
        expected.update(dict.fromkeys(signs.tolist(), op))
    assert buffer.contains(np.array([signs[0], 5000, 2**64 - 1], np.uint64)).tolist() == [
        True, False, False]
    signs, ops = buffer.swap()
    assert np.all(np.diff(signs.astype(np.int64)) > 0)  # ascending
    assert dict(zip(signs.tolist(), ops.tolist(), strict=True)) == expected
    assert len(buffer) == 0 and buffer.swap()[0].size == 0
    with pytest.raises(ValueError, match="outside"):
        buffer.insert(np.array([3, 5000, 4], np.uint64))
    assert len(buffer) == 1 and buffer.swap()[0].tolist() == [3]  # signs before the bad one stay


def _flush_and_check_first_packets(producer: IncrementalProducer, a_rows: np.ndarray,
                                   b_signs: int) -> None:
    """Table a's first packet holds signs 0..599 with `a_rows`; b's holds 0..b_signs-1."""
    assert producer.flush()
    by_table = {(p.header.table, p.header.sequence): p for p in read_packets(producer.store)}
    np.testing.assert_array_equal(by_table["a", 0].signs, np.arange(600, dtype=np.uint64))
    np.testing.assert_array_equal(by_table["a", 0].embeddings, a_rows)
    np.testing.assert_array_equal(by_table["b", 0].signs, np.arange(b_signs, dtype=np.uint64))


def test_record_many_with_row_id_tables_flushes_them_together(tmp_path: Path) -> None:
    model = NumpyModel()
    config = producer_config(str(tmp_path / "inc"), buffer_size=500)
    with producer_from_config(config) as producer:
        producer.register_table("a", model.read, rows=1000)
        producer.register_table("b", model.read)
        producer.record_many({"a": np.arange(400), "b": np.arange(10)})
        assert producer.buffered_total == 410
        producer.record_many({"a": np.arange(300, 600), "b": np.arange(5, 20)})  # 620 >= 500
        assert (producer.buffered("a"), producer.buffered("b")) == (0, 0)
        producer.record("b", np.arange(20))
        with pytest.raises(KeyError):
            producer.record_many({"b": np.arange(3), "nope": np.arange(3)})
        assert producer.buffered("b") == 20  # nothing inserted when a table is unknown
        producer.register_table("b", model.read, rows=1000)  # re-register: buffered signs kept
        assert producer.buffered("b") == 20
        _flush_and_check_first_packets(producer, model.weight[:600].copy(), b_signs=20)


def test_row_id_signbuffer_covers_every_bit_of_its_words() -> None:
    buffer = RowIdSignBuffer(1000)  # 15 full words and a partial one
    everything = np.arange(1000, dtype=np.uint64)
    assert buffer.insert(everything[::-1]) == 1000
    signs, ops = buffer.swap()
    assert np.array_equal(signs, everything) and not ops.any()
    buffer.insert(everything[::7])
    buffer.insert(everything[::14], SignBuffer.DELETE)
    buffer.insert(everything[::28])  # upserted again after the delete: upserts win
    signs, ops = buffer.swap()
    assert np.array_equal(signs, everything[::7])
    expected = np.isin(signs, everything[::14]) & ~np.isin(signs, everything[::28])
    assert np.array_equal(ops.astype(bool), expected)
    buffer.insert(everything[:5])  # a swap clears the deletes too
    assert buffer.swap()[1].tolist() == [0] * 5


def test_row_id_signbuffer_takes_sparse_words_empty_ones_between() -> None:
    """`_take` writes each word's lowest sign before knowing the word holds one: empty words
    (the last ones too), one-bit and many-bit words, with and without buffered deletes."""
    rng = np.random.default_rng(5)
    rows = 64 * 40 + 17
    for trial in range(20):
        buffer = RowIdSignBuffer(rows)
        picked = rng.choice(rows, int(rng.integers(1, 60)), replace=False)
        if trial % 4 == 0:
            picked = np.append(picked, [0, 63, 64, rows - 1])  # word edges, the last row
        if trial % 4 == 1:
            picked = np.arange(64 * 3, 64 * 3 + 64)  # one full word, every other word empty
        upserts = np.unique(picked).astype(np.uint64)
        buffer.insert(upserts)
        deleted = upserts[::3] if trial % 2 else upserts[:0]
        buffer.insert(deleted, SignBuffer.DELETE)
        signs, ops = buffer.swap()
        assert signs.tolist() == upserts.tolist()
        assert signs[ops.astype(bool)].tolist() == deleted.tolist()
        assert len(buffer) == 0 and buffer.swap()[0].size == 0


def test_reads_into_reader_ships_the_rows_at_flush_time(tmp_path: Path) -> None:
    model = NumpyModel(rows=5000, dim=8)
    config = producer_config(str(tmp_path / "inc"), buffer_size=400)
    expected = []
    with producer_from_config(config) as producer:
        producer.register_table("emb", model.read_into, dim=8, rows=5000, reads_into=True)
        for _ in range(12):
            ids = np.unique(model.step(450))
            producer.record("emb", ids)  # over 400: flushes every time
            expected.append((ids, model.weight[ids].copy()))
            assert producer.writer.drain(10)
        packets = read_packets(producer.store)
    assert len(packets) == 12
    for packet, (ids, rows) in zip(packets, expected, strict=True):
        assert np.array_equal(packet.signs, ids.astype(np.uint64))
        assert np.array_equal(packet.embeddings, rows)


def test_a_failing_reads_into_reader_keeps_the_signs(tmp_path: Path) -> None:
    model = NumpyModel(rows=1000, dim=4)
    calls = {"n": 0}

    def flaky(signs: np.ndarray, out: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("optimizer state unavailable")
        model.read_into(signs, out)
        return np.ones((signs.size, 3), np.float32) if calls["n"] == 3 else np.ones((1, 3), np.float32)

    config = producer_config(str(tmp_path / "inc"), buffer_size=10_000)
    with producer_from_config(config) as producer:
        producer.register_table("emb", flaky, dim=4, rows=1000, reads_into=True)
        producer.record("emb", np.arange(50))
        with pytest.raises(RuntimeError, match="unavailable"):
            producer.flush()
        assert producer.buffered("emb") == 50
        with pytest.raises(ValueError, match=r"table 'emb'.*state of shape \(1, 3\) for 50 signs"):
            producer.flush()  # a state of the wrong length is refused, the signs kept
        assert producer.buffered("emb") == 50
        assert producer.flush()
        packets = read_packets(producer.store)
    assert len(packets) == 1 and packets[0].state is not None and packets[0].state.shape == (50, 3)
    with producer_from_config(config) as producer, pytest.raises(ValueError, match="needs dim"):
        producer.register_table("x", flaky, reads_into=True)


def test_writer_thread_runs_at_the_configured_nice(tmp_path: Path) -> None:
    config = producer_config(str(tmp_path / "inc"), writer_nice=7)
    with producer_from_config(config) as producer:
        assert os.sched_getscheduler(producer.writer._thread.native_id) == os.SCHED_OTHER
        assert producer.wait_generation(10) is not None
        tid = producer.writer._thread.native_id
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        own = Path(f"/proc/self/task/{threading.get_native_id()}/stat").read_text()
        assert int(fields[16]) == min(19, int(own.rsplit(")", 1)[1].split()[16]) + 7)


def test_row_id_columns_mark_like_one_buffer_per_column() -> None:
    rng = np.random.default_rng(5)
    rows = [1000, 300, 5000]
    fused = [RowIdSignBuffer(r) for r in rows]
    alone = [RowIdSignBuffer(r) for r in rows]
    for buffer in fused:
        buffer.insert(np.array([1, 2]))  # bits set before the group takes the bitsets over
    for buffer in alone:
        buffer.insert(np.array([1, 2]))
    group = RowIdColumns(fused)
    columns = np.array([3, 0, 1])  # table t reads column columns[t]; column 2 is nobody's
    for _ in range(20):
        ids = np.stack([rng.integers(0, 300, 64), rng.integers(0, 300, 64),
                        rng.integers(0, 10**9, 64), rng.integers(0, 1000, 64)], axis=1)
        sizes = group.insert(ids, columns)
        assert sizes == [b.insert(ids[:, c]) for b, c in zip(alone, columns, strict=True)]
    for a, b in zip(fused, alone, strict=True):
        assert np.array_equal(a.swap()[0], b.swap()[0])
    assert group.current()
    bad = np.array([[5, 6, 0, 7], [8, 9, 0, 1000]])  # 1000 is outside the first table's rows
    with pytest.raises(ValueError, match="sign 1000 is outside"):
        group.insert(bad, columns)
    assert fused[0].swap()[0].tolist() == [7]  # the rows before the bad one stay, in every table
    assert fused[1].swap()[0].tolist() == [5]


def test_row_id_columns_keep_last_op_wins_after_an_evict() -> None:
    buffers = [RowIdSignBuffer(100), RowIdSignBuffer(100)]
    group = RowIdColumns(buffers)
    buffers[0].insert(np.array([4, 5]), SignBuffer.DELETE)
    group.insert(np.array([[4, 1], [6, 2]]), np.array([0, 1]))  # 4 upserted after its delete
    signs, ops = buffers[0].swap()
    assert dict(zip(signs.tolist(), ops.tolist(), strict=True)) == {4: 0, 5: 1, 6: 0}


def test_record_columns_marks_each_table_from_its_column_and_flushes_them_together(
        tmp_path: Path) -> None:
    model = NumpyModel()
    config = producer_config(str(tmp_path / "inc"), buffer_size=500)
    with producer_from_config(config) as producer:
        producer.register_table("a", model.read, rows=1000)
        producer.register_table("b", model.read, rows=1000)
        producer.register_table("h", model.read)  # a hash buffer: recorded column by column
        ids = np.stack([np.arange(600), np.arange(600) % 7, np.arange(600) % 3], axis=1)
        producer.record_columns(ids[:300], {"a": 0, "b": 1})
        assert (producer.buffered("a"), producer.buffered("b")) == (300, 7)
        producer.record_columns(ids[300:], {"a": 0, "b": 1})  # 600 + 7 >= 500: both flushed
        assert (producer.buffered("a"), producer.buffered("b")) == (0, 0)
        producer.record_columns(ids, {"b": 1, "h": 2})
        assert (producer.buffered("b"), producer.buffered("h")) == (7, 3)
        with pytest.raises(KeyError, match="nope"):
            producer.record_columns(ids, {"nope": 0})
        with pytest.raises(ValueError, match="id matrix"):
            producer.record_columns(ids[:, 0], {"a": 0})
        _flush_and_check_first_packets(producer, model.weight[:600].copy(), b_signs=7)


def test_deferred_reads_run_on_the_writer_thread_and_never_inside_a_step(tmp_path: Path) -> None:
    model = NumpyModel(rows=3000, dim=4)
    in_update = threading.Event()
    readers: set[int] = set()
    torn: list[int] = []

    def read_into(signs: np.ndarray, out: np.ndarray) -> None:
        readers.add(threading.get_ident())
        if in_update.is_set():
            torn.append(signs.size)
        model.read_into(signs, out)

    config = producer_config(str(tmp_path / "inc"), buffer_size=250)
    touched: set[int] = set()
    with producer_from_config(config) as producer:
        producer.register_table("emb", read_into, dim=4, rows=3000, reads_into=True)
        producer.defer_reads()
        for _ in range(40):
            with producer.training_step():
                in_update.set()
                ids = model.step(60)
                time.sleep(0.002)  # a slow update: a read racing it would see the flag
                in_update.clear()
            touched.update(ids.tolist())
            producer.record("emb", ids)
        assert producer.flush()
        packets = read_packets(producer.store)
    # the writer reads between steps; the training thread only when a merge folds in rows
    # still unread (between steps too): never inside an update
    assert producer.writer._thread.ident in readers and not torn
    state = replay(packets, 4)
    assert set(state) == touched
    for sign, row in state.items():
        np.testing.assert_array_equal(row, model.weight[sign])


def _deferring_producer(tmp_path: Path, reader: Callable[[np.ndarray, np.ndarray], None]
                        ) -> IncrementalProducer:
    """A producer of one 1000-row, 4-wide table read by `reader` into place, on the writer
    thread (deferred reads), flushing at 40 buffered signs."""
    producer = producer_from_config(producer_config(str(tmp_path / "inc"), buffer_size=40))
    producer.register_table("emb", reader, dim=4, rows=1000, reads_into=True)
    producer.defer_reads()
    return producer


def test_a_failing_deferred_read_keeps_the_signs_and_raises_on_the_next_call(tmp_path: Path) -> None:
    model = NumpyModel(rows=1000, dim=4)
    calls = {"n": 0}

    def flaky(signs: np.ndarray, out: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("weights moved to another device")
        model.read_into(signs, out)

    with _deferring_producer(tmp_path, flaky) as producer:
        producer.record("emb", np.arange(50))  # full: flushed, read later by the writer
        assert producer.writer.drain(10)
        assert producer.buffered("emb") == 50  # the failed read handed its signs back
        with pytest.raises(RuntimeError, match="another device"):
            producer.record("emb", np.arange(50, 60))  # recorded, then the error is raised
        assert producer.buffered("emb") == 0  # 60 >= 40: flushed again, this time read
        assert producer.flush()
        packets = read_packets(producer.store)
    assert sorted(int(s) for p in packets for s in p.signs) == list(range(60))
    assert not list((tmp_path / "inc").rglob("*.tmp"))


def test_a_failed_deferred_read_hands_its_signs_back_only_under_the_producers_lock(
        tmp_path: Path) -> None:
    """The writer thread gives a failed read's signs back without touching the buffers while
    the training thread is inside the producer (it may be replacing a buffer): they wait
    until the lock is free, then are buffered again with the next call, and stored."""
    model = NumpyModel(rows=1000, dim=4)
    failed = threading.Event()

    def flaky(signs: np.ndarray, out: np.ndarray) -> None:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("weights moved to another device")
        model.read_into(signs, out)

    with _deferring_producer(tmp_path, flaky) as producer:
        with producer._lock:  # as a training-thread call holds it
            producer.record("emb", np.arange(50))  # full: flushed, read later by the writer
            wait_until(lambda: producer._read_error is not None, "the read to fail", timeout_s=10)
            assert producer.buffered("emb") == 0  # not put back behind the holder's back
        with pytest.raises(RuntimeError, match="another device"):
            producer.record("emb", np.arange(50, 55))  # takes the 50 back (55 >= 40: flushed)
        assert producer.buffered("emb") == 0 and not producer._returned
        assert producer.flush()
        packets = read_packets(producer.store)
    assert sorted(int(s) for p in packets for s in p.signs) == list(range(55))


def test_a_flush_inside_a_step_with_deferred_reads_is_refused_not_deadlocked(tmp_path: Path) -> None:
    model = NumpyModel(rows=100, dim=4)
    with producer_from_config(producer_config(str(tmp_path / "inc"), buffer_size=5)) as producer:
        producer.register_table("emb", model.read_into, dim=4, rows=100, reads_into=True)
        producer.defer_reads()
        with producer.training_step(), pytest.raises(RuntimeError, match="after the optimizer step"):
            producer.record("emb", np.arange(10))
        assert producer.buffered("emb") == 10  # kept for the next flush
        producer.record("emb", np.arange(3))
        assert producer.flush()
        assert [int(s) for p in read_packets(producer.store) for s in p.signs] == list(range(10))
