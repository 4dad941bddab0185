"""Accuracy against bytes: what each update policy ships, and what serving it earns.

One training run on the demo's drifting click stream (persia_inc/demo/: the CTR model, the
stream, the learning rates, the evictions) with the same seed; the stream clock is simulated
(`--steps-per-s` training steps per stream second), so every policy sees the very same steps
whatever the machine does. Each policy has its own real producer (local storage, packets
encoded and stored by its writer) and a served copy of the tables: the checkpoint, then
exactly the packets that producer stored, applied as soon as they are stored (after the
step that flushed them; deletes serve zeros, as a missing row does). After each stream
second a held-out window of the stream (its own sample generator, as the demo's serving
arms) is scored on every served copy with the checkpoint's dense part, as the demo's arms
are; AUC and log-loss are over all windows. "frozen" is the checkpoint, never updated.

Per policy: bytes and rows stored (ratio against all-float32), AUC and log-loss,
max_row_staleness_s (the longest a changed row waited for a packet holding it, in stream
seconds; rows still held back at the end count with their age) and the update policy's
memory per row. The prioritized policies at three budgets, with and without int8, rank by
"delta"; "touches" is the other candidate rank, at the middle budget.

    flock /tmp/persia-heavy.lock .venv/bin/python bench/traffic.py [--seconds 60]

Writes bench/results/traffic.json and bench/results/traffic.png (AUC against bytes; needs
matplotlib: pip install -e '.[demo]').
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from persia_inc.config import config_from_mapping
from persia_inc.demo.clicks import ClickStream, ClickStreamConfig
from persia_inc.demo.ctr import CTRModel, dense_part
from persia_inc.demo.serving import auc, log_loss
from persia_inc.extras import have
from persia_inc.packet_format import decode_cut
from persia_inc.producer import IncrementalProducer
from persia_inc.wiring import producer_from_config

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Arm:
    """One policy: its producer (None: frozen), served copy and tallies."""

    name: str
    settings: dict
    producer: IncrementalProducer | None = None
    served: dict[str, np.ndarray] = field(default_factory=dict)
    after: str | None = None
    stored: int = 0
    bytes: int = 0
    rows: int = 0
    pending_max: int = 0
    changed_since: dict[str, np.ndarray] = field(default_factory=dict)
    staleness_s: float = 0.0
    scores: list[np.ndarray] = field(default_factory=list)

    def apply_new(self, now_s: float) -> None:
        """Apply every packet stored since the last call; a shipped row's wait ends now."""
        producer = self.producer
        if producer is None or producer.writer.objects_stored == self.stored:
            return
        assert producer.writer.drain(60)
        self.stored = producer.writer.objects_stored
        for info in producer.store.list("", self.after):
            data = producer.store.get(info.key)
            cut = decode_cut(data, where=info.key)
            self.bytes += len(data)
            self.pending_max = max(self.pending_max, cut.header.pending_rows)
            for rows in cut.tables:
                self.rows += rows.row_count
                ids = rows.signs.astype(np.int64)
                self.served[rows.name][ids] = rows.embeddings
                gone = rows.deleted.astype(np.int64)
                self.served[rows.name][gone] = 0.0
                since = self.changed_since[rows.name]
                done = np.concatenate([ids, gone])
                waited = now_s - since[done]
                if np.isfinite(waited).any():
                    self.staleness_s = max(self.staleness_s, float(np.nanmax(waited)))
                since[done] = np.nan
            self.after = info.key


