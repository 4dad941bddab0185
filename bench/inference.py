"""Inference benchmark: 128-row requests through TorchServe over gRPC (and HTTP) with two
embedding-server shards, next to the same handler logic called in-process on the same requests
in the same run; the ratio, and the in-process time split into decode, lookup, pool, forward.

Requests are the seed document's shape: 128 samples, 13 dense features, 26 sparse features of
16 ids each (53,248 signs, about 50k unique), ids drawn from 1M per feature; every row exists
on the shards (dim 16). Requests go one at a time (latency, not throughput); TorchServe runs
one worker with batch_size 1.

Printed and written to bench/results/inference.json.

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

SPEC = ModelSpec()
ROWS = 128
IDS_PER_FEATURE = 1_000_000


def make_requests(count: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """(request bodies, uint64[n] every table sign they use)."""
    rng = np.random.default_rng(seed)
    bodies, used = [], []
    for _ in range(count):
        sparse = [rng.integers(0, IDS_PER_FEATURE, (ROWS, 16), dtype=np.uint64) for _ in SPEC.sparse]
        dense = rng.random((ROWS, SPEC.dense_dim), dtype=np.float32)
        bodies.append(PersiaBatch().add_dense([dense])
                      .add_sparse(list(zip(SPEC.sparse, sparse, strict=True))).to_bytes())
        used += [SPEC.table_signs(f, s.reshape(-1)) for f, s in enumerate(sparse)]
    return bodies, np.unique(np.concatenate(used))


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
        bodies, signs = make_requests(args.requests + args.warmup)
        client = EmbeddingClient(servers)
        client.wait_ready(60)
        rows = np.random.default_rng(1).standard_normal((signs.size, SPEC.dim)).astype(np.float32)
        chunk = 1_000_000  # one packet per million rows: under gRPC's message limit
        for seq, lo in enumerate(range(0, signs.size, chunk)):
            client.apply(decode_packet(encode_packet(
                PacketHeader(model="ctr", table=SPEC.table, producer="bench", generation=0,
                             sequence=seq), signs[lo:lo + chunk], rows[lo:lo + chunk])))
        pt = save_torchscript(build_model(SPEC), work / "ctr.pt")
        engine = PersiaInference(load_torchscript(pt), SPEC, client.lookup)

        torchserve.start()
        archive_model("ctr", pt, SPEC, torchserve.model_store, config_file=config)
        with HttpManagement(torchserve.management_url) as mgmt:
            mgmt.register("ctr.mar")
        stub = get_inference_stub(torchserve.grpc_inference_target)

        warm, measured = bodies[:args.warmup], bodies[args.warmup:]
        for body in warm:
            engine.predict(body)
            infer(stub, "ctr", body)
            infer_http(torchserve.inference_url, "ctr", body)

        # the same requests, interleaved in rounds so drift hits every path alike
        grpc_t, http_t, local_t = [], [], []
        split = Timings()
        mismatches = 0
        for body in measured:
            t, (remote,) = timed(lambda b: infer(stub, "ctr", b), [body])
            grpc_t += t
            t, _ = timed(lambda b: infer_http(torchserve.inference_url, "ctr", b), [body])
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
        n = len(measured)
        result = {
            "requests": n, "rows_per_request": ROWS, "signs_per_request": ROWS * 26 * 16,
            "shards": 2, "torchserve_workers": 1, "batch_size": 1,
            "torchserve_grpc": percentiles(grpc_t),
            "torchserve_http": percentiles(http_t),
            "in_process": percentiles(local_t),
            "ratio_grpc_to_in_process_p50": round(float(np.median(grpc_t) / np.median(local_t)), 2),
            "ratio_grpc_to_in_process_p99": round(float(np.percentile(grpc_t, 99)
                                                        / np.percentile(local_t, 99)), 2),
            "in_process_split_mean_ms": {
                "decode": round(split.decode_s / n * 1e3, 3),
                "lookup (dedup + 2-shard gRPC)": round(split.lookup_s / n * 1e3, 3),
                "pool (embedding_bag sum)": round(split.pool_s / n * 1e3, 3),
                "forward (TorchScript MLP)": round(split.forward_s / n * 1e3, 3)},
            "torchserve_equals_in_process": mismatches == 0,
        }
        print(json.dumps(result, indent=2))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        client.close()
    finally:
        torchserve.stop()
        for proc in shards:
            proc.terminate()
            proc.wait(15)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
