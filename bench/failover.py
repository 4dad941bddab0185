"""Failover benchmark: 2 shards x 2 replicas, steady lookups through kills and restarts.

Four `persia-inc embedding-server` processes (2 shards, 2 replicas each) and a `persia-inc
loader` process on local storage; this process writes cuts the way a producer does and looks
up 53,248 known signs over and over (one client, as a serving handler does). Every row says
which sign it belongs to and which cut wrote it (row[0] = sign mod 65536, the rest = the
cut's version), so every answer is checked exactly:

- failed: the lookup raised (no replica of some shard answered within the deadline);
- stale: some row is missing (zeros) or older than a version an earlier answer already
  showed for that sign (a read that went back in time: a replica behind its sibling);
- torn: some row is not a row the bench wrote.

Phases, in one run: idle (no writes, no kills), apply (a full cut of every known sign every
0.5 s), failover (a small cut every second; every 10 s one replica is killed with SIGKILL and
started again at once, empty: the loader catches it up from storage, and it serves once it
holds what its sibling holds), then a rolling restart of all four (SIGTERM, start, wait until
it serves, next). Reported: lookups, failed, stale, torn, lookup p50/p99 per phase (and
within 2 s of each kill), the client's failovers, and how long each restarted replica took
to serve again. Written to bench/results/failover.json.

Variants, each a run of its own recorded under `variants` in the same file:
`--variant no-health-watch` (the client does not follow the replicas' health and replicas stop
taking calls at SIGTERM without draining: a read learns of a replica gone, stopping or catching
up by a failed call), `--variant hedged --hedge-ms M`: lookups take turns between a plain client
and a hedged one (a read of a shard not answered after M ms is asked of its next replica too, the first answer
wins), each arm's phases reported apart (`plain`, `hedged`): an A/B under the same conditions.

Run: flock /tmp/persia-heavy.lock .venv/bin/python bench/failover.py [--quick] [--variant V]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.embedding_server.errors import ShardError
from persia_inc.foundation.memory import keep_freed_memory
from persia_inc.foundation.net import free_port
from persia_inc.foundation.wait import wait_until
from persia_inc.local_services import (
    EMBEDDING_TOKEN,
    EMBEDDING_TOKEN_ENV,
    EmbeddingCluster,
    write_test_config,
)
from persia_inc.packet_format import CutHeader, TableRows, cut_key, encode_cut
from persia_inc.storage import open_store

ROOT = Path(__file__).resolve().parents[1]
DIM = 8
SIGNS = 53_248
SHARDS, REPLICAS = 2, 2


def rows_of(signs: np.ndarray, version: int) -> np.ndarray:
    """float32[n, DIM]: row[0] = sign mod 65536, the rest = version (both exact in float32)."""
    rows = np.full((signs.shape[0], DIM), float(version), np.float32)
    rows[:, 0] = (signs % np.uint64(65536)).astype(np.float32)
    return rows


class Writer:
    """Writes cuts (version v for some signs) into storage, as a producer does."""

    def __init__(self, store: Any) -> None:
        self.store, self.sequence, self.version = store, 0, 0

    def write(self, signs: np.ndarray) -> None:
        self.version += 1
        header = CutHeader(model="m", producer="bench", generation=1, sequence=self.sequence)
        table = TableRows("t", signs, rows_of(signs, self.version), np.empty(0, np.uint64))
        self.store.put(cut_key("m", "bench", 1, self.sequence), encode_cut(header, (table,)))
        self.sequence += 1


class HedgedClient(EmbeddingClient):
    """A client whose read of a shard, not answered after `hedge_s`, is also sent to the
    shard's next replica; the first answer wins (a failure falls back to the plain read)."""

    hedge_s = 0.005

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hedges, self.hedge_wins = 0, 0
        self._hedge_pool = ThreadPoolExecutor(4 * len(self.targets), thread_name_prefix="hedge")

    def _read(self, shard: int, call: Any) -> Any:
        order = self.router.order(shard)
        if len(order) < 2:
            return super()._read(shard, call)
        first = self._hedge_pool.submit(call, order[0], False, self.timeout_s)
        done, _ = wait([first], timeout=self.hedge_s)
        if not done:
            self.hedges += 1
            second = self._hedge_pool.submit(call, order[1], False, self.timeout_s)
            pending = {first, second}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    if future.exception() is None:
                        self.hedge_wins += future is second
                        return future.result()
            return super()._read(shard, call)
        if first.exception() is None:
            self.router.answered(order[0])
            return first.result()
        return super()._read(shard, call)  # failed fast: the plain failover read

    def close(self) -> None:
        self._hedge_pool.shutdown(wait=False, cancel_futures=True)
        super().close()