def policies(budgets: list[float], staleness_s: float) -> list[tuple[str, dict]]:
    arms: list[tuple[str, dict]] = [("all-float32", {}), ("all-int8", {"dtype": "int8"})]
    for budget in budgets:
        for dtype in ("float32", "int8"):
            arms.append((f"prioritized-{budget:g}-{dtype}", {
                "update_policy": "prioritized", "update_budget_fraction": budget,
                "max_staleness_s": staleness_s, "dtype": dtype}))
    middle = budgets[len(budgets) // 2]
    arms.append((f"prioritized-{middle:g}-int8-touches", {
        "update_policy": "prioritized", "update_budget_fraction": middle,
        "max_staleness_s": staleness_s, "dtype": "int8", "update_rank": "touches"}))
    return arms


def make_producer(folder: Path, settings: dict, interval_s: float, buffer_size: int,
                  clock: object) -> IncrementalProducer:
    producer = {"flush_interval_s": interval_s, "close_on_exit": False,
                "close_on_sigterm": False, "producer_id": "trainer-0", **settings}
    config = config_from_mapping({
        "enable_incremental_update": True, "incremental_buffer_size": buffer_size,
        "incremental_dir": str(folder), "storage": "local",
        "persia_inc": {"model": "bench", "producer": producer}}, "<bench/traffic.py>")
    return producer_from_config(config, clock=clock, generation=1)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    vocab, dim, batch = args.vocab, 16, 1024
    model = CTRModel(vocab, dim, seed=args.seed)
    stream = ClickStream(ClickStreamConfig(vocab=vocab, popular=min(200, vocab // 2),
                                           seed=args.seed))
    tables = model.named_tables()
    names = list(tables)
    optimizer = torch.optim.SGD([{"params": model.tables.parameters(), "lr": 60.0},
                                 {"params": model.mlp.parameters(), "lr": 0.1}])
    rng = np.random.default_rng(args.seed)
    eval_rng = np.random.default_rng(args.seed + 1)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def train_step() -> np.ndarray:
        clicks = stream.sample(rng, batch)
        sparse = torch.from_numpy(clicks.ids)
        optimizer.zero_grad()
        loss_fn(model(torch.from_numpy(clicks.dense), sparse),
                torch.from_numpy(clicks.label)).backward()
        optimizer.step()
        return clicks.ids

    for _ in range(args.warmup_steps):  # the stream stands still, as in the demo's warm-up
        train_step()
    checkpoint = {name: t.weight.detach().numpy().copy() for name, t in tables.items()}
    dense = dense_part(model)  # the checkpoint's dense part: every arm scores with it
    weights = {name: t.weight.detach().numpy() for name, t in tables.items()}  # live views

    now = [0.0]  # the stream clock: every producer's policy clock

    def clock() -> float:
        return now[0]
    workdir = Path(tempfile.mkdtemp(prefix="persia-traffic-"))
    arms = [Arm("frozen", {})]
    for name, settings in policies(args.budgets, args.max_staleness_s):
        producer = make_producer(workdir / name, settings, args.interval_s, args.buffer_size,
                                 clock)
        for table, weight in weights.items():
            producer.register_table(table, lambda s, w=weight: w[s.astype(np.int64)], dim=dim,
                                    rows=vocab)
            producer.mark_served(table, np.arange(vocab, dtype=np.uint64), checkpoint[table])
        arms.append(Arm(name, settings, producer))
    for arm in arms:
        arm.served = {name: rows.copy() for name, rows in checkpoint.items()}
        arm.changed_since = {name: np.full(vocab, np.nan) for name in names}
    columns = {name: i for i, name in enumerate(names)}

    labels: list[np.ndarray] = []
    steps = args.seconds * args.steps_per_s
    started = time.perf_counter()
    for step in range(steps):
        now[0] = step / args.steps_per_s
        stream.advance_to(now[0])
        ids = train_step()
        for arm in arms[1:]:
            for i, name in enumerate(names):
                since = arm.changed_since[name]
                touched = ids[:, i]
                since[touched] = np.where(np.isnan(since[touched]), now[0], since[touched])
        if (step + 1) % 40 == 0:  # the demo's evictions: 64 rows of one table every 40 steps
            table = names[int(rng.integers(len(names)))]
            gone = rng.choice(vocab, 64, replace=False).astype(np.uint64)
        else:
            gone = None
        now[0] = (step + 1) / args.steps_per_s  # the step took its time: flush at its end
        for arm in arms[1:]:
            assert arm.producer is not None
            arm.producer.record_columns(ids, columns)
            if gone is not None:
                arm.producer.evict(table, gone)
                arm.changed_since[table][gone.astype(np.int64)] = np.where(
                    np.isnan(arm.changed_since[table][gone.astype(np.int64)]), now[0],
                    arm.changed_since[table][gone.astype(np.int64)])
            arm.apply_new(now[0])
        if (step + 1) % args.steps_per_s == 0:  # a training second: score a held-out window
            clicks = stream.sample(eval_rng, args.window)
            labels.append(clicks.label)
            for arm in arms:
                sparse = np.stack([arm.served[name][clicks.ids[:, i]]
                                   for i, name in enumerate(names)], axis=1)
                with torch.no_grad():
                    probs = dense(torch.from_numpy(clicks.dense), torch.from_numpy(sparse))
                arm.scores.append(probs.numpy().astype(np.float64))
            print(f"\r{(step + 1) // args.steps_per_s}/{args.seconds} s", end="", file=sys.stderr)
    elapsed = time.perf_counter() - started
    print(file=sys.stderr)
    y = np.concatenate(labels)
    base = next(a for a in arms if a.name == "all-float32")
    results: dict[str, dict] = {}
    for arm in arms:
        probs = np.concatenate(arm.scores)
        memory = arm.producer._updates.bytes_per_row if (
            arm.producer is not None and arm.producer._updates is not None) else {}
        left = 0.0
        for since in arm.changed_since.values():  # rows still waiting at the end
            if arm.producer is not None and arm.producer.pending_rows and np.isfinite(since).any():
                left = max(left, now[0] - float(np.nanmin(since)))
        results[arm.name] = {
            **arm.settings, "bytes": arm.bytes, "rows": arm.rows,
            "bytes_ratio_vs_all_float32": round(arm.bytes / base.bytes, 4) if base.bytes else None,
            "bytes_fewer_x": round(base.bytes / arm.bytes, 2) if arm.bytes else None,
            "auc": round(auc(probs, y), 4), "logloss": round(log_loss(probs, y), 4),
            "max_row_staleness_s": round(max(arm.staleness_s, left), 2) if arm.producer else None,
            "max_pending_rows": arm.pending_max,
            "policy_bytes_per_row": next(iter(memory.values()), 0),
        }
        if arm.producer is not None:
            arm.producer.close()
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "command": "flock /tmp/persia-heavy.lock .venv/bin/python bench/traffic.py "
                   + " ".join(sys.argv[1:]),
        "setup": {"seconds": args.seconds, "steps_per_s": args.steps_per_s,
                  "warmup_steps": args.warmup_steps, "vocab": vocab, "dim": dim, "tables": 26,
                  "batch": batch, "flush_interval_s": args.interval_s,
                  "max_staleness_s": args.max_staleness_s, "window": args.window,
                  "seed": args.seed, "wall_s": round(elapsed, 1)},
        "policies": results,
    }


def plot(report: dict, path: Path) -> bool:
    if not have("matplotlib"):
        print("no picture: matplotlib is missing (pip install -e '.[demo]')", file=sys.stderr)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    policies_ = report["policies"]
    for name, r in policies_.items():
        if name == "frozen":
            axes.axhline(r["auc"], color="#d8573b", linestyle=":", label=f"frozen {r['auc']}")
            continue
        marker = "s" if "int8" in name else "o"
        color = "#3bb273" if name.startswith("prioritized") else "#3b7dd8"
        axes.scatter(r["bytes"] / 1e6, r["auc"], marker=marker, color=color)
        axes.annotate(name, (r["bytes"] / 1e6, r["auc"]), fontsize=7, xytext=(4, 2),
                      textcoords="offset points")
    axes.set_xscale("log")
    axes.set_xlabel("MB shipped (log)")
    axes.set_ylabel("AUC over the held-out windows")
    axes.set_title("update policies: accuracy against bytes (demo click stream)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--steps-per-s", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=150)
    parser.add_argument("--vocab", type=int, default=20_000)
    parser.add_argument("--interval-s", type=float, default=0.5)
    parser.add_argument("--buffer-size", type=int, default=20_000)
    parser.add_argument("--max-staleness-s", type=float, default=20.0)
    parser.add_argument("--budgets", type=float, nargs=3, default=[0.05, 0.1, 0.25])
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "traffic.json")
    args = parser.parse_args()
    report = run(args)
    width = max(len(n) for n in report["policies"])
    print(f"{'policy':<{width}}  {'MB':>8} {'x fewer':>7} {'rows':>9} {'AUC':>7} "
          f"{'logloss':>7} {'stale s':>7}")
    for name, r in report["policies"].items():
        print(f"{name:<{width}}  {r['bytes'] / 1e6:8.2f} {r['bytes_fewer_x'] or 0:7.2f} "
              f"{r['rows']:9d} {r['auc']:7.4f} {r['logloss']:7.4f} "
              f"{r['max_row_staleness_s'] if r['max_row_staleness_s'] is not None else '-':>7}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if plot(report, args.out.with_suffix(".png")):
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    else:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
