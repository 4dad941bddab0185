"""The serving path end to end, against real processes on loopback: TorchServe (one per module,
stopped by PID), two embedding-server shards per test, and the loader.

The last test is the issue's "done when": a packet written to storage changes rows a request
uses, the loader applies it, and TorchServe's prediction becomes exactly what the in-process
handler computes with the new rows. `test_seed_request_example` runs the seed document's
request code (section 4) as written, with only its import lines ours, against the seed's
shared-table model and against a model of 26 tables of mixed dims.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from persia_inc.config import load_config
from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.embedding_server.errors import ShardError
from persia_inc.foundation.wait import WaitTimeoutError, wait_until
from persia_inc.handler import ConfiguredHandler
from persia_inc.inference.archive import archive_model
from persia_inc.inference.batch import PersiaBatch, decode_batch
from persia_inc.inference.client import (
    ADDRESS_ENV,
    INPUT_KEY,
    InferenceError,
    ModelNotRegisteredError,
    get_inference_stub,
    infer,
    infer_http,
)
from persia_inc.inference.engine import PersiaInference
from persia_inc.inference.local import LocalTorchServe
from persia_inc.inference.management import GrpcManagement, HttpManagement, ManagementError, RegisterOptions
from persia_inc.inference.model import build_model, load_torchscript, save_torchscript
from persia_inc.inference.protos import stubs
from persia_inc.inference.spec import CONFIG_ENV, SPEC_FILE, ModelSpec, spec_from_module
from persia_inc.local_services import EMBEDDING_TOKEN, EMBEDDING_TOKEN_ENV, EmbeddingCluster, stop_pid
from persia_inc.packet_format import PacketHeader, decode_packet, encode_packet, packet_key
from persia_inc.wiring import MAR_HANDLER

SPEC = ModelSpec()
TABLE, DIM = "embedding", 16
MODEL = "ctr"
ROWS = 128


class TwentySixTables(torch.nn.Module):
    """A model with one nn.Embedding per seed feature, a few of other widths than 16."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = torch.nn.ModuleDict({
            f"feature{i + 1}": torch.nn.Embedding(10, {2: 8, 7: 32, 19: 4}.get(i, 16))
            for i in range(26)})


# derived from the module, as the training side does: 26 tables, ids are their signs
MULTI = spec_from_module(TwentySixTables(), dense_dim=13,
                         tables={n: m for n, m in TwentySixTables().tables.items()})


@pytest.fixture(scope="module")
def dense_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_torchscript(build_model(SPEC, seed=7), tmp_path_factory.mktemp("model") / f"{MODEL}.pt")


@pytest.fixture(scope="module")
def multi_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_torchscript(build_model(MULTI, seed=8), tmp_path_factory.mktemp("multi") / "multi.pt")


def give_rows(cluster: EmbeddingCluster, spec: ModelSpec, signs_by_table: dict[str, np.ndarray],
              seed: int) -> None:
    """Random rows for the unique signs of every table, one packet per table."""
    rng = np.random.default_rng(seed)
    with cluster.client() as client:
        for seq, (table, signs) in enumerate(signs_by_table.items()):
            unique = np.unique(signs)
            client.apply(decode_packet(encode_packet(
                PacketHeader(model=MODEL, table=table, producer="p", generation=0, sequence=seq),
                unique, rng.standard_normal((unique.size, spec.table(table).dim)).astype(np.float32))))


def request(seed: int, rows: int = ROWS, spec: ModelSpec = SPEC) -> tuple[bytes, list[np.ndarray]]:
    """A seed-document-style request; returns (body, the raw signs of each feature:
    uint64[rows, 16])."""
    rng = np.random.default_rng(seed)
    sparse = [rng.integers(0, 5000, (rows, 16), dtype=np.uint64) for _ in spec.sparse]
    body = (PersiaBatch().add_dense([rng.random((rows, spec.dense_dim), dtype=np.float32)])
            .add_sparse(list(zip(spec.sparse, sparse, strict=True))).to_bytes())
    return body, sparse


