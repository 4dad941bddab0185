"""Dense versions activated in step with the sparse stream (issue 16), against real processes on
loopback: one TorchServe per module, two embedding-server shards, the loader with its dense sync
in this process.

The producer writes to a staging store; the test ships its packets and dense versions into
incremental_dir, so it decides when the servers reach a version's sparse positions ("applying
the packets later"). Every wait is on a condition, with a deadline.
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
import torch
import xxhash

from persia_inc.cli import main as cli_main
from persia_inc.config import load_config
from persia_inc.dense import publish_mar
from persia_inc.foundation.wait import wait_until
from persia_inc.inference.batch import PersiaBatch
from persia_inc.inference.client import get_inference_stub, infer
from persia_inc.inference.engine import PersiaInference
from persia_inc.inference.local import LocalTorchServe
from persia_inc.inference.management import GrpcManagement, HttpManagement, ManagementError
from persia_inc.inference.model import build_model, load_torchscript, save_torchscript
from persia_inc.inference.spec import ModelSpec
from persia_inc.loader.settings import DenseSyncSettings
from persia_inc.local_services import EmbeddingCluster
from persia_inc.packet_format import ManifestError
from persia_inc.packet_format.dense_manifest import (
    DenseArchive,
    DenseManifest,
    dense_manifest_key,
    dense_mar_key,
    dense_version_of_key,
)
from persia_inc.storage import ObjectStore, open_store
from persia_inc.wiring import loader_from_config, producer_from_config

SPEC = ModelSpec()
MODEL = "ctr"
SERVED = "dense"  # the TorchServe model name
TABLE, DIM = "embedding", 16


def request(seed: int, rows: int = 64) -> tuple[bytes, np.ndarray]:
    """A request body and the table signs it uses (uint64[n], unique)."""
    rng = np.random.default_rng(seed)
    sparse = [rng.integers(0, 5000, (rows, 16), dtype=np.uint64) for _ in SPEC.sparse]
    body = (PersiaBatch().add_dense([rng.random((rows, SPEC.dense_dim), dtype=np.float32)])
            .add_sparse(list(zip(SPEC.sparse, sparse, strict=True))).to_bytes())
    signs = np.unique(np.concatenate([SPEC.table_signs(f, s.reshape(-1)) for f, s in enumerate(sparse)]))
    return body, signs


class Rows:
    """The training side's table: rows are a function of the sign and `scale`."""

    def __init__(self) -> None:
        self.scale = 1.0

    def __call__(self, signs: np.ndarray) -> np.ndarray:
        base = (signs % np.uint64(997)).astype(np.float32)[:, None] / 997.0
        return (base * self.scale + np.arange(DIM, dtype=np.float32) / DIM).astype(np.float32)


def ship(staging: ObjectStore, store: ObjectStore, prefix: str) -> int:
    """Copy what `staging` holds under `prefix` into `store` (atomic puts, key order; a
    dense version's manifest last); returns how many objects were copied."""
    keys = sorted(info.key for info in staging.list(prefix) if not store.exists(info.key))
    keys.sort(key=lambda k: k.endswith("manifest.json"))
    for key in keys:
        store.put(key, staging.get(key))
    return len(keys)


