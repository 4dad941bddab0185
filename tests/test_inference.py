"""Inference pieces that need no service: the request format and its validation, the model
spec, TorchScript saving, sum pooling against a plain numpy reference, and the generated
TorchServe stubs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from persia_inc.inference.batch import BatchError, PersiaBatch, decode_batch
from persia_inc.inference.engine import PersiaInference, per_table
from persia_inc.inference.local import JVM_OPTIONS
from persia_inc.inference.model import build_model, load_torchscript, save_torchscript, script
from persia_inc.inference.spec import ModelSpec, RequestLimits

SPEC = ModelSpec()


def seed_style_batch(rng: np.random.Generator, batch_size: int = 8, spec: ModelSpec = SPEC,
                     per_sample: int = 16) -> tuple[PersiaBatch, np.ndarray, list[list[np.ndarray]]]:
    """The seed document's example: 13 dense features, 26 sparse features of 16 signs."""
    dense = rng.random((batch_size, spec.dense_dim), dtype=np.float32)
    sparse = [[rng.integers(1_000_000, size=int(rng.integers(0, per_sample + 1))).astype(np.uint64)
               for _ in range(batch_size)] for _ in spec.sparse]
    batch = PersiaBatch()
    batch.add_dense([dense])
    batch.add_sparse([(name, sparse[f]) for f, name in enumerate(spec.sparse)])
    return batch, dense, sparse


def test_round_trip_keeps_every_sign_in_its_bag() -> None:
    rng = np.random.default_rng(0)
    batch, dense, sparse = seed_style_batch(rng)
    decoded = decode_batch(batch.to_bytes(), SPEC)
    assert decoded.rows == 8 and np.array_equal(decoded.dense, dense)
    assert decoded.bag_offsets.shape == (26 * 8 + 1,)
    for f in range(26):
        for i in range(8):
            j = f * 8 + i
            got = decoded.signs[decoded.bag_offsets[j]:decoded.bag_offsets[j + 1]]
            assert np.array_equal(got, SPEC.table_signs(f, sparse[f][i]))


def test_fixed_width_sparse_and_several_dense_arrays() -> None:
    spec = ModelSpec.shared_table(("a", "b"), dense_dim=5, prefix_bits=0)
    signs = np.arange(12, dtype=np.uint64).reshape(4, 3)
    body = (PersiaBatch().add_dense([np.ones((4, 2), np.float32), np.zeros((4, 3), np.float32)])
            .add_sparse([("a", signs), ("b", np.zeros((4, 0), np.uint64))]).to_bytes())
    decoded = decode_batch(body, spec)
    assert decoded.dense[:, :2].all() and not decoded.dense[:, 2:].any()
    assert np.array_equal(decoded.signs, signs.reshape(-1))
    assert list(decoded.bag_offsets) == [0, 3, 6, 9, 12, 12, 12, 12, 12]


def test_feature_prefix_separates_features() -> None:
    same = np.array([7, 2**63 + 7], np.uint64)
    a, b = SPEC.table_signs(0, same), SPEC.table_signs(1, same)
    assert not set(a) & set(b)
    assert (a >> np.uint64(56) == 1).all() and (b >> np.uint64(56) == 2).all()
    assert np.array_equal(ModelSpec.shared_table(prefix_bits=0).table_signs(3, same), same)
    assert ModelSpec.from_json(SPEC.to_json()) == SPEC


def _bad(body: bytes, spec: ModelSpec = SPEC) -> BatchError:
    with pytest.raises(BatchError) as info:
        decode_batch(body, spec)
    return info.value


def test_bad_requests_name_the_column() -> None:
    rng = np.random.default_rng(1)
    good, dense, sparse = seed_style_batch(rng)
    assert "not an Arrow IPC stream" in str(_bad(b"\x00garbage" * 10))
    assert "empty request body" in str(_bad(b""))
    assert "not an Arrow IPC stream" in str(_bad(good.to_bytes()[:-40]))

    fewer = PersiaBatch().add_dense([dense]).add_sparse(
        [(n, sparse[f]) for f, n in enumerate(SPEC.sparse[:25])])
    err = _bad(fewer.to_bytes())
    assert err.column == "feature26" and "26 sparse features" in str(err) and "has 25" in str(err)

    extra = PersiaBatch().add_dense([dense]).add_sparse(
        [*((n, sparse[f]) for f, n in enumerate(SPEC.sparse)), ("feature27", sparse[0])])
    assert _bad(extra.to_bytes()).column == "feature27"

    narrow = PersiaBatch().add_dense([dense[:, :12]]).add_sparse(
        [(n, sparse[f]) for f, n in enumerate(SPEC.sparse)])
    err = _bad(narrow.to_bytes())
    assert err.column == "dense" and "13 dense features" in str(err)

    # a sparse column of the wrong type
    table = pa.RecordBatch.from_pydict({
        "dense": pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), 13),
        **{n: pa.array([[1, 2]] * 8, pa.list_(pa.int64())) for n in SPEC.sparse}})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_batch(table)
    err = _bad(sink.getvalue().to_pybytes())
    assert err.column == "feature1" and "list<uint64>" in str(err)

    # null lists
    with_null = {n: pa.array([[1]] * 7 + [None], pa.list_(pa.uint64())) for n in SPEC.sparse}
    table = pa.RecordBatch.from_pydict({
        "dense": pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), 13), **with_null})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_batch(table)
    assert "null lists" in str(_bad(sink.getvalue().to_pybytes()))

    # two record batches
    batch = good.to_record_batch()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
        writer.write_batch(batch)
    assert "exactly one record batch" in str(_bad(sink.getvalue().to_pybytes()))


