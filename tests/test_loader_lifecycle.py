"""The loader's edges, against real embedding-server processes (and a real Kafka-protocol
broker): a broker that is down at start, a SIGTERM, a bad setting, and `replay` of rows the
loader is allowed to apply."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_loader_services import DIM, FAST, Training

from persia_inc.config import ConfigError, load_config
from persia_inc.foundation.fields import FieldError
from persia_inc.foundation.kafka import KafkaSettings
from persia_inc.foundation.wait import wait_until
from persia_inc.loader.daemon import Loader
from persia_inc.loader.settings import LoaderSettings
from persia_inc.local_services import EMBEDDING_TOKEN, EMBEDDING_TOKEN_ENV, TansuBroker, write_test_config
from persia_inc.packet_format import PacketHeader, encode_packet, packet_key
from persia_inc.storage import open_store


def test_a_loader_whose_broker_is_down_comes_up_flagged_and_recovers(
        embedding_cluster_factory, tmp_path: Path) -> None:
    """The broker's port refuses at start: the loader starts anyway (not after kafka-python's
    30 s bootstrap, not failing), /healthz names the broker, packets still apply from the
    storage listing, and once the broker is up the flag goes."""
    cluster = embedding_cluster_factory(1, incremental_dir=str(tmp_path / "inc"))
    broker = TansuBroker(tmp_path / "tansu")  # not started yet: nothing listens on its port
    kafka = KafkaSettings(bootstrap_servers=(broker.bootstrap,), topic="down", group_id="down",
                          session_timeout_ms=2000, heartbeat_interval_ms=500)
    settings = LoaderSettings(**{**FAST, "source": "kafka"})
    try:
        with cluster.client() as client, \
                Loader(client, open_store(str(tmp_path / "inc")), model="m", owns_store=True,
                       settings=settings, kafka=kafka) as loader:
            health = loader.health()
            assert not health.healthy and health.dispatcher, health
            assert any("broker unreachable" in p for p in health.problems), health.problems
            training = Training(loader.store)
            training.write(1, 0)
            training.check(client)  # the storage listing still finds it
            broker.start()
            wait_until(lambda: loader.health().healthy, "the broker's flag gone", timeout_s=30)
    finally:
        broker.stop()


def test_the_loader_logs_its_stop_on_sigterm(embedding_cluster_factory, tmp_path: Path) -> None:
    cluster = embedding_cluster_factory(1, incremental_dir=str(tmp_path / "inc"),
                                        persia_inc={"loader": FAST})
    log = tmp_path / "loader.log"
    env = {**os.environ, EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "persia_inc.cli", "loader", "--config",
                                 str(cluster.config_path)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        wait_until(lambda: "loader for model m on" in log.read_text(), "the loader started",
                   timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "loader for model m: stopping on SIGTERM" in text, text
    assert "loader for model m stopped: 0 packets applied" in text, text


def test_loader_settings_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(FieldError) as caught:
        LoaderSettings(gap_timeout_s=-1.0)
    assert caught.value.key == "gap_timeout_s" and "-1.0" in caught.value.reason
    path = write_test_config(tmp_path / "config.yaml", ["127.0.0.1:1"], str(tmp_path / "inc"),
                             persia_inc={"loader": {"prefetch": 0}})
    with pytest.raises(ConfigError) as bad:
        load_config(path)
    assert bad.value.key == "persia_inc.loader.prefetch", bad.value
    path = write_test_config(tmp_path / "dense.yaml", ["127.0.0.1:1"], str(tmp_path / "inc"),
                             persia_inc={"loader": {"dense_sync": {"enabled": True}}})
    with pytest.raises(ConfigError) as bad:
        load_config(path)
    assert bad.value.key == "persia_inc.loader.dense_sync.model_store", bad.value


def test_replay_honours_allow_non_finite(embedding_cluster_factory, tmp_path: Path) -> None:
    """A packet with a NaN row: `replay` applies it when `loader.allow_non_finite` says the
    loader would, and refuses it (naming it) when not."""
    signs = np.array([3, 5, 7], dtype=np.uint64)
    rows = np.ones((3, DIM), np.float32)
    rows[1, 2] = np.nan
    header = PacketHeader(model="m", table="t", producer="p", generation=1, sequence=0)
    env = {**os.environ, EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN}
    for allowed in (False, True):
        cluster = embedding_cluster_factory(1, name=f"c{allowed}", incremental_dir=str(
            tmp_path / f"inc{allowed}"), persia_inc={"loader": {"allow_non_finite": allowed}})
        with open_store(str(tmp_path / f"inc{allowed}")) as store:
            store.put(packet_key("m", "t", "p", 1, 0), encode_packet(header, signs, rows))
        done = subprocess.run([sys.executable, "-m", "persia_inc.cli", "replay", "--config",
                               str(cluster.config_path)], capture_output=True, text=True, env=env,
                              timeout=120, check=False)
        if not allowed:
            assert done.returncode == 1 and "0000000001-000000000000.arrow" in done.stderr, done.stderr
            continue
        assert done.returncode == 0, done.stderr
        with cluster.client() as client:
            got = client.lookup("t", signs)
        np.testing.assert_array_equal(got, rows)  # NaN in the same place (assert_array_equal: NaN == NaN)
