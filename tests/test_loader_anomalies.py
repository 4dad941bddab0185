"""Never stale in silence, against real embedding-server processes: a stray generation is held
while the old generation still applies, a packet arriving below the watermark is an ERROR, a
metric and a flag, an unreachable shard does not stop the others and catches up when it is
back, health names every dead part, and a failed start leaves nothing running."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_loader_services import FAST, Training

from persia_inc.config import load_config
from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.embedding_server.errors import ShardIdentityError
from persia_inc.embedding_server.sharding import shard_of
from persia_inc.foundation.kafka import KafkaSettings
from persia_inc.foundation.net import free_port
from persia_inc.foundation.wait import wait_until
from persia_inc.loader.daemon import Loader
from persia_inc.loader.settings import LoaderSettings
from persia_inc.local_services import EMBEDDING_TOKEN, EMBEDDING_TOKEN_ENV
from persia_inc.packet_format import decode_packet, packet_key
from persia_inc.storage import open_store
from persia_inc.wiring import loader_from_config

STRAY = 9999999999


def metric(loader: Loader, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(s.value for m in loader.metrics.registry.collect() for s in m.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def status_json(config_path: Path, *args: str, code: int = 3) -> dict:
    """`persia-inc status --json`, which exits `code` (3: something is flagged)."""
    env = {**os.environ, EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN}
    done = subprocess.run([sys.executable, "-m", "persia_inc.cli", "status", "--json", "--config",
                           str(config_path), *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == code, done.stderr
    return json.loads(done.stdout)


def records(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.ERROR) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level and text in r.getMessage()]


def test_stray_generation_is_held_and_a_late_packet_is_skipped_loudly(
        embedding_cluster_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """(1,0), (1,1), a stray (9999999999,0), then (1,2): (1,2) is applied first, the stray is
    held and logged, passed only after gap_timeout_s (an injected clock), and (1,3) arriving
    after that is an ERROR, a metric and a flag in health, /streams and `persia-inc status`."""
    caplog.set_level(logging.WARNING, logger="persia_inc.loader")
    port = free_port()
    cluster = embedding_cluster_factory(2, incremental_dir=str(tmp_path / "inc"), persia_inc={
        "loader": {**FAST, "gap_timeout_s": 60.0, "metrics_port": port}})
    config = load_config(cluster.config_path)
    skew = [0.0]
    with cluster.client() as client, config.open_store() as store:
        training = Training(store)
        with loader_from_config(config, client, clock=lambda: time.monotonic() + skew[0]) as loader:
            training.write(1, 0)
            training.write(1, 1)
            training.check(client)
            stray_key, stray, stray_signs, stray_rows = training.packet(STRAY, 0)
            store.put(stray_key, stray)
            wait_until(lambda: metric(loader, "persia_inc_loader_generation_jumps_total",
                                    outcome="held") == 1, "the stray held", timeout_s=15)
            logged = records(caplog, "GENERATION JUMP")
            assert len(logged) == 1 and stray_key in logged[0] and "(1, 1)" in logged[0], logged
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/streams", timeout=5) as reply:
                row = json.load(reply)["streams"][0]
            assert row["generation_jump_held"] == stray_key
            shown = status_json(cluster.config_path)["streams"][0]
            assert shown["generation_jump_held"] == stray_key and "generation-jump-held" in shown["flags"]
            assert shown["watermark"] == [1, 1]

            training.write(1, 2)  # the old generation goes on: applied before the stray
            training.check(client)
            wait_until(lambda: [(w.generation, w.sequence) for w in client.watermarks()] == [(1, 2)],
                       "(1, 2) applied", timeout_s=15)
            assert loader.streams().streams[0].generation_jump_held == stray_key

            skew[0] += 61.0  # the gap timeout runs out: the stray passes, loudly and counted
            training.remember(stray_signs, stray_rows)
            wait_until(lambda: metric(loader, "persia_inc_loader_generation_jumps_total",
                                    outcome="passed") == 1, "the stray passed", timeout_s=15)
            training.check(client)
            assert [(w.generation, w.sequence) for w in client.watermarks()] == [(STRAY, 0)]
            assert any(stray_key in m for m in records(caplog, "passed"))

            late = training.write(1, 3, remember=False)  # below the watermark, never applied
            wait_until(lambda: metric(loader, "persia_inc_loader_skipped_below_watermark_total",
                                    table="t") == 1, "the late packet reported", timeout_s=15)
            logged = records(caplog, "SKIPPED")
            assert len(logged) == 1 and late in logged[0] and "below the watermark" in logged[0]
            training.check(client)  # its rows were not applied over the newer ones
            row = loader.streams().streams[0]
            skipped = row.anomaly("skipped-below-watermark")
            assert row.skipped_below_watermark == 1 and skipped and skipped.last_key == late
            assert row.generation_jump_held is None and row.count("generation-jump-passed") == 1
            shown = status_json(cluster.config_path)["streams"][0]
            assert shown["skipped_below_watermark"] == 1
            assert shown["flags"] == ["generation-jump-passed=1", "skipped-below-watermark=1"]


def _owned(training: Training, shard: int, num: int) -> np.ndarray:
    signs = np.array(sorted(training.expected), dtype=np.uint64)
    return signs[shard_of(signs, num) == shard]


def test_unreachable_shard_is_reported_and_the_others_still_get_their_slices(
        embedding_cluster_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="persia_inc.loader")
    cluster = embedding_cluster_factory(2, incremental_dir=str(tmp_path / "inc"),
                                        persia_inc={"loader": FAST})
    config = load_config(cluster.config_path)
    address = cluster.servers[1]
    cluster.stop(1)  # nothing listens at shard 1's address: as if it were a wrong one
    with cluster.client(timeout_s=5) as client, config.open_store() as store:
        training = Training(store)
        with loader_from_config(config, client) as loader:
            for seq in range(5):
                training.write(1, seq)
            # shard 0 gets its slices while shard 1 is down
            wait_until(lambda: [(w.generation, w.sequence) for w in client.status(0).watermarks]
                       == [(1, 4)], "shard 0 applied everything", timeout_s=15)
            mine = _owned(training, 0, 2)
            np.testing.assert_array_equal(client.lookup("t", mine),
                                          np.stack([training.expected[s] for s in mine.tolist()]))
            wait_until(lambda: metric(loader, "persia_inc_loader_shard_unreachable_total",
                                    shard="1", address=address) >= 3, "failures counted", timeout_s=15)
            logged = records(caplog, f"SHARD 1 ({address})")
            assert len(logged) == 1, logged  # bounded: at most one line per 30 s per shard
            assert metric(loader, "persia_inc_loader_shard_up", shard="1") == 0
            health = loader.health()
            assert not health.healthy and not health.servers
            assert any(address in p for p in health.problems), health
            row = loader.streams().streams[0]
            assert row.shards_unreachable == (1,)
            assert row.reachable_watermark == (1, 4) and row.watermark is None
            shown = status_json(cluster.config_path)["streams"][0]  # status probes shards too
            assert shown["shards_unreachable"] == [1] and "shard-unreachable=1" in shown["flags"]
            assert shown["watermark"] == [1, 4]

            cluster.start(1)  # back, empty: it catches up from storage
            cluster.wait_ready()
            training.write(1, 5)
            training.check(client, timeout_s=30)
            wait_until(lambda: loader.health().healthy, "healthy again", timeout_s=15)
            assert [(w.generation, w.sequence) for w in client.watermarks()] == [(1, 5)]
            assert loader.streams().streams[0].watermark == (1, 5)
            assert metric(loader, "persia_inc_loader_replays_total") >= 1


def test_health_names_a_dead_source(embedding_cluster_factory, tmp_path: Path) -> None:
    cluster = embedding_cluster_factory(1, incremental_dir=str(tmp_path / "inc"),
                                        persia_inc={"loader": {**FAST, "metrics_port": 0}})
    config = load_config(cluster.config_path)
    port = free_port()
    with cluster.client() as client, config.open_store() as store:
        training = Training(store)
        for kind in ("watch", "list"):
            settings = LoaderSettings(**{**FAST, "source": kind, "metrics_port": port})
            with Loader(client, store, model="m", settings=settings) as loader:
                training.write(1, len(training.expected) // 20)
                training.check(client)
                wait_until(lambda: loader.health().healthy, "healthy", timeout_s=15)
                loader.sources[0].close()  # the watcher / poller thread is gone
                health = loader.health()
                assert not health.healthy and health.sources[kind] is False
                assert all(ok for name, ok in health.sources.items() if name != kind)
                assert f"source {kind} is dead" in health.problems
                with pytest.raises(urllib.error.HTTPError) as reply:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
                with reply.value:
                    assert reply.value.code == 503
                    assert f"source {kind} is dead" in json.load(reply.value)["problems"]


def test_health_names_a_dead_kafka_consumer(embedding_cluster_factory, kafka, tmp_path: Path) -> None:
    cluster = embedding_cluster_factory(1, incremental_dir=str(tmp_path / "inc"))
    with cluster.client() as client, open_store(str(tmp_path / "inc")) as store:
        settings = LoaderSettings(**{**FAST, "source": "kafka"})
        name = f"persia-inc-dead-{free_port()}"  # its own topic and group on the shared broker
        kafka_settings = KafkaSettings(bootstrap_servers=(kafka.bootstrap,), topic=name, group_id=name,
                                       session_timeout_ms=2000, heartbeat_interval_ms=500)
        with Loader(client, store, model="m", settings=settings, kafka=kafka_settings) as loader:
            wait_until(lambda: loader.health().healthy, "healthy", timeout_s=15)
            sources = loader.health().sources
            assert sources["kafka-list"] and sources["kafka"]
            loader.sources[1].close()
            health = loader.health()
            assert not health.healthy and "source kafka is dead" in health.problems


def _no_loader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("persia-inc-loader")]


def test_start_refusing_a_misordered_server_list_closes_everything(
        embedding_cluster_factory, tmp_path: Path) -> None:
    cluster = embedding_cluster_factory(2, incremental_dir=str(tmp_path / "inc"))
    store = open_store(str(tmp_path / "inc"))
    with EmbeddingClient(list(reversed(cluster.servers)), token=EMBEDDING_TOKEN) as client:
        loader = Loader(client, store, model="m", owns_store=True,
                        settings=LoaderSettings(**{**FAST, "source": "list"}))
        with pytest.raises(ShardIdentityError):
            loader.start()
    assert store.stop.is_set()  # the store it owns is closed
    assert not _no_loader_threads()


def test_start_failing_on_a_source_or_the_metrics_port_closes_everything(tmp_path: Path) -> None:
    # no embedding server answers: that is waited for (the loader serves what answers), but a
    # source that cannot start, or a metrics port in use, fails the start
    with EmbeddingClient([f"127.0.0.1:{free_port()}"], timeout_s=2) as client:
        root = tmp_path / "inc"
        store = open_store(str(root))
        root.write_text("a file where the watched directory should be")
        loader = Loader(client, store, model="m", owns_store=True,
                        settings=LoaderSettings(**{**FAST, "source": "watch"}))
        with pytest.raises(OSError):
            loader.start()
        assert store.stop.is_set() and not _no_loader_threads()
        root.unlink()
        # the metrics port is taken: the dispatcher and the poller were already running
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            store = open_store(str(tmp_path / "inc"))
            loader = Loader(client, store, model="m", owns_store=True, settings=LoaderSettings(
                **{**FAST, "source": "list", "metrics_port": taken.getsockname()[1]}))
            with pytest.raises(OSError):
                loader.start()
        assert store.stop.is_set() and not _no_loader_threads()
        loader.close()  # safe again


def test_status_flags_a_stored_generation_jump_without_a_loader(embedding_cluster_factory,
                                                                tmp_path: Path) -> None:
    cluster = embedding_cluster_factory(1, incremental_dir=str(tmp_path / "inc"))
    config = load_config(cluster.config_path)
    with cluster.client() as client, config.open_store() as store:
        training = Training(store)
        training.write(1, 0)
        client.apply(decode_packet(store.get(packet_key("m", "t", "p", 1, 0))))
        training.write(STRAY, 0, remember=False)
    shown = status_json(cluster.config_path, "--loader", "none")
    assert shown["loader"] is None
    row = shown["streams"][0]
    assert row["watermark"] == [1, 0] and row["generation_jump"] == [STRAY, 0]
    assert row["flags"] == [f"generation-jump={STRAY}:0"]
    assert row["skipped_below_watermark"] is None and row["shards_unreachable"] == []
