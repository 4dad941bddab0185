"""Inference benchmark: 128-row requests through TorchServe (gRPC, HTTP), the kserve frontend
(gRPC, HTTP) and in process, each stage of the in-process path printed beside its floor (the
cheapest way this machine does the same work), all measured in the same run, on the same requests,
interleaved (the paths in a new random order per request, so no path always follows the same one).

Two embedding-server shards (separate processes), two table layouts of the same model and
requests: `shared_table` (the seed's: 26 features in one table `embedding`, prefixed signs) and
`table_per_feature` (the demo's: tables C1..C26, ids as signs). Requests are the seed
document's shape: 128 samples, 13 dense features, 26 sparse features of 16 ids each (53,248
signs), ids drawn from 1M per feature; every row exists on the shards (dim 16). Requests go one
at a time (latency, not throughput).

Stages (the engine's `Timings`) and their floors:
- decode: reading the request bytes with pyarrow (open the IPC stream, read the batch);
- dedup: a hash-based unique (`pyarrow.compute.unique`) of each table's signs;
- lookup: one `EmbeddingClient.lookup` of the same 53,248 signs (in one table), and the servers'
  own handler time per LookupBlocks call (their Prometheus histogram; it leaves out gRPC and
  the reply's encoding);
- pool: one `embedding_bag` over rows already in memory;
- forward: the TorchScript module alone on ready tensors.
TorchServe runs beside a TorchServe model whose handler returns a constant (its own floor:
the frontend, the worker pipe and the request bytes, no work).
The Open Inference Protocol frontend (`persia-inc serve --frontend kserve`, a child process on
the same .mar) is called with tritonclient's gRPC and HTTP clients, the request bytes as the
BYTES input (`kserve_grpc`, `kserve_http`); its Done-when bound: gRPC p50 <= in-process p50 + 2 ms.

Printed and written to bench/results/inference.json: per layout, per path p50/p99/mean, per
stage p50/p99/mean and its share of the in-process mean, each floor's figures and the ratio.

Run: flock /tmp/persia-heavy.lock .venv/bin/python bench/inference.py [--requests N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import requests
import torch
import yaml
from torch.nn.functional import embedding_bag

from persia_inc.demo.kserve import KServeServed
from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.foundation.memory import keep_freed_memory
from persia_inc.inference.archive import archive_model
from persia_inc.inference.batch import PersiaBatch
from persia_inc.inference.client import get_inference_stub, infer, infer_http
from persia_inc.inference.engine import PersiaInference, Timings, serving_threads
from persia_inc.inference.local import LocalTorchServe, free_port
from persia_inc.inference.management import HttpManagement, RegisterOptions
from persia_inc.inference.model import build_model, load_torchscript, save_torchscript
from persia_inc.inference.spec import ModelSpec
from persia_inc.packet_format import PacketHeader, decode_packet, encode_packet
from persia_inc.wiring import MAR_HANDLER

ROOT = Path(__file__).resolve().parents[1]

SHARED = ModelSpec()
LAYOUTS = {"shared_table": SHARED,
           "table_per_feature": ModelSpec.per_feature({f"C{i + 1}": 16 for i in range(26)})}
ROWS = 128
IDS_PER_FEATURE = 1_000_000
CONSTANT_MODEL = "constant"
# a TorchServe handler that does no work: its answer is a constant of the real one's size
_CONSTANT_HANDLER = f'''"""Returns a constant: TorchServe's own floor (bench/inference.py)."""

ANSWER = "[" + ", ".join(["0.5"] * {ROWS}) + "]"


def handle(data, context):
    return None if data is None else [ANSWER for _ in data]
