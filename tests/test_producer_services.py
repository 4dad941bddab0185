"""The producer against real services: a Ceph gateway outage, a Kafka broker outage, and
kill -9 of a training process."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from test_producer_support import NumpyModel, producer_config, read_packets, replay

from persia_inc.foundation.kafka import import_kafka
from persia_inc.foundation.wait import WaitTimeoutError, wait_until
from persia_inc.local_services import CephCluster, TansuBroker
from persia_inc.packet_format import Announcement, parse_packet_path
from persia_inc.storage import open_store
from persia_inc.wiring import producer_from_config

REPO = Path(__file__).resolve().parent.parent


def _assert_lossless(packets: list, model: NumpyModel, touched: set[int]) -> None:
    by_stream: dict[tuple[str, int], list[int]] = {}
    for packet in packets:
        by_stream.setdefault((packet.header.table, packet.header.generation), []).append(
            packet.header.sequence)
    for sequences in by_stream.values():
        assert sequences == list(range(len(sequences)))  # contiguous: no gap, no loss
    state = replay(packets, model.weight.shape[1])
    assert set(state) == touched
    for sign, row in state.items():
        np.testing.assert_array_equal(row, model.weight[sign])


def test_ceph_outage_in_the_middle_of_training_loses_nothing(ceph: CephCluster) -> None:
    uri = ceph.new_bucket()
    config = producer_config(uri, storage="ceph", buffer_size=400,
                             s3=dataclasses.asdict(ceph.s3_settings(connect_timeout_s=0.5)))
    model = NumpyModel(rows=5000, dim=8)
    touched: set[int] = set()

    def train(steps: int) -> None:
        for _ in range(steps):
            ids = model.step(150)
            touched.update(ids.tolist())
            producer.record("emb", ids)

    with producer_from_config(config, producer_id="p") as producer:
        producer.register_table("emb", model.read)
        train(10)
        assert producer.flush(timeout_s=30)
        stored_before = len(producer.store.list())
        ceph.stop_gateway()
        try:
            train(30)  # flushes start; puts fail and are retried; rows merge while queued
            wait_until(lambda: producer.writer.pending_rows > 0
                       and producer.metrics.of(producer.metrics.retries, what="store")._value.get() > 0,
                       "rows pending and the store retried", timeout_s=30)
        finally:
            ceph.start_gateway()
        train(5)
        assert producer.flush(timeout_s=60)
        packets = read_packets(producer.store)
    assert len(packets) > stored_before
    _assert_lossless(packets, model, touched)


def _announcements(bootstrap: str, topic: str, want: int, timeout_s: float = 30) -> list[Announcement]:
    consumer = import_kafka().KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None,
                             session_timeout_ms=2000, heartbeat_interval_ms=500)
    found: list[Announcement] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(found) < want and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    announcement = Announcement.from_json(record.value)
                    assert record.key == announcement.producer.encode()
                    found.append(announcement)
    finally:
        consumer.close()
    return found


def test_kafka_broker_outage_loses_nothing(tmp_path: Path,
                                           kafka_factory: Callable[..., TansuBroker]) -> None:
    # Memory storage: the restarted broker has lost the topic and what was announced before,
    # so the test reads those first; the announcer re-creates the topic on reconnect.
    # (Tansu's s3 engine never answers InitProducerId, which idempotence needs.)
    broker = kafka_factory()
    kafka = {"bootstrap_servers": [broker.bootstrap], "topic": "inc-{model}", "num_partitions": 2,
             "request_timeout_ms": 2000, "delivery_timeout_ms": 3000,
             "session_timeout_ms": 2000, "heartbeat_interval_ms": 500}
    config = producer_config(str(tmp_path / "inc"), buffer_size=300, announce="kafka", kafka=kafka)
    model = NumpyModel(rows=5000, dim=4)
    touched: set[int] = set()

    def train(steps: int) -> None:
        for _ in range(steps):
            ids = model.step(120)
            touched.update(ids.tolist())
            producer.record("emb", ids)

    with producer_from_config(config, producer_id="k") as producer:
        producer.register_table("emb", model.read)
        train(5)
        producer.flush()
        wait_until(lambda: producer.announcer.pending == 0, "every announcement sent", timeout_s=30)
        before = _announcements(broker.bootstrap, "inc-ctr", len(producer.store.list()))
        broker.stop()
        try:
            train(15)  # packets keep being stored; announcements wait
            assert producer.flush(timeout_s=20)
            assert producer.announcer.pending > 0
        finally:
            broker.start()
        train(3)
    # close() above waited for the announcer
    assert producer.announcer.pending == 0
    store = open_store(str(tmp_path / "inc"))
    packets = read_packets(store)
    _assert_lossless(packets, model, touched)
    announced = before + _announcements(broker.bootstrap, "inc-ctr", len(packets) - len(before))
    stored_uris = {store.uri(info.key) for info in store.list()}
    assert {a.uri for a in announced} == stored_uris  # at least once each, nothing unknown
    for a in announced:
        assert parse_packet_path(a.uri).position == (a.generation, a.sequence)



KILL_SCRIPT = """
import sys, time
import numpy as np
import pytest
sys.path.insert(0, {tests!r})
from test_producer_support import NumpyModel, producer_config
from persia_inc.wiring import producer_from_config
config = producer_config({uri!r}, buffer_size=20000)
model = NumpyModel(rows=200_000, dim=64)
producer = producer_from_config(config, producer_id="killed")
producer.register_table("emb", model.read)
print(producer.wait_generation(30), flush=True)
while True:
    producer.record("emb", model.step(5000))
"""


def test_kill_9_mid_flush_leaves_no_partial_packet_and_restart_takes_new_generation(
        tmp_path: Path) -> None:
    uri = str(tmp_path / "inc")
    script = KILL_SCRIPT.format(tests=str(REPO / "tests"), uri=uri)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"1"
        folder = tmp_path / "inc" / "ctr" / "~cuts" / "killed"
        def writing() -> bool:  # kill while a temporary file is being written
            names = os.listdir(folder) if folder.exists() else []
            return len([n for n in names if n.endswith(".arrow")]) >= 3 and any(
                n.endswith(".tmp") for n in names)

        with contextlib.suppress(WaitTimeoutError):  # else killed between writes: still checked
            wait_until(writing, "a temporary file after three packets", timeout_s=60, interval_s=0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    store = open_store(uri)
    packets = read_packets(store)  # decodes and verifies every listed packet
    assert len(packets) >= 3
    assert all(p.header.generation == 1 for p in packets)
    assert all(info.key.endswith(".arrow") for info in store.list())
    config = producer_config(uri)
    with producer_from_config(config, producer_id="killed") as producer:
        assert producer.wait_generation(10) == 2


def test_metrics_are_served_when_asked(tmp_path: Path) -> None:
    import urllib.request

    config = producer_config(str(tmp_path / "inc"))
    model = NumpyModel()
    with producer_from_config(config, metrics_port=0) as quiet:
        assert quiet.metrics_port == 0
    from persia_inc.local_services import free_port

    with producer_from_config(config, metrics_port=free_port()) as producer:
        producer.register_table("emb", model.read)
        producer.record("emb", np.arange(10))
        producer.flush()
        with urllib.request.urlopen(f"http://127.0.0.1:{producer.metrics_port}/metrics") as reply:
            body = reply.read()
    text = body.decode()
    assert 'persia_inc_producer_packets_total{model="ctr",producer="producer-0",reason="explicit"' \
        in text.replace(',table="emb"', "")
    assert "persia_inc_producer_dump_seconds_count" in text
    json.dumps(text[:10])
