"""The fault soak (see persia_inc.soak): N minutes of training with known values while the
trainer, the loader and a server are killed with -9, the Ceph gateway and the Kafka broker
stop and start, and one oversized burst goes out; then every row on the servers is compared
with training byte for byte.

    flock /tmp/persia-heavy.lock .venv/bin/python bench/soak.py [--minutes 5] [--local]

Prints the faults injected by kind, rows checked, rows lost (must be 0), packets applied out
of order (must be 0) and the longest stall of any stream, and writes bench/results/soak.json.
Exit 0 only when nothing was lost.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from persia_inc.soak import FAULT_KINDS, SoakOptions, run_soak

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long training runs (default 5)")
    parser.add_argument("--local", action="store_true",
                        help="local directory storage and dir announcements (no Ceph, no Kafka)")
    parser.add_argument("--fault-every-s", type=float, default=15.0, help="mean time between faults")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    # this process only watches; the faults' retries are the children's to log (logs/ in workdir)
    logging.getLogger("persia_inc.foundation.retry").setLevel(logging.ERROR)
    options = SoakOptions(seconds=args.minutes * 60, storage="local" if args.local else "ceph",
                          announce="dir" if args.local else "kafka", fault_every_s=args.fault_every_s,
                          seed=args.seed, workdir=args.workdir, faults=FAULT_KINDS)
    started = time.monotonic()
    report = run_soak(options, on_fault=lambda kind, at: print(f"  {at:6.1f} s  {kind}", flush=True))
    print(f"soak: {report.training_s:.0f} s of training on {report.storage} storage with "
          f"{report.announce} announcements (wall {time.monotonic() - started:.0f} s)")
    print("faults injected:   " + ", ".join(f"{k} {v}" for k, v in report.faults.items()))
    print(f"training steps:    {report.steps:,}; packets: {report.packets:,}")
    print(f"rows checked:      {report.rows_checked:,}")
    print(f"rows lost:         {report.rows_lost:,}   (must be 0)")
    print(f"out of order:      {report.out_of_order:,}   (must be 0)")
    print(f"longest stall:     {report.longest_stall_s:.1f} s (any stream, packet stored -> on every shard)")
    print(f"catch-up at end:   {report.catch_up_s:.1f} s")
    for problem in report.problems:
        print(f"problem: {problem}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json.loads(report.to_json()) | {"minutes": args.minutes}, indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