def table_signs(sparse: list[np.ndarray]) -> np.ndarray:
    """uint64[n]: the unique table signs a request uses."""
    return np.unique(np.concatenate([SPEC.table_signs(f, s.reshape(-1)) for f, s in enumerate(sparse)]))


def publish(config_path: Path, sequence: int, signs: np.ndarray, rows: np.ndarray) -> str:
    """Store a packet as the training side does (atomic put under incremental_dir)."""
    config = load_config(config_path)
    header = PacketHeader(model=config.persia_inc.model, table=TABLE, producer="trainer-0",
                          generation=0, sequence=sequence)
    key = packet_key(header.model, header.table, header.producer, 0, sequence)
    store = config.open_store()
    try:
        store.put(key, encode_packet(header, signs, rows))
    finally:
        store.close()
    return key


def in_process(cluster: EmbeddingCluster, dense_pt: Path, spec: ModelSpec = SPEC
               ) -> tuple[PersiaInference, EmbeddingClient]:
    """The in-process engine on the cluster, and its client (close it)."""
    client = cluster.client()
    return PersiaInference.from_client(load_torchscript(dense_pt), spec, client), client


def make_cluster(factory: Callable[..., EmbeddingCluster], name: str) -> EmbeddingCluster:
    return factory(2, name=name, model=MODEL,
                   persia_inc={"loader": {"rescan_interval_s": 0.5, "watermark_poll_s": 0.5}})


# The seed document's request example (PERSIA inference document, section 4), verbatim; only
# the imports are ours (PERSIA's were `from persia.prelude import PyPersiaBatchData` and its
# gRPC client helpers).
SEED_IMPORTS = """\
import numpy as np

from persia_inc.inference.batch import PyPersiaBatchData
from persia_inc.inference.client import get_inference_stub, infer
"""
SEED_EXAMPLE = """\
batch_size = 128
feature_dim = 16
denses = [np.random.rand(batch_size, 13).astype(np.float32)]
sparse = []
for sparse_idx in range(26):
    sparse.append((
        f'feature{sparse_idx + 1}',
        [np.random.randint(1000000, size=feature_dim).astype(np.uint64) for _ in range(batch_size)]
    ))

batch_data = PyPersiaBatchData()
batch_data.add_dense(denses)
batch_data.add_sparse(sparse)

model_input = batch_data.to_bytes()
infer(get_inference_stub(), 'you_model_name', model_input)
"""


# --------------------------------------------------------------------------------- tests


def request_signs(spec: ModelSpec, body: bytes) -> dict[str, np.ndarray]:
    """table -> uint64[n] the table signs a request body uses."""
    decoded = decode_batch(body, spec)
    b, bags = decoded.rows, decoded.bag_offsets
    per_feature = {name: decoded.signs[bags[f * b]:bags[(f + 1) * b]] for f, name in enumerate(spec.sparse)}
    out: dict[str, list[np.ndarray]] = {}
    for name, signs in per_feature.items():
        out.setdefault(spec.feature_table(name).name, []).append(signs)
    return {table: np.concatenate(parts) for table, parts in out.items()}