def _stream(columns: dict[str, pa.Array]) -> bytes:
    batch = pa.RecordBatch.from_pydict(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def test_a_known_schema_is_still_checked_for_order_and_nulls() -> None:
    """A schema seen before skips its column checks, never the columns' order or their nulls:
    the same columns reversed decode alike, and a null sign or dense value in a request of
    an accepted schema names its column."""
    rng = np.random.default_rng(5)
    good, dense, sparse = seed_style_batch(rng, batch_size=4)
    expected = decode_batch(good.to_bytes(), SPEC)
    batch = good.to_record_batch()
    reversed_body = _stream({n: batch.column(n) for n in reversed(batch.schema.names)})
    for _ in range(2):  # the second time from the accepted schemas
        got = decode_batch(reversed_body, SPEC)
        assert np.array_equal(got.signs, expected.signs) and np.array_equal(got.dense, dense)
        assert np.array_equal(got.bag_offsets, expected.bag_offsets)

    def body(null_sign: bool = False, null_dense: bool = False) -> bytes:
        values = dense.reshape(-1).tolist()
        if null_dense:
            values[5] = None
        columns = {"dense": pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), 13)}
        for f, name in enumerate(SPEC.sparse):
            lists = [[int(s) for s in signs] + [7] for signs in sparse[f]]
            columns[name] = pa.array([[*lists[0][:-1], None], *lists[1:]] if null_sign and f == 3
                                     else lists, pa.list_(pa.uint64()))
        return _stream(columns)

    assert decode_batch(body(), SPEC).signs.size == sum(len(s) + 1 for f in sparse for s in f)
    err = _bad(body(null_sign=True))
    assert err.column == "feature4" and "null signs" in str(err)
    err = _bad(body(null_dense=True))
    assert err.column == "dense" and "nulls" in str(err)


def test_limits_are_checked_before_use() -> None:
    rng = np.random.default_rng(2)
    body = seed_style_batch(rng, batch_size=8)[0].to_bytes()
    small = ModelSpec(limits=RequestLimits(max_bytes=len(body) - 1))
    assert "over the limit" in str(_bad(body, small))
    assert "8 samples is over" in str(_bad(body, ModelSpec(limits=RequestLimits(max_rows=4))))
    assert "signs is over" in str(_bad(body, ModelSpec(limits=RequestLimits(max_signs=10))))


def test_corrupted_offsets_are_rejected_not_read(tmp_path: Path) -> None:
    """Flip bytes all over a valid request: every outcome is a BatchError or a valid batch."""
    rng = np.random.default_rng(3)
    body = bytearray(seed_style_batch(rng, batch_size=4)[0].to_bytes())
    for _ in range(300):
        mutated = bytearray(body)
        for pos in rng.integers(0, len(body), 4):
            mutated[pos] = int(rng.integers(0, 256))
        try:
            decoded = decode_batch(bytes(mutated), SPEC)
        except BatchError:
            continue
        assert decoded.bag_offsets[-1] == decoded.signs.size


def test_save_torchscript_requires_pt(tmp_path: Path) -> None:
    model = build_model(SPEC)
    with pytest.raises(ValueError, match=r"\.pt"):
        save_torchscript(model, tmp_path / "model.pth")
    path = save_torchscript(model, tmp_path / "model.pt")
    loaded = load_torchscript(path)
    dense, sparse = torch.rand(3, 13), torch.rand(3, 26, 16)
    with torch.no_grad():
        assert torch.equal(loaded(dense, sparse), model(dense, sparse))
    assert loaded(dense, sparse).shape == (3,)


