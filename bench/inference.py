"""Inference benchmark: 128-row requests through TorchServe over gRPC (and HTTP) with two
embedding-server shards, next to the same handler logic called in-process on the same requests
in the same run; the ratio, and the in-process time split into decode, lookup, pool, forward.

Two table layouts of the same model and requests: `shared_table` (the seed's: 26 features in
one table `embedding`, prefixed signs) and `table_per_feature` (the demo's: tables C1..C26,
one per feature, ids as signs). Requests are the seed document's shape: 128 samples, 13 dense
features, 26 sparse features of 16 ids each (53,248 signs, about 50k unique), ids drawn from
1M per feature; every row exists on the shards (dim 16). Requests go one at a time (latency,
not throughput); TorchServe runs one worker per model with batch_size 1.

Printed and written to bench/results/inference.json (the top-level latency keys are the
shared table's, as before; `layouts` holds both).

Run: flock /tmp/persia-heavy.lock .venv/bin/python bench/inference.py [--requests N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.inference.archive import archive_model
from persia_inc.inference.batch import PersiaBatch
from persia_inc.inference.client import get_inference_stub, infer, infer_http
from persia_inc.inference.engine import PersiaInference, Timings
from persia_inc.inference.local import LocalTorchServe, free_port
from persia_inc.inference.management import HttpManagement
from persia_inc.inference.model import build_model, load_torchscript, save_torchscript
from persia_inc.inference.spec import ModelSpec
from persia_inc.packet_format import PacketHeader, decode_packet, encode_packet

ROOT = Path(__file__).resolve().parents[1]

SHARED = ModelSpec()
LAYOUTS = {"shared_table": SHARED,
           "table_per_feature": ModelSpec.per_feature({f"C{i + 1}": 16 for i in range(26)})}
ROWS = 128
IDS_PER_FEATURE = 1_000_000


def make_requests(spec: ModelSpec, count: int, seed: int = 0) -> tuple[list[bytes], dict[str, np.ndarray]]:
    """(request bodies, table -> uint64[n] every sign of it they use); the same ids for every
    layout with the same seed."""
    rng = np.random.default_rng(seed)
    bodies, used = [], []
    for _ in range(count):
        sparse = [rng.integers(0, IDS_PER_FEATURE, (ROWS, 16), dtype=np.uint64) for _ in spec.sparse]
        dense = rng.random((ROWS, spec.dense_dim), dtype=np.float32)
        bodies.append(PersiaBatch().add_dense([dense])
                      .add_sparse(list(zip(spec.sparse, sparse, strict=True))).to_bytes())
        used.append(spec.signs_by_table(dict(zip(spec.sparse, sparse, strict=True))))
    return bodies, {t: np.unique(np.concatenate([u[t] for u in used])) for t in used[0]}


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def timed(fn, bodies: list[bytes]) -> tuple[list[float], list[np.ndarray]]:
    times, outs = [], []
    for body in bodies:
        start = time.perf_counter()
        outs.append(fn(body))
        times.append(time.perf_counter() - start)
    return times, outs


def load_rows(client: EmbeddingClient, model: str, signs_by_table: dict[str, np.ndarray], dim: int
              ) -> None:
    """Give every sign a row: one packet per table and million rows (under gRPC's limit)."""
    rng = np.random.default_rng(1)
    seq = 0
    for table, signs in signs_by_table.items():
        rows = rng.standard_normal((signs.size, dim)).astype(np.float32)
        for lo in range(0, signs.size, 1_000_000):
            client.apply(decode_packet(encode_packet(
                PacketHeader(model=model, table=table, producer="bench", generation=0, sequence=seq),
                signs[lo:lo + 1_000_000], rows[lo:lo + 1_000_000])))
            seq += 1


def measure(name: str, spec: ModelSpec, args: argparse.Namespace, work: Path, servers: list[str],
            config: Path, torchserve: LocalTorchServe) -> dict[str, object]:
    """One layout: rows loaded, .mar registered, the same requests through every path."""
    bodies, signs = make_requests(spec, args.requests + args.warmup)
    client = EmbeddingClient(servers)
    client.wait_ready(60)
    load_rows(client, "ctr", signs, 16)
    pt = save_torchscript(build_model(spec), work / f"{name}.pt")
    engine = PersiaInference.from_client(load_torchscript(pt), spec, client)
    archive_model(name, pt, spec, torchserve.model_store, config_file=config)
    with HttpManagement(torchserve.management_url) as mgmt:
        mgmt.register(f"{name}.mar")
    stub = get_inference_stub(torchserve.grpc_inference_target)

    warm, measured = bodies[:args.warmup], bodies[args.warmup:]
    for body in warm:
        engine.predict(body)
        infer(stub, name, body)
        infer_http(torchserve.inference_url, name, body)

    # the same requests, interleaved so drift hits every path alike
    grpc_t, http_t, local_t = [], [], []
    split = Timings()
    mismatches = 0
    for body in measured:
        t, (remote,) = timed(lambda b: infer(stub, name, b), [body])
        grpc_t += t
        t, _ = timed(lambda b: infer_http(torchserve.inference_url, name, b), [body])
        http_t += t
        t, (local,) = timed(engine.predict, [body])
        local_t += t
        last = engine.last_timings
        split.decode_s += last.decode_s
        split.lookup_s += last.lookup_s
        split.pool_s += last.pool_s
        split.forward_s += last.forward_s
        mismatches += int(not np.array_equal(remote, local))
    stub.channel.close()
    client.close()
    n = len(measured)
    return {
        "tables": len(spec.tables), "requests": n,
        "torchserve_grpc": percentiles(grpc_t),
        "torchserve_http": percentiles(http_t),
        "in_process": percentiles(local_t),
        "ratio_grpc_to_in_process_p50": round(float(np.median(grpc_t) / np.median(local_t)), 2),
        "ratio_grpc_to_in_process_p99": round(float(np.percentile(grpc_t, 99)
                                                    / np.percentile(local_t, 99)), 2),
        "in_process_split_mean_ms": {
            "decode": round(split.decode_s / n * 1e3, 3),
            # LookupTables: per-table dedup, both shards concurrently, once for all tables
            "lookup (dedup + 2-shard gRPC)": round(split.lookup_s / n * 1e3, 3),
            "pool (embedding_bag sum)": round(split.pool_s / n * 1e3, 3),
            "forward (TorchScript MLP)": round(split.forward_s / n * 1e3, 3)},
        "torchserve_equals_in_process": mismatches == 0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "inference.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    servers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({
        "PersiaInferConfig": {"servers": servers}, "incremental_dir": str(work / "inc"),
        "storage": "local", "persia_inc": {"model": "ctr"}}))
    shards = []
    for shard in range(2):
        with (work / f"shard{shard}.log").open("ab") as log:
            shards.append(subprocess.Popen(
                [sys.executable, "-m", "persia_inc.cli", "embedding-server", "--config", str(config),
                 "--shard", str(shard)], stdout=log, stderr=subprocess.STDOUT))
    torchserve = LocalTorchServe(work / "ts")
    try:
        torchserve.start()
        layouts = {name: measure(name, spec, args, work, servers, config, torchserve)
                   for name, spec in LAYOUTS.items()}
        shared, per_feature = layouts["shared_table"], layouts["table_per_feature"]
        result = {
            # the shared table's figures under the keys they always had
            "requests": shared["requests"], "rows_per_request": ROWS, "signs_per_request": ROWS * 26 * 16,
            "shards": 2, "torchserve_workers": 1, "batch_size": 1,
            **{k: v for k, v in shared.items() if k not in ("tables", "requests")},
            "layouts": layouts,
            "ratio_table_per_feature_to_shared_p99": {
                path: round(per_feature[path]["p99_ms"] / shared[path]["p99_ms"], 2)  # type: ignore[index]
                for path in ("torchserve_grpc", "in_process")},
        }
        print(json.dumps(result, indent=2))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        torchserve.stop()
        for proc in shards:
            proc.terminate()
            proc.wait(15)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