@pytest.mark.parametrize("layout", ["shared table", "26 tables"])
def test_seed_request_example(layout: str, torchserve: LocalTorchServe, dense_pt: Path, multi_pt: Path,
                              monkeypatch: pytest.MonkeyPatch,
                              embedding_cluster_factory: Callable[..., EmbeddingCluster]) -> None:
    """The seed's code runs unchanged against TorchServe serving 'you_model_name' (the seed's
    shared-table model, or one of 26 tables of mixed dims); get_inference_stub() finds
    TorchServe through PERSIA_INC_INFERENCE_ADDRESS."""
    spec, pt = (SPEC, dense_pt) if layout == "shared table" else (MULTI, multi_pt)
    cluster = make_cluster(embedding_cluster_factory, "seed")
    archive_model("you_model_name", pt, spec, torchserve.model_store, handler=MAR_HANDLER,
                  config_file=cluster.config_path, check_config=load_config)
    monkeypatch.setenv(ADDRESS_ENV, torchserve.grpc_inference_target)
    program = ast.parse(SEED_IMPORTS + SEED_EXAMPLE, "<seed example>")
    *build, call = program.body  # run it all, in order; keep the value of the last line
    assert isinstance(call, ast.Expr) and ast.unparse(call).startswith("infer(get_inference_stub()")
    namespace: dict[str, object] = {}
    exec(compile(ast.Module(body=build, type_ignores=[]), "<seed example>", "exec"), namespace)
    model_input = namespace["model_input"]
    assert isinstance(model_input, bytes)

    # give half of the request's signs of every table rows, so the answer depends on them
    give_rows(cluster, spec, {t: np.unique(s)[::2] for t, s in request_signs(spec, model_input).items()}, 21)
    engine, client = in_process(cluster, pt, spec)
    try:
        with HttpManagement(torchserve.management_url) as mgmt:
            mgmt.register("you_model_name.mar")
            try:
                scores = eval(compile(ast.Expression(call.value), "<seed example>", "eval"), namespace)
            finally:
                mgmt.unregister("you_model_name")
        want = engine.predict(model_input)
        assert want.shape == (128,) and np.isfinite(want).all()
        assert isinstance(scores, np.ndarray) and np.array_equal(scores, want)
        no_rows = PersiaInference(engine.model, spec, lambda by_table: {
            t: np.zeros((s.size, spec.table(t).dim), np.float32) for t, s in by_table.items()})
        assert not np.array_equal(want, no_rows.predict(model_input))  # the rows mattered
    finally:
        client.close()


def test_multi_table_model_over_grpc_and_http(
        torchserve: LocalTorchServe, multi_pt: Path,
        embedding_cluster_factory: Callable[..., EmbeddingCluster]) -> None:
    """26 tables of dims 4, 8, 16 and 32: TorchServe (gRPC and HTTP) answers exactly what the
    in-process engine computes (up to float rounding when TorchServe batched requests into one
    forward); a bad request is an error naming the column for `infer` (INVALID_ARGUMENT) and
    HTTP (400), also when TorchServe batches it with good ones."""
    assert len(MULTI.tables) == 26 and sorted(set(MULTI.dims)) == [4, 8, 16, 32]
    assert MULTI.sparse_shape(3) == (3, sum(MULTI.dims))
    cluster = make_cluster(embedding_cluster_factory, "multi")
    bodies = [request(30 + i, rows, MULTI)[0] for i, rows in enumerate((ROWS, 1, 33))]
    give_rows(cluster, MULTI, request_signs(MULTI, bodies[0]), 31)
    archive_model("multi", multi_pt, MULTI, torchserve.model_store, handler=MAR_HANDLER,
                  config_file=cluster.config_path, check_config=load_config)
    engine, client = in_process(cluster, multi_pt, MULTI)
    stub = get_inference_stub(torchserve.grpc_inference_target)
    missing = (PersiaBatch().add_dense([np.zeros((4, 13), np.float32)])
               .add_sparse([(n, np.zeros((4, 1), np.uint64)) for n in MULTI.sparse if n != "feature8"])
               .to_bytes())
    try:
        with HttpManagement(torchserve.management_url) as mgmt:
            # batches of up to 4 requests, filled for up to 300 ms
            mgmt.register("multi.mar", options=RegisterOptions(batch_size=4, max_batch_delay_ms=300))
            try:
                wants = [engine.predict(body) for body in bodies]
                assert not np.array_equal(wants[0], engine.predict(request(99, ROWS, MULTI)[0]))
                for body, want in zip(bodies, wants, strict=True):
                    assert np.array_equal(infer(stub, "multi", body), want)
                    assert np.array_equal(infer_http(torchserve.inference_url, "multi", body), want)
                # all together, with a bad one: TorchServe batches them
                answers: dict[int, object] = {}

                def send(i: int, body: bytes) -> None:
                    try:
                        answers[i] = (infer(stub, "multi", body) if i % 2
                                      else infer_http(torchserve.inference_url, "multi", body))
                    except InferenceError as exc:
                        answers[i] = exc

                threads = [threading.Thread(target=send, args=(i, b))
                           for i, b in enumerate([*bodies, missing, missing])]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(60)
                for i, want in enumerate(wants):
                    # one forward over the batch: the MLP's float sums may round differently
                    assert isinstance(answers[i], np.ndarray), answers[i]
                    np.testing.assert_allclose(answers[i], want, rtol=1e-5, atol=1e-7)
                for i, status in ((3, "INVALID_ARGUMENT"), (4, 400)):
                    error = answers[i]
                    assert isinstance(error, InferenceError) and error.status == status, error
                    assert "column 'feature8': missing" in error.message
            finally:
                mgmt.unregister("multi")
    finally:
        stub.channel.close()
        client.close()