def test_dense_versions_activate_in_step_with_the_sparse_stream(
        tmp_path: Path, torchserve: LocalTorchServe,
        embedding_cluster_factory: Callable[..., EmbeddingCluster]) -> None:
    cluster = embedding_cluster_factory(2, name="dense", model=MODEL,
                                        persia_inc={"loader": {"rescan_interval_s": 0.5,
                                                               "watermark_poll_s": 0.5}})
    config = load_config(cluster.config_path)
    settings = dataclasses.replace(
        config.persia_inc.loader, quarantine_prefix="quarantine",
        dense_sync=DenseSyncSettings(enabled=True, management_address=torchserve.grpc_management_target,
                                     model_name=SERVED, model_store=str(torchserve.model_store),
                                     keep_versions=1, interval_s=0.2, retire_grace_s=2.0,
                                     inference_address=torchserve.grpc_inference_target))
    staging = open_store(str(tmp_path / "staging"))
    store = config.open_store()
    client = cluster.client()
    producer = producer_from_config(config, store=staging, producer_id="trainer-0")
    rows = Rows()
    producer.register_table(TABLE, rows, dim=DIM)
    loader = loader_from_config(config, client, settings=settings).start()
    assert loader.dense_sync is not None
    sync = loader.dense_sync
    body, signs = request(1)
    modules = {v: build_model(SPEC, seed=v) for v in (1, 2, 3)}
    engines = {v: PersiaInference.from_client(
        load_torchscript(save_torchscript(m, tmp_path / f"v{v}.pt")), SPEC, client)
        for v, m in modules.items()}
    stub = get_inference_stub(torchserve.grpc_inference_target)
    answers: list[int] = []
    failures: list[str] = []
    started = time.monotonic()
    events: list[str] = []  # what the test did when, to place a failure
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            try:
                infer(stub, SERVED, body)
                answers.append(1)
            except Exception as exc:  # every failure is the test's finding
                failures.append(f"at {time.monotonic() - started:.1f}s: {type(exc).__name__}: {exc}")
            stop.wait(0.02)

    asker = threading.Thread(target=keep_asking, name="test-asker", daemon=True)

    def serves(version: int) -> bool:
        return np.array_equal(infer(stub, SERVED, body), engines[version].predict(body))

    try:
        # version 1: published, shipped with its packets, activated
        producer.record(TABLE, signs)
        v1 = publish_mar(producer, modules[1], SPEC, config_file=cluster.config_path)
        assert v1.version == 1 and v1.manifest.sparse_positions[0].producer == "trainer-0"
        ship(staging, store, f"{MODEL}/~cuts/")
        ship(staging, store, f"{MODEL}/_dense/")
        wait_until(lambda: sync.active == 1, "version 1 to activate", timeout_s=120.0)
        events.append(f"v1 active at {time.monotonic() - started:.1f}s")
        wait_until(lambda: serves(1), "TorchServe to serve version 1 with the shipped rows", timeout_s=120.0)
        asker.start()
        wait_until(lambda: len(answers) >= 5, "the asking thread to get answers", timeout_s=120.0)

        # version 2: its dense part arrives before its packets: registered, pending, not default
        rows.scale = 3.0
        producer.record(TABLE, signs[::2])
        v2 = publish_mar(producer, modules[2], SPEC, config_file=cluster.config_path)
        assert v2.version == 2 and v2.manifest.sparse_positions[0].position > \
            v1.manifest.sparse_positions[0].position
        ship(staging, store, f"{MODEL}/_dense/")
        wait_until(lambda: sync.versions.get(2) is not None and sync.versions[2].state == "registered",
                   "version 2 to be registered", timeout_s=120.0)
        events.append(f"v2 registered at {time.monotonic() - started:.1f}s")
        status = loader.streams().dense
        assert status["active"]["version"] == 1
        assert [p["version"] for p in status["pending"]] == [2]
        assert status["pending"][0]["waiting_for"], status
        rounds = sync.rounds
        wait_until(lambda: sync.rounds >= rounds + 3, "three more dense-sync rounds", timeout_s=120.0)
        assert sync.active == 1 and serves(1)  # the servers still lack version 2's packets

        # the packets arrive: version 2 activates, version 1 is unregistered (keep_versions 1)
        ship(staging, store, f"{MODEL}/~cuts/")
        wait_until(lambda: sync.active == 2,
                   "version 2 to activate once the servers hold its packets", timeout_s=120.0)
        events.append(f"v2 active at {time.monotonic() - started:.1f}s")
        wait_until(lambda: serves(2), "TorchServe to serve version 2", timeout_s=120.0)
        wait_until(lambda: sync.versions[1].state == "retired",
                   "version 1 to be unregistered", timeout_s=120.0)
        events.append(f"v1 retired at {time.monotonic() - started:.1f}s")
        with HttpManagement(torchserve.management_url) as http:
            described = {d["modelVersion"] for d in http.describe(f"{SERVED}/all")}
        assert described == {"2"}, described

        # version 3: a corrupt .mar (its manifest checksum fixed, so it reaches TorchServe)
        producer.record(TABLE, signs[::3])
        v3 = publish_mar(producer, modules[3], SPEC, config_file=cluster.config_path)
        ship(staging, store, f"{MODEL}/~cuts/")
        bad = bytearray(staging.get(v3.mar_key))
        bad[: len(bad) // 2] = bytes(len(bad) // 2)  # the zip's local headers zeroed
        staging.put(v3.mar_key, bytes(bad))
        fixed = dataclasses.replace(v3.manifest, mar=DenseArchive(
            v3.manifest.mar.path, len(bad), xxhash.xxh3_64_hexdigest(bytes(bad))))
        staging.put(v3.manifest_key, fixed.to_json())
        ship(staging, store, f"{MODEL}/_dense/")
        wait_until(lambda: sync.versions.get(3) is not None and sync.versions[3].state == "refused",
                   "the corrupt version 3 to be refused", timeout_s=120.0)
        events.append(f"v3 refused at {time.monotonic() - started:.1f}s")
        assert sync.active == 2 and serves(2)
        assert "TorchServe refused it" in sync.versions[3].reason
        refused = loader.metrics.dense_refused.labels(MODEL, "register")._value.get()
        assert refused == 1
        moved = {r["key"] for r in loader.quarantine.records}
        assert {dense_mar_key(MODEL, 3), dense_manifest_key(MODEL, 3)} <= moved
        assert store.get(f"quarantine/{dense_mar_key(MODEL, 3)}") == bytes(bad)  # bytes kept
        reason = json.loads(store.get(f"quarantine/{dense_mar_key(MODEL, 3)}.reason.json"))
        assert "dense version 3" in reason["reason"]
        assert loader.streams().dense["refused"][0]["version"] == 3

        n = len(answers)
        wait_until(lambda: len(answers) >= n + 5, "answers after the refusal", timeout_s=120.0)
        assert [a["version"] for a in sync.activations] == [1, 2]
        assert loader.metrics.dense_active.labels(MODEL)._value.get() == 2

        # rollback to version 1 (unregistered by now: registered again from storage)
        assert cli_main(["rollback", "--config", str(cluster.config_path), "--to", "1", "--sparse",
                         "--management", torchserve.grpc_management_target, "--model-name", SERVED,
                         "--model-store", str(torchserve.model_store)]) == 0
        events.append(f"rolled back to v1 at {time.monotonic() - started:.1f}s")
        wait_until(lambda: serves(1),
                   "TorchServe to serve version 1 again after the rollback", timeout_s=120.0)
        n = len(answers)
        wait_until(lambda: len(answers) >= n + 5, "answers after the rollback", timeout_s=120.0)
    finally:
        stop.set()
        if asker.is_alive():
            asker.join(10)
        loader.close()
        producer.close()
        stub.channel.close()
        with GrpcManagement(torchserve.grpc_management_target) as management:
            for version in ("1", "2", "3"):
                with contextlib.suppress(ManagementError):  # not registered (any more)
                    management.unregister(SERVED, version)
        client.close()
        staging.close()
        store.close()
    assert not failures, (failures[:5], events)
    assert answers


def test_dense_manifest_roundtrip_and_errors_name_the_key() -> None:
    manifest = DenseManifest(model=MODEL, version=7, mar=DenseArchive("model.mar", 10, "0" * 16))
    assert DenseManifest.from_json(manifest.to_json()) == manifest
    record = json.loads(manifest.to_json())
    record["sparse_positions"] = [{"lane": "_cuts", "producer": "p", "generation": 1, "sequence": 2}]
    assert DenseManifest.from_json(json.dumps(record)).sparse_positions[0].position == (1, 2)

    def error(change: Callable[[dict], None]) -> str:
        bad = json.loads(json.dumps(record))
        change(bad)
        with pytest.raises(ManifestError) as info:
            DenseManifest.from_json(json.dumps(bad), where="m/_dense/000000000007/manifest.json")
        assert "m/_dense/000000000007/manifest.json" in str(info.value)
        return str(info.value)

    assert "version" in error(lambda r: r.update(version="7"))
    assert "mar.checksum" in error(lambda r: r["mar"].update(checksum="xyz"))
    assert "mar.path" in error(lambda r: r["mar"].update(path="../x.mar"))
    assert "mar.bytes" in error(lambda r: r["mar"].update(bytes=-1))
    assert "sparse_positions[0].sequence" in error(lambda r: r["sparse_positions"][0].update(sequence=None))
    assert "sparse_positions[0].producer" in error(lambda r: r["sparse_positions"][0].pop("producer"))
    assert "exported_at_ns" in error(lambda r: r.pop("exported_at_ns"))
    assert "kind" in error(lambda r: r.update(kind="other"))
    assert "format_version" in error(lambda r: r.update(format_version=9))
    assert "twice" in error(lambda r: r["sparse_positions"].append(dict(r["sparse_positions"][0])))


def test_publish_dense_numbers_versions_and_writes_the_manifest_last(tmp_path: Path) -> None:
    """Without TorchServe: the exporter is a stand-in; versions go 1, 2; an explicit lower one
    is refused; the manifest's position is the last stored cut's."""
    from persia_inc.producer import IncrementalProducer, ProducerSettings

    store = open_store(str(tmp_path / "inc"))
    written: list[str] = []

    def exporter(module: object, version: int, export_dir: Path) -> Path:
        path = export_dir / "x.mar"
        path.write_bytes(f"mar {version}".encode())
        return path

    settings = ProducerSettings(producer_id="p0")
    with IncrementalProducer(store, model=MODEL, settings=settings, generation=3) as producer:
        producer.register_table(TABLE, Rows(), dim=DIM)
        producer.record(TABLE, np.arange(10, dtype=np.uint64))
        first = producer.publish_dense(torch.nn.Identity(), exporter)
        producer.record(TABLE, np.arange(5, dtype=np.uint64))
        second = producer.publish_dense(torch.nn.Identity(), exporter)
        with pytest.raises(ValueError, match="not above"):
            producer.publish_dense(torch.nn.Identity(), exporter, version=2)
        written = sorted(info.key for info in store.list(f"{MODEL}/_dense/"))
        last = producer.writer.stored[-1].header
    assert (first.version, second.version) == (1, 2)
    assert second.manifest.sparse_positions[0].position == (last.generation, last.sequence) == (3, 1)
    assert first.manifest.sparse_positions[0].position == (3, 0)
    assert written == [dense_manifest_key(MODEL, 1), dense_mar_key(MODEL, 1),
                       dense_manifest_key(MODEL, 2), dense_mar_key(MODEL, 2)]
    loaded = DenseManifest.from_json(store.get(dense_manifest_key(MODEL, 2)))
    assert loaded.mar.checksum == xxhash.xxh3_64_hexdigest(b"mar 2") and loaded.mar.bytes == 5
    store.close()


def test_the_hook_publishes_every_dense_every_s_and_a_failure_is_kept_not_raised(
        tmp_path: Path) -> None:
    """`IncrementalUpdateHook(dense_every_s=...)` publishes after the first step ending that
    long after the last publish (a stand-in clock and exporter); each version's position is
    the last cut stored before it; a failing exporter is recorded, training goes on; the
    demo's report lists the versions and turns the failure into a problem."""
    from persia_inc.demo.pipeline import _settle_dense
    from persia_inc.demo.report import DemoReport, Progress
    from persia_inc.demo.versions import DenseWatcher, dense_summary, dense_versions_report
    from persia_inc.foundation.net import free_port
    from persia_inc.producer import IncrementalProducer, ProducerSettings
    from persia_inc.producer.torch_hook import IncrementalUpdateHook

    now = [0.0]
    broken = [False]

    def exporter(module: object, version: int, export_dir: Path) -> Path:
        if broken[0]:
            raise OSError("disk full")
        path = export_dir / "x.mar"
        path.write_bytes(f"mar {version}".encode())
        return path

    emb = torch.nn.Embedding(100, 4, sparse=True)
    optimizer = torch.optim.SGD(emb.parameters(), lr=0.1)
    store = open_store(str(tmp_path / "inc"))
    with IncrementalProducer(store, model=MODEL, settings=ProducerSettings(producer_id="x")) as producer, \
            pytest.raises(ValueError, match="dense_module"):
        IncrementalUpdateHook(producer, {}, optimizer, dense_every_s=1.0)
    with IncrementalProducer(store, model=MODEL, settings=ProducerSettings(producer_id="p0")) as producer:
        hook = IncrementalUpdateHook(producer, {"emb": emb}, optimizer, dense_every_s=10.0,
                                     dense_module=torch.nn.Identity, dense_exporter=exporter,
                                     clock=lambda: now[0])

        def step(at: float) -> None:
            now[0] = at
            optimizer.zero_grad()
            emb(torch.tensor([int(at) % 100, 7])).sum().backward()
            optimizer.step()

        for at in (1.0, 9.9, 10.0, 15.0, 20.5, 30.0):  # publishes after the steps at 10, 20.5
            step(at)
        assert [d.version.version for d in hook.dense_published if d.version] == [1, 2]
        last = producer.writer.stored[-1].header
        assert hook.dense_published[-1].version.manifest.sparse_positions[0].position == (
            last.generation, last.sequence)
        broken[0] = True
        step(41.0)  # the exporter fails: recorded and logged, optimizer.step() does not raise
        step(42.0)
        assert [d.version is None for d in hook.dense_published] == [False, False, True]
        assert hook.dense_published[-1].error == "OSError: disk full"
    assert [v for v in (dense_version_of_key(MODEL, i.key) for i in store.list(f"{MODEL}/_dense/"))
            if v is not None] == [1, 2]
    store.close()

    published = hook.dense_published
    activations = [{"version": 1, "activated_at_ns": published[0].version.manifest.exported_at_ns + 5}]
    versions = dense_versions_report(published, activations)
    assert [(v["version"], v["activated_at_ns"] is not None) for v in versions] == [(1, True), (2, False)]
    summary = dense_summary(published, versions, 10.0)
    assert (summary["published"], summary["activated"], summary["failed"]) == (2, 1, 1)

    # the demo's settling: the last version never activates (no loader answers here)
    report = DemoReport()
    watch = DenseWatcher(f"http://127.0.0.1:{free_port()}", Progress())
    assert _settle_dense(published, watch, 10.0, 0.5, report) is None
    assert report.dense["failures"] == ["OSError: disk full"]
    assert any("publish(es) failed, first: OSError: disk full" in p for p in report.problems)
    assert any("version 2 was not activated" in p for p in report.problems), report.problems
