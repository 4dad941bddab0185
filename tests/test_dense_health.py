"""TorchServe's health is watched (issue 22, defect 5): `kill -9` of TorchServe's Java frontend
under `persia-inc serve` makes `serve` exit non-zero (a supervisor restarts it), and the
loader's dense sync flags it: a metric, an ERROR naming the address, a `status` flag and exit
status 1, `/healthz` unhealthy. Real TorchServe, a real embedding server, the loader here."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from process_checks import alive, processes_under

from persia_inc.cli import main as cli_main
from persia_inc.config import load_config
from persia_inc.foundation.net import free_port
from persia_inc.foundation.wait import wait_until
from persia_inc.inference.archive import archive_model
from persia_inc.inference.model import build_model, save_torchscript
from persia_inc.inference.spec import ModelSpec
from persia_inc.loader.settings import DenseSyncSettings
from persia_inc.local_services import EmbeddingCluster, stop_pid
from persia_inc.wiring import MAR_HANDLER, loader_from_config

SPEC = ModelSpec()


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return [p for p in found if alive(p)]


def test_torchserve_killed_serve_exits_non_zero_and_the_dense_sync_flags_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
        embedding_cluster_factory: Callable[..., EmbeddingCluster]) -> None:
    cluster = embedding_cluster_factory(1, name="health", model="ctr")
    store = tmp_path / "store"
    archive_model("ctr", save_torchscript(build_model(SPEC), tmp_path / "ctr.pt"), SPEC, store,
                  handler=MAR_HANDLER)
    ports = {name: free_port() for name in
             ("grpc-inference", "grpc-management", "inference", "management", "metrics")}
    workdir = tmp_path / "work"
    out_path, err_path = tmp_path / "serve.out", tmp_path / "serve.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "persia_inc.cli", "serve", "--config", str(cluster.config_path),
             "--model-store", str(store), "--model", "ctr.mar", "--workdir", str(workdir),
             *[arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]],
            stdout=out, stderr=err)
    management = f"127.0.0.1:{ports['grpc-management']}"
    config = load_config(cluster.config_path)
    metrics_port = free_port()
    settings = dataclasses.replace(
        config.persia_inc.loader, metrics_port=metrics_port,
        dense_sync=DenseSyncSettings(enabled=True, management_address=management, model_name="ctr",
                                     model_store=str(store), interval_s=0.2,
                                     inference_address=f"127.0.0.1:{ports['grpc-inference']}"))
    client = cluster.client()
    loader = None
    status = ["status", "--config", str(cluster.config_path), "--loader", f"http://127.0.0.1:{metrics_port}"]
    try:
        def started() -> bool:
            assert proc.poll() is None, err_path.read_text()[-3000:]
            return "stop with SIGTERM" in out_path.read_text()

        wait_until(started, "serve to say it is up", timeout_s=120, interval_s=0.1)
        torchserve_pid = int(re.search(r"TorchServe pid (\d+)", out_path.read_text()).group(1))  # type: ignore[union-attr]
        loader = loader_from_config(config, client, settings=settings).start()
        sync = loader.dense_sync
        assert sync is not None
        wait_until(lambda: sync.view.answers, "the dense sync to read TorchServe", timeout_s=60)
        assert sync.view.default == "1.0" and sync.active is None  # serve's model, not a dense version
        assert cli_main(status) == 0

        workers = children(torchserve_pid)
        assert workers  # the model's worker
        os.kill(torchserve_pid, signal.SIGKILL)  # the Java frontend
        assert proc.wait(timeout=60) != 0  # serve notices and exits non-zero
        assert "TorchServe exited with -9" in err_path.read_text(), err_path.read_text()[-2000:]
        wait_until(lambda: "torchserve-unreachable" in sync.flags(), "the dense sync to flag TorchServe",
                   timeout_s=60)
        assert loader.metrics.dense_torchserve_up.labels("ctr")._value.get() == 0
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any(management in m and "does not answer" in m for m in errors), errors
        health = loader.health()
        assert not health.healthy and any(management in p for p in health.problems), health
        capsys.readouterr()
        assert cli_main(status) == 1
        shown = capsys.readouterr()
        assert "torchserve-unreachable" in shown.out and management in shown.err, shown
        # nothing of TorchServe is left behind: its workers went with it
        assert not alive(torchserve_pid)
        wait_until(lambda: not any(alive(pid) for pid in workers), "TorchServe's workers to exit",
                   timeout_s=30)
        assert not processes_under(workdir)
    finally:
        if loader is not None:
            loader.close()
        if proc.poll() is None:
            stop_pid(proc)
        client.close()
