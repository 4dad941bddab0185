"""Producer benchmarks: record throughput vs Python sets; training-step overhead of the hook on
the example CTR model (bar: at most 5%), with and without the hook in alternating blocks of the
same run, flushing every 100k distinct rows per table; 1M-row flush to local disk and to Ceph
(the S3_ENDPOINT_URL gateway with --s3-uri, else a throwaway cluster started here).

    flock /tmp/persia-heavy.lock .venv/bin/python bench/producer.py [--steps 600] [--no-ceph]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from persia_inc.config import config_from_mapping
from persia_inc.producer import IncrementalProducer, SignBuffer


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


def bench_record_columns(rounds: int = 200, vocab: int = 300_000) -> None:
    """The torch hook's per-step call on a CTR id matrix [2048, 26] into 26 dense tables: one
    row-major pass (`record_columns`) vs a `record_many` of the 26 column views."""
    from train_ctr import make_producer

    rng = np.random.default_rng(1)
    matrices = [(rng.zipf(1.1, (2048, 26)) % vocab).astype(np.int64) for _ in range(rounds)]
    names = [f"C{i + 1}" for i in range(26)]
    with tempfile.TemporaryDirectory() as folder:
        producer = make_producer(folder, buffer_size=10**9, flush_interval_s=3600.0)
        for name in names:
            producer.register_table(name, lambda signs, out: None, dim=16, rows=vocab, reads_into=True)
        columns = {name: i for i, name in enumerate(names)}

        def fused() -> None:
            for m in matrices:
                producer.record_columns(m, columns)

        def per_table() -> None:
            for m in matrices:
                producer.record_many({name: m[:, i] for i, name in enumerate(names)})

        fused()
        per_table()
        t = {f.__name__: min(_time(f) for _ in range(3)) for f in (fused, per_table)}
        producer.close()
    print(f"record a [2048, 26] id matrix into 26 tables x {vocab:,} rows: record_columns "
          f"{t['fused'] / rounds * 1e3:.3f} ms/step, record_many of the columns "
          f"{t['per_table'] / rounds * 1e3:.3f} ms/step ({t['per_table'] / t['fused']:.1f}x; warm "
          f"cache, in training both pay cache misses on top)")


def _time(f) -> float:
    started = time.perf_counter()
    f()
    return time.perf_counter() - started


def bench_overhead(steps: int, block: int, vocab: int, folder: str) -> None:
    """Step time of the example CTR model with and without the hook, in alternating blocks.

    Each table flushes at 100k distinct rows (no interval flush); vocab and the Zipf ids are
    chosen so every table flushes several times during the measured steps. Batches are made
    outside the timed region. A with-hook block ends by waiting for the writer, so its
    background work cannot leak into the next without-hook block; that wait is charged to the
    hook twice over: at its wall time (an upper bound: it includes fsync waits, which overlap
    the steps in continuous training) and at the writer thread's CPU time in it (the work it
    would take from the training threads).
    """
    import torch
    from train_ctr import example_batch, example_model, make_producer

    from persia_inc.producer.torch_hook import IncrementalUpdateHook

    model = example_model(vocab, 16)  # seeded
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    producer = make_producer(folder, buffer_size=100_000, flush_interval_s=3600.0)
    producer.wait_generation(30)
    rng = np.random.default_rng(0)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    tables = model.named_tables()

    def writer_cpu_s() -> float:
        """CPU time of the writer thread (Linux: /proc per-thread stat, user + system)."""
        tid = producer.writer._thread.native_id
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def run(n: int, hooked: bool) -> tuple[list[float], float, float]:
        hook = IncrementalUpdateHook(producer, tables, optimizer) if hooked else None
        times = []
        for _ in range(n):
            dense, sparse, label = example_batch(rng, 2048, vocab)
            started = time.perf_counter()
            optimizer.zero_grad()
            loss_fn(model(dense, sparse), label).backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
        drained = drained_cpu = 0.0
        if hook is not None:
            hook.remove()
            started, cpu = time.perf_counter(), writer_cpu_s()
            producer.writer.drain()
            drained, drained_cpu = time.perf_counter() - started, writer_cpu_s() - cpu
        return times, drained, drained_cpu

    def packets() -> list[Path]:
        return sorted(Path(folder).rglob("*.arrow"))

    run(20, False)  # warm-up, excluded: until every table has flushed once, so the measured
    warm_up = 20    # steps see steady training (row buffers and write memory already in place)
    while len({p.parent.parent.name for p in packets()}) < len(tables) and warm_up < 1000:
        run(50, True)
        warm_up += 50
    before = set(packets())
    arms: dict[bool, list[float]] = {False: [], True: []}
    drain_s = drain_cpu_s = 0.0
    blocks = max(1, steps // block)
    for k in range(blocks):  # ABBA...: drift and the order of arms hit both alike
        for hooked in ((False, True) if k % 2 == 0 else (True, False)):
            times, drained, drained_cpu = run(block, hooked)
            arms[hooked] += times
            drain_s += drained
            drain_cpu_s += drained_cpu
    new = [p for p in packets() if p not in before]
    fresh = set(new)
    rows = sum(s.header.rows for s in producer.writer.stored if Path(folder, s.key) in fresh)
    buffered = sum(producer.buffered(t) for t in tables)
    producer.close()
    a, b = statistics.median(arms[False]), statistics.median(arms[True])
    ma = sum(arms[False]) / len(arms[False])
    mb = (sum(arms[True]) + drain_s) / len(arms[True])
    mc = (sum(arms[True]) + drain_cpu_s) / len(arms[True])
    n = len(arms[True])
    print(f"step time (batch 2048, 26 tables x {vocab:,} rows, dim 16, {n} steps per arm in "
          f"{blocks} alternating blocks of {block}, {warm_up + 20} warm-up steps excluded; torch as it "
          f"comes: {torch.get_num_threads()} intra-op threads on {os.cpu_count()} cores, the writer "
          f"thread shares them):")
    print(f"  median: without hook {a * 1e3:.2f} ms, with hook {b * 1e3:.2f} ms, "
          f"ratio {b / a:.3f} ({100 * (b / a - 1):+.1f}%)")
    print(f"  mean incl. flush steps, writer drain at wall time ({drain_s * 1e3:.0f} ms in all): "
          f"without {ma * 1e3:.2f} ms, with {mb * 1e3:.2f} ms, ratio {mb / ma:.3f} "
          f"({100 * (mb / ma - 1):+.1f}%)")
    print(f"  mean incl. flush steps, writer drain at its CPU time ({drain_cpu_s * 1e3:.0f} ms in all): "
          f"with {mc * 1e3:.2f} ms, ratio {mc / ma:.3f} ({100 * (mc / ma - 1):+.1f}%)")
    print(f"  flushes during the measured steps: {len(new)} packets, {rows:,} rows "
          f"(size trigger 100,000 distinct rows per table; {buffered:,} rows still buffered)")


def bench_flush(uri: str, storage: str, s3: dict | None = None, rows: int = 1_000_000,
                dim: int = 16) -> None:
    """One explicit flush of `rows` rows: read them, encode, store durably (fsync / S3 put)."""
    section: dict = {"model": "bench", "producer": {"close_on_exit": False, "close_on_sigterm": False}}
    if s3:
        section["s3"] = s3
    config = config_from_mapping({"enable_incremental_update": True, "incremental_buffer_size": rows + 1,
                                  "incremental_dir": uri, "storage": storage, "persia_inc": section})
    weight = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    with IncrementalProducer(config) as producer:
        producer.register_table("t", lambda s: weight[s.astype(np.int64)], rows=rows)
        if producer.wait_generation(30) is None:
            raise RuntimeError(f"no generation from {uri} within 30s")
        producer.record("t", np.arange(rows))
        started = time.perf_counter()
        if not producer.flush(timeout_s=300):
            raise RuntimeError(f"the flush to {uri} did not finish")
        elapsed = time.perf_counter() - started
        size = producer.writer.stored[-1].size
    print(f"flush of {rows:,} rows x {dim} to {storage}: "
          f"{elapsed:.2f}s, {rows / elapsed / 1e6:.2f} M rows/s, "
          f"{size / elapsed / 1e6:.0f} MB/s ({size / 1e6:.0f} MB packet)")


def bench_flush_ceph(s3_uri: str) -> None:
    """The 1M-row flush to Ceph: to `s3_uri` with the S3_ENDPOINT_URL / AWS_* environment, or,
    without S3_ENDPOINT_URL, to a throwaway single-node Ceph started (and stopped) here."""
    import dataclasses

    from persia_inc.storage.s3 import S3Settings

    cluster = None
    try:
        if os.environ.get("S3_ENDPOINT_URL"):
            settings = S3Settings(
                endpoint_url=os.environ["S3_ENDPOINT_URL"],
                region=os.environ.get("AWS_DEFAULT_REGION", ""),
                access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", ""),
                secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
            uri = s3_uri
            if not uri:
                raise SystemExit("S3_ENDPOINT_URL is set: give --s3-uri s3://bucket/prefix")
        else:
            from persia_inc.local_services import CephCluster

            print("starting a throwaway Ceph cluster (mon, osd, radosgw) ...", flush=True)
            cluster = CephCluster(Path(tempfile.mkdtemp(prefix="bench-ceph-"))).start()
            settings = cluster.s3_settings(read_timeout_s=60.0)
            uri = cluster.new_bucket("bench")
        bench_flush(uri, "ceph", dataclasses.asdict(settings))
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.workdir, ignore_errors=True)  # its 10 GB sparse disk file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="measured steps per arm")
    parser.add_argument("--block", type=int, default=50, help="steps per alternating block")
    parser.add_argument("--vocab", type=int, default=300_000, help="rows per embedding table")
    parser.add_argument("--s3-uri", default="", help="s3://bucket/prefix when S3_ENDPOINT_URL is set")
    parser.add_argument("--no-ceph", action="store_true", help="skip the flush to Ceph")
    args = parser.parse_args()
    bench_record()
    bench_record_columns()
    with tempfile.TemporaryDirectory() as folder:
        bench_overhead(args.steps, args.block, args.vocab, folder + "/overhead")
        bench_flush(folder + "/flush", "local")
    if not args.no_ceph:
        bench_flush_ceph(args.s3_uri)


if __name__ == "__main__":
    main()