def test_register_infer_and_bad_requests(torchserve: LocalTorchServe, dense_pt: Path,
                                         embedding_cluster_factory: Callable[..., EmbeddingCluster]
                                         ) -> None:
    cluster = make_cluster(embedding_cluster_factory, "serve")
    body, sparse = request(1)
    signs = table_signs(sparse)
    rows = np.random.default_rng(2).standard_normal((signs.size, DIM)).astype(np.float32)
    with cluster.client() as client:
        client.apply(decode_packet(
            encode_packet(PacketHeader(model=MODEL, table=TABLE, producer="p", generation=0,
                                       sequence=0), signs, rows)))
    archive_model("served", dense_pt, SPEC, torchserve.model_store, handler=MAR_HANDLER,
                  config_file=cluster.config_path, check_config=load_config)
    engine, client = in_process(cluster, dense_pt)
    stub = get_inference_stub(torchserve.grpc_inference_target)
    try:
        with GrpcManagement(torchserve.grpc_management_target) as grpc_mgmt, \
                HttpManagement(torchserve.management_url) as http_mgmt:
            assert "registered" in grpc_mgmt.register("served.mar")
            assert "served" in http_mgmt.list_models() and "served" in grpc_mgmt.list_models()
            want = engine.predict(body)
            assert want.shape == (ROWS,) and np.isfinite(want).all()
            assert np.array_equal(infer(stub, "served", body), want)
            worker = int(http_mgmt.describe("served")[0]["workers"][0]["pid"])
            assert_serves_at_frontend_priority(worker, torchserve)
            assert np.array_equal(infer_http(torchserve.inference_url, "served", body), want)

            narrow = PersiaBatch().add_dense([np.zeros((4, 12), np.float32)]).add_sparse(
                [(n, np.zeros((4, 1), np.uint64)) for n in SPEC.sparse]).to_bytes()
            fewer = PersiaBatch().add_dense([np.zeros((4, 13), np.float32)]).add_sparse(
                [(n, np.zeros((4, 1), np.uint64)) for n in SPEC.sparse[:-1]]).to_bytes()
            cases = [(b"\x01not arrow at all", "not an Arrow IPC stream"),
                     (narrow, "column 'dense'"), (fewer, "column 'feature26': missing")]
            for bad, message in cases:
                # a generic gRPC client sees an error status, not an OK with an error inside
                with pytest.raises(grpc.RpcError) as raw:
                    stub.Predictions(stubs().inference_pb2.PredictionsRequest(
                        model_name="served", input={INPUT_KEY: bad}), timeout=30)
                assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raw.value
                assert message in raw.value.details()
                for send, status in ((lambda b: infer(stub, "served", b), "INVALID_ARGUMENT"),
                                     (lambda b: infer_http(torchserve.inference_url, "served", b), 400)):
                    with pytest.raises(InferenceError) as info:
                        send(bad)
                    assert info.value.status == status and message in info.value.message
                    assert info.value.message.startswith("bad request: ")
            # TorchServe 0.12 answers an unknown model with gRPC INTERNAL (naming its
            # ModelNotFoundException) and HTTP 404: both become the one clear error
            for send, status in ((lambda: infer(stub, "no-such-model", body), "INTERNAL"),
                                 (lambda: infer_http(torchserve.inference_url, "no-such-model", body), 404)):
                with pytest.raises(ModelNotRegisteredError,
                                   match="model 'no-such-model' is not registered") as info:
                    send()
                assert info.value.status == status and info.value.model_name == "no-such-model"
                assert "\n" not in str(info.value)
            with pytest.raises(ModelNotRegisteredError,
                               match="version 'v9' of model 'served' is not registered"):
                infer(stub, "served", body, model_version="v9")
            # the worker survived all of it
            assert np.array_equal(infer(stub, "served", body), want)

            assert "scaled" in http_mgmt.scale("served", 2).lower()
            assert len(http_mgmt.describe("served")[0]["workers"]) == 2
            assert "scaled" in grpc_mgmt.scale("served", 1).lower()
            assert np.array_equal(infer_http(torchserve.inference_url, "served", body), want)
            assert "unregistered" in http_mgmt.unregister("served")
            with pytest.raises(ManagementError) as refused:
                grpc_mgmt.unregister("served")
            assert refused.value.status == "NOT_FOUND" or "not found" in refused.value.message.lower()
    finally:
        stub.channel.close()
        client.close()


