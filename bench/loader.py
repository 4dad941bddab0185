"""Loader benchmarks (the issue's bars), printed and written to bench/results/loader.json.

1. Apply throughput from local storage into two shards, 100k-row dim-16 cuts, as a ratio to
   the embedding client applying the same arrays directly (no storage, no decoding) in the
   same run (bar >= 0.8x).
2. Freshness through the whole pipeline: a real producer flushes (10k rows a flush, every
   50 ms), stores and announces; the loader sees, fetches and applies; a checker looks the
   flush's marker row up until it is served. Producer and loader run in processes of their
   own, as the training job and `persia-inc loader` do (`freshness_watch_same_process`:
   both in the benchmark's process, for comparison). p50/p99 of flush -> visible, and the latency
   budget per stage (flush -> stored -> announced -> seen -> fetched -> applied, from the
   producer's and the loader's stage histograms). Directory watch (bar p99 < 20 ms); Kafka
   announcements with Ceph storage (bar p99 < 200 ms), next to the same with one store at a
   time (`max_inflight: 1`); PERSIA's way (a directory rescan every 10 s) for scale.
   A 26-table model's run counts objects and announcements per flush (bar: 1).
3. Replay of 1,000 cuts of 10k rows from local storage into two fresh shards: rows/s.

Run: flock /tmp/persia-heavy.lock .venv/bin/python bench/loader.py [--quick] [--no-kafka]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from persia_inc.config import load_config
from persia_inc.embedding_server.errors import ShardError
from persia_inc.foundation.memory import keep_freed_memory
from persia_inc.loader.replay import replay
from persia_inc.local_services import (
    EMBEDDING_TOKEN,
    EMBEDDING_TOKEN_ENV,
    EmbeddingCluster,
    free_port,
    write_test_config,
)
from persia_inc.packet_format import Cut, CutHeader, TableRows, cut_key, encode_cut
from persia_inc.wiring import loader_from_config, producer_from_config

ROOT = Path(__file__).resolve().parents[1]

DIM = 16
MARKER = 10**12  # marker signs: one per flush, in no other flush


def cluster(folder: Path, inc: str, **options: object) -> EmbeddingCluster:
    folder.mkdir(parents=True)
    servers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    path = write_test_config(folder / "config.yaml", servers, inc, max_message_bytes=64 << 20,
                             **options)  # type: ignore[arg-type]
    c = EmbeddingCluster(path, servers, folder)
    for shard in range(2):
        c.start(shard)
    c.wait_ready()
    return c


def make(rng: np.random.Generator, n: int, universe: int) -> tuple[np.ndarray, np.ndarray]:
    """signs: uint64[n] unique, rows: float32[n, DIM]."""
    signs = rng.choice(universe, size=n, replace=False).astype(np.uint64) + 1
    return signs, rng.standard_normal((n, DIM)).astype(np.float32)


def cut_of(producer: str, seq: int, signs: np.ndarray, emb: np.ndarray) -> tuple[CutHeader, Cut]:
    header = CutHeader(model="m", producer=producer, generation=1, sequence=seq)
    rows = TableRows("t", signs, emb, np.empty(0, np.uint64))
    return header, Cut(header, (rows,))


def throughput(tmp: Path, packets: int, rows: int) -> dict:
    inc = tmp / "tp-inc"
    c = cluster(tmp / "tp", str(inc), persia_inc={"loader": {"rescan_interval_s": 0.5, "prefetch": 4}})
    try:
        config = load_config(c.config_path)
        rng = np.random.default_rng(1)
        data = [make(rng, rows, 4 * rows) for _ in range(packets)]
        with c.client(max_message_bytes=64 << 20) as client:
            # direct: the same arrays, no storage, no decoding (its own producer id)
            started = time.perf_counter()
            for seq, (signs, emb) in enumerate(data):
                client.apply_cut(cut_of("direct", seq, signs, emb)[1])
            direct_s = time.perf_counter() - started
            with config.open_store() as store:
                for seq, (signs, emb) in enumerate(data):
                    header, cut = cut_of("p", seq, signs, emb)
                    store.put(cut_key("m", "p", 1, seq), encode_cut(header, cut.tables))
            started = time.perf_counter()
            with loader_from_config(config, client) as loader:
                while loader.applied < packets:
                    time.sleep(0.002)
                loader_s = time.perf_counter() - started
        total = packets * rows
        return {"packets": packets, "rows_per_packet": rows, "direct_rows_per_s": total / direct_s,
                "loader_rows_per_s": total / loader_s, "ratio": direct_s / loader_s}
    finally:
        c.stop_all()


def histogram_quantiles(registry: Any, name: str, stage: str | None,
                        qs: tuple[float, ...] = (0.5, 0.99)) -> list[float | None]:
    """Quantiles (ms) of one stage of a stage histogram (or of a histogram without stages),
    interpolated within its buckets the way Prometheus' histogram_quantile does."""
    buckets: list[tuple[float, float]] = []
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == f"{name}_bucket" and sample.labels.get("stage") == stage:
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return [None for _ in qs]
    total = buckets[-1][1]
    out: list[float | None] = []
    for q in qs:
        rank, lower, below = q * total, 0.0, 0.0
        for upper, count in buckets:
            if count >= rank:
                if upper == float("inf"):
                    out.append(lower * 1e3)
                else:
                    share = (rank - below) / (count - below) if count > below else 1.0
                    out.append((lower + (upper - lower) * share) * 1e3)
                break
            lower, below = upper, count
    return out