class Reader(threading.Thread):
    """Looks up every known sign back to back, checking each answer; records per lookup
    (start, latency_s, outcome), and in `arms` which of `clients` asked (they take turns: an
    A/B comparison under the same conditions)."""

    def __init__(self, clients: list[Any], signs: np.ndarray) -> None:
        super().__init__(name="reader", daemon=True)
        self.clients, self.signs = clients, signs
        self.arms: list[int] = []
        self.code = (signs % np.uint64(65536)).astype(np.float32)
        self.seen = np.zeros(signs.shape[0], np.float32)  # newest version answered per sign
        self.records: list[tuple[float, float, str]] = []
        self.stop = threading.Event()
        self.first_error = ""

    def run(self) -> None:
        while not self.stop.is_set():
            arm = len(self.records) % len(self.clients)
            self.arms.append(arm)
            started = time.monotonic()
            try:
                rows = self.clients[arm].lookup("t", self.signs)
            except ShardError as exc:
                self.records.append((started, time.monotonic() - started, "failed"))
                self.first_error = self.first_error or str(exc)
                continue
            took = time.monotonic() - started
            versions = rows[:, 1]
            if not (np.array_equal(rows[:, 0], self.code)
                    and (rows[:, 1:] == versions[:, None]).all()):
                missing = (rows == 0).all(axis=1)
                outcome = "stale" if missing.any() else "torn"
            elif (versions < self.seen).any():
                outcome = "stale"
            else:
                outcome = "ok"
            np.maximum(self.seen, versions, out=self.seen)
            self.records.append((started, took, outcome))
            self.stop.wait(0.01)