def assert_serves_at_frontend_priority(worker: int, torchserve: LocalTorchServe) -> None:
    """The worker was started by inference/worker_start.py, in a session of its own (its start
    ran at the lowest priority), and now serves at the frontend's priority."""
    assert torchserve.pid is not None
    assert "worker_start.py" in Path(f"/proc/{worker}/cmdline").read_text()
    assert os.getsid(worker) != os.getsid(torchserve.pid)
    assert os.getpriority(os.PRIO_PROCESS, worker) == os.getpriority(os.PRIO_PROCESS, torchserve.pid)
    groups = [Path(f"/proc/{pid}/autogroup").read_text().split()[-1]
              for pid in (worker, torchserve.pid) if Path(f"/proc/{pid}/autogroup").exists()]
    assert len(set(groups)) <= 1, groups  # the same autogroup nice


def test_handler_in_process_with_config_from_environment(
        tmp_path: Path, dense_pt: Path, monkeypatch: pytest.MonkeyPatch,
        embedding_cluster_factory: Callable[..., EmbeddingCluster]) -> None:
    """PersiaHandler without TorchServe: a .mar with no config inside, PERSIA_INC_CONFIG naming
    it, one TorchServe batch of [good, bad, good] -> two answers and one 400."""
    cluster = make_cluster(embedding_cluster_factory, "env")
    good1, sparse1 = request(3, rows=5)
    good2, _ = request(4, rows=7)
    some = table_signs(sparse1)[::2]  # half of request 1's signs have rows; the rest read as zeros
    with cluster.client() as client:
        client.apply(decode_packet(encode_packet(
            PacketHeader(model=MODEL, table=TABLE, producer="p", generation=0, sequence=0),
            some, np.full((some.size, DIM), 0.25, np.float32))))
    mar = archive_model("envmodel", dense_pt, SPEC, tmp_path / "store", handler=MAR_HANDLER)
    model_dir = tmp_path / "model_dir"
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(model_dir)
        assert SPEC_FILE in archive.namelist() and "global_config.yaml" not in archive.namelist()
    monkeypatch.setenv(CONFIG_ENV, str(cluster.config_path))
    import json

    from ts.context import Context, RequestProcessor  # inference.handler imported ts quietly
    from ts.utils.util import PredictionException

    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    context = Context("envmodel", str(model_dir), manifest, 3, None, "0.12.0", model_yaml_config={})
    handler = ConfiguredHandler()
    handler.initialize(context)
    try:
        assert handler.engine is not None and handler.engine.last_timings.total_s > 0  # warmed up
        assert handler.warm_up(SPEC) == 2
        context.request_processor = [RequestProcessor({}) for _ in range(3)]
        handler.context = context
        out = handler.postprocess(handler.inference(handler.preprocess(
            [{"data": bytearray(good1)}, {"body": bytearray(b"junk")}, {"batch": bytearray(good2)}])))
        assert len(out) == 3 and len(json.loads(out[0])) == 5 and len(json.loads(out[2])) == 7
        assert context.get_response_status(1)[0] == 400 and "bad request" in out[1]["error"]
        assert context.get_response_status(0)[0] == 200
        # a batch of bad requests only: one PredictionException(400), which TorchServe sends
        # as gRPC INVALID_ARGUMENT and HTTP 400 (the test against TorchServe checks that)
        context.request_processor = [RequestProcessor({}) for _ in range(2)]
        with pytest.raises(PredictionException) as refused:
            handler.preprocess([{"data": bytearray(b"junk")}, {"data": bytearray(b"junk")}])
        assert refused.value.error_code == 400
        assert refused.value.message.startswith("bad request: not an Arrow IPC stream")
        assert ";" not in refused.value.message  # the same error once
        engine, client = in_process(cluster, dense_pt)
        try:
            assert np.array_equal(np.asarray(json.loads(out[0]), np.float32), engine.predict(good1))
        finally:
            client.close()
    finally:
        handler.client.close()


