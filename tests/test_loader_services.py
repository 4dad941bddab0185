"""The loader against real processes: embedding-server shards on loopback, local disk with
watchdog, Ceph (S3) and the WebHDFS emulator by listing, Kafka (Tansu) with a consumer group,
kill -9 of the loader, a restarted embedding server, and replay / status from the CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from persia_inc.config import load_config
from persia_inc.foundation.wait import WaitTimeoutError, wait_until
from persia_inc.loader.daemon import Loader
from persia_inc.loader.reports import HealthReport
from persia_inc.local_services import EMBEDDING_TOKEN, EMBEDDING_TOKEN_ENV
from persia_inc.packet_format import Announcement, PacketHeader, encode_packet, packet_key, read_packet_header
from persia_inc.storage import ObjectStore
from persia_inc.wiring import loader_from_config

from conftest import FAST_RETRY

DIM = 4
FAST = {"rescan_interval_s": 0.2, "list_interval_s": 0.1, "gap_timeout_s": 1.0,
        "watermark_poll_s": 0.2, "retry_backoff_s": 0.1, "quarantine_prefix": "_quarantine"}
KAFKA_FAST = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500, "num_partitions": 2}


class Training:
    """Writes packets the way a producer does and remembers what the servers must end with."""

    def __init__(self, store: ObjectStore, table: str = "t", producer: str = "p", seed: int = 0,
                 universe: int = 200) -> None:
        self.store, self.table, self.producer = store, table, producer
        self.rng = np.random.default_rng(seed)
        self.signs = np.arange(1, universe + 1, dtype=np.uint64) + (seed << 20)
        self.expected: dict[int, np.ndarray] = {}

    def packet(self, generation: int, sequence: int, n: int = 20
               ) -> tuple[str, bytes, np.ndarray, np.ndarray]:
        signs = self.rng.choice(self.signs, size=n, replace=False)
        rows = self.rng.standard_normal((n, DIM)).astype(np.float32)
        header = PacketHeader(model="m", table=self.table, producer=self.producer,
                              generation=generation, sequence=sequence)
        key = packet_key("m", self.table, self.producer, generation, sequence)
        return key, encode_packet(header, signs, rows), signs, rows

    def write(self, generation: int, sequence: int, *, remember: bool = True, n: int = 20) -> str:
        key, data, signs, rows = self.packet(generation, sequence, n)
        self.store.put(key, data)
        if remember:
            self.remember(signs, rows)
        return key

    def remember(self, signs: np.ndarray, rows: np.ndarray) -> None:
        for sign, row in zip(signs.tolist(), rows, strict=True):
            self.expected[sign] = row

    def check(self, client, timeout_s: float = 15.0) -> None:
        """Wait until the servers hold exactly the expected rows."""
        signs = np.array(sorted(self.expected), dtype=np.uint64)
        want = np.stack([self.expected[s] for s in signs.tolist()])
        got: list[np.ndarray] = []

        def held() -> bool:
            got[:] = [client.lookup(self.table, signs)]
            return np.array_equal(got[0], want)

        try:
            wait_until(held, "the servers to hold the expected rows", timeout_s=timeout_s,
                       ignore=(Exception,))
        except WaitTimeoutError:
            mismatched = int((got[0] != want).any(axis=1).sum()) if got else None
            raise AssertionError(f"servers differ from training in {mismatched} rows") from None


def metric(loader: Loader, name: str) -> float:
    return sum(s.value for m in loader.metrics.registry.collect() for s in m.samples
               if s.name == name)


def test_directory_source_orders_and_handles_bad_packets(embedding_cluster_factory, tmp_path: Path) -> None:
    inc = tmp_path / "inc"
    cluster = embedding_cluster_factory(2, incremental_dir=str(inc),
                                        persia_inc={"loader": {**FAST, "metrics_port": 0}})
    config = load_config(cluster.config_path)
    with cluster.client() as client, config.open_store() as store:
        training = Training(store)
        training.write(1, 0)  # stored before the loader starts: found by the first listing
        with loader_from_config(config, client) as loader:
            training.check(client)
            # out of order: 3 then 2 then 1 -> applied 1, 2, 3
            made = [training.packet(1, seq) for seq in (1, 2, 3)]
            for _, _, signs, rows in made:
                training.remember(signs, rows)  # the apply order
            for key, data, _, _ in reversed(made):
                store.put(key, data)
            training.check(client)
            # a duplicate (same packet again, rewritten atomically) changes nothing
            key = packet_key("m", "t", "p", 1, 3)
            store.put(key, store.get(key))
            # corrupt: quarantined, never applied; then a gap that is passed after 1 s
            corrupt_key, data, _, _ = training.packet(1, 4)
            store.put(corrupt_key, data[:-20])
            training.write(1, 5)
            wait_until(lambda: metric(loader, "persia_inc_loader_gaps_total") == 1,
                       "gap passed", timeout_s=15)
            training.check(client)
            assert metric(loader, "persia_inc_loader_quarantined_total") == 1
            assert store.exists("_quarantine/" + corrupt_key) and not store.exists(corrupt_key)
            # a missing packet: (1, 7) arrives, (1, 6) never does -> gap passed, then (1, 6)
            # arriving late must not be applied over newer rows
            training.write(1, 7)
            wait_until(lambda: metric(loader, "persia_inc_loader_gaps_total") == 2,
                       "second gap", timeout_s=15)
            training.check(client)
            late_signs_before = client.lookup("t", training.signs).copy()
            training.write(1, 6, remember=False)
            # the loader tells when it has seen and refused it: wait for that, not for a while
            wait_until(lambda: metric(loader, "persia_inc_loader_skipped_below_watermark_total") == 1,
                       "the late packet seen and skipped", timeout_s=15)
            np.testing.assert_array_equal(client.lookup("t", training.signs), late_signs_before)
            assert loader.streams().streams[0].skipped_below_watermark == 1
            # a new generation (producer restart) starts at sequence 0
            for seq in range(3):
                training.write(2, seq)
            # junk files are ignored
            (inc / "m" / "t" / "p" / "README.txt").write_text("hi")
            (inc / "m" / "t" / "p" / "9-9.arrow").write_bytes(b"x")
            training.check(client)
            health = loader.health()
            assert health.healthy, health
            assert metric(loader, "persia_inc_loader_packets_applied_total") >= 9
            assert metric(loader, "persia_inc_loader_freshness_seconds_count") >= 9


@pytest.mark.parametrize("backend", ["ceph", "hdfs"])
def test_listing_source_on_s3_and_hdfs(backend: str, embedding_cluster_factory, request) -> None:
    if backend == "ceph":
        ceph = request.getfixturevalue("ceph")
        uri = ceph.new_bucket()
        s3 = ceph.s3_settings()
        options = {"storage": "ceph", "persia_inc": {"loader": FAST, "s3": {
            "endpoint_url": s3.endpoint_url, "region": s3.region,
            "access_key_id": s3.access_key_id, "secret_access_key": s3.secret_access_key}}}
    else:
        webhdfs = request.getfixturevalue("webhdfs")
        uri = f"{webhdfs.uri}/persia/inc"
        options = {"storage": "hdfs", "persia_inc": {"loader": FAST}}
    cluster = embedding_cluster_factory(2, incremental_dir=uri, **options)
    config = load_config(cluster.config_path)
    with cluster.client() as client, config.open_store() as store:
        store.retry = FAST_RETRY
        one, two = Training(store, producer="a", seed=1), Training(store, producer="b", seed=2)
        one.write(1, 0)
        with loader_from_config(config, client) as loader:
            assert loader.source_kind == "list"
            for seq in range(1, 4):
                one.write(1, seq)
                two.write(1, seq - 1)
            one.check(client)
            two.check(client)


def test_kafka_group_of_two_loaders_with_ceph(embedding_cluster_factory, ceph, kafka) -> None:
    from persia_inc.foundation.kafka import import_kafka

    kafka_mod = import_kafka()
    uri = ceph.new_bucket()
    s3 = ceph.s3_settings()
    topic = f"persia-inc-{uri.split('/')[2]}"
    cluster = embedding_cluster_factory(2, incremental_dir=uri, storage="ceph", persia_inc={
        "loader": {**FAST, "list_interval_s": 30.0, "rescan_interval_s": 30.0},
        "producer": {"announce": "kafka"},
        "kafka": {**KAFKA_FAST, "bootstrap_servers": [kafka.bootstrap], "topic": topic},
        "s3": {"endpoint_url": s3.endpoint_url, "region": s3.region,
               "access_key_id": s3.access_key_id, "secret_access_key": s3.secret_access_key}})
    config = load_config(cluster.config_path)
    admin = kafka_mod.admin.KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    admin.create_topics([kafka_mod.admin.NewTopic(topic, 2, 1)])
    admin.close()
    producer = kafka_mod.KafkaProducer(bootstrap_servers=kafka.bootstrap)
    with cluster.client() as client, config.open_store() as store:
        streams = [Training(store, producer=f"p{i}", seed=i) for i in range(4)]
        loaders = [loader_from_config(config, client).start() for _ in range(2)]
        sent = []
        try:
            wait_until(lambda: all(lo.sources[1].assigned for lo in loaders), "both assigned", timeout_s=30)
            wait_until(lambda: all(lo.health().ready for lo in loaders), "both ready", timeout_s=15)
            for seq in range(5):
                for training in streams:
                    key = training.write(1, seq)
                    header = PacketHeader(model="m", table="t", producer=training.producer,
                                          generation=1, sequence=seq, checksum="x")
                    announcement = Announcement.for_packet(store.root_uri, header, 1)
                    assert store.key_of(announcement.uri) == key
                    sent.append(producer.send(topic, key=announcement.key, value=announcement.to_json()))
            # hostile and malformed messages never stop the loaders
            sent.append(producer.send(topic, key=b"p0", value=b"{not json"))
            bad = Announcement.for_packet("s3://elsewhere/root", header, 1)
            sent.append(producer.send(topic, key=b"p0", value=bad.to_json()))
            producer.flush()
            for training in streams:
                training.check(client, timeout_s=30)
            assert sum(lo.applied for lo in loaders) >= 20
            wait_until(lambda: sum(metric(lo, "persia_inc_loader_rejected_total") for lo in loaders) >= 2,
                       "rejections counted", timeout_s=15)
        finally:
            for lo in loaders:
                lo.close()
            producer.close()
        # offsets were committed after apply: up to the last message sent, on every partition
        ends: dict = {}
        for future in sent:
            meta = future.get(10)
            part = kafka_mod.TopicPartition(topic, meta.partition)
            ends[part] = max(ends.get(part, 0), meta.offset + 1)
        consumer = kafka_mod.KafkaConsumer(bootstrap_servers=kafka.bootstrap,
                                           group_id=config.persia_inc.kafka.group_id)
        committed = {p: consumer.committed(p) for p in ends}
        consumer.close()
        assert committed == ends


def test_a_revoked_partition_moves_with_its_offsets(kafka, tmp_path: Path) -> None:
    """A loader that loses its partition to a new group member commits what it settled on the
    revoke (kafka-python calls the listener on its IO loop, where a blocking commit raises), so
    the next owner does not read it all again. The periodic commit is off (an hour): only the
    revoke can commit."""
    import queue

    from persia_inc.foundation.kafka import KafkaSettings, import_kafka
    from persia_inc.loader.sources import KafkaSource
    from persia_inc.storage import open_store

    kafka_mod = import_kafka()
    topic, group = f"persia-inc-revoke-{tmp_path.name[-12:]}", f"revoke-{tmp_path.name[-12:]}"
    admin = kafka_mod.admin.KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    admin.create_topics([kafka_mod.admin.NewTopic(topic, 1, 1)])
    admin.close()
    producer = kafka_mod.KafkaProducer(bootstrap_servers=kafka.bootstrap)
    for _ in range(5):  # rejected announcements settle as soon as they are read
        producer.send(topic, value=b"{not json")
    producer.flush()
    producer.close()
    part = kafka_mod.TopicPartition(topic, 0)
    settings = KafkaSettings(bootstrap_servers=(kafka.bootstrap,), group_id=group,
                             session_timeout_ms=6000, heartbeat_interval_ms=500)
    store = open_store(str(tmp_path / "inc"))
    source = KafkaSource(settings, topic, "m", queue.Queue(), store.key_of, commit_interval_s=3600.0).start()
    joiner = checker = None
    try:
        wait_until(lambda: source.committable().get(part) == 5, "the five messages read", timeout_s=30)
        joiner = kafka_mod.KafkaConsumer(topic, bootstrap_servers=kafka.bootstrap, group_id=group,
                                         enable_auto_commit=False, session_timeout_ms=6000,
                                         heartbeat_interval_ms=500)
        checker = kafka_mod.KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group)

        def moved_with_offsets() -> bool:
            joiner.poll(timeout_ms=100)
            return checker.committed(part) == 5

        wait_until(moved_with_offsets, "the revoke's commit of offset 5", timeout_s=30)
    finally:
        for consumer in (joiner, checker):
            if consumer is not None:
                consumer.close(autocommit=False)
        source.close()


def test_a_spare_loader_of_a_kafka_group_is_healthy_but_not_ready(
        embedding_cluster_factory, kafka, tmp_path: Path) -> None:
    """One partition, two loaders in the group: the one without a partition sees nothing;
    its health says so (ready false, what it waits for) while the other is ready."""
    from persia_inc.foundation.kafka import import_kafka

    kafka_mod = import_kafka()
    topic = f"persia-inc-spare-{tmp_path.name[-12:]}"
    cluster = embedding_cluster_factory(1, incremental_dir=str(tmp_path / "inc"), persia_inc={
        "loader": {**FAST, "source": "kafka"},
        "kafka": {**KAFKA_FAST, "bootstrap_servers": [kafka.bootstrap], "topic": topic}})
    admin = kafka_mod.admin.KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    admin.create_topics([kafka_mod.admin.NewTopic(topic, 1, 1)])
    admin.close()
    config = load_config(cluster.config_path)
    with cluster.client() as client:
        loaders = [loader_from_config(config, client).start() for _ in range(2)]
        try:
            last: list[HealthReport] = []

            def split() -> list[HealthReport] | None:
                last[:] = [lo.health() for lo in loaders]
                return last if sorted(h.ready for h in last) == [False, True] else None

            try:  # a loaded machine can take a few group rebalances to settle
                healths = wait_until(split, "one loader with the partition", timeout_s=60)
            except WaitTimeoutError as exc:
                raise AssertionError(f"{exc}; the loaders' last health: {last}") from None
            spare = next(h for h in healths if not h.ready)
            assert spare.healthy and spare.waiting == ("kafka: no partition assigned",)
            assert next(h for h in healths if h.ready).waiting == ()
        finally:
            for lo in loaders:
                lo.close()


def _loader_process(config_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "persia_inc.cli", "loader", "--config",
                                 str(config_path)], stdout=out, stderr=subprocess.STDOUT, env=env)


def test_kill_9_mid_stream_then_restart_ends_equal_and_in_order(embedding_cluster_factory,
                                                                tmp_path: Path) -> None:
    from persia_inc.local_services import free_port

    port = free_port()
    cluster = embedding_cluster_factory(2, incremental_dir=str(tmp_path / "inc"),
                                        persia_inc={"loader": {**FAST, "metrics_port": port}})
    config = load_config(cluster.config_path)
    log = tmp_path / "loader.log"
    with cluster.client() as client, config.open_store() as store:
        training = Training(store, universe=400)
        proc = _loader_process(cluster.config_path, log)
        try:
            for seq in range(30):
                training.write(1, seq, n=50)
                if seq == 15:  # kill it mid-stream: once it has applied some, not all
                    wait_until(lambda: any(w.sequence >= 5 for w in client.watermarks()),
                               "the first loader applying", timeout_s=30)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
            proc = _loader_process(cluster.config_path, log)
            for seq in range(30, 40):
                training.write(1, seq, n=50)
            training.check(client, timeout_s=30)
            marks = client.watermarks()
            assert [(w.table, w.producer, w.generation, w.sequence) for w in marks] == [("t", "p", 1, 39)]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
                assert json.load(reply)["healthy"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                assert b"persia_inc_loader_freshness_seconds_bucket" in reply.read()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def test_restarted_embedding_server_is_rebuilt(embedding_cluster_factory, tmp_path: Path) -> None:
    cluster = embedding_cluster_factory(2, incremental_dir=str(tmp_path / "inc"),
                                        persia_inc={"loader": FAST})
    config = load_config(cluster.config_path)
    with cluster.client() as client, config.open_store() as store:
        training = Training(store)
        with loader_from_config(config, client) as loader:
            for seq in range(5):
                training.write(1, seq)
            training.check(client)
            cluster.stop(1, signal.SIGKILL)
            training.write(1, 5)  # arrives while shard 1 is down
            cluster.start(1)
            cluster.wait_ready()
            training.write(1, 6)
            training.check(client, timeout_s=20)
            assert metric(loader, "persia_inc_loader_replays_total") >= 1


def test_a_shard_restarted_between_two_applies_is_caught_up_not_skipped(
        embedding_cluster_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A shard restarts (empty) while the loader is idle, faster than any look at the
    servers: no call failed, and the loader's last view says it holds (1, 4). The next apply
    expects (1, 4) there, is refused, and the loader rebuilds the shard from storage rather
    than writing (1, 5) over nothing."""
    cluster = embedding_cluster_factory(2, incremental_dir=str(tmp_path / "inc"),
                                        persia_inc={"loader": {**FAST, "watermark_poll_s": 600}})
    config = load_config(cluster.config_path)
    caplog.set_level(logging.INFO, logger="persia_inc.loader")
    with cluster.client() as client, config.open_store() as store:
        training = Training(store)
        with loader_from_config(config, client) as loader:
            for seq in range(5):
                training.write(1, seq)
            training.check(client)
            cluster.stop(1)
            cluster.start(1)
            cluster.wait_ready()
            assert client.status(1).watermarks == []
            training.write(1, 5)
            training.check(client, timeout_s=20)
            assert [(w.generation, w.sequence) for w in client.shard_watermarks(1)] == [(1, 5)]
            assert metric(loader, "persia_inc_loader_replays_total") >= 1
            assert any("shard 1 holds t/p at None, not (1, 4)" in r.getMessage()
                       for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_replay_and_status_commands(embedding_cluster_factory, tmp_path: Path) -> None:
    cluster = embedding_cluster_factory(2, incremental_dir=str(tmp_path / "inc"),
                                        persia_inc={"loader": FAST})
    env = {**os.environ, EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN}
    config = load_config(cluster.config_path)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "persia_inc.cli", *args, "--config",
                               str(cluster.config_path)], capture_output=True, text=True, env=env,
                              timeout=120, check=False)

    with cluster.client() as client, config.open_store() as store:
        training = Training(store)
        for seq in range(6):
            if seq == 3:
                rollback = Training(store)  # a copy of the state up to (1, 2)
                rollback.expected = dict(training.expected)
            training.write(1, seq)
        status = cli("status", "--json")
        assert status.returncode == 0, status.stderr
        stream = json.loads(status.stdout)["streams"][0]
        assert stream["watermark"] is None and stream["newest"] == [1, 5]
        assert stream["lag_packets"] == 6 and stream["lag_s"] >= 0
        dry = cli("replay", "--dry-run", "--until", "1:2")
        assert dry.returncode == 0 and len(dry.stdout.splitlines()) == 3, dry.stderr
        created = [read_packet_header(store.get(packet_key("m", "t", "p", 1, seq))).created_at_ns
                   for seq in (2, 3)]
        dry = cli("replay", "--dry-run", "--until-time", f"{sum(created) / 2e9:.6f}")
        assert dry.returncode == 0 and len(dry.stdout.splitlines()) == 3, dry.stderr
        done = cli("replay", "--until", "1:2")
        assert done.returncode == 0, done.stderr
        rollback.check(client)
        done = cli("replay")
        assert done.returncode == 0 and "replayed 3 packets" in done.stdout, done.stdout
        training.check(client)
        status = json.loads(cli("status", "--json").stdout)["streams"][0]
        assert status["watermark"] == [1, 5] and status["lag_packets"] == 0