def test_engine_sum_pools_like_numpy_in_one_lookup_per_table() -> None:
    """The engine against an in-memory table: PERSIA's sum pooling, one lookup per table for
    the whole TorchServe batch (the client deduplicates)."""
    rng = np.random.default_rng(4)
    table: dict[int, np.ndarray] = {}
    calls: list[np.ndarray] = []

    def lookup(name: str, signs: np.ndarray) -> np.ndarray:
        assert name == "embedding"
        calls.append(signs)
        return np.stack([table.setdefault(int(s), rng.standard_normal(16).astype(np.float32))
                         for s in signs])

    model = build_model(SPEC)
    engine = PersiaInference(script(model), SPEC, per_table(lookup))
    batches = [seed_style_batch(rng, batch_size=n) for n in (5, 3)]
    bad = b"not arrow"
    results = engine.predict_many([batches[0][0].to_bytes(), bad, batches[1][0].to_bytes()])
    assert isinstance(results[1], BatchError)
    assert len(calls) == 1  # both good requests' signs in one call for the table

    for (_, dense, sparse), got in zip(batches, (results[0], results[2]), strict=True):
        pooled = np.zeros((dense.shape[0], 26, 16), np.float32)
        for f in range(26):
            for i in range(dense.shape[0]):
                for s in SPEC.table_signs(f, sparse[f][i]):
                    pooled[i, f] += table[int(s)]
        with torch.no_grad():
            want = model(torch.from_numpy(dense), torch.from_numpy(pooled)).numpy()
        assert got.shape == (dense.shape[0],) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    t = engine.last_timings
    assert t.decode_s > 0 and t.lookup_s > 0 and t.forward_s > 0


def test_engine_takes_read_only_rows_as_one_shard_returns_them() -> None:
    """A one-shard client returns a read-only view of the gRPC reply; torch must not warn
    (warnings are errors here, and a TorchServe worker would log one per request)."""
    rng = np.random.default_rng(5)

    def lookup(name: str, signs: np.ndarray) -> np.ndarray:
        rows = np.frombuffer(rng.standard_normal((signs.size, 16)).astype(np.float32).tobytes(),
                             np.float32).reshape(signs.size, 16)
        assert not rows.flags.writeable
        return rows

    engine = PersiaInference(script(build_model(SPEC)), SPEC, per_table(lookup))
    batch, dense, _ = seed_style_batch(rng, batch_size=4)
    [scores] = engine.predict_many([batch.to_bytes()])
    assert isinstance(scores, np.ndarray) and scores.shape == (dense.shape[0],)


def test_one_request_pools_as_a_batch_of_several_does() -> None:
    """One request takes the in-order path (its decoded signs and bags used as they are), a
    batch of several the general one: each request's pooled features are bit for bit alike,
    for one table per feature and for a shared table."""
    rng = np.random.default_rng(6)
    rows: dict[tuple[str, int], np.ndarray] = {}

    def lookup(name: str, signs: np.ndarray) -> np.ndarray:
        return np.stack([rows.setdefault((name, int(s)), rng.standard_normal(16).astype(np.float32))
                         for s in signs]).reshape(-1, 16)

    for spec in (SPEC, ModelSpec.per_feature({name: 16 for name in SPEC.sparse})):
        engine = PersiaInference(script(build_model(spec)), spec, per_table(lookup))
        one, other = (engine.decode(seed_style_batch(rng, n, spec)[0].to_bytes()) for n in (5, 3))
        dense, alone = engine.features([one])
        both = engine.features([one, other])[1]
        assert alone.shape == (5, 26, 16) and torch.equal(alone, both[:5]) and alone.abs().sum() > 0
        assert torch.equal(engine.features([other])[1], both[5:])
        assert np.array_equal(dense.numpy(), one.dense)


def test_torchserve_stubs_are_generated_from_the_jar(tmp_path: Path) -> None:
    from persia_inc.inference.protos import generate, stubs

    directory = generate(tmp_path)
    package = directory / "persia_inc_ts_protos"
    assert {p.name for p in package.glob("*_pb2*.py")} == {
        "inference_pb2.py", "inference_pb2_grpc.py", "management_pb2.py", "management_pb2_grpc.py"}
    assert generate(tmp_path) == directory  # cached
    protos = stubs()
    request = protos.inference_pb2.PredictionsRequest(model_name="m", input={"data": b"x"})
    assert request.input["data"] == b"x"
    assert hasattr(protos.management_pb2_grpc, "ManagementAPIsServiceStub")


def test_infra_torchserve_config_is_local_only() -> None:
    """The shipped local config binds to loopback, turns token auth off and the model API on."""
    root = Path(__file__).resolve().parent.parent / "infra" / "torchserve"
    props = {}
    for line in (root / "config.properties").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "true"
    assert props["enable_model_api"] == "true"
    assert props["vmargs"] == JVM_OPTIONS  # the JVM options LocalTorchServe starts with
    deploy = (root / "config.deploy.properties").read_text()
    assert "disable_token_authorization=false" in deploy
