"""What the time-driven flush interval costs the training step: bench/producer.py's step-time
overhead (the torch hook on the example CTR model, interval off as there) and its freshness
(a flush every 0.5 s under training load, where the interval fires), run on the code before
the change (`--base`, extracted with `git archive`) and on this tree, alternating processes in
ABBA order, so each figure stands next to a same-run baseline. Writes
bench/results/producer_idle_interval.json.

    flock /tmp/persia-heavy.lock .venv/bin/python bench/producer_idle_interval.py [--base REV]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "producer_idle_interval.json"
PACKAGES = ("embedding_server", "foundation", "inference", "loader", "packet_format", "producer",
            "storage")

CHILD = """
import importlib.util, json, tempfile
import persia_inc.producer.core as core
spec = importlib.util.spec_from_file_location("bench_producer", {bench!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)  # bench/producer.py, by path: not the persia_inc.producer package
assert core.__file__.startswith({tree!r}), core.__file__
with tempfile.TemporaryDirectory() as folder:
    out = {{"record_columns": bench.bench_record_columns(),
           "step_overhead": bench.bench_overhead({rounds}, {block}, {vocab}, folder + "/o"),
           "freshness": bench.bench_freshness({fresh_rounds}, {fresh_s}, folder + "/f")}}
print("RESULT " + json.dumps(out))
"""


def base_tree(rev: str, into: Path) -> Path:
    """A package folder importing `persia_inc` from the code at `rev` (git archive of it)."""
    src = into / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(src, filter="data")
    pkg = into / "pkg" / "persia_inc"
    pkg.mkdir(parents=True)
    for entry in (src / "persia_inc").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for name in PACKAGES:
        (pkg / name).symlink_to(src / name)
    return into / "pkg"


def run(arm: str, tree: str, env: dict[str, str], args: argparse.Namespace) -> dict:
    code = CHILD.format(bench=str(ROOT / "bench" / "producer.py"), tree=tree, rounds=args.rounds,
                        block=args.block, vocab=args.vocab, fresh_rounds=args.fresh_rounds,
                        fresh_s=args.fresh_seconds)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=False, cwd=tempfile.gettempdir())  # not the repo: its persia_inc/
    if done.returncode != 0:
        raise SystemExit(f"{arm} run failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def summary(result: dict) -> dict:
    arm = result["step_overhead"]["arms"]["all"]
    fresh = result["freshness"]["arms"]["all"]
    return {"overhead_pct": arm["overhead_pct"], "overhead_pct_sd": arm["overhead_pct_sd"],
            "median_ratio": arm["median_ratio"],
            "no_hook_median_ms": result["step_overhead"]["arms"]["no_hook"]["median_ms"],
            "record_columns_ms": result["record_columns"]["record_columns_ms"],
            "fresh_p50_ms": fresh["p50_ms"], "fresh_p99_ms": fresh["p99_ms"],
            "fresh_steps_per_s": fresh["steps_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="14baae8^", help="the code before the change")
    parser.add_argument("--pairs", type=int, default=1, help="ABBA quadruples of processes")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=300_000)
    parser.add_argument("--fresh-rounds", type=int, default=3)
    parser.add_argument("--fresh-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_pkg = base_tree(args.base, Path(tmp))
        env_new = dict(os.environ)
        env_base = {**os.environ, "PYTHONPATH": str(base_pkg)}
        arms = {"base": (str(base_pkg), env_base), "new": (str(ROOT), env_new)}
        runs: dict[str, list[dict]] = {"base": [], "new": []}
        for k in range(args.pairs):
            for arm in ("base", "new", "new", "base") if k % 2 == 0 else ("new", "base", "base", "new"):
                tree, env = arms[arm]
                print(f"pair {k}: {arm} ...", flush=True)
                runs[arm].append(summary(run(arm, tree, env, args)))
    figures = {arm: {key: round(statistics.mean(r[key] for r in rs), 3)
                     for key in rs[0]} for arm, rs in runs.items()}
    for arm in ("base", "new"):
        f = figures[arm]
        print(f"{arm:>4}: hook overhead {f['overhead_pct']:+.2f}% (sd {f['overhead_pct_sd']:.2f}), "
              f"median step x{f['median_ratio']:.3f} vs no hook ({f['no_hook_median_ms']:.2f} ms), "
              f"record_columns {f['record_columns_ms']:.3f} ms, freshness p50/p99 "
              f"{f['fresh_p50_ms']}/{f['fresh_p99_ms']} ms")
    ratio = {key: round(figures["new"][key] / figures["base"][key], 3)
             for key in ("median_ratio", "record_columns_ms", "fresh_p50_ms", "fresh_p99_ms",
                         "fresh_steps_per_s")
             if figures["base"][key]}
    print(f"new / base: {ratio}")
    args.out.write_text(json.dumps({
        "command": "bench/producer_idle_interval.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "base": args.base,
        "what": "bench/producer.py's step overhead (interval off) and freshness (interval 0.5 s "
                "under load), on the code before the time-driven interval (base) and after (new)",
        "figures": figures, "new_over_base": ratio, "runs": runs}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
