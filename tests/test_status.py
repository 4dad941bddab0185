"""`persia-inc status` always answers, against real embedding-server processes: it reads v1 and
v2 (cut) headers of waiting packets, an unreachable loader is a flag (exit 3) and not a
failure, and its exit codes say ok (0), flagged (3), failed (1) and usage (2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_loader_services import FAST, Training
from test_producer_support import NumpyModel

from persia_inc.config import load_config
from persia_inc.foundation.net import free_port
from persia_inc.foundation.wait import wait_until
from persia_inc.local_services import EMBEDDING_TOKEN, EMBEDDING_TOKEN_ENV
from persia_inc.packet_format import CUT_LANE, packet_key
from persia_inc.wiring import loader_from_config, producer_from_config


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN}
    return subprocess.run([sys.executable, "-m", "persia_inc.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def test_status_reads_waiting_cuts_and_flags_an_unreachable_loader(embedding_cluster_factory,
                                                                    tmp_path: Path) -> None:
    """Two v2 cuts wait (no loader runs), and the config names a loader metrics port where
    nothing listens: status shows both cuts as lag and the loader as a flag, exit 3."""
    down_port = free_port()
    cluster = embedding_cluster_factory(1, incremental_dir=str(tmp_path / "inc"),
                                        persia_inc={"loader": {"metrics_port": down_port}})
    config = load_config(cluster.config_path)
    model = NumpyModel(rows=1000, dim=4)
    producer = producer_from_config(config, producer_id="trainer-0")
    producer.register_table("emb", model.read)
    for _ in range(2):
        producer.record("emb", model.step(50))
        assert producer.flush()
    producer.close()

    shown = cli("status", "--json", "--config", str(cluster.config_path))
    assert shown.returncode == 3, shown.stderr
    report = json.loads(shown.stdout)
    assert report["loader"] == {"url": f"http://127.0.0.1:{down_port}", "answered": False,
                                "error": report["loader"]["error"]}
    assert report["loader"]["error"]  # why it did not answer (connection refused)
    assert any(flag.startswith("loader-unreachable") for flag in report["flags"]), report["flags"]
    (stream,) = report["streams"]
    assert (stream["table"], stream["producer"]) == (CUT_LANE, "trainer-0")
    assert stream["watermark"] is None and stream["lag_packets"] == 2 and stream["lag_s"] >= 0
    assert stream["flags"] == [] and stream["skipped_below_watermark"] is None

    text = cli("status", "--config", str(cluster.config_path))
    assert text.returncode == 3, text.stderr
    assert f"flag loader-unreachable (http://127.0.0.1:{down_port}" in text.stdout
    assert CUT_LANE in text.stdout

    quiet = cli("status", "--config", str(cluster.config_path), "--loader", "none")
    assert quiet.returncode == 0, quiet.stderr  # nothing flagged: waiting is not an anomaly


def test_status_exit_codes_for_failure_and_usage(embedding_cluster_factory, tmp_path: Path) -> None:
    cluster = embedding_cluster_factory(1, incremental_dir=str(tmp_path / "inc"))
    cluster.stop(0)
    failed = cli("status", "--config", str(cluster.config_path), "--loader", "none")
    assert failed.returncode == 1 and "no embedding server answers" in failed.stderr
    usage = cli("status")  # --config is required
    assert usage.returncode == 2 and "--config" in usage.stderr
    bad = cli("status", "--config", str(cluster.config_path), "--clear", "no-slash")
    assert bad.returncode == 2 and "TABLE/PRODUCER" in bad.stderr
    typo = cli("status", "--jsn", "--config", str(cluster.config_path))
    assert typo.returncode == 2 and typo.stderr.startswith("usage: persia-inc status")
    assert "did you mean '--json'?" in typo.stderr, typo.stderr
    helped = cli("status", "--help")
    assert helped.returncode == 0
    assert "3 something is flagged" in helped.stdout and "2 usage" in helped.stdout


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_labelled_counters_start_at_zero_and_the_lag_names_its_producer(
        embedding_cluster_factory, tmp_path: Path) -> None:
    port = free_port()
    cluster = embedding_cluster_factory(1, incremental_dir=str(tmp_path / "inc"), persia_inc={
        "loader": {**FAST, "metrics_port": port}})
    config = load_config(cluster.config_path)
    with cluster.client() as client, config.open_store() as store, \
            loader_from_config(config, client):
        code, page = _get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        for sample in ('persia_inc_loader_quarantined_total{model="m",reason="CorruptPacketError"} 0.0',
                       'persia_inc_loader_rejected_total{model="m",reason="missing"} 0.0',
                       'persia_inc_loader_errors_total{model="m",stage="apply"} 0.0'):
            assert sample in page, sample
        training = Training(store)
        training.write(1, 0)
        training.check(client)
        wanted = ('persia_inc_loader_gaps_total{model="m",table="t"} 0.0',
                  'persia_inc_loader_lag_packets{model="m",producer="p",table="t"} 0.0')
        wait_until(lambda: all(w in _get(f"http://127.0.0.1:{port}/metrics")[1] for w in wanted),
                   "the stream's gauges and counters at 0", timeout_s=10)


def test_anomalies_stay_flagged_until_cleared(embedding_cluster_factory, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A quarantined packet and the gap it leaves stay flags on their stream in `status` (exit 3)
    and `/healthz` after later packets applied cleanly, until `status --clear t/p`, which
    carries the write token the loader asks for; without it (or with a wrong one) the loader
    answers 401 and keeps the flags."""
    monkeypatch.setenv(EMBEDDING_TOKEN_ENV, EMBEDDING_TOKEN)  # the loader's, from the config
    port = free_port()
    cluster = embedding_cluster_factory(1, incremental_dir=str(tmp_path / "inc"), persia_inc={
        "loader": {**FAST, "metrics_port": port, "settle_s": 0.0}})
    config = load_config(cluster.config_path)
    base = f"http://127.0.0.1:{port}"
    with cluster.client() as client, config.open_store() as store:
        training = Training(store)
        with loader_from_config(config, client):
            training.write(1, 0)
            store.put(packet_key("m", "t", "p", 1, 1), b"not a packet")  # quarantined
            training.write(1, 2)  # after the gap it leaves: passed after gap_timeout_s
            training.write(1, 3)  # applies cleanly
            training.check(client)
            wait_until(lambda: [(w.generation, w.sequence) for w in client.watermarks()] == [(1, 3)],
                       "(1, 3) applied", timeout_s=15)

            shown = cli("status", "--json", "--config", str(cluster.config_path))
            assert shown.returncode == 3, shown.stderr
            (stream,) = json.loads(shown.stdout)["streams"]
            assert stream["flags"] == ["quarantined=1", "gap-passed=1"], stream
            kinds = {a["kind"]: a for a in stream["anomalies"]}
            assert kinds["quarantined"]["last_key"] == packet_key("m", "t", "p", 1, 1)
            code, body = _get(f"{base}/healthz")
            health = json.loads(body)
            assert code == 200 and health["healthy"]  # flagged, not unhealthy
            assert health["flags"] == ["t/p quarantined=1 gap-passed=1"]

            for header in ({}, {"Authorization": "Bearer wrong"}):
                request = urllib.request.Request(f"{base}/clear", data=b'{"streams": "all"}',
                                                 method="POST", headers=header)
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(request, timeout=10)
                assert refused.value.code == 401 and b"token_env" in refused.value.read()
            assert json.loads(_get(f"{base}/healthz")[1])["flags"] == ["t/p quarantined=1 gap-passed=1"]
            no_token = subprocess.run(
                [sys.executable, "-m", "persia_inc.cli", "status", "--config", str(cluster.config_path),
                 "--clear", "t/p"], capture_output=True, text=True, timeout=120, check=False,
                env={k: v for k, v in os.environ.items() if k != EMBEDDING_TOKEN_ENV})
            assert no_token.returncode == 1 and "refused --clear" in no_token.stderr, no_token.stderr
            bad = cli("status", "--config", str(cluster.config_path), "--clear", "t/other")
            assert bad.returncode == 3 and "cleared the flags of no stream" in bad.stderr
            cleared = cli("status", "--config", str(cluster.config_path), "--clear", "t/p")
            assert cleared.returncode == 0, cleared.stdout + cleared.stderr
            assert "cleared the flags of t/p" in cleared.stderr
            assert json.loads(_get(f"{base}/healthz")[1])["flags"] == []
