"""Dense versions on day two (issue 22), against real TorchServe, real embedding-server
processes and the loader with its dense sync in this process: a loader restart adopts what
TorchServe holds, a module that cannot serve is refused with its reason, `rollback --to N`
works while N is registered and `status` follows it. One TorchServe for the module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_dense_versions import DIM, MODEL, SPEC, TABLE, Rows, request

from persia_inc.cli import main as cli_main
from persia_inc.config import load_config
from persia_inc.dense import mar_exporter, publish_mar
from persia_inc.foundation.net import free_port
from persia_inc.foundation.wait import wait_until
from persia_inc.inference.client import get_inference_stub, infer
from persia_inc.inference.engine import PersiaInference
from persia_inc.inference.local import LocalTorchServe
from persia_inc.inference.management import GrpcManagement, ManagementError
from persia_inc.inference.model import build_model, load_torchscript, save_torchscript
from persia_inc.loader.settings import DenseSyncSettings
from persia_inc.local_services import EmbeddingCluster
from persia_inc.wiring import loader_from_config, producer_from_config


def dense_settings(torchserve: LocalTorchServe, served: str, **overrides: object) -> DenseSyncSettings:
    return DenseSyncSettings(
        enabled=True, management_address=torchserve.grpc_management_target, model_name=served,
        model_store=str(torchserve.model_store), keep_versions=2, interval_s=0.2, retire_grace_s=1.0,
        inference_address=torchserve.grpc_inference_target, log_dir=str(torchserve.workdir / "logs"),
        **overrides)  # type: ignore[arg-type]


def described(torchserve: LocalTorchServe, served: str, version: str = "all") -> dict[str, str]:
    """TorchServe's versions of `served` -> their .mar (the default one alone with version '')."""
    with GrpcManagement(torchserve.grpc_management_target) as management:
        return {d["modelVersion"]: d["modelUrl"] for d in management.describe(served, version)}


def unregister_all(torchserve: LocalTorchServe, served: str) -> None:
    with GrpcManagement(torchserve.grpc_management_target) as management, \
            contextlib.suppress(ManagementError):
            versions = sorted(d["modelVersion"] for d in management.describe(served, "all"))
            default = management.describe(served)[0]["modelVersion"]
            for version in [v for v in versions if v != default] + [default]:
                management.unregister(served, version)


