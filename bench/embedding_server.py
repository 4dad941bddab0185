"""Embedding-server benchmarks (the issue's bars), printed and written to
bench/results/embedding_server.json.

1. In-process table: apply and lookup of 1M random signs against a 10M-row dim-16 table, as
   a ratio to numpy scatter/gather of the same rows on a plain float32[10M, 16] array of
   random data, in the same run, interleaved, medians (bar: >= 0.5x).
2. Memory at 10M rows, dim 16: bytes per row, allocated and resident (bar: <= 1.5 x 72).
3. Two shard processes over gRPC on loopback: p50/p99 of a 53,248-sign lookup (128 samples x
   26 features x 16 ids, dim 16; bar p99 < 10 ms), and Apply throughput with 1M-row packets
   (bar >= 3M rows/s).
4. The same lookups while a writer applies 100k-row packets back to back, at full speed (no
   pacing; its rows/s are reported beside the ratio, and so are its rows/s alone): bar p99
   <= 2x the idle p99 of the same run. Idle and busy lookups alternate in rounds, so drift
   hits both alike. The writer runs in its own process, as the loader is deployed (a
   separate process from the inference clients): that is the shape being measured, not a
   trick. `same_process_writer` repeats the measurement with the writer as a thread of the
   lookup client's process (sharing its GIL), for comparison.
5. Cuts (key `cuts`), two shard processes: apply throughput (rows/s) of 26-table cuts (dims
   8..64), one Apply per shard (chunks over 24 MiB), against 26 per-table applies of the same
   rows, same run, interleaved, at 1k, 5k and 20k rows per table (goal >= 1.5x), and the cut
   without the 24 MiB message cap; the CPU each costs (client and servers together: a cut
   saves per-call work, and per-row work is the same for both); and LookupBlocks of a
   26-table request (128 signs per table) against 26 Lookup calls in turn: p50/p99 and their
   ratio.

This process and the servers keep freed memory for reuse, as the loader and the servers do
(foundation/memory.py); `--default-malloc` measures with glibc's defaults instead, under
`<figure>_default_malloc`.

Run: flock /tmp/persia-heavy.lock .venv/bin/python bench/embedding_server.py [--quick]
     [--only cuts] [--default-malloc]   (--only: one figure, its key updated in the results)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.embedding_server.table import EmbeddingTable, warm_up
from persia_inc.foundation.memory import OPT_OUT, keep_freed_memory
from persia_inc.foundation.net import free_port
from persia_inc.packet_format import Packet, PacketHeader
from persia_inc.packet_format.cut import Cut, CutHeader, TableRows

ROOT = Path(__file__).resolve().parents[1]

DIM = 16
REQUEST_SIGNS = 128 * 26 * 16
APPLY_PACKET_ROWS = 100_000  # rows per packet of the writer that runs during lookups


def medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function over `repeats` rounds after one warm-up round; every
    round runs each function once, in turn, so drift hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(t)) for name, t in times.items()}


def in_process(rows: int, batch: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    signs = np.unique(rng.integers(0, 2**64, int(rows * 1.001), dtype=np.uint64, endpoint=False))
    signs = rng.permutation(signs)[:rows]
    warm_up()
    table = EmbeddingTable(DIM, reserve=rows)
    started = time.perf_counter()
    step = 1_000_000
    for lo in range(0, rows, step):
        chunk = signs[lo:lo + step]
        table.upsert(chunk, rng.random((chunk.size, DIM), dtype=np.float32))
    build_s = time.perf_counter() - started
    # every array of the table, headroom included (RSS deltas proved unreliable here: the
    # allocator reuses and returns memory of the build's temporaries)
    memory = {"rows": len(table), "allocated_bytes_per_row": table.nbytes / rows,
              "raw_bytes_per_row": 72, "ratio": table.nbytes / rows / 72,
              "build_rows_per_s": rows / build_s}

    # The same rows on both sides: the fresh table handed out row ids in insertion order, so
    # signs[index] live in rows `index`. The plain array holds real data (a np.zeros array
    # never written reads the kernel's shared zero page, all cache hits), and both gathers
    # write into a preallocated output (values[index] would also time a fresh 64 MB
    # allocation and its page faults; it is reported separately).
    index = rng.integers(0, rows, batch)
    query = signs[index]
    values = rng.random((batch, DIM), dtype=np.float32)
    no_deletes = np.empty(0, np.uint64)
    out = np.empty((batch, DIM), np.float32)
    plain = rng.random((rows, DIM), dtype=np.float32)
    plain_out = np.empty((batch, DIM), np.float32)
    t = medians({
        "lookup": lambda: table.lookup(query, out),
        "gather": lambda: np.take(plain, index, axis=0, out=plain_out),
        "apply": lambda: table.apply(query, values, no_deletes),
        "scatter": lambda: plain.__setitem__(index, values),
        "fancy_gather": lambda: plain[index],
    }, repeats)
    return {
        "table_rows": rows, "batch": batch, "dim": DIM,
        "lookup_rows_per_s": batch / t["lookup"], "numpy_gather_rows_per_s": batch / t["gather"],
        "lookup_ratio": t["gather"] / t["lookup"],
        "apply_rows_per_s": batch / t["apply"], "numpy_scatter_rows_per_s": batch / t["scatter"],
        "apply_ratio": t["scatter"] / t["apply"],
        "numpy_gather": "np.take(plain, index, axis=0, out=...)",
        "numpy_fancy_gather_new_array_rows_per_s": batch / t["fancy_gather"],
        "memory": memory,
    }


def make_packet(sequence: int, signs: np.ndarray, rows: np.ndarray) -> Packet:
    header = PacketHeader(model="bench", table="emb", producer="bench", generation=0,
                          sequence=sequence, dim=DIM, rows=signs.size)
    return Packet(header=header, signs=signs, embeddings=rows, deleted=np.empty(0, np.uint64))


def _writer(servers: list[str], signs: list[np.ndarray], rows: list[np.ndarray], go: Any,
            stop: Any, parked: Any, applied: Any) -> None:
    """Apply the packets (signs[i]: uint64[k], rows[i]: float32[k, DIM]) round robin, back
    to back while `go` is set; `parked` is set while it waits; `applied` counts rows. Runs
    as a thread or, with multiprocessing's events and Value, as a process."""
    with EmbeddingClient(servers, max_message_bytes=512 * 1024 * 1024) as client:
        seq = 10_000
        while not stop.is_set():
            if not go.is_set():
                parked.set()
                go.wait(0.1)
                continue
            parked.clear()
            i = seq % len(signs)
            client.apply(make_packet(seq, signs[i], rows[i]))
            with applied.get_lock():
                applied.value += signs[i].size
            seq += 1


