"""`persia-inc serve --frontend kserve`: the Open Inference Protocol (KServe v2), called with
tritonclient's off-the-shelf gRPC and HTTP clients, against real embedding servers."""

from __future__ import annotations

import dataclasses
import filecmp
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from persia_inc.cli import main as cli_main
from persia_inc.commands.serve_kserve import KServeFrontend, KServeSettings
from persia_inc.config import load_config
from persia_inc.dense import mar_exporter, publish_mar
from persia_inc.foundation.net import free_port
from persia_inc.foundation.wait import wait_until
from persia_inc.inference.archive import archive_model
from persia_inc.inference.batch import PersiaBatch
from persia_inc.inference.engine import PersiaInference
from persia_inc.inference.management import HttpManagement, ManagementError
from persia_inc.inference.model import build_model, load_torchscript, save_torchscript
from persia_inc.inference.spec import ModelSpec
from persia_inc.loader.settings import DenseSyncSettings
from persia_inc.local_services import EmbeddingCluster, stop_pid
from persia_inc.packet_format import PacketHeader, decode_packet, encode_packet
from persia_inc.storage import ObjectStore, open_store
from persia_inc.wiring import MAR_HANDLER, loader_from_config, producer_from_config

SPEC = ModelSpec.per_feature({f"C{i + 1}": 16 for i in range(26)})  # the demo's 26 tables
CLI = [sys.executable, "-m", "persia_inc.cli"]
ROOT = Path(__file__).resolve().parents[1]


def sample(seed: int, rows: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dense float32[rows, 13], ids uint64[26 * ..] feature-major, lengths int64[26, rows]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 4, (26, rows))
    ids = rng.integers(0, 3000, int(lengths.sum()), dtype=np.uint64)
    return rng.random((rows, 13), dtype=np.float32), ids, lengths