def status_json(config_path: Path, loader_url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    capsys.readouterr()
    code = cli_main(["status", "--config", str(config_path), "--loader", loader_url, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_restart_bad_module_and_rollback_while_serving(
        tmp_path: Path, torchserve: LocalTorchServe, capsys: pytest.CaptureFixture[str],
        embedding_cluster_factory: Callable[..., EmbeddingCluster]) -> None:
    """publish 1 and 2 -> restart the loader -> publish a module that cannot serve ->
    `rollback --to 1`, with requests flowing the whole time: none fails, version 2 answers
    until the rollback, the bad module is refused with its reason, `status` says 1 after."""
    served = "ops"
    cluster = embedding_cluster_factory(2, name="ops", model=MODEL,
                                        persia_inc={"loader": {"rescan_interval_s": 0.5,
                                                               "watermark_poll_s": 0.5}})
    config = load_config(cluster.config_path)
    port = free_port()
    settings = dataclasses.replace(config.persia_inc.loader, quarantine_prefix="quarantine",
                                   metrics_port=port, dense_sync=dense_settings(torchserve, served))
    loader_url = f"http://127.0.0.1:{port}"
    client = cluster.client()
    producer = producer_from_config(config, producer_id="trainer-0")
    rows = Rows()
    producer.register_table(TABLE, rows, dim=DIM)
    loader = loader_from_config(config, client, settings=settings).start()
    body, signs = request(1)
    modules = {v: build_model(SPEC, seed=v) for v in (1, 2, 3)}
    engines = {v: PersiaInference.from_client(
        load_torchscript(save_torchscript(modules[v], tmp_path / f"v{v}.pt")), SPEC, client) for v in (1, 2)}
    stub = get_inference_stub(torchserve.grpc_inference_target)
    answers: list[int | None] = []  # which version each answer matched (None: neither)
    failures: list[str] = []
    events: list[str] = []
    started = time.monotonic()
    expected: dict[int, np.ndarray] = {}
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            try:
                scores = infer(stub, served, body)
                answers.append(next((v for v, want in expected.items()
                                     if np.array_equal(scores, want)), None))
            except Exception as exc:  # every failure is the test's finding
                failures.append(f"at {time.monotonic() - started:.1f}s: {type(exc).__name__}: {exc}")
            stop.wait(0.02)

    asker = threading.Thread(target=keep_asking, name="test-asker", daemon=True)
    try:
        # versions 1 and 2, each activated once the servers hold its packets
        producer.record(TABLE, signs)
        assert publish_mar(producer, modules[1], SPEC, config_file=cluster.config_path).version == 1
        wait_until(lambda: loader.dense_sync is not None and loader.dense_sync.active == 1,
                   "version 1 to activate", timeout_s=120.0)
        rows.scale = 3.0
        producer.record(TABLE, signs)
        assert publish_mar(producer, modules[2], SPEC, config_file=cluster.config_path).version == 2
        wait_until(lambda: loader.dense_sync is not None and loader.dense_sync.active == 2,
                   "version 2 to activate", timeout_s=120.0)
        expected.update({v: engines[v].predict(body) for v in (1, 2)})  # the rows are final now
        assert not np.array_equal(expected[1], expected[2])
        asker.start()
        wait_until(lambda: answers.count(2) >= 5, "answers from version 2", timeout_s=60.0)
        assert described(torchserve, served) == {
            "1": f"{served}.v000000000001.mar", "2": f"{served}.v000000000002.mar"}

        # restart the loader: TorchServe keeps both versions; the new sync adopts them
        loader.close()
        events.append(f"loader restarted at {time.monotonic() - started:.1f}s")
        loader = loader_from_config(config, client, settings=settings).start()
        sync = loader.dense_sync
        assert sync is not None
        wait_until(lambda: sync.rounds >= 3, "three rounds of the new dense sync", timeout_s=60.0)
        assert sync.active == 2 and {v: s.state for v, s in sync.versions.items()} == {
            1: "registered", 2: "active"}
        assert not sync.status()["refused"] and not loader.quarantine.records
        assert all((torchserve.model_store / f"{served}.v{v:012d}.mar").is_file() for v in (1, 2))
        assert described(torchserve, served, "")["2"]  # still the default
        code, report = status_json(cluster.config_path, loader_url, capsys)
        assert code == 0 and report["dense"]["active"]["version"] == 2, report["dense"]

        # a module that cannot serve: the bare MLP. publish_mar refuses it in training ...
        with pytest.raises(ValueError, match=r"forward\(dense float32\[4, 13\], sparse .* failed"):
            publish_mar(producer, modules[3].mlp, SPEC, config_file=cluster.config_path)
        # ... and a version published past that check is refused by the validation request
        bad = producer.publish_dense(modules[3].mlp, mar_exporter(SPEC, config_file=cluster.config_path))
        assert bad.version == 3
        wait_until(lambda: 3 in sync.versions and sync.versions[3].state == "refused",
                   "the bad version 3 to be refused", timeout_s=120.0)
        events.append(f"v3 refused at {time.monotonic() - started:.1f}s")
        reason = sync.versions[3].reason
        assert "expected at most 2 argument(s)" in reason, reason  # the worker's own error
        assert "version 3 of TorchServe model 'ops'" in reason and torchserve.grpc_inference_target in reason
        assert sync.active == 2 and "3" not in described(torchserve, served)
        code, report = status_json(cluster.config_path, loader_url, capsys)
        assert [r["version"] for r in report["dense"]["refused"]] == [3]
        assert "expected at most 2 argument(s)" in report["dense"]["refused"][0]["reason"]
        n = len(answers)
        wait_until(lambda: len(answers) >= n + 5, "answers after the refusal", timeout_s=60.0)
        assert set(answers) == {2}, (set(answers), events)

        # roll back to version 1, which is still registered (keep_versions 2)
        assert cli_main(["rollback", "--config", str(cluster.config_path), "--to", "1",
                         "--management", torchserve.grpc_management_target, "--model-name", served,
                         "--model-store", str(torchserve.model_store)]) == 0
        events.append(f"rolled back at {time.monotonic() - started:.1f}s")
        rolled_back_at = len(answers)
        wait_until(lambda: answers[-5:] == [1] * 5, "version 1 to answer after the rollback", timeout_s=60.0)
        wait_until(lambda: sync.active == 1, "the dense sync to see version 1 as the default", timeout_s=30.0)
        code, report = status_json(cluster.config_path, loader_url, capsys)
        assert code == 0 and report["dense"]["active"]["version"] == 1, report["dense"]
        assert report["dense"]["pinned"]["version"] == 1 and "pinned=1" in report["dense"]["flags"]
        capsys.readouterr()
        assert cli_main(["status", "--config", str(cluster.config_path), "--loader", loader_url]) == 0
        assert "active version 1" in capsys.readouterr().out
        rounds = sync.rounds
        wait_until(lambda: sync.rounds >= rounds + 3, "three more rounds", timeout_s=30.0)
        assert sync.active == 1  # pinned: the sync does not move it forward again
    finally:
        stop.set()
        if asker.is_alive():
            asker.join(10)
        loader.close()
        producer.close()
        stub.channel.close()
        unregister_all(torchserve, served)
        client.close()
    assert not failures, (failures[:5], events)
    assert set(answers[:rolled_back_at]) == {2}, events  # version 2 until the rollback
    assert set(answers[rolled_back_at:]) <= {1, 2}