def freshness(tmp: Path, name: str, flushes: int, rows: int, *, loader_settings: dict,
              extra: dict | None = None, inc: str | None = None, tables: int = 1,
              interval_s: float = 0.05, producer_settings: dict | None = None,
              same_process: bool = False) -> dict:
    """flush -> visible through Lookup, end to end through a real producer and loader. As in
    production, the producer runs in a process of its own (it says when it flushed what over
    a pipe) and so does the loader (`persia-inc loader`; its stage histograms are read from
    its /metrics), beside the servers and this process, which only checks; `same_process`
    runs producer and loader in this process instead (the comparison: one interpreter lock)."""
    inc = inc or str(tmp / f"{name}-inc")
    metrics_port = free_port()
    loader_section = {**loader_settings, "metrics_port": 0 if same_process else metrics_port,
                      "metrics_addr": "127.0.0.1"}
    settings: dict = {"persia_inc": {"loader": loader_section, **(extra or {})}}
    producer_section = {"close_on_exit": False, "close_on_sigterm": False,
                        **settings["persia_inc"].get("producer", {}), **(producer_settings or {})}
    settings["persia_inc"]["producer"] = producer_section
    if extra and "s3" in extra:
        settings["storage"] = "ceph"
    c = cluster(tmp / name, inc, **settings)
    names = [f"t{i}" for i in range(tables)]
    per_table = max(1, rows // tables)
    plan = {"config": str(c.config_path), "flushes": flushes, "per_table": per_table,
            "tables": tables, "interval_s": interval_s}
    try:
        config = load_config(c.config_path)
        latencies: list[float] = []
        outstanding: dict[int, tuple[float, np.ndarray, float]] = {}
        lock = threading.Lock()
        with c.client() as client, contextlib.ExitStack() as running:
            if same_process:
                loader = running.enter_context(loader_from_config(config, client))
                _wait_for_kafka_assignment(loader)
                registry = loader.metrics.registry
            else:
                scrape = running.enter_context(_loader_process(c.config_path, tmp / f"{name}-loader.log",
                                                               metrics_port))
            done = threading.Event()
            deadline = {"at": float("inf")}

            def check() -> None:
                while not done.is_set() or outstanding:
                    with lock:
                        items = list(outstanding.items())
                    if items:
                        signs = np.concatenate([marker for _, (_, marker, _) in items])
                        try:
                            got = client.lookup(names[0], signs)
                        except ShardError:  # the table does not exist before the first apply
                            got = None
                        now = time.perf_counter()
                        for (seq, (flushed_at, _, value)), row in zip(
                                items, got if got is not None else [], strict=False):
                            if row[0] == value:
                                latencies.append(now - flushed_at)
                                with lock:
                                    del outstanding[seq]
                    time.sleep(0.002)  # the checker's own load on 2 cores stays small
                    if done.is_set() and time.perf_counter() > deadline["at"]:
                        break

            def flushed(seq: int, at: float) -> None:  # perf_counter: one clock per machine
                with lock:
                    outstanding[seq] = (at, np.array([MARKER + seq], np.uint64), float(seq + 1))

            checker = threading.Thread(target=check)
            checker.start()
            try:
                produced = (produce(plan, flushed) if same_process
                            else _produce_in_a_child(plan, flushed))
            finally:
                deadline["at"] = time.perf_counter() + 30
                done.set()
                checker.join()
            if not same_process:
                registry = scrape()
            applied = int(sum(s.value for m in registry.collect() for s in m.samples
                              if s.name == "persia_inc_loader_packets_applied_total"))
            stages = produced["stages"]
            for stage in ("seen", "fetched", "applied"):
                stages[stage] = histogram_quantiles(registry, "persia_inc_loader_stage_seconds",
                                                    stage)
            stages["apply_call"] = histogram_quantiles(  # the Apply RPCs alone, not from flush
                registry, "persia_inc_loader_apply_seconds", None)
        lat = np.array(latencies) * 1e3
        objects = produced["objects_stored"]
        return {"flushes": flushes, "tables": tables, "rows_per_flush": per_table * tables,
                "processes": ("producer and loader in one" if same_process
                              else "producer, loader, checker: one each"),
                "visible": len(lat), "applied": applied,
                "objects_stored": objects,
                "objects_per_flush": objects / max(produced["flush_count"], 1),
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "stages_p50_p99_ms": {k: [None if v is None else round(v, 1) for v in pair]
                                      for k, pair in stages.items()},
                "producer": producer_section}
    finally:
        c.stop_all()


class _Scraped:
    """Metric families read from a /metrics page, shaped like a registry (`collect`)."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.families = list(text_string_to_metric_families(text))

    def collect(self) -> list[Any]:
        return self.families


@contextlib.contextmanager
def _loader_process(config_path: Path, log: Path, port: int) -> Any:
    """`persia-inc loader` on `config_path`, ready (its sources see packets: a Kafka consumer
    has its partition); yields a function returning its metrics now. SIGTERM at the end."""
    env = {**os.environ, EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN}
    with log.open("ab") as out:
        child = subprocess.Popen([sys.executable, "-m", "persia_inc.cli", "loader", "--config",
                                  str(config_path)], stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"the loader exited with {child.returncode} (see {log})")
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as reply:
                    if json.loads(reply.read()).get("ready"):
                        break
            except (OSError, ValueError):
                pass  # not listening yet, or 503: not healthy yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"the loader was not ready in 60 s (see {log})")
            time.sleep(0.05)

        def scrape() -> _Scraped:
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
                return _Scraped(reply.read().decode())

        yield scrape
    finally:
        child.terminate()
        child.wait(timeout=60)


def produce(plan: dict, flushed: Any) -> dict:
    """The training side of a freshness run: `flushes` flushes of `per_table` rows of each
    table every `interval_s`, a marker row (sign MARKER + seq, value seq + 1) in the first
    table; `flushed(seq, perf_counter)` at each flush. Returns what the producer counted."""
    config = load_config(plan["config"])
    rng = np.random.default_rng(2)
    names = [f"t{i}" for i in range(plan["tables"])]
    epoch = {"value": 0.0}

    def reader(signs: np.ndarray) -> np.ndarray:
        return np.full((signs.size, DIM), epoch["value"], np.float32)

    per_table = plan["per_table"]
    with producer_from_config(config, producer_id="p", buffer_size=10**9) as producer:
        for table in names:
            producer.register_table(table, reader, dim=DIM)
        for seq in range(plan["flushes"]):
            signs = rng.choice(20 * per_table * plan["tables"], size=per_table,
                               replace=False).astype(np.uint64) + 1
            producer.record_many({t: signs for t in names})
            producer.record(names[0], np.array([MARKER + seq], np.uint64))
            epoch["value"] = float(seq + 1)
            at = time.perf_counter()
            producer.flush(wait=False)
            flushed(seq, at)
            time.sleep(plan["interval_s"])
        assert producer.flush(timeout_s=60)
        stages = {stage: histogram_quantiles(producer.metrics.registry,
                                             "persia_inc_producer_stage_seconds", stage)
                  for stage in ("stored", "announced")}
        return {"objects_stored": producer.writer.objects_stored, "stages": stages,
                "flush_count": sum(s.value for m in producer.metrics.registry.collect()
                                   for s in m.samples
                                   if s.name == "persia_inc_producer_flushes_total")}


def _produce_in_a_child(plan: dict, flushed: Any) -> dict:
    """`produce` in a child process: the plan goes in as JSON, each flush and the final
    counts come back as JSON lines on its stdout."""
    child = subprocess.Popen([sys.executable, __file__, "--producer", json.dumps(plan)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    result = None
    for line in child.stdout:
        message = json.loads(line)
        if "seq" in message:
            flushed(message["seq"], message["at"])
        else:
            result = message
    if child.wait(timeout=120) != 0 or result is None:
        raise RuntimeError(f"the producer process failed (exit {child.returncode})")
    return result


def _producer_main(plan_json: str) -> None:
    def flushed(seq: int, at: float) -> None:
        print(json.dumps({"seq": seq, "at": at}), flush=True)

    print(json.dumps(produce(json.loads(plan_json), flushed)), flush=True)


def _wait_for_kafka_assignment(loader: Any, timeout_s: float = 30.0) -> None:
    """Measure the steady state: a Kafka consumer joins its group (a second or so) before it
    sees anything; packets stored meanwhile are found late (or by listing)."""
    consumers = [s for s in loader.sources if hasattr(s, "assigned")]
    deadline = time.monotonic() + timeout_s
    while consumers and not all(s.assigned for s in consumers):
        if time.monotonic() > deadline:
            raise RuntimeError("the loader's Kafka consumer got no partition in 30 s")
        time.sleep(0.05)


def replay_bench(tmp: Path, packets: int, rows: int) -> dict:
    inc = tmp / "rp-inc"
    c = cluster(tmp / "rp", str(inc))
    try:
        config = load_config(c.config_path)
        rng = np.random.default_rng(3)
        with config.open_store() as store:
            for seq in range(packets):
                signs, emb = make(rng, rows, 1_000_000)
                header, cut = cut_of("p", seq, signs, emb)
                store.put(cut_key("m", "p", 1, seq), encode_cut(header, cut.tables))
            with c.client() as client:
                result = replay(client, store, "m", prefetch=4)
        return {"packets": result.packets, "rows": result.rows, "seconds": result.seconds,
                "rows_per_s": result.rows / result.seconds, "mb_per_s": result.bytes / result.seconds / 1e6}
    finally:
        c.stop_all()


def kafka_ceph(tmp: Path, flushes: int, rows: int, *, max_inflight: int = 0) -> dict:
    from persia_inc.foundation.kafka import import_kafka
    from persia_inc.local_services import CephCluster, TansuBroker

    ceph = CephCluster(tmp / f"ceph-{max_inflight}")
    broker = None
    try:
        ceph.start()
        broker = TansuBroker(tmp / f"tansu-{max_inflight}").start()
        uri = ceph.new_bucket("bench")
        s3 = ceph.s3_settings()
        kafka = import_kafka()  # the topic exists before the loader subscribes, as in production
        admin = kafka.admin.KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics([kafka.admin.NewTopic("persia-inc-bench", 1, 1)])
        admin.close()
        extra = {"producer": {"announce": "kafka", "max_inflight": max_inflight},
                 "kafka": {"bootstrap_servers": [broker.bootstrap], "topic": "persia-inc-bench",
                           "session_timeout_ms": 2000, "heartbeat_interval_ms": 500},
                 "s3": {"endpoint_url": s3.endpoint_url, "region": s3.region,
                        "access_key_id": s3.access_key_id, "secret_access_key": s3.secret_access_key}}
        return freshness(tmp, f"kafka-{max_inflight}", flushes, rows, inc=uri, extra=extra,
                         loader_settings={"rescan_interval_s": 30.0, "list_interval_s": 30.0})
    finally:
        if broker is not None:
            broker.stop()
        ceph.stop()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--producer":  # a freshness run's training side
        _producer_main(sys.argv[2])
        return
    keep_freed_memory()  # as the loader process does (persia-inc loader)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer packets (a smoke run)")
    parser.add_argument("--no-kafka", action="store_true", help="skip the Ceph + Kafka runs")
    parser.add_argument("--only", choices=["throughput", "watch", "tables", "persia", "kafka",
                                           "replay"], action="append",
                        help="run only these parts (repeatable); results merge into the file")
    args = parser.parse_args()
    q = args.quick
    only = set(args.only or ["throughput", "watch", "tables", "persia", "kafka", "replay"])
    out = ROOT / "bench" / "results" / "loader.json"
    results: dict = json.loads(out.read_text()) if out.exists() and args.only else {}
    n = 40 if q else 200

    def record(key: str, value: dict) -> None:
        results[key] = value
        print(key, json.dumps(value), flush=True)

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if "throughput" in only:
            record("throughput", throughput(tmp, 5 if q else 30, 100_000))
        if "watch" in only:
            record("freshness_watch", freshness(tmp, "watch", n, 10_000,
                                                loader_settings={"rescan_interval_s": 1.0}))
            record("freshness_watch_same_process", freshness(
                tmp, "watch-same", n, 10_000, loader_settings={"rescan_interval_s": 1.0},
                same_process=True))
        if "tables" in only:
            record("freshness_watch_26_tables", freshness(
                tmp, "tables", n, 26 * 2_000, tables=26,
                loader_settings={"rescan_interval_s": 1.0}))
        if "persia" in only:
            record("freshness_persia_rescan_10s", freshness(
                tmp, "persia", n, 10_000,
                loader_settings={"source": "list", "list_interval_s": 10.0, "discover_every": 1}))
        if "kafka" in only and not args.no_kafka:
            record("freshness_kafka_ceph_one_store_at_a_time",
                   kafka_ceph(tmp, n, 10_000, max_inflight=1))
            record("freshness_kafka_ceph", kafka_ceph(tmp, n, 10_000))
        if "replay" in only:
            record("replay", replay_bench(tmp, 100 if q else 1000, 10_000))
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