def during_apply(client: EmbeddingClient, servers: list[str], signs: np.ndarray,
                 packets: list[Packet], lookups: int, *, writer_process: bool,
                 rounds: int = 5) -> dict:
    """Lookup latency idle and while a writer applies 100k-row packets at full speed; idle
    and busy phases alternate over `rounds`."""
    rng = np.random.default_rng(2)
    ctx = multiprocessing.get_context("spawn")
    go, stop, parked, applied = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Value("q", 0)
    small_signs = [p.signs[:APPLY_PACKET_ROWS].copy() for p in packets]
    small_rows = [p.embeddings[:APPLY_PACKET_ROWS].copy() for p in packets]
    args = (servers, small_signs, small_rows, go, stop, parked, applied)
    writer = (ctx.Process(target=_writer, args=args) if writer_process
              else threading.Thread(target=_writer, args=args))
    writer.start()

    def latencies(n: int) -> list[float]:
        out = []
        for _ in range(n):
            query = signs[rng.integers(0, signs.size, REQUEST_SIGNS)]
            t0 = time.perf_counter()
            client.lookup("emb", query)
            out.append(time.perf_counter() - t0)
        return out

    def applying(seconds: float) -> float:
        """Let the writer run alone for `seconds`; its rows/s."""
        before, t0 = applied.value, time.perf_counter()
        time.sleep(seconds)
        return (applied.value - before) / (time.perf_counter() - t0)

    quiet: list[float] = []
    busy: list[float] = []
    busy_s = busy_rows = 0.0
    try:
        if not parked.wait(120):
            raise TimeoutError("the writer did not start")
        latencies(20)
        go.set()
        alone = applying(2.0)  # also warms the writer up
        go.clear()
        parked.wait(60)
        per_round = lookups // rounds
        for _ in range(rounds):
            parked.wait(60)
            quiet += latencies(per_round)
            go.set()
            first = applied.value
            while applied.value == first:  # the writer is at full speed from here
                time.sleep(0.001)
            before, t0 = applied.value, time.perf_counter()
            busy += latencies(per_round)
            busy_s += time.perf_counter() - t0
            busy_rows += applied.value - before
            go.clear()
    finally:
        go.clear()
        stop.set()
        writer.join(60)
    q, b = np.array(quiet) * 1000, np.array(busy) * 1000
    return {
        "lookups_idle": q.size, "lookups_during_apply": b.size,
        "lookup_p50_ms": float(np.percentile(q, 50)),
        "lookup_p99_ms": float(np.percentile(q, 99)),
        "lookup_during_apply_p50_ms": float(np.percentile(b, 50)),
        "lookup_during_apply_p99_ms": float(np.percentile(b, 99)),
        # the bar: lookup p99 while applies run at full speed <= 2x the idle p99
        "lookup_during_apply_p99_ratio": float(np.percentile(b, 99) / np.percentile(q, 99)),
        "apply_rows_per_s_during_lookups": busy_rows / busy_s,
        "apply_rows_per_s_alone": alone,
        "apply_packet_rows_during_lookups": APPLY_PACKET_ROWS,
        "writer": "own process" if writer_process else "thread of the lookup process",
    }