def as_bytes(dense: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> bytes:
    bounds = np.concatenate([[0], np.cumsum(lengths.reshape(-1))])
    rows = dense.shape[0]
    sparse = [(name, [ids[bounds[f * rows + i]:bounds[f * rows + i + 1]] for i in range(rows)])
              for f, name in enumerate(SPEC.sparse)]
    return PersiaBatch().add_dense([dense]).add_sparse(sparse).to_bytes()


def give_rows(cluster: EmbeddingCluster) -> None:
    rng = np.random.default_rng(1)
    signs = np.arange(3000, dtype=np.uint64)
    with cluster.client() as client:
        for seq, table in enumerate(SPEC.sparse):
            client.apply(decode_packet(encode_packet(
                PacketHeader(model="ctr", table=table, producer="p", generation=0, sequence=seq),
                signs, rng.standard_normal((signs.size, 16)).astype(np.float32))))


def inputs(mod: object, dense: np.ndarray, ids: np.ndarray, lengths: np.ndarray, body: bytes | None) -> list:
    """tritonclient InferInputs (module `mod`: grpc or http): BYTES or the plain tensors."""
    if body is not None:
        tensor = mod.InferInput("request", [1], "BYTES")  # type: ignore[attr-defined]
        tensor.set_data_from_numpy(np.array([body], dtype=np.object_))
        return [tensor]
    out = []
    for name, array, dtype in (("dense", dense, "FP32"), ("sparse_ids", ids.view(np.int64), "INT64"),
                               ("sparse_lengths", lengths.astype(np.int64), "INT64")):
        tensor = mod.InferInput(name, list(array.shape), dtype)  # type: ignore[attr-defined]
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def test_kserve_frontend_over_tritonclient(
        tmp_path: Path, embedding_cluster_factory: Callable[..., EmbeddingCluster]) -> None:
    cluster = embedding_cluster_factory(2, name="oip", model="ctr")
    give_rows(cluster)
    store = tmp_path / "store"
    pts = [save_torchscript(build_model(SPEC, seed=s), tmp_path / f"ctr{s}.pt") for s in (3, 4)]
    archive_model("ctr", pts[0], SPEC, store, handler=MAR_HANDLER, version="1")
    archive_model("ctr2", pts[1], SPEC, store, handler=MAR_HANDLER, version="2")
    http_port, grpc_port = free_port(), free_port()
    out_path = tmp_path / "serve.out"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--frontend", "kserve", "--config", str(cluster.config_path), "--model-store",
             str(store), "--model", "ctr.mar", "--inference-port", str(http_port),
             "--grpc-inference-port", str(grpc_port)], stdout=out, stderr=subprocess.STDOUT)
    engine_client = cluster.client()
    engines = [PersiaInference.from_client(load_torchscript(pt), SPEC, engine_client) for pt in pts]
    g = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    h = thttp.InferenceServerClient(f"127.0.0.1:{http_port}")
    try:
        def started() -> bool:
            assert proc.poll() is None, out_path.read_text()[-3000:]
            return "stop with SIGTERM" in out_path.read_text()

        wait_until(started, "serve --frontend kserve to say it is up", timeout_s=60)
        assert g.is_server_live() and g.is_server_ready() and h.is_server_live() and h.is_server_ready()
        assert g.is_model_ready("ctr") and h.is_model_ready("ctr", "1") and not h.is_model_ready("ctr", "9")
        meta = h.get_model_metadata("ctr")
        assert meta["versions"] == ["1"] and {i["name"] for i in meta["inputs"]} == {
            "request", "dense", "sparse_ids", "sparse_lengths"}
        assert g.get_model_metadata("ctr").outputs[0].name == "scores"

        dense, ids, lengths = sample(7)
        body = as_bytes(dense, ids, lengths)
        want = engines[0].predict(body)
        for client, mod in ((g, tgrpc), (h, thttp)):
            for given in (body, None):  # BYTES, then plain tensors: bit for bit as in process
                got = client.infer("ctr", inputs(mod, dense, ids, lengths, given)).as_numpy("scores")
                assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))

        # statuses: a malformed request names its input; an unknown model is NOT_FOUND / 404
        torn = inputs(tgrpc, dense, ids, lengths, body[: len(body) // 2])
        with pytest.raises(InferenceServerException) as bad:
            g.infer("ctr", torn)
        assert bad.value.status() == "StatusCode.INVALID_ARGUMENT" and "'request'" in bad.value.message()
        short = inputs(thttp, dense[:, :5].copy(), ids, lengths, None)
        with pytest.raises(InferenceServerException) as bad_http:
            h.infer("ctr", short)
        assert bad_http.value.status() == "400" and "'dense'" in bad_http.value.message()
        with pytest.raises(InferenceServerException) as unknown:
            g.infer("nope", inputs(tgrpc, dense, ids, lengths, body))
        assert unknown.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as unknown_http:
            h.get_model_metadata("nope")
        assert unknown_http.value.status() == "404"

        # versions: what the dense sync and rollback do, over the management routes
        with HttpManagement(f"http://127.0.0.1:{http_port}/persia") as management:
            management.register("ctr2.mar", "ctr")
            with pytest.raises(ManagementError) as twice:
                management.register("ctr2.mar", "ctr")
            assert twice.value.status == 409
            assert h.get_model_metadata("ctr", "2")["versions"] == ["1", "2"]
            assert np.array_equal(g.infer("ctr", inputs(tgrpc, dense, ids, lengths, body), "2")
                                  .as_numpy("scores"), engines[1].predict(body))
            management.set_default("ctr", "2")
            answer = h.infer("ctr", inputs(thttp, dense, ids, lengths, body)).get_response()
            assert answer["model_version"] == "2"
            management.unregister("ctr", "1")
            assert [d["modelVersion"] for d in management.describe("ctr/all")] == ["2"]
        metrics = h._get("metrics", None, None).read().decode()  # Prometheus text
        assert 'persia_oip_requests_total{model="ctr",protocol="grpc",status="OK"}' in metrics

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, out_path.read_text()[-3000:]
    finally:
        g.close()
        h.close()
        if proc.poll() is None:
            stop_pid(proc)
        engine_client.close()


def test_generated_protos_are_current(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "inference/oip_protos/generate.sh"), str(tmp_path)], check=True)
    for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi"):
        assert filecmp.cmp(tmp_path / "inference/oip_protos" / name, ROOT / "inference/oip_protos" / name,
                           shallow=False), f"{name} is stale: run inference/oip_protos/generate.sh"