def quantiles(records: list[tuple[float, float, str]], lo: float, hi: float) -> dict[str, Any]:
    took = [r[1] * 1e3 for r in records if lo <= r[0] < hi]
    if not took:
        return {"lookups": 0}
    return {"lookups": len(took), "p50_ms": round(float(np.percentile(took, 50)), 2),
            "p99_ms": round(float(np.percentile(took, 99)), 2),
            "max_ms": round(float(np.max(took)), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases (a smoke run)")
    parser.add_argument("--variant", choices=["no-health-watch", "hedged"], default="",
                        help="a variant, recorded under `variants` (default: the plain run)")
    parser.add_argument("--hedge-ms", type=float, default=5.0, help="hedged: the delay")
    args = parser.parse_args()
    keep_freed_memory()
    scale = 0.25 if args.quick else 1.0
    idle_s, apply_s, chaos_s = 15 * scale, 15 * scale, 60 * scale
    kill_every_s = 10 * scale
    rng = np.random.default_rng(7)
    signs = np.unique(rng.integers(1, 2**63, SIGNS * 2, dtype=np.uint64))[:SIGNS]
    result: dict[str, Any] = {"shards": SHARDS, "replicas": REPLICAS, "signs_per_lookup": SIGNS,
                              "dim": DIM}
    with tempfile.TemporaryDirectory(prefix="failover-") as tmp:
        folder = Path(tmp)
        inc = folder / "inc"
        inc.mkdir()
        servers = [[f"127.0.0.1:{free_port()}" for _ in range(REPLICAS)] for _ in range(SHARDS)]
        loader_port = free_port()
        path = write_test_config(
            folder / "config.yaml", servers, str(inc), max_message_bytes=64 << 20,
            replica_max_lag_s=1.0, replica_poll_s=0.1, replica_retry_s=0.5,
            request_timeout_s=5.0, drain_s=0.0 if args.variant == "no-health-watch" else 0.5,
            persia_inc={"loader": {
                "watermark_poll_s": 0.2, "retry_backoff_s": 0.1, "rescan_interval_s": 0.5,
                "metrics_port": loader_port}})
        cluster = EmbeddingCluster(path, servers, folder)
        for shard in range(SHARDS):
            for replica in range(REPLICAS):
                cluster.start(shard, replica)
        cluster.wait_ready(90)
        env_loader = subprocess.Popen(
            [sys.executable, "-m", "persia_inc.cli", "loader", "--config", str(path)],
            stdout=(folder / "loader.log").open("ab"), stderr=subprocess.STDOUT,
            env={**os.environ, EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN})
        store = open_store(str(inc))
        writer = Writer(store)
        kills: list[dict[str, Any]] = []
        try:
            HedgedClient.hedge_s = args.hedge_ms / 1e3
            hedged = args.variant == "hedged"
            options: dict[str, Any] = {
                "token": EMBEDDING_TOKEN, "max_message_bytes": 64 << 20, "timeout_s": 5.0,
                "replica_retry_s": 0.5, "watch_health": args.variant != "no-health-watch"}
            with (EmbeddingClient(servers, **options) as client,
                  HedgedClient(servers, **options) if hedged else nullcontext() as hedging):
                def serving(target: int) -> bool:
                    try:
                        status = client.status(target)
                    except ShardError:
                        return False
                    return status.ready and status.current and any(
                        w.sequence == writer.sequence - 1 for w in status.watermarks)

                writer.write(signs)  # version 1 everywhere before the first lookup
                wait_until(lambda: all(serving(t) for t in range(len(client.targets))),
                           "every replica to hold the first cut", timeout_s=60)
                reader = Reader([client, hedging] if hedged else [client], signs)
                reader.start()
                t0 = time.monotonic()
                reader.stop.wait(idle_s)
                t_idle = time.monotonic()
                while time.monotonic() < t_idle + apply_s:  # heavy apply: full cuts
                    writer.write(signs)
                    reader.stop.wait(0.5)
                t_apply = time.monotonic()
                victims = [(s, r) for r in range(REPLICAS) for s in range(SHARDS)]
                next_kill, k = t_apply + 1.0, 0
                small = rng.choice(signs, 2048, replace=False)
                while time.monotonic() < t_apply + chaos_s:
                    writer.write(np.sort(rng.choice(signs, 2048, replace=False)) if k % 2
                                 else small)
                    if time.monotonic() >= next_kill:
                        shard, replica = victims[k % len(victims)]
                        k += 1
                        at = time.monotonic()
                        cluster.stop(shard, signal.SIGKILL, replica=replica)
                        cluster.start(shard, replica)
                        kills.append({"at_s": round(at - t0, 2), "shard": shard,
                                      "replica": replica, "signal": "SIGKILL", "t": at})
                        next_kill += kill_every_s
                    reader.stop.wait(1.0)
                t_chaos = time.monotonic()
                for shard, replica in victims:  # rolling restart, one at a time
                    target = client.replicas_of(shard)[replica]
                    at = time.monotonic()
                    cluster.stop(shard, signal.SIGTERM, replica=replica)
                    cluster.start(shard, replica)
                    writer.write(small)
                    wait_until(lambda target=target: serving(target),
                               f"shard {shard} replica {replica} to serve again", timeout_s=60)
                    kills.append({"at_s": round(at - t0, 2), "shard": shard, "replica": replica,
                                  "signal": "SIGTERM (rolling)", "t": at,
                                  "serving_again_s": round(time.monotonic() - at, 2)})
                t_roll = time.monotonic()
                reader.stop.wait(2.0)
                reader.stop.set()
                reader.join(10)
                for kill in kills:  # time to serve again, for the chaos kills too
                    kill.pop("t")
                records = reader.records
                outcomes = [r[2] for r in records]
                windows = [(t0 + k["at_s"], t0 + k["at_s"] + 2.0) for k in kills]
                near = [r for r in records if any(lo <= r[0] < hi for lo, hi in windows)]
                result.update({
                    "lookups": len(records), "failed": outcomes.count("failed"),
                    "stale": outcomes.count("stale"), "torn": outcomes.count("torn"),
                    "first_error": reader.first_error,
                    "client": client.counters(),
                    "cuts_written": writer.sequence,
                    "idle": quantiles(records, t0, t_idle),
                    "apply": quantiles(records, t_idle, t_apply),
                    "failover": quantiles(records, t_apply, t_chaos),
                    "failover_within_2s_of_a_kill": quantiles(near, t0, t_roll),
                    "rolling_restart": quantiles(records, t_chaos, t_roll),
                    "kills": kills})
                if hedged:  # the same phases, per arm (every other lookup each)
                    phases = {"idle": (t0, t_idle), "apply": (t_idle, t_apply),
                              "failover": (t_apply, t_chaos), "rolling_restart": (t_chaos, t_roll)}
                    for arm, name in enumerate(("plain", "hedged")):
                        mine = [r for r, a in zip(records, reader.arms, strict=False) if a == arm]
                        near_mine = [r for r in mine if any(lo <= r[0] < hi for lo, hi in windows)]
                        result[name] = {
                            **{k: quantiles(mine, lo, hi) for k, (lo, hi) in phases.items()},
                            "failover_within_2s_of_a_kill": quantiles(near_mine, t0, t_roll)}
                    result["hedged"]["client"] = {**hedging.counters(), "hedges": hedging.hedges,
                                                  "hedge_wins": hedging.hedge_wins,
                                                  "hedge_ms": args.hedge_ms}
        finally:
            env_loader.send_signal(signal.SIGTERM)
            env_loader.wait(20)
            cluster.stop_all()
            store.close()
    idle, fail = result["idle"].get("p99_ms"), result["failover"].get("p99_ms")
    if idle and fail:
        result["failover_p99_ratio"] = round(fail / idle, 2)
        result["apply_p99_ratio"] = round(result["apply"]["p99_ms"] / idle, 2)
    print(json.dumps({k: v for k, v in result.items() if k != "kills"}, indent=2))
    print(f"lookups {result['lookups']}: failed {result['failed']}, stale {result['stale']}, "
          f"torn {result['torn']}; p99 idle {idle} ms, failover {fail} ms "
          f"({result.get('failover_p99_ratio')}x), apply {result['apply'].get('p99_ms')} ms "
          f"({result.get('apply_p99_ratio')}x)")
    if not args.quick:
        out = ROOT / "bench" / "results" / "failover.json"
        recorded = json.loads(out.read_text()) if out.exists() else {}
        if args.variant:  # beside the plain run's figures (a run of its own: compare ratios)
            recorded.setdefault("variants", {})[args.variant] = {
                k: v for k, v in result.items() if k != "kills"}
            result = recorded
        elif "variants" in recorded:  # the variants' own runs stay recorded
            result["variants"] = recorded["variants"]
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {out}")
    return 0 if result["failed"] == 0 and result["stale"] == 0 and result["torn"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
