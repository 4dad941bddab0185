"""Loader benchmarks (the issue's bars), printed and written to bench/results/loader.json.

1. Apply throughput from local storage into two shards, 100k-row dim-16 packets, as a ratio to
   the embedding client applying the same arrays directly (no storage, no decoding) in the
   same run (bar >= 0.8x).
2. Freshness, from the packet's durable put returning (what the producer's flush() waits for)
   to its rows being visible through Lookup, p50/p99 over 200 packets of 10k rows: directory
   watch (bar p99 < 300 ms); Kafka announcements with Ceph storage (bar p99 < 1 s); and, side
   by side, PERSIA's way (no watching, a directory rescan every 10 s).
3. Replay of 1,000 packets of 10k rows from local storage into two fresh shards: rows/s.

Run: flock /tmp/persia-heavy.lock .venv/bin/python bench/loader.py [--quick] [--no-kafka]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from persia_inc.config import load_config
from persia_inc.embedding_server.errors import ShardError
from persia_inc.loader.replay import replay
from persia_inc.local_services import EmbeddingCluster, free_port, write_test_config
from persia_inc.packet_format import Announcement, Packet, PacketHeader, encode_packet, packet_key
from persia_inc.wiring import loader_from_config

ROOT = Path(__file__).resolve().parents[1]

DIM = 16


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
                header = PacketHeader(model="m", table="t", producer="direct", generation=1,
                                      sequence=seq, rows=rows, dim=DIM)
                client.apply(Packet(header, signs, emb, np.empty(0, np.uint64)))
            direct_s = time.perf_counter() - started
            with config.open_store() as store:
                for seq, (signs, emb) in enumerate(data):
                    header = PacketHeader(model="m", table="t", producer="p", generation=1, sequence=seq)
                    store.put(packet_key("m", "t", "p", 1, seq), encode_packet(header, signs, emb))
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


def freshness(tmp: Path, name: str, packets: int, rows: int, *, loader_settings: dict,
              extra: dict | None = None, inc: str | None = None, announce=None,
              interval_s: float = 0.05) -> dict:
    inc = inc or str(tmp / f"{name}-inc")
    settings = {"persia_inc": {"loader": loader_settings, **(extra or {})}}
    if extra and "s3" in extra:
        settings["storage"] = "ceph"
    c = cluster(tmp / name, inc, **settings)
    try:
        config = load_config(c.config_path)
        rng = np.random.default_rng(2)
        latencies: list[float] = []
        outstanding: dict[int, tuple[float, np.ndarray, np.ndarray]] = {}
        lock = threading.Lock()
        with c.client() as client, config.open_store() as store, loader_from_config(config, client) as loader:
            done = threading.Event()

            def check() -> None:
                while not done.is_set() or outstanding:
                    with lock:
                        items = list(outstanding.items())
                    for seq, (put_at, signs, row) in items:
                        try:
                            got = client.lookup("t", signs)
                        except ShardError:  # the table does not exist before the first apply
                            break
                        if np.array_equal(got[0], row):
                            latencies.append(time.perf_counter() - put_at)
                            with lock:
                                del outstanding[seq]
                    time.sleep(0.001)
                    if done.is_set() and time.perf_counter() > deadline:
                        break

            deadline = float("inf")
            checker = threading.Thread(target=check)
            checker.start()
            for seq in range(packets):
                signs, emb = make(rng, rows, 20 * rows)
                signs[0] = 10**12 + seq  # a sign no other packet touches: visible means applied
                header = PacketHeader(model="m", table="t", producer="p", generation=1, sequence=seq)
                key = packet_key("m", "t", "p", 1, seq)
                data = encode_packet(header, signs, emb)
                store.put(key, data)
                put_at = time.perf_counter()
                if announce is not None:
                    announce(Announcement.for_packet(store.root_uri, header, len(data)))
                with lock:
                    outstanding[seq] = (put_at, signs[:1], emb[0])
                time.sleep(interval_s)
            deadline = time.perf_counter() + 30
            done.set()
            checker.join()
            applied = loader.applied
        lat = np.array(latencies) * 1e3
        return {"packets": packets, "rows_per_packet": rows, "seen": len(lat), "applied": applied,
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}
    finally:
        c.stop_all()


def replay_bench(tmp: Path, packets: int, rows: int) -> dict:
    inc = tmp / "rp-inc"
    c = cluster(tmp / "rp", str(inc))
    try:
        config = load_config(c.config_path)
        rng = np.random.default_rng(3)
        with config.open_store() as store:
            for seq in range(packets):
                signs, emb = make(rng, rows, 1_000_000)
                header = PacketHeader(model="m", table="t", producer="p", generation=1, sequence=seq)
                store.put(packet_key("m", "t", "p", 1, seq), encode_packet(header, signs, emb))
            with c.client() as client:
                result = replay(client, store, "m", prefetch=4)
        return {"packets": result.packets, "rows": result.rows, "seconds": result.seconds,
                "rows_per_s": result.rows / result.seconds, "mb_per_s": result.bytes / result.seconds / 1e6}
    finally:
        c.stop_all()


def kafka_ceph(tmp: Path, packets: int, rows: int) -> dict:
    from persia_inc.foundation.kafka import import_kafka
    from persia_inc.local_services import CephCluster, TansuBroker

    kafka = import_kafka()
    ceph = CephCluster(tmp / "ceph")
    broker = None
    try:
        ceph.start()
        broker = TansuBroker(tmp / "tansu").start()
        uri = ceph.new_bucket("bench")
        s3 = ceph.s3_settings()
        topic = "persia-inc-bench"
        admin = kafka.admin.KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics([kafka.admin.NewTopic(topic, 1, 1)])
        admin.close()
        producer = kafka.KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0)

        def announce(a: Announcement) -> None:
            producer.send(topic, key=a.key, value=a.to_json())
            producer.flush()

        extra = {"producer": {"announce": "kafka"},
                 "kafka": {"bootstrap_servers": [broker.bootstrap], "topic": topic,
                           "session_timeout_ms": 2000, "heartbeat_interval_ms": 500},
                 "s3": {"endpoint_url": s3.endpoint_url, "region": s3.region,
                        "access_key_id": s3.access_key_id, "secret_access_key": s3.secret_access_key}}
        try:
            return freshness(tmp, "kafka", packets, rows, inc=uri, announce=announce, extra=extra,
                             loader_settings={"rescan_interval_s": 30.0, "list_interval_s": 30.0})
        finally:
            producer.close()
    finally:
        if broker is not None:
            broker.stop()
        ceph.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-kafka", action="store_true")
    args = parser.parse_args()
    q = args.quick
    results: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        results["throughput"] = throughput(tmp, 5 if q else 30, 100_000)
        print("throughput", json.dumps(results["throughput"]), flush=True)
        results["freshness_watch"] = freshness(tmp, "watch", 40 if q else 200, 10_000,
                                               loader_settings={"rescan_interval_s": 1.0})
        print("freshness watch", json.dumps(results["freshness_watch"]), flush=True)
        results["freshness_persia_rescan_10s"] = _persia(tmp, 40 if q else 200)
        print("freshness persia", json.dumps(results["freshness_persia_rescan_10s"]), flush=True)
        if not args.no_kafka:
            results["freshness_kafka_ceph"] = kafka_ceph(tmp, 40 if q else 200, 10_000)
            print("freshness kafka+ceph", json.dumps(results["freshness_kafka_ceph"]), flush=True)
        results["replay"] = replay_bench(tmp, 100 if q else 1000, 10_000)
        print("replay", json.dumps(results["replay"]), flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "loader.json").write_text(json.dumps(results, indent=2) + "\n")


def _persia(tmp: Path, packets: int) -> dict:
    """PERSIA's inference servers: no watching, a directory rescan every 10 s."""
    return freshness(tmp, "persia", packets, 10_000, loader_settings={
        "source": "list", "list_interval_s": 10.0, "discover_every": 1})


if __name__ == "__main__":
    main()