def test_dense_sync_and_rollback_drive_the_kserve_frontend(
        tmp_path: Path, embedding_cluster_factory: Callable[..., EmbeddingCluster]) -> None:
    """Versions activate once their sparse positions are on every shard, in well under a
    second; keep_versions holds; a version the model cannot serve is refused and the previous
    one keeps serving; rollback loads an unloaded version again from storage."""
    cluster = embedding_cluster_factory(2, name="dense", model="ctr",
                                        persia_inc={"loader": {"rescan_interval_s": 0.5}})
    give_rows(cluster)
    config = load_config(cluster.config_path)
    store_dir = tmp_path / "model-store"
    frontend = KServeFrontend(cluster.config_path, store_dir, KServeSettings(http_port=0, grpc_port=0))
    address = f"127.0.0.1:{frontend.start().http_port}"
    settings = dataclasses.replace(config.persia_inc.loader, dense_sync=DenseSyncSettings(
        enabled=True, frontend="kserve", management_address=address, model_name="ctr",
        model_store=str(store_dir), keep_versions=1, interval_s=0.05, retire_grace_s=0.0))
    staging, store, client = open_store(str(tmp_path / "staging")), config.open_store(), cluster.client()
    producer = producer_from_config(config, store=staging, producer_id="trainer-0")
    producer.register_table("C1", lambda signs: np.ones((signs.size, 16), np.float32), dim=16)
    loader = loader_from_config(config, client, settings=settings).start()
    sync = loader.dense_sync
    assert sync is not None
    dense, ids, lengths = sample(3)
    body = as_bytes(dense, ids, lengths)
    g = tgrpc.InferenceServerClient(frontend.grpc_target)

    def serves(module: torch.nn.Module) -> bool:
        want = PersiaInference(module, SPEC, client.lookup_tables).predict(body)
        got = g.infer("ctr", inputs(tgrpc, dense, ids, lengths, body)).as_numpy("scores")
        return np.array_equal(got, want)

    try:
        modules = [build_model(SPEC, seed=s) for s in (1, 2)]
        for version, module in enumerate(modules, start=1):
            producer.record("C1", np.arange(10 * version, dtype=np.uint64))
            published = publish_mar(producer, module, SPEC)
            ship(staging, store, "ctr/_dense/")  # the dense part first: it waits for its packets
            if version == 2:
                wait_until(lambda r=sync.rounds: sync.rounds >= r + 3, "three dense-sync rounds",
                           timeout_s=60)
                assert sync.active == 1 and sync.versions[2].waiting_for
            ship(staging, store, "ctr/~cuts/")
            wait_until(lambda v=version: sync.active == v, f"version {version} to activate", timeout_s=60)
            assert serves(module) and sync.versions[version].validated  # its versioned infer answered
            active = sync.activations[-1]
            assert active["activated_at_ns"] - published.manifest.exported_at_ns < 5e9
        wait_until(lambda: sync.versions[1].state == "retired", "version 1 to be unloaded", timeout_s=60)
        assert frontend.repository is not None and frontend.repository.versions("ctr") == ["2"]

        wrong = build_model(ModelSpec.per_feature({"C1": 16}, dense_dim=13), seed=3)  # not this spec's shape
        producer.record("C1", np.arange(5, dtype=np.uint64))
        producer.publish_dense(wrong, mar_exporter(SPEC))  # past publish_mar's own check
        ship(staging, store, "ctr/")
        wait_until(lambda: 3 in sync.versions and sync.versions[3].state == "refused", "version 3 refused",
                   timeout_s=60)
        assert sync.active == 2 and serves(modules[1])
        reason = sync.versions[3].reason
        assert "does not take its spec's inputs" in reason
        assert "The kserve frontend refused it (version 3 of the kserve frontend model 'ctr'" in reason
        assert "TorchServe" not in reason  # the reason names the frontend in use

        assert cli_main(["rollback", "--config", str(cluster.config_path), "--to", "1",
                         "--frontend", "kserve", "--management", address, "--model-name", "ctr",
                         "--model-store", str(store_dir)]) == 0
        assert serves(modules[0])
    finally:
        g.close()
        loader.close()
        producer.close()
        frontend.close()
        client.close()
        staging.close()
        store.close()


def ship(staging: ObjectStore, store: ObjectStore, prefix: str) -> None:
    """Copy what `staging` holds under `prefix` into `store`, a dense manifest last."""
    keys = sorted(info.key for info in staging.list(prefix) if not store.exists(info.key))
    for key in sorted(keys, key=lambda k: k.endswith("manifest.json")):
        store.put(key, staging.get(key))