'''


@dataclasses.dataclass
class Request:
    """One request: its body and, per table, the signs it asks for (uint64[n_t])."""

    body: bytes
    signs_by_table: dict[str, np.ndarray]


def make_requests(spec: ModelSpec, count: int, seed: int = 0) -> tuple[list[Request], dict[str, np.ndarray]]:
    """(requests, table -> uint64[n] every sign of it they use); the same ids for every
    layout with the same seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        sparse = [rng.integers(0, IDS_PER_FEATURE, (ROWS, 16), dtype=np.uint64) for _ in spec.sparse]
        dense = rng.random((ROWS, spec.dense_dim), dtype=np.float32)
        pairs = list(zip(spec.sparse, sparse, strict=True))
        body = PersiaBatch().add_dense([dense]).add_sparse(pairs).to_bytes()
        out.append(Request(body, spec.signs_by_table(dict(zip(spec.sparse, sparse, strict=True)))))
    every = {t: np.unique(np.concatenate([r.signs_by_table[t] for r in out])) for t in out[0].signs_by_table}
    return out, every


def percentiles(samples_s: list[float] | np.ndarray) -> dict[str, float]:
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def clock(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


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


def server_seconds(metrics_urls: list[str], method: str) -> tuple[float, float]:
    """(sum of seconds, count) of `method` calls over the shards' latency histograms."""
    total = count = 0.0
    pattern = re.compile(r'persia_inc_embedding_rpc_seconds_(sum|count)\{method="' + method
                         + r'"\} ([0-9.e+-]+)')
    for url in metrics_urls:
        for kind, value in pattern.findall(requests.get(url, timeout=10).text):
            if kind == "sum":
                total += float(value)
            else:
                count += float(value)
    return total, count


def register_constant(torchserve: LocalTorchServe, work: Path, pt: Path, options: RegisterOptions) -> None:
    """The constant handler's .mar, registered under CONSTANT_MODEL."""
    with tempfile.TemporaryDirectory(prefix="bench-const-") as staging:
        handler = Path(staging) / "constant_handler.py"
        handler.write_text(_CONSTANT_HANDLER)
        from model_archiver.model_archiver_config import ModelArchiverConfig
        from model_archiver.model_packaging import generate_model_archive
        generate_model_archive(ModelArchiverConfig(
            model_name=CONSTANT_MODEL, handler=str(handler), version="1.0", serialized_file=str(pt),
            export_path=str(torchserve.model_store), force=True))
    with HttpManagement(torchserve.management_url) as mgmt:
        mgmt.register(f"{CONSTANT_MODEL}.mar", options=options)


def kserve_paths(served: KServeServed, model: str) -> tuple[dict[str, Callable[[bytes], np.ndarray]],
                                                           Callable[[], None]]:
    """The kserve frontend's paths through tritonclient (gRPC, HTTP with binary tensors both
    ways), the request bytes as the BYTES input `request`; and a function closing both clients."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    g = tgrpc.InferenceServerClient(served.grpc_target)
    h = thttp.InferenceServerClient(served.http_url.removeprefix("http://"))
    wanted = [thttp.InferRequestedOutput("scores", binary_data=True)]

    def call(client: Any, mod: Any, body: bytes, **kw: Any) -> np.ndarray:
        tensor = mod.InferInput("request", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([body], dtype=np.object_))
        return client.infer(model, [tensor], **kw).as_numpy("scores")

    def close() -> None:
        g.close()
        h.close()

    return {"kserve_grpc": lambda b: call(g, tgrpc, b),
            "kserve_http": lambda b: call(h, thttp, b, outputs=wanted)}, close


def stage_names() -> list[str]:
    return [f.name.removesuffix("_s") for f in dataclasses.fields(Timings)]


def measure(name: str, spec: ModelSpec, args: argparse.Namespace, work: Path, servers: list[str],
            metrics_urls: list[str], config: Path, torchserve: LocalTorchServe,
            options: RegisterOptions) -> dict[str, object]:
    """One layout: rows loaded, .mar registered, the same requests through every path and
    every floor, interleaved so drift hits all alike."""
    reqs, signs = make_requests(spec, args.requests + args.warmup)
    client = EmbeddingClient(servers)
    client.wait_ready(60)
    load_rows(client, "ctr", signs, 16)
    pt = save_torchscript(build_model(spec), work / f"{name}.pt")
    module = load_torchscript(pt)
    engine = PersiaInference.from_client(module, spec, client)
    # the same engine on a client that lends no lookup regions: everything through gRPC
    grpc_client = EmbeddingClient(servers, shared_memory=False)
    grpc_engine = PersiaInference.from_client(module, spec, grpc_client)
    archive_model(name, pt, spec, torchserve.model_store, handler=MAR_HANDLER, config_file=config)
    with HttpManagement(torchserve.management_url) as mgmt:
        mgmt.register(f"{name}.mar", options=options)
    stub = get_inference_stub(torchserve.grpc_inference_target)
    served = KServeServed(config, torchserve.model_store / f"{name}.mar", work / f"kserve-{name}",
                          name).start()
    kserve, close_kserve = kserve_paths(served, name)
    session = requests.Session()
    first_table = spec.tables[0].name
    weight = torch.randn(ROWS * 16 * len(spec.sparse), 16)
    sparse_in = torch.randn(spec.sparse_shape(ROWS))
    dense_in = torch.randn(ROWS, spec.dense_dim)

    paths: dict[str, Callable[[bytes], np.ndarray]] = {
        "torchserve_grpc": lambda b: infer(stub, name, b),
        "torchserve_constant_grpc": lambda b: infer(stub, CONSTANT_MODEL, b),
        "torchserve_http": lambda b: infer_http(torchserve.inference_url, name, b, session=session),
        "in_process": engine.predict,
        "in_process_grpc_only": grpc_engine.predict,
        **kserve,
    }

    def floors(req: Request) -> dict[str, float]:
        decoded = engine.decode(req.body)
        offsets = torch.from_numpy(decoded.bag_offsets)
        every = np.concatenate(list(req.signs_by_table.values()))
        out = {
            "decode": clock(lambda: pa.ipc.open_stream(pa.py_buffer(req.body)).read_next_batch())[0],
            "dedup": clock(lambda: [pc.unique(s) for s in req.signs_by_table.values()])[0],
            "lookup": clock(lambda: client.lookup(first_table, every))[0],
            "lookup_unique": clock(lambda: client.lookup_unique({first_table: every}))[0],
            "pool": clock(lambda: embedding_bag(torch.arange(decoded.signs.size), weight, offsets,
                                                mode="sum", include_last_offset=True))[0],
        }
        with torch.no_grad():
            out["forward"] = clock(lambda: module(dense_in, sparse_in))[0]
        return out

    for req in reqs[:args.warmup]:
        for fn in paths.values():
            fn(req.body)
        floors(req)

    times: dict[str, list[float]] = {p: [] for p in paths}
    stages: dict[str, list[float]] = {s: [] for s in stage_names()}
    floor_t: dict[str, list[float]] = {s: [] for s in ("decode", "dedup", "lookup", "lookup_unique",
                                                       "pool", "forward")}
    mismatches = kserve_mismatches = 0
    server_before = server_seconds(metrics_urls, "LookupBlocks")
    shuffle = np.random.default_rng(7)
    for req in reqs[args.warmup:]:
        results = {}
        # the paths in a new order per request: in a fixed order a path always meets its
        # process after the same others (the kserve frontend's gRPC call, always first after
        # its quiet time, took about 1 ms more than its HTTP call right after it)
        for path in shuffle.permutation(list(paths)):
            t, results[path] = clock(lambda f=paths[path], b=req.body: f(b))
            times[path].append(t)
            if path == "in_process":
                for stage, value in dataclasses.asdict(engine.last_timings).items():
                    stages[stage.removesuffix("_s")].append(value)
        mismatches += int(not np.array_equal(results["torchserve_grpc"], results["in_process"]))
        mismatches += int(not np.array_equal(results["in_process_grpc_only"], results["in_process"]))
        kserve_mismatches += sum(int(not np.array_equal(results[p], results["in_process"])) for p in kserve)
        for stage, t in floors(req).items():
            floor_t[stage].append(t)
    server_after = server_seconds(metrics_urls, "LookupBlocks")
    stub.channel.close()
    close_kserve()
    served.close()
    session.close()
    region_answers = client.counters()["region_answers"]
    client.close()
    grpc_client.close()

    n = len(reqs) - args.warmup
    in_process_mean = float(np.mean(times["in_process"]))
    stage_out: dict[str, dict[str, object]] = {}
    for stage, values in stages.items():
        entry: dict[str, object] = {**percentiles(values),
                                    "share_of_mean": round(float(np.mean(values)) / in_process_mean, 3)}
        if stage in floor_t:
            entry["floor"] = percentiles(floor_t[stage])
            entry["ratio_p50_to_floor"] = round(float(np.median(values) / np.median(floor_t[stage])), 2)
        stage_out[stage] = entry
    served = server_after[1] - server_before[1]
    server_mean_ms = (server_after[0] - server_before[0]) / served * 1e3 if served else float("nan")
    stage_out.setdefault("lookup", {})["servers_own_mean_ms"] = round(server_mean_ms, 3)
    # the same signs as one table through lookup_unique (which lends lookup regions, as the
    # engine's lookup does; `lookup` sends them through gRPC)
    stage_out["lookup"]["floor_lookup_unique"] = percentiles(floor_t["lookup_unique"])
    grpc, local, const = (np.asarray(times[p]) for p in ("torchserve_grpc", "in_process",
                                                         "torchserve_constant_grpc"))
    out: dict[str, object] = {
        "tables": len(spec.tables), "requests": n,
        **{path: percentiles(t) for path, t in times.items()},
        "ratio_grpc_to_in_process_p50": round(float(np.median(grpc) / np.median(local)), 2),
        "ratio_grpc_to_in_process_p99": round(float(np.percentile(grpc, 99) / np.percentile(local, 99)), 2),
        # the Done-when test: TorchServe p50 <= in-process p50 + constant-handler p50 + 1 ms
        "grpc_p50_over_in_process_plus_constant_ms": round(
            float(np.median(grpc) - np.median(local) - np.median(const)) * 1e3, 3),
        "ratio_in_process_to_one_lookup_p50": round(
            float(np.median(local) / np.median(floor_t["lookup"])), 2),
        "ratio_in_process_to_one_lookup_unique_p50": round(
            float(np.median(local) / np.median(floor_t["lookup_unique"])), 2),
        # lookup regions (embedding_server/regions.py) against the same engine through gRPC
        "ratio_in_process_to_grpc_only_p50": round(
            float(np.median(local) / np.median(times["in_process_grpc_only"])), 2),
        "region_answers": region_answers,
        "in_process_stages": stage_out,
        "torchserve_equals_in_process": mismatches == 0,
        # issue 26's Done-when: kserve gRPC p50 <= in-process p50 + 2 ms
        "kserve_grpc_p50_over_in_process_ms": round(
            float(np.median(times["kserve_grpc"]) - np.median(local)) * 1e3, 3),
        "kserve_http_p50_over_in_process_ms": round(
            float(np.median(times["kserve_http"]) - np.median(local)) * 1e3, 3),
        "kserve_equals_in_process": kserve_mismatches == 0,
    }
    if args.throughput:
        out["throughput"] = throughput(name, [r.body for r in reqs], torchserve, args)
    with HttpManagement(torchserve.management_url) as mgmt:
        mgmt.unregister(name)
    return out


def load(target: str, model: str, bodies: list[bytes], clients: int, seconds: float
         ) -> tuple[float, dict[str, float]]:
    """`clients` threads sending requests back to back for `seconds`, each on its own channel:
    (requests/s, latency percentiles)."""
    stubs = [get_inference_stub(target) for _ in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            started = time.perf_counter()
            infer(stubs[k], model, bodies[i % len(bodies)])
            latencies[k].append(time.perf_counter() - started)
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    for stub in stubs:
        stub.channel.close()
    every = [t for per in latencies for t in per]
    return len(every) / elapsed, percentiles(every)


def throughput(name: str, bodies: list[bytes], torchserve: LocalTorchServe,
               args: argparse.Namespace) -> dict[str, object]:
    """Requests/s through TorchServe gRPC at rising concurrency, per worker count; the best
    rate whose p99 stays at or under `--p99-budget-ms`. The load generator runs on the same
    two cores (its CPU is not free)."""
    out: dict[str, object] = {}
    for workers in (int(w) for w in args.throughput.split(",")):
        with HttpManagement(torchserve.management_url) as mgmt:
            mgmt.scale(name, workers)
        levels = {}
        for clients in (1, 2, 4, 8):
            rate, lat = load(torchserve.grpc_inference_target, name, bodies, clients, args.load_seconds)
            levels[clients] = {"requests_per_s": round(rate, 1), **lat}
            print(f"  {name}: {workers} worker(s), {clients} client(s): {rate:6.1f} req/s, "
                  f"p50 {lat['p50_ms']:.1f} p99 {lat['p99_ms']:.1f} ms", flush=True)
        within = [v for v in levels.values() if v["p99_ms"] <= args.p99_budget_ms]
        best = max(within, key=lambda v: v["requests_per_s"]) if within else None
        out[f"workers_{workers}"] = {
            "by_clients": levels,
            f"requests_per_s_at_p99_le_{args.p99_budget_ms:g}_ms": best["requests_per_s"] if best else 0.0}
    return out


def print_layout(name: str, result: dict[str, object]) -> None:
    print(f"\n== {name} ({result['tables']} tables, {result['requests']} requests)")
    for path in ("in_process", "in_process_grpc_only", "torchserve_grpc", "torchserve_constant_grpc",
                 "torchserve_http", "kserve_grpc", "kserve_http"):
        p = result[path]
        print(f"  {path:26s} p50 {p['p50_ms']:7.2f}  p99 {p['p99_ms']:7.2f}  mean {p['mean_ms']:7.2f} ms")  # type: ignore[index]
    print(f"  {'stage':10s} {'p50':>7s} {'p99':>7s} {'mean':>7s} {'share':>6s} "
          "| floor p50 p99 mean ms, ratio p50")
    for stage, s in result["in_process_stages"].items():  # type: ignore[attr-defined]
        line = (f"  {stage:10s} {s['p50_ms']:7.2f} {s['p99_ms']:7.2f} {s['mean_ms']:7.2f} "
                f"{s['share_of_mean']:6.1%}")
        if "floor" in s:
            f = s["floor"]
            line += (f" | {f['p50_ms']:6.2f} {f['p99_ms']:6.2f} {f['mean_ms']:6.2f}  "
                     f"x{s['ratio_p50_to_floor']}")
        if "servers_own_mean_ms" in s:
            line += (f"; servers' own mean {s['servers_own_mean_ms']:.2f}; one lookup_unique p50 "
                     f"{s['floor_lookup_unique']['p50_ms']:.2f}")
        print(line)
    print(f"  in process / through gRPC only p50: x{result['ratio_in_process_to_grpc_only_p50']} "
          f"({result['region_answers']} shard answers through lookup regions); "
          f"/ one lookup_unique p50: x{result['ratio_in_process_to_one_lookup_unique_p50']}")
    print(f"  in process / one lookup p50: x{result['ratio_in_process_to_one_lookup_p50']}; "
          "grpc p50 - (in process + constant) p50: "
          f"{result['grpc_p50_over_in_process_plus_constant_ms']} ms; "
          f"bit for bit: {result['torchserve_equals_in_process']}")
    print(f"  kserve gRPC p50 - in process p50: {result['kserve_grpc_p50_over_in_process_ms']} ms "
          f"(bound 2), HTTP: {result['kserve_http_p50_over_in_process_ms']} ms; "
          f"bit for bit: {result['kserve_equals_in_process']}")


def start_shards(work: Path, servers: list[str], metrics_base: int) -> tuple[Path, list[subprocess.Popen]]:
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({
        "PersiaInferConfig": {"servers": servers}, "incremental_dir": str(work / "inc"),
        "storage": "local",
        "persia_inc": {"model": "ctr", "embedding_server": {"metrics_port_base": metrics_base}}}))
    shards = []
    for shard in range(len(servers)):
        with (work / f"shard{shard}.log").open("ab") as log:
            shards.append(subprocess.Popen(
                [sys.executable, "-m", "persia_inc.cli", "embedding-server", "--config", str(config),
                 "--shard", str(shard)], stdout=log, stderr=subprocess.STDOUT))
    return config, shards


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated layouts")
    parser.add_argument("--workers", type=int, default=1, help="TorchServe workers per model")
    parser.add_argument("--batch-size", type=int, default=1, help="TorchServe batch_size")
    parser.add_argument("--max-batch-delay-ms", type=int, default=5, help="TorchServe max_batch_delay")
    parser.add_argument("--throughput", default="1,2",
                        help="TorchServe worker counts to load-test ('' skips the load test)")
    parser.add_argument("--load-seconds", type=float, default=5.0, help="seconds per load level")
    parser.add_argument("--p99-budget-ms", type=float, default=50.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "inference.json"))
    args = parser.parse_args()
    threads = serving_threads()  # as the handler does: OMP_NUM_THREADS, else 1
    keep_freed_memory()  # as the TorchServe and kserve workers do: in process pays no more page faults
    options = RegisterOptions(initial_workers=args.workers, batch_size=args.batch_size,
                              max_batch_delay_ms=args.max_batch_delay_ms)

    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    servers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    metrics_base = free_port()
    metrics_urls = [f"http://127.0.0.1:{metrics_base + s}/metrics" for s in range(len(servers))]
    config, shards = start_shards(work, servers, metrics_base)
    torchserve = LocalTorchServe(work / "ts")
    try:
        torchserve.start()
        register_constant(torchserve, work, save_torchscript(build_model(SHARED), work / "const.pt"), options)
        layouts = {}
        for name in args.layouts.split(","):
            layouts[name] = measure(name, LAYOUTS[name], args, work, servers, metrics_urls, config,
                                    torchserve, options)
            print_layout(name, layouts[name])
        result = {
            "command": "flock /tmp/persia-heavy.lock .venv/bin/python bench/inference.py "
                       + " ".join(sys.argv[1:]),
            "rows_per_request": ROWS, "signs_per_request": ROWS * 26 * 16, "shards": len(servers),
            "torch_threads": threads,
            "torchserve": {"workers": args.workers, "batch_size": args.batch_size,
                           "max_batch_delay_ms": args.max_batch_delay_ms},
            "layouts": layouts,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten to {args.out}")
    finally:
        torchserve.stop()
        for proc in shards:
            proc.terminate()
            proc.wait(15)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
