"""Producer benchmarks: record throughput vs Python sets; what the producer costs the training
job (the step overhead of the hook on the example CTR model: the process's CPU time per step
with the hook over without, bar: at most 5%, with a 95% interval; see `bench_overhead` for why
CPU time) and how fresh its packets are (flush -> packet durably stored on local disk, p50/p99,
on the demo's model and flush interval, under training load, with the O_DIRECT write path on
and off in interleaved blocks of one run); a 1M-row flush to local disk and to Ceph (the
S3_ENDPOINT_URL gateway with --s3-uri, else a throwaway cluster started here). Writes
bench/results/producer.json; the recorded result is the default settings' (a few minutes).

    flock /tmp/persia-heavy.lock .venv/bin/python bench/producer.py [--no-ceph]

The switchable piece (on by default; the `no_page_sink` arm turns it off; its step overhead
is measured with --overhead-arms all,no_page_sink):
  page_sink    size-hinted local writes encoded into page-aligned memory and written with
               O_DIRECT (off: streamed through the page cache)
Pieces judged and deleted (the PageSink's by-reference writes with alignment padding, the
block pool, the SCHED_IDLE writer) keep their figures under "decisions" in the results, which
a rerun carries over.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see bench_overhead

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from persia_inc.config import config_from_mapping
from persia_inc.demo import ctr
from persia_inc.producer import IncrementalProducer
from persia_inc.producer.signset import SignBuffer
from persia_inc.wiring import producer_from_config

RESULTS = Path(__file__).resolve().parent / "results" / "producer.json"
PIECES = ("page_sink",)
ALL_ON = frozenset(PIECES)
HOOKED_ARMS: dict[str, frozenset[str]] = {
    "all": ALL_ON, **{f"no_{piece}": ALL_ON - {piece} for piece in PIECES}}


def arm_producer(folder: str, on: frozenset[str], **kwargs: float) -> IncrementalProducer:
    """`ctr.make_producer(folder, **kwargs)` with only the pieces in `on` turned on."""
    producer = ctr.make_producer(folder, **kwargs)  # type: ignore[arg-type]
    if producer.wait_generation(30) is None:
        raise RuntimeError(f"no generation from {folder} within 30s")
    producer.store.direct_writes = "page_sink" in on
    return producer


def abba(names: list[str], rounds: int) -> Iterable[tuple[int, str]]:
    """(round, arm) in A B C .. C B A order, so drift and the order of arms hit all alike."""
    for k in range(rounds):
        for name in (names if k % 2 == 0 else names[::-1]):
            yield k, name


def bench_record(rounds: int = 200) -> dict:
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
    return {"ms_per_call": round(per, 3), "vs_set_update_tolist": round(t["py_list"] / t["ours"], 1),
            "vs_set_update_array": round(t["py_array"] / t["ours"], 1)}


def bench_record_columns(rounds: int = 200, vocab: int = 300_000) -> dict:
    """The torch hook's per-step call on a CTR id matrix [2048, 26] into 26 dense tables: one
    row-major pass (`record_columns`) vs a `record_many` of the 26 column views."""
    rng = np.random.default_rng(1)
    matrices = [(rng.zipf(1.1, (2048, 26)) % vocab).astype(np.int64) for _ in range(rounds)]
    names = [f"C{i + 1}" for i in range(26)]
    with tempfile.TemporaryDirectory() as folder:
        producer = ctr.make_producer(folder, buffer_size=10**9, flush_interval_s=3600.0)
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
    return {"record_columns_ms": round(t["fused"] / rounds * 1e3, 3),
            "record_many_ms": round(t["per_table"] / rounds * 1e3, 3)}


def _time(f) -> float:
    started = time.perf_counter()
    f()
    return time.perf_counter() - started


_BATCH_POOL = 200  # batches made once (making one takes about half a step); steps cycle them


def _thread_cpu_s(thread: object) -> float:
    """CPU time of one running thread (user + system, ns resolution: its POSIX CPU clock)."""
    ident = thread.ident  # type: ignore[attr-defined]
    return time.clock_gettime(time.pthread_getcpuclockid(ident)) if ident else 0.0


def _producer_cpu_s(producer: IncrementalProducer) -> tuple[float, float]:
    """(writer thread's CPU s, store threads' CPU s) of `producer`."""
    writer = producer.writer
    return (_thread_cpu_s(writer._thread),
            sum(_thread_cpu_s(t) for t in writer._store_threads))


def bench_overhead(rounds: int, block: int, vocab: int, folder: str,
                   arm_names: tuple[str, ...] = ("all",)) -> dict:
    """What the hook costs the example CTR model per step, in CPU time, without the hook and
    with it under each arm, in interleaved blocks (ABBA).

    The step overhead is the process's CPU time per step (every thread: the training thread,
    torch's intra-op threads, the producer's writer and store threads; the batches' making left
    out) with the hook over without it, minus 1, paired by round; its 95% interval is Student's
    t over the rounds. CPU time, not wall time, because wall time on this machine (2 cores
    shared with other jobs) swings ±20 points between rounds, and because the producer's
    background threads finish their work during the next steps: on cores training fills, the
    CPU they take is what training loses. It is an upper bound of the wall-time cost when a
    core is left to the producer. torch runs with OMP_WAIT_POLICY=PASSIVE unless the caller
    set it (set at the top of this file): with libgomp's default spin-wait an idle intra-op
    thread burns CPU while it waits, more when another process or the writer holds the other
    core, which made the per-round figure swing with the load of the machine; passive also
    makes the baseline smaller, so the ratio is the stricter one.

    Each arm has its own producer and replays one pool of batches in the same order, so the
    hooked arms flush at the same of their steps (a flush window of about 4 steps never spans
    the pool's 200). Each table flushes at 100k distinct rows over all tables
    (no interval flush). A hooked block ends by waiting for the writer (its CPU there is
    counted), so its background work does not leak into the next block. Also reported per
    arm: wall time (drain at its wall time), and the CPU split by thread: training threads,
    the writer thread (deferred row reads, sort, checks), the store threads (encode, checksum,
    write, fsync).
    """
    import torch

    from persia_inc.producer.torch_hook import IncrementalUpdateHook

    model = ctr.example_model(vocab, 16)  # seeded
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    tables = model.named_tables()
    names = ["no_hook", *arm_names]
    rng = np.random.default_rng(0)  # one pool of batches, replayed by every arm in the same order
    pool = [ctr.example_batch(rng, 2048, vocab) for _ in range(_BATCH_POOL)]
    cursors = dict.fromkeys(names, 0)
    producers = {name: arm_producer(f"{folder}/{name}", HOOKED_ARMS[name], buffer_size=100_000,
                                    flush_interval_s=3600.0)
                 for name in arm_names}

    def run(n: int, name: str) -> dict[str, float]:
        """One block: per step, wall ms (drain in), process CPU ms, the training threads',
        writer thread's and store threads' CPU ms (the batches' making left out)."""
        producer = producers.get(name)
        hook = IncrementalUpdateHook(producer, tables, optimizer) if producer else None
        at = cursors[name]
        batches = [pool[(at + i) % len(pool)] for i in range(n)]
        cursors[name] = at + n
        ours = [_producer_cpu_s(p) for p in producers.values()]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_started, started = time.process_time(), time.perf_counter()
        for dense, sparse, label in batches:
            optimizer.zero_grad()
            loss_fn(model(dense, sparse), label).backward()
            optimizer.step()
        if hook is not None and producer is not None:
            hook.remove()
            producer.writer.drain()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        after = resource.getrusage(resource.RUSAGE_SELF)
        spent = [tuple(b - a for a, b in zip(before, _producer_cpu_s(p), strict=True))
                 for before, p in zip(ours, producers.values(), strict=True)]
        writer, store = sum(s[0] for s in spent), sum(s[1] for s in spent)
        return {"wall_ms": wall / n * 1e3, "cpu_ms": cpu / n * 1e3,
                "training_cpu_ms": (cpu - writer - store) / n * 1e3,
                "writer_cpu_ms": writer / n * 1e3, "store_cpu_ms": store / n * 1e3,
                "system_cpu_ms": (after.ru_stime - usage.ru_stime) / n * 1e3,
                "page_faults": (after.ru_minflt - usage.ru_minflt) / n}

    def stored(name: str) -> int:
        return len(producers[name].writer.stored)

    run(20, "no_hook")  # warm-up, excluded: until every table of every arm has flushed once,
    warm_up = 20        # so the measured steps see steady training (buffers in place)
    for name, producer in producers.items():
        steps = 0
        while len({t.name for s in producer.writer.stored for t in s.header.tables}) < len(tables) \
                and steps < 1000:
            run(50, name)
            steps += 50
        warm_up = max(warm_up, steps)
    before = {name: stored(name) for name in producers}
    blocks: dict[str, list[dict]] = {name: [] for name in names}
    for k, name in abba(names, rounds):
        blocks[name].append({"round": k, **run(block, name)})
    flushed = {name: stored(name) - before[name] for name in producers}
    for producer in producers.values():
        producer.close()
    base = blocks["no_hook"]
    figures = ("wall_ms", "cpu_ms", "training_cpu_ms", "writer_cpu_ms", "store_cpu_ms",
               "system_cpu_ms", "page_faults")
    arms: dict[str, dict] = {}
    for name in names:
        arm: dict = {figure: round(statistics.mean(b[figure] for b in blocks[name]), 3)
                     for figure in figures}
        if name != "no_hook":
            per_round = [100 * (b["cpu_ms"] / a["cpu_ms"] - 1)
                         for a, b in zip(base, blocks[name], strict=True)]
            wall_round = [100 * (b["wall_ms"] / a["wall_ms"] - 1)
                          for a, b in zip(base, blocks[name], strict=True)]
            arm.update({
                "overhead_pct": round(statistics.mean(per_round), 2),
                "overhead_pct_ci95": ci95(per_round),
                "overhead_pct_sd": round(statistics.stdev(per_round), 2) if rounds > 1 else 0.0,
                "overhead_pct_per_round": [round(x, 2) for x in per_round],
                "split_pct": {  # of the no-hook arm's CPU per step, where the extra CPU went
                    part: round(100 * (arm[f"{part}_cpu_ms"] - arms["no_hook"][f"{part}_cpu_ms"])
                                / arms["no_hook"]["cpu_ms"], 2)
                    for part in ("training", "writer", "store")},
                "wall_overhead_pct": round(statistics.mean(wall_round), 2),
                "wall_overhead_pct_ci95": ci95(wall_round),
                "packets_while_measuring": flushed[name]})
        arm["blocks"] = [{key: round(v, 3) if isinstance(v, float) else v for key, v in b.items()}
                         for b in blocks[name]]
        arms[name] = arm
    print(f"step overhead (batch 2048, 26 tables x {vocab:,} rows, dim 16, a flush every 100k "
          f"distinct rows; {rounds} rounds of ABBA-ordered blocks of {block} steps per arm, up to "
          f"{warm_up} warm-up steps per arm excluded; torch: {torch.get_num_threads()} intra-op "
          f"threads on {os.cpu_count()} cores, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
          "): process CPU per step with the hook vs without, paired by round:")
    b = arms["no_hook"]
    print(f"  {'no_hook':<13} CPU {b['cpu_ms']:6.2f} ms/step, wall {b['wall_ms']:6.2f} ms/step; "
          f"system CPU {b['system_cpu_ms']:.2f} ms, {b['page_faults']:.0f} page faults per step")
    for name in arm_names:
        a = arms[name]
        low, high = a["overhead_pct_ci95"]
        wall_low, wall_high = a["wall_overhead_pct_ci95"]
        split = a["split_pct"]
        print(f"  {name:<13} CPU {a['cpu_ms']:6.2f} ms/step: overhead {a['overhead_pct']:+5.2f}% "
              f"(95% CI {low:+.2f}..{high:+.2f}, sd {a['overhead_pct_sd']:.1f} over rounds) = "
              f"training threads {split['training']:+.2f} + writer {split['writer']:+.2f} + "
              f"store {split['store']:+.2f} points; wall {a['wall_ms']:6.2f} ms/step, "
              f"{a['wall_overhead_pct']:+.1f}% (CI {wall_low:+.1f}..{wall_high:+.1f}); "
              f"{a['packets_while_measuring']} packets; system CPU {a['system_cpu_ms']:.2f} ms, "
              f"{a['page_faults']:.0f} page faults per step")
    return {"setup": {"model": "persia_inc.demo.ctr.example_model", "batch": 2048, "vocab": vocab,
                      "dim": 16, "tables": 26, "flush": "100,000 distinct rows over all tables",
                      "rounds": rounds, "block_steps": block, "warm_up_steps_per_arm": warm_up,
                      "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                      "overhead": "process CPU time per step (every thread, the end-of-block "
                                  "drain in, the batches' making out) with the hook over without, "
                                  "minus 1, per ABBA round; mean and Student-t 95% interval over "
                                  "the rounds"},
            "arms": arms}


def bench_freshness(rounds: int, seconds: float, folder: str) -> dict:
    """Flush -> packet durably stored (fsync + rename) on local disk, on the demo's shape: its
    CTR model (vocab 20k, batch 1024, Zipf 1.2), the hook, a flush every 0.5 s (every table at
    once: 26 packets), training flat out. One block per arm per round (ABBA). A block ends by
    training on without the hook until the writer has stored everything it was given, so the
    last packets are timed under load too. Freshness of a packet: its store time minus the
    created-at of its header (the flush), on the wall clock."""
    import torch

    from persia_inc.producer.torch_hook import IncrementalUpdateHook

    vocab, batch = 20_000, 1024
    model = ctr.CTRModel(vocab, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    rng = np.random.default_rng(2)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    tables = model.named_tables()
    samples: list[float] = []
    producers = {name: arm_producer(f"{folder}/{name}", on, buffer_size=vocab, flush_interval_s=0.5)
                 for name, on in HOOKED_ARMS.items()}
    for producer in producers.values():
        producer.writer.on_stored = lambda stored: samples.append(
            (time.time_ns() - stored.header.created_at_ns) / 1e6)

    def step() -> None:
        dense, sparse, label = ctr.synthetic_batch(rng, batch, vocab)
        optimizer.zero_grad()
        loss_fn(model(dense, sparse), label).backward()
        optimizer.step()

    def run(name: str, seconds: float) -> tuple[list[float], int]:
        samples.clear()
        producer = producers[name]
        hook = IncrementalUpdateHook(producer, tables, optimizer)
        steps, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            step()
            steps += 1
        hook.remove()
        while not producer.writer.drain(0):
            step()
        return list(samples), steps

    for name in producers:
        run(name, 1.5)  # warm-up: pools, files, the model's pages
    blocks: dict[str, list[dict]] = {name: [] for name in HOOKED_ARMS}
    for k, name in abba(list(HOOKED_ARMS), rounds):
        got, steps = run(name, seconds)
        blocks[name].append({"round": k, "steps": steps, "packets": len(got),
                             "p50_ms": round(float(np.percentile(got, 50)), 2),
                             "p99_ms": round(float(np.percentile(got, 99)), 2),
                             "samples_ms": [round(x, 2) for x in got]})
    for producer in producers.values():
        producer.close()
    arms = {}
    for name, arm_blocks in blocks.items():
        pooled = [x for b in arm_blocks for x in b["samples_ms"]]
        arms[name] = {"p50_ms": round(float(np.percentile(pooled, 50)), 2),
                      "p99_ms": round(float(np.percentile(pooled, 99)), 2),
                      "packets": len(pooled),
                      "steps_per_s": round(sum(b["steps"] for b in arm_blocks) / (seconds * rounds), 1),
                      "blocks": arm_blocks}
    base = arms["all"]
    print(f"freshness, flush -> stored on local disk (demo shape: vocab {vocab:,}, batch {batch}, "
          f"26 tables, flush every 0.5 s, training flat out; {rounds} rounds of ABBA-ordered "
          f"{seconds:.0f} s blocks per arm):")
    for name, a in arms.items():
        print(f"  {name:<15} p50 {a['p50_ms']:7.1f} ms (x{a['p50_ms'] / base['p50_ms']:.2f}), "
              f"p99 {a['p99_ms']:7.1f} ms (x{a['p99_ms'] / base['p99_ms']:.2f}), "
              f"{a['packets']} packets, {a['steps_per_s']:.0f} steps/s")
    return {"setup": {"model": "persia_inc.demo.ctr.CTRModel (the demo's)", "vocab": vocab,
                      "batch": batch, "tables": 26, "flush_interval_s": 0.5,
                      "rounds": rounds, "block_s": seconds,
                      "freshness": "wall time at store (after fsync and rename) minus the "
                                   "packet header's created-at (the flush)"},
            "arms": arms}


# two-sided 95% quantiles of Student's t by degrees of freedom (normal beyond the table)
_T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
         11: 2.20, 12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11, 18: 2.10, 19: 2.09,
         20: 2.09, 24: 2.06, 29: 2.05, 39: 2.02, 59: 2.00}


def ci95(samples: list[float]) -> list[float]:
    """The 95% confidence interval of the mean of `samples` (Student's t over the rounds)."""
    n = len(samples)
    if n < 2:
        return [float("-inf"), float("inf")]
    df = n - 1
    t = _T975.get(df) or next((v for k, v in sorted(_T975.items()) if k >= df), 1.96)
    mean, half = statistics.mean(samples), t * statistics.stdev(samples) / n ** 0.5
    return [round(mean - half, 2), round(mean + half, 2)]


def _paired(without: list[float], with_: list[float]) -> dict:
    """What a piece gains per round (without - with: positive is better with the piece), its
    mean, and the spread: two standard errors of that mean over the rounds."""
    gains = [a - b for a, b in zip(without, with_, strict=True)]
    spread = 2 * statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("inf")
    return {"with": round(statistics.mean(with_), 2), "without": round(statistics.mean(without), 2),
            "gain": round(statistics.mean(gains), 2), "spread_2se": round(spread, 2),
            "gain_per_round": [round(g, 2) for g in gains],
            "beyond_spread": statistics.mean(gains) > spread}


def judge(overhead: dict, freshness: dict) -> dict:
    """Per piece: with (all on) vs without (that piece off), paired by round."""
    verdicts = {}
    for piece in PIECES:
        off = f"no_{piece}"
        f_with, f_without = freshness["arms"]["all"]["blocks"], freshness["arms"][off]["blocks"]
        verdicts[piece] = {
            "freshness_p50_ms": _paired([b["p50_ms"] for b in f_without], [b["p50_ms"] for b in f_with]),
            "freshness_p99_ms": _paired([b["p99_ms"] for b in f_without], [b["p99_ms"] for b in f_with]),
        }
        if off in overhead["arms"]:  # the step-time arms ran it (--overhead-arms)
            verdicts[piece]["step_overhead_pct"] = _paired(
                overhead["arms"][off]["overhead_pct_per_round"],
                overhead["arms"]["all"]["overhead_pct_per_round"])
    print("each piece, with vs without (paired by round; gain > 0: better with it; spread: "
          "2 standard errors):")
    for piece, v in verdicts.items():
        parts = [f"{label} {v[key]['with']:.2f} vs {v[key]['without']:.2f} "
                 f"(gain {v[key]['gain']:+.2f} ± {v[key]['spread_2se']:.2f}"
                 f"{', beyond spread' if v[key]['beyond_spread'] else ''})"
                 for key, label in (("step_overhead_pct", "overhead %"),
                                    ("freshness_p50_ms", "fresh p50 ms"),
                                    ("freshness_p99_ms", "fresh p99 ms")) if key in v]
        print(f"  {piece:<12} " + "; ".join(parts))
    return verdicts


def bench_flush(uri: str, storage: str, s3: dict | None = None, rows: int = 1_000_000,
                dim: int = 16) -> dict:
    """One explicit flush of `rows` rows: read them, encode, store durably (fsync / S3 put)."""
    section: dict = {"model": "bench", "producer": {"close_on_exit": False, "close_on_sigterm": False}}
    if s3:
        section["s3"] = s3
    config = config_from_mapping({"enable_incremental_update": True, "incremental_buffer_size": rows + 1,
                                  "incremental_dir": uri, "storage": storage, "persia_inc": section})
    weight = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    with producer_from_config(config) as producer:
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
    return {"rows": rows, "dim": dim, "seconds": round(elapsed, 3), "packet_mb": round(size / 1e6, 1)}


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
    parser.add_argument("--rounds", type=int, default=60, help="ABBA rounds of the step-time arms")
    parser.add_argument("--block", type=int, default=50, help="steps per arm per round")
    parser.add_argument("--overhead-arms", default="all", help="hooked step-time arms, comma-"
                        f"separated, of {', '.join(HOOKED_ARMS)} (each adds a third to the time)")
    parser.add_argument("--vocab", type=int, default=300_000, help="rows per embedding table")
    parser.add_argument("--fresh-rounds", type=int, default=8, help="ABBA rounds of the freshness arms")
    parser.add_argument("--fresh-seconds", type=float, default=3.0, help="seconds per freshness block")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON (its 'decisions' are kept)")
    parser.add_argument("--s3-uri", default="", help="s3://bucket/prefix when S3_ENDPOINT_URL is set")
    parser.add_argument("--no-ceph", action="store_true", help="skip the flush to Ceph")
    args = parser.parse_args()
    results: dict = {"command": "bench/producer.py " + " ".join(sys.argv[1:]),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results["record"] = bench_record()
    results["record_columns"] = bench_record_columns()
    with tempfile.TemporaryDirectory() as folder:
        arms = tuple(a for a in args.overhead_arms.split(",") if a)
        unknown = [a for a in arms if a not in HOOKED_ARMS]
        if unknown or "all" not in arms:
            parser.error(f"--overhead-arms: {args.overhead_arms!r} must name 'all' and only "
                         f"arms of {', '.join(HOOKED_ARMS)}")
        results["step_overhead"] = bench_overhead(args.rounds, args.block, args.vocab,
                                                  folder + "/overhead", arms)
        results["freshness"] = bench_freshness(args.fresh_rounds, args.fresh_seconds,
                                               folder + "/freshness")
        results["pieces"] = judge(results["step_overhead"], results["freshness"])
        results["flush_local"] = bench_flush(folder + "/flush", "local")
    if not args.no_ceph:
        bench_flush_ceph(args.s3_uri)
    if args.out.exists():  # the decisions taken on earlier runs stay with their figures
        results["decisions"] = json.loads(args.out.read_text()).get("decisions", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
