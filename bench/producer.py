"""Producer benchmarks: record throughput vs Python sets, training-step overhead of the hook,
flush throughput to local disk (and Ceph with --s3-uri + S3 env).

    flock /tmp/persia-heavy.lock .venv/bin/python bench/producer.py [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from persia_inc.config import config_from_mapping
from producer import IncrementalProducer, SignBuffer


def bench_record(rounds: int = 200) -> None:
    rng = np.random.default_rng(0)
    arrays = [(rng.zipf(1.2, 53_248) % 50_000_000).astype(np.uint64) for _ in range(rounds)]
    buffer = SignBuffer()
    def ours() -> None:
        for a in arrays:
            if buffer.insert(a) >= 100_000:
                buffer.swap()
    def py_list() -> None:
        s: set[int] = set()
        for a in arrays:
            s.update(a.tolist())
            if len(s) >= 100_000:
                s = set()
    def py_array() -> None:
        s: set = set()
        for a in arrays:
            s.update(a)
            if len(s) >= 100_000:
                s = set()
    ours()
    t = {f.__name__: min(_time(f) for _ in range(3)) for f in (ours, py_list, py_array)}
    per = t["ours"] / rounds * 1e3
    print(f"record 53,248 signs: {per:.3f} ms/call ({53_248 * rounds / t['ours'] / 1e6:.1f} M signs/s); "
          f"vs set.update(arr.tolist()) {t['py_list'] / t['ours']:.1f}x, "
          f"vs set.update(arr) {t['py_array'] / t['ours']:.1f}x")


def _time(f) -> float:
    started = time.perf_counter()
    f()
    return time.perf_counter() - started


def bench_overhead(steps: int, folder: str) -> None:
    import torch
    from train_ctr import CTRModel, make_producer, synthetic_batch

    from producer.torch_hook import IncrementalUpdateHook

    model = CTRModel(100_000, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    producer = make_producer(folder, buffer_size=100_000)
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(rng, 2048, 100_000) for _ in range(20)]
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def run(n: int) -> list[float]:
        times = []
        for i in range(n):
            dense, sparse, label = batches[i % len(batches)]
            started = time.perf_counter()
            optimizer.zero_grad()
            loss_fn(model(dense, sparse), label).backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
        return times

    run(5)
    without, with_hook = [], []
    tables = {f"C{i + 1}": t for i, t in enumerate(model.tables)}
    for _ in range(max(1, steps // 10)):  # interleave blocks so drift hits both alike
        without += run(10)
        hook = IncrementalUpdateHook(producer, tables, optimizer)
        with_hook += run(10)
        hook.remove()
    producer.close()
    a, b = statistics.median(without), statistics.median(with_hook)
    print(f"step time (batch 2048, 26 tables, dim 16): without hook {a * 1e3:.2f} ms, "
          f"with hook {b * 1e3:.2f} ms (median of {len(without)}): overhead {100 * (b / a - 1):+.1f}%")


def bench_flush(uri: str, storage: str, s3: dict | None = None, rows: int = 1_000_000, dim: int = 16) -> None:
    section = {"model": "bench", "producer": {"close_on_exit": False, "close_on_sigterm": False}}
    if s3:
        section["s3"] = s3
    config = config_from_mapping({"enable_incremental_update": True, "incremental_buffer_size": rows + 1,
                                  "incremental_dir": uri, "storage": storage, "persia_inc": section})
    weight = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    with IncrementalProducer(config) as producer:
        producer.register_table("t", lambda s: weight[s.astype(np.int64)])
        producer.wait_generation(30)
        producer.record("t", np.arange(rows))
        started = time.perf_counter()
        producer.flush()
        elapsed = time.perf_counter() - started
        size = producer.writer.stored[-1].size
    print(f"flush of {rows:,} rows x {dim} to {storage}: {elapsed:.2f}s, "
          f"{rows / elapsed / 1e6:.2f} M rows/s, "
          f"{size / elapsed / 1e6:.0f} MB/s ({size / 1e6:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--s3-uri", default="")
    args = parser.parse_args()
    bench_record()
    with tempfile.TemporaryDirectory() as folder:
        bench_overhead(args.steps, folder + "/overhead")
        bench_flush(folder + "/flush", "local")
    if args.s3_uri:
        bench_flush(args.s3_uri, "ceph")


if __name__ == "__main__":
    main()