@contextlib.contextmanager
def shard_processes(count: int = 2, pids: list[int] | None = None) -> Iterator[list[str]]:
    """`count` embedding-server processes on loopback (512 MiB messages); their addresses
    (and their process ids appended to `pids`, when given)."""
    workdir = Path(tempfile.mkdtemp(prefix="persia-bench-"))
    servers = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    config = {"PersiaInferConfig": {"servers": servers}, "incremental_dir": str(workdir / "inc"),
              "persia_inc": {"embedding_server": {"max_message_bytes": 512 * 1024 * 1024}}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    procs = [subprocess.Popen([sys.executable, "-m", "persia_inc.cli", "--log-level", "WARNING",
                               "embedding-server", "--config", str(workdir / "config.yaml"),
                               "--shard", str(i)], cwd=ROOT) for i in range(count)]
    if pids is not None:
        pids.extend(proc.pid for proc in procs)
    try:
        yield servers
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def over_grpc(table_rows: int, lookups: int) -> dict:
    with shard_processes(2) as servers, \
            EmbeddingClient(servers, max_message_bytes=512 * 1024 * 1024) as client:
        client.wait_ready(120)
        rng = np.random.default_rng(1)
        signs = rng.integers(0, 2**64, table_rows, dtype=np.uint64, endpoint=False)
        batch = 1_000_000
        packets = [make_packet(i, signs[lo:lo + batch],
                               rng.random((min(batch, table_rows - lo), DIM), dtype=np.float32))
                   for i, lo in enumerate(range(0, table_rows, batch))]
        started = time.perf_counter()
        for p in packets:
            client.apply(p)
        insert_s = time.perf_counter() - started
        # steady-state apply: updates of existing rows, 1M-row packets
        started = time.perf_counter()
        for i, p in enumerate(packets):
            client.apply(make_packet(len(packets) + i, p.signs, p.embeddings))
        update_s = time.perf_counter() - started
        deployed = during_apply(client, servers, signs, packets, lookups, writer_process=True)
        same = during_apply(client, servers, signs, packets, lookups, writer_process=False)
    return {
        "servers": 2, "table_rows": table_rows, "dim": DIM,
        "apply_insert_rows_per_s": table_rows / insert_s,
        "apply_update_rows_per_s": table_rows / update_s,
        "lookup_signs": REQUEST_SIGNS,
        **deployed,
        "same_process_writer": same,
    }


CUT_TABLES = 26
CUT_DIMS = (8, 16, 24, 32, 40, 48, 56, 64)
SERVING_BATCH = 128  # signs per feature table in one serving request


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by this process and the processes `pids`."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def cpu_per_call(fns: dict, repeats: int, pids: list[int]) -> dict[str, float]:
    """CPU seconds per call of each function, this process's and the `pids`' together, over
    `repeats` calls in a row."""
    out = {}
    for name, fn in fns.items():
        before = cpu_seconds(pids)
        for _ in range(repeats):
            fn()
        out[name] = (cpu_seconds(pids) - before) / repeats
    return out


def cuts_over_grpc(sizes: tuple[int, ...], repeats: int, lookups: int) -> dict:
    """Figure 5: 26-table cuts against 26 per-table applies (at each of `sizes` rows per
    table), LookupTables against 26 Lookups."""
    from persia_inc.embedding_server import client as client_module

    rng = np.random.default_rng(5)
    names = [f"f{i:02d}" for i in range(CUT_TABLES)]
    dims = {name: CUT_DIMS[i % len(CUT_DIMS)] for i, name in enumerate(names)}
    none = np.empty(0, np.uint64)
    sequence = iter(range(1, 1 << 40))
    capped = client_module._CUT_MESSAGE_BYTES
    applies = []
    pids: list[int] = []
    with shard_processes(2, pids) as servers, \
            EmbeddingClient(servers, max_message_bytes=512 * 1024 * 1024) as client:
        client.wait_ready(120)
        for rows_per_table in sizes:
            signs = {n: rng.integers(0, 2**64, rows_per_table, dtype=np.uint64, endpoint=False)
                     for n in names}
            rows = {n: rng.random((rows_per_table, dims[n]), dtype=np.float32) for n in names}
            total = rows_per_table * CUT_TABLES

            def cut(signs: dict = signs, rows: dict = rows, cap: int = capped) -> None:
                client_module._CUT_MESSAGE_BYTES = cap  # type: ignore[attr-defined]
                header = CutHeader(model="bench", producer="cuts", generation=0,
                                   sequence=next(sequence))
                client.apply_cut(Cut(header, tuple(TableRows(n, signs[n], rows[n], none)
                                                   for n in names)))
                client_module._CUT_MESSAGE_BYTES = capped  # type: ignore[attr-defined]

            def per_table(signs: dict = signs, rows: dict = rows) -> None:
                seq = next(sequence)
                for n in names:
                    header = PacketHeader(model="bench", table=n, producer="tables", generation=0,
                                          sequence=seq, dim=dims[n], rows=signs[n].size)
                    client.apply(Packet(header=header, signs=signs[n], embeddings=rows[n],
                                        deleted=none))

            t = medians({"cut": cut, "per_table": per_table,
                         "cut_one_message": functools.partial(cut, cap=1 << 40)}, repeats)
            cpu = cpu_per_call({"cut": cut, "per_table": per_table}, repeats, pids)
            applies.append({
                "rows_per_table": rows_per_table, "rows_per_cut": total,
                "cut_bytes": sum(s.nbytes + r.nbytes for s, r in zip(signs.values(), rows.values(),
                                                                    strict=True)),
                "cut_apply_rows_per_s": total / t["cut"],
                "per_table_apply_rows_per_s": total / t["per_table"],
                # the goal: >= 1.5 (one Apply per shard for the cut, 26 per shard without)
                "cut_vs_per_table_ratio": t["per_table"] / t["cut"],
                # without the 24 MiB message cap: one message per shard however big
                "cut_one_message_rows_per_s": total / t["cut_one_message"],
                # CPU ms per apply, the client's and both servers' together (2 cores here):
                # what a cut saves is per-call work; per-row work is the same for both
                "cut_cpu_ms": cpu["cut"] * 1000, "per_table_cpu_ms": cpu["per_table"] * 1000,
                "cpu_ratio": cpu["per_table"] / cpu["cut"],
            })

        def query() -> dict[str, np.ndarray]:
            return {n: signs[n][rng.integers(0, rows_per_table, SERVING_BATCH)] for n in names}

        def one_call() -> None:
            client.lookup_tables(query())

        def many_calls() -> None:
            for name, q in query().items():
                client.lookup(name, q)

        one_call(), many_calls()  # warm up
        times: dict[str, list[float]] = {"lookup_tables": [], "lookups": []}
        for _ in range(lookups):  # alternate, so drift hits both alike
            for name, fn in (("lookup_tables", one_call), ("lookups", many_calls)):
                started = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - started) * 1000)
    p = {name: (float(np.percentile(v, 50)), float(np.percentile(v, 99)))
         for name, v in times.items()}
    return {
        "servers": 2, "tables": CUT_TABLES, "dims": sorted(set(dims.values())),
        "repeats": repeats, "cut_message_cap_bytes": capped,
        "apply": applies,
        "lookup_signs_per_table": SERVING_BATCH,
        "lookups": lookups,
        "lookup_tables_p50_ms": p["lookup_tables"][0],
        "lookup_tables_p99_ms": p["lookup_tables"][1],
        "lookup_26_calls_p50_ms": p["lookups"][0],
        "lookup_26_calls_p99_ms": p["lookups"][1],
        "lookup_p50_ratio": p["lookups"][0] / p["lookup_tables"][0],
        "lookup_p99_ratio": p["lookups"][1] / p["lookup_tables"][1],
        "lookup_baseline": "26 EmbeddingClient.lookup calls in turn (each reaches both shards)",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M-row table, fewer repeats")
    parser.add_argument("--only", choices=("in_process", "grpc", "cuts"),
                        help="run one figure; without --quick, update its key in the results")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave malloc as it is in this process and the servers (the loader "
                             "and servers keep freed memory: foundation/memory.py); results go "
                             "under <figure>_default_malloc")
    args = parser.parse_args()
    if args.default_malloc:
        os.environ[OPT_OUT] = "0"  # the servers, started by the CLI, inherit it
    keep_freed_memory()  # as the loader and the servers do (the client here stands for the loader)
    rows = 1_000_000 if args.quick else 10_000_000
    figures = {
        "in_process": lambda: in_process(rows, 1_000_000, 3 if args.quick else 7),
        "grpc": lambda: over_grpc(1_000_000 if args.quick else 4_000_000,
                                  200 if args.quick else 1000),
        "cuts": lambda: cuts_over_grpc((2_000, 5_000) if args.quick else (1_000, 5_000, 20_000),
                                       3 if args.quick else 9, 100 if args.quick else 1000),
    }
    out = ROOT / "bench" / "results" / "embedding_server.json"
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    if args.only and out.exists():
        results = {**json.loads(out.read_text()), **results}
    suffix = "_default_malloc" if args.default_malloc else ""
    for name, run in figures.items():
        if args.only in (None, name):
            results[name + suffix] = run()
    text = json.dumps(results if not args.only else {args.only: results[args.only + suffix]},
                      indent=2)
    print(text)
    if not args.quick:
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
