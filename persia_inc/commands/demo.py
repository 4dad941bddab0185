"""`persia-inc demo`: the whole pipeline on one machine, checked byte for byte."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "train with the hook, load into two embedding servers, verify every row (make demo)"
DESCRIPTION = """\
Builds an initial sparse checkpoint of a CTR model (26 embedding tables, dim 16), starts the
embedding servers from it, trains the model on synthetic Criteo-shaped data with the producer
hook (evicting rows now and then), runs the loader, and shows live progress: steps, packets,
rows applied, freshness p50/p99 and lag. At the end it checks that every row on the servers
equals the training table byte for byte and that evicted rows are gone, prints a summary,
and writes report.json and freshness.png (with matplotlib: the `plot` extra) into the workdir.

The default is the embedded set-up: local directory storage and the watchdog loader, no
external services. --storage ceph|hdfs and --announce kafka use real services when they run
(ceph: S3_ENDPOINT_URL and AWS_* credentials, or --incremental-dir s3://bucket/prefix;
hdfs: --incremental-dir hdfs://namenode:9870/path; kafka: --kafka-bootstrap host:port).

Exit status: 0 verified, 1 the check failed, 2 usage error.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=60.0, help="training time (default 60)")
    parser.add_argument("--workdir", type=Path, help="where everything goes (default: a temp dir)")
    parser.add_argument("--storage", choices=["local", "ceph", "hdfs"], default="local")
    parser.add_argument("--announce", choices=["dir", "kafka"], default="dir")
    parser.add_argument("--incremental-dir", default="", help="packet root URI (ceph, hdfs)")
    parser.add_argument("--kafka-bootstrap", default="", help="host:port of a Kafka broker")
    parser.add_argument("--shards", type=int, default=2, help="embedding servers (default 2)")
    parser.add_argument("--vocab", type=int, default=20_000, help="rows per table (default 20000)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from persia_inc.demo.pipeline import DemoOptions, default_workdir, run_demo
    from persia_inc.demo.report import Progress
    from persia_inc.extras import have, install_hint

    if not have("torch"):
        print(f"persia-inc demo: the demo trains with PyTorch, which is not installed: "
              f"{install_hint('torch')}", file=sys.stderr)
        return 2
    if args.shards < 1 or args.vocab < 100 or args.seconds <= 0:
        print("persia-inc demo: --shards >= 1, --vocab >= 100 and --seconds > 0 please")
        return 2
    workdir = args.workdir or default_workdir()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    _log_to_file(workdir / "logs" / "demo.log")  # keep the live display readable
    options = DemoOptions(workdir=workdir, seconds=args.seconds, storage=args.storage,
                          announce=args.announce, shards=args.shards, vocab=args.vocab,
                          incremental_dir=args.incremental_dir,
                          kafka_bootstrap=args.kafka_bootstrap)
    console = Console()
    console.print(f"[bold]persia-inc demo[/] in {workdir} ({args.storage} storage, "
                  f"{args.announce} announcements, {args.shards} embedding servers)")
    if not have("matplotlib"):
        console.print("no freshness.png this time: matplotlib is not installed "
                      f"({install_hint('matplotlib')})")

    def render(progress: Progress) -> Table:
        table = Table(show_header=False, box=None)
        lag = progress.packets_stored - progress.packets_visible
        for name, value in (
            ("phase", progress.phase),
            ("training steps", f"{progress.steps:,}"),
            ("packets stored / applied", f"{progress.packets_stored:,} / {progress.packets_visible:,}"),
            ("rows applied", f"{progress.rows_applied:,}"),
            ("freshness p50 / p99", f"{progress.percentile(50):.0f} ms / {progress.percentile(99):.0f} ms"),
            ("lag", f"{lag:,} packets"),
        ):
            table.add_row(f"[cyan]{name}[/]", value)
        return table

    with Live(render(Progress()), console=console, refresh_per_second=4) as live:
        report = run_demo(options, on_progress=lambda p: live.update(render(p)))

    summary = Table(title="persia-inc demo: summary")
    summary.add_column("check")
    summary.add_column("result", justify="right")
    fresh = report.freshness_ms
    for name, value in (
        ("verified", "[green]yes[/]" if report.verified else "[red]NO[/]"),
        ("training steps", f"{report.steps:,} in {report.train_seconds:.0f} s"),
        ("packets applied", f"{report.packets:,}"),
        ("rows applied", f"{report.rows_applied:,}"),
        ("rows checked byte for byte", f"{report.checked_rows:,}"),
        ("mismatched rows", f"{report.mismatched_rows:,}"),
        ("evicted rows / still served", f"{report.evicted_rows:,} / {report.evicted_still_served:,}"),
        ("freshness p50 / p99 / max", f"{fresh.get('p50', 0):.0f} / {fresh.get('p99', 0):.0f} / "
                                      f"{fresh.get('max', 0):.0f} ms"),
    ):
        summary.add_row(name, value)
    console.print(summary)
    for problem in report.problems:
        console.print(f"[red]problem:[/] {problem}")
    pictures = "".join(f"   picture: {workdir / name}" for name in report.pictures)
    console.print(f"report: {workdir / 'report.json'}{pictures}   logs: {workdir / 'logs'}")
    return 0 if report.verified else 1


def _log_to_file(path: Path) -> None:
    import logging

    root = logging.getLogger()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
