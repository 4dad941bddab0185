"""Writes in flight: several packets stored at once, announced in sequence order, none lost
when some puts fail, and a refusal stops the writer with the rows kept."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from test_producer_support import NumpyModel, producer_config, read_cuts, read_packets, replay

from persia_inc.foundation.wait import wait_until
from persia_inc.packet_format import Announcement, parse_packet_path
from persia_inc.producer.announce import DirectoryAnnouncer
from persia_inc.producer.errors import UnstoredDataError, WriterFailedError
from persia_inc.producer.snapshot import Snapshot
from persia_inc.producer.writer import PacketWriter
from persia_inc.storage import StorageError, TransientStorageError
from persia_inc.storage.local import LocalStore
from persia_inc.wiring import producer_from_config


class GatedStore(LocalStore):
    """Local disk whose puts wait for their sequence's gate (so a test decides the order
    stores complete in), fail transiently on chosen attempts, or are refused for good."""

    def __init__(self, root_uri: str) -> None:
        super().__init__(root_uri)
        self.gates: dict[int, threading.Event] = {}
        self.fail_attempts: dict[int, int] = {}  # sequence -> transient failures left
        self.refuse: set[int] = set()
        self.inside = 0
        self.most_inside = 0
        self.lock = threading.Lock()

    @contextmanager
    def writer(self, key: str, size_hint: int = 0) -> Iterator[BinaryIO]:
        sequence = parse_packet_path(key).sequence
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            gate = self.gates.get(sequence)
            if gate is not None:
                assert gate.wait(20), f"sequence {sequence}'s gate never opened"
            with self.lock:
                left = self.fail_attempts.get(sequence, 0)
                if left:
                    self.fail_attempts[sequence] = left - 1
            if left:
                raise TransientStorageError(self.location(key), "put failed (test)")
            if sequence in self.refuse:
                raise StorageError(self.location(key), "access denied (test)", retriable=False)
            with super().writer(key, size_hint) as sink:
                yield sink
        finally:
            with self.lock:
                self.inside -= 1


def _snapshot(start: int, n: int = 50, dim: int = 4) -> Snapshot:
    signs = np.arange(start, start + n, dtype=np.uint64)
    rows = np.repeat(signs.astype(np.float32)[:, None], dim, axis=1)
    return Snapshot("emb", signs, rows, np.empty(0, np.uint64), dim, "explicit")


def _writer(store: GatedStore, announced: list[Announcement], inflight: int) -> PacketWriter:
    return PacketWriter(store, "ctr", "p", DirectoryAnnouncer(on_announced=announced.append),
                        generation=1, max_inflight=inflight, max_backoff_s=0.05)


def test_stores_overlap_and_announcements_follow_sequence_order(tmp_path: Path) -> None:
    store = GatedStore(str(tmp_path))
    store.gates = {0: threading.Event(), 1: threading.Event()}
    announced: list[Announcement] = []
    writer = _writer(store, announced, inflight=4)
    try:
        for k in range(4):  # each submit after the writer took the previous: four packets
            writer.submit(_snapshot(100 * k))
            wait_until(lambda: not writer._queue, "the writer takes the cut", timeout_s=15)
        # 2 and 3 are stored while 0 and 1 hang: nobody hears of them before 0 and 1
        wait_until(lambda: len(store.list()) == 2, "packets 2 and 3 stored", timeout_s=15)
        assert store.most_inside >= 3 and announced == []
        store.gates[1].set()
        wait_until(lambda: len(store.list()) == 3, "packet 1 stored", timeout_s=15)
        assert announced == []  # 0 still hangs
        store.gates[0].set()
        assert writer.drain(10)
    finally:
        writer.close(5)
    assert [a.sequence for a in announced] == [0, 1, 2, 3]
    assert [c.header.sequence for c in read_cuts(store)] == [0, 1, 2, 3]


def test_failed_puts_are_retried_in_flight_and_nothing_is_lost(tmp_path: Path) -> None:
    store = GatedStore(str(tmp_path / "inc"))
    store.fail_attempts = {s: 2 for s in range(0, 40, 3)}  # every third packet fails twice
    model = NumpyModel(rows=2000, dim=4)
    config = producer_config(str(tmp_path / "inc"), buffer_size=150, max_inflight=4)
    touched: set[int] = set()
    with producer_from_config(config, generation=1, store=store) as producer:
        producer.register_table("emb", model.read)
        producer.register_table("other", model.read)
        for _ in range(30):
            ids = model.step(100)
            touched.update(ids.tolist())
            producer.record_many({"emb": ids, "other": ids[:10]})
        assert producer.flush(timeout_s=20)
        stored = [s.header.sequence for s in producer.writer.stored]
    assert stored == list(range(len(stored)))  # handed to the announcer in order
    assert store.most_inside > 1
    assert not any(store.fail_attempts.get(s, 0) for s in stored)  # the failures happened
    packets = read_packets(store)
    state = replay([p for p in packets if p.header.table == "emb"], 4)
    assert set(state) == touched
    for sign, row in state.items():
        np.testing.assert_array_equal(row, model.weight[sign])


def test_a_refused_put_stops_the_writer_and_close_names_the_rows(tmp_path: Path) -> None:
    store = GatedStore(str(tmp_path / "inc"))
    store.refuse = {1}
    config = producer_config(str(tmp_path / "inc"), buffer_size=10_000, max_inflight=3,
                             close_timeout_s=2.0)
    producer = producer_from_config(config, generation=1, store=store)
    model = NumpyModel()
    producer.register_table("emb", model.read)
    producer.record("emb", np.arange(10))
    assert producer.flush(timeout_s=10)
    producer.record("emb", np.arange(10, 30))
    assert not producer.flush(timeout_s=10)  # refused: the writer stopped
    with pytest.raises(WriterFailedError, match="access denied"):
        producer.record("emb", np.arange(3))
    with pytest.raises(UnstoredDataError) as info:
        producer.close()
    assert info.value.rows >= 20 and info.value.tables == ["emb"]
    assert [c.header.sequence for c in read_cuts(store)] == [0]


def test_max_inflight_is_checked(tmp_path: Path) -> None:
    store = GatedStore(str(tmp_path))
    with pytest.raises(ValueError, match="max_inflight"):
        PacketWriter(store, "ctr", "p", DirectoryAnnouncer(), generation=1, max_inflight=0)
    config = producer_config(str(tmp_path / "inc"), max_inflight=0)
    with producer_from_config(config, store=store) as producer:  # 0: the backend's default
        assert producer.writer.max_inflight == LocalStore.parallel_writes