def test_incremental_update_reaches_inference(
        tmp_path: Path, torchserve: LocalTorchServe, dense_pt: Path,
        embedding_cluster_factory: Callable[..., EmbeddingCluster]) -> None:
    """Done-when: storage -> loader -> embedding servers -> TorchServe changes its answer to
    exactly what the in-process handler computes with the new rows."""
    cluster = make_cluster(embedding_cluster_factory, "e2e")
    env = {**os.environ, EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN}
    with (tmp_path / "loader.log").open("ab") as log:
        loader = subprocess.Popen(
            [sys.executable, "-m", "persia_inc.cli", "loader", "--config", str(cluster.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    body, sparse = request(11)
    signs = table_signs(sparse)
    rng = np.random.default_rng(12)
    old_rows = rng.standard_normal((signs.size, DIM)).astype(np.float32)
    engine, client = in_process(cluster, dense_pt)
    stub = get_inference_stub(torchserve.grpc_inference_target)

    def wait_for_rows(expected: np.ndarray, what: str) -> None:
        def applied() -> bool:
            assert loader.poll() is None, (f"loader exited {loader.poll()}:\n"
                                           + (tmp_path / "loader.log").read_text()[-3000:])
            try:
                return np.array_equal(client.lookup(TABLE, signs), expected)
            except ShardError as exc:  # NOT_FOUND until the first packet creates the table
                assert exc.code == "NOT_FOUND", exc
                return False

        try:
            wait_until(applied, f"the loader to apply {what}", timeout_s=30, interval_s=0.1)
        except WaitTimeoutError as exc:
            raise AssertionError(f"{exc}:\n" + (tmp_path / "loader.log").read_text()[-3000:]) from None

    try:
        publish(cluster.config_path, 0, signs, old_rows)
        wait_for_rows(old_rows, "the first packet")
        archive_model("e2e", dense_pt, SPEC, torchserve.model_store, handler=MAR_HANDLER,
                      config_file=cluster.config_path, check_config=load_config)
        with HttpManagement(torchserve.management_url) as mgmt:
            mgmt.register("e2e.mar")
            before = infer(stub, "e2e", body)
            assert np.array_equal(before, engine.predict(body))

            # the training side changes the rows of sample 0's signs of every feature, and more
            touched = np.unique(np.concatenate(
                [SPEC.table_signs(f, s[0]) for f, s in enumerate(sparse)] + [signs[::3]]))
            new_rows = np.random.default_rng(13).standard_normal((touched.size, DIM)).astype(np.float32)
            new_rows[:, :] *= 3.0
            publish(cluster.config_path, 1, touched, new_rows)
            expected_table = old_rows.copy()
            expected_table[np.searchsorted(signs, touched)] = new_rows
            wait_for_rows(expected_table, "the update packet")

            after_grpc = infer(stub, "e2e", body)
            after_http = infer_http(torchserve.inference_url, "e2e", body)
            want = engine.predict(body)  # the in-process handler, reading the new rows
            assert np.array_equal(after_grpc, want) and np.array_equal(after_http, want)
            assert not np.array_equal(after_grpc, before)
            assert after_grpc[0] != before[0]  # sample 0: every feature's rows changed
            mgmt.unregister("e2e")
    finally:
        stub.channel.close()
        client.close()
        stop_pid(loader)
    assert loader.returncode == 0, (tmp_path / "loader.log").read_text()[-3000:]
