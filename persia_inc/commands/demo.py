"""`persia-inc demo`: the whole pipeline on one machine, checked byte for byte."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger(__name__)

HELP = "train with the hook, load into two embedding servers, serve, verify every row (make demo)"
DESCRIPTION = """\
Warms a CTR model (26 embedding tables, dim 16) up on a synthetic Criteo-shaped click stream,
saves the sparse checkpoint the embedding servers start from and the dense part (TorchScript),
then trains on with the producer hook while the stream drifts (what users like moves, new ids
arrive; evicting rows now and then), and runs the loader. Meanwhile a steady stream of
requests (128 rows each) is scored on arms: live, with embeddings from the live servers,
which the loader keeps updating, and the dense version TorchServe serves (see below); and
frozen, with a copy that loaded the same checkpoint and never gets a packet, and the
checkpoint's dense part; their AUC and log-loss show what freshness is worth. The live arm
is served by TorchServe (the dense part archived as a .mar whose handler reaches the live
servers, started as `persia-inc serve` starts it, one worker, on 127.0.0.1, logs in
WORKDIR/torchserve) over its gRPC inference API; the frozen arm by the same engine code in
process. Without Java or TorchServe (the `serve` extra) the live arm is served in
process too, and one line says what to install. After training, once the loader has applied
every packet, 100 requests are scored by TorchServe and in process: they must agree bit for
bit.

While training, the dense part is published as a dense version every --dense-every-seconds
(default 10; 0: never): the sparse buffer flushed so the cut is exact, the dense part saved
with TorchScript and archived as a .mar, stored with its manifest in incremental_dir. The
loader's dense sync registers each version with TorchServe and makes it the default once
both embedding servers hold its sparse positions, so the live arm serves through them; a
third arm scores the live rows with the checkpoint's dense part, in process, to show what the
dense updates add. After training the last version must activate, and the bit-for-bit check
runs against it; report.json lists dense_versions (version, exported_at_ns, sparse_positions,
activated_at_ns from the loader's dense sync). No request may fail while versions switch.

Live progress: steps, packets, rows applied, freshness p50/p99, lag, requests/s,
serving p50/p99, dense versions and the AUC of the arms. At the end it checks that every
row on the live servers equals the training table byte for byte, that evicted rows are gone
and that the frozen arm still holds the checkpoint, prints a summary, and writes report.json,
freshness.png and serving.png (with matplotlib: the `plot` extra) into the workdir.

The default is the embedded set-up: local directory storage and the watchdog loader, no
external services. --storage ceph|hdfs and --announce kafka use real services:

  ceph   the S3 endpoint from --s3-endpoint-url, else S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3,
         AWS_ENDPOINT_URL (keys: the AWS_* variables), or --incremental-dir s3://bucket/prefix;
         with none of these the demo starts a throwaway single-node Ceph with its S3 gateway
  kafka  --kafka-bootstrap host:port, else KAFKA_BOOTSTRAP_SERVERS; with neither the demo
         starts a Tansu Kafka-protocol broker
  hdfs   --incremental-dir hdfs://namenode:9870/path (none can be started here)

What the demo starts binds to 127.0.0.1, lives under WORKDIR/services and is stopped by PID
when the demo ends, also on an error, Ctrl-C or SIGTERM.

Exit status: 0 verified, 1 the check failed or a service did not start, 2 usage error or a
missing package (the line says how to install it), 130 Ctrl-C, 143 SIGTERM.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="training and serving time after the checkpoint (default 60)")
    parser.add_argument("--warmup-seconds", type=float, default=8.0,
                        help="training time before the checkpoint (default 8)")
    parser.add_argument("--workdir", type=Path, help="where everything goes (default: a temp dir)")
    parser.add_argument("--storage", choices=["local", "ceph", "hdfs"], default="local")
    parser.add_argument("--announce", choices=["dir", "kafka"], default="dir")
    parser.add_argument("--incremental-dir", default="", help="packet root URI (ceph, hdfs)")
    parser.add_argument("--s3-endpoint-url", default="",
                        help="S3 endpoint for ceph (default: S3_ENDPOINT_URL, AWS_ENDPOINT_URL; "
                             "none: start a throwaway Ceph)")
    parser.add_argument("--kafka-bootstrap", default="",
                        help="host:port of a Kafka broker (default: KAFKA_BOOTSTRAP_SERVERS; "
                             "none: start a Tansu broker)")
    parser.add_argument("--shards", type=int, default=2, help="embedding servers (default 2)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="processes per live shard, each a full copy; clients fail over "
                             "between them (default 1)")
    parser.add_argument("--chaos", nargs="?", type=float, const=5.0, default=0.0, metavar="S",
                        help="kill one live replica with SIGKILL every S seconds (default 5) "
                             "while serving and start it again; needs --replicas >= 2")
    parser.add_argument("--vocab", type=int, default=20_000, help="rows per table (default 20000)")
    parser.add_argument("--buffer-size", type=int, default=20_000,
                        help="incremental_buffer_size: distinct signs over all 26 tables that "
                             "start a flush (default 20,000)")
    parser.add_argument("--flush-interval-s", type=float, default=0.5,
                        help="flush when the oldest unflushed sign is this old (default 0.5)")
    parser.add_argument("--dense-every-seconds", type=float, default=10.0, metavar="S",
                        help="publish the dense part as a dense version this often while "
                             "training; the loader activates each in TorchServe (default 10; "
                             "0: never; needs the torchserve or kserve frontend)")
    parser.add_argument("--update-policy", choices=["all", "prioritized"], default="all",
                        help="which touched rows a flush ships: all (default) or prioritized "
                             "(the rows that changed most, within --update-budget, every other "
                             "one within --max-staleness-s); the report says the bytes shipped")
    parser.add_argument("--update-budget", type=float, default=0.05, metavar="F",
                        help="prioritized: fraction of the touched rows a flush ships besides "
                             "the due ones (default 0.05)")
    parser.add_argument("--max-staleness-s", type=float, default=20.0, metavar="S",
                        help="prioritized: no touched row waits longer (default 20)")
    parser.add_argument("--frontend", choices=["torchserve", "kserve", "in-process"], default="torchserve",
                        help="how the live arm is served (default torchserve; in process when "
                             "Java or TorchServe is missing); kserve: the Open Inference Protocol "
                             "(persia-inc serve --frontend kserve, gRPC), dense versions included")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text

    from persia_inc.demo.pipeline import DemoOptions, default_workdir, run_demo
    from persia_inc.demo.report import DemoReport, Progress
    from persia_inc.demo.services import (
        DemoUsageError,
        StartedServices,
        install_command,
        plan_services,
    )
    from persia_inc.demo.serving import ServingOptions, torchserve_missing
    from persia_inc.extras import have, install_hint
    from persia_inc.local_services import ServiceError
    from persia_inc.storage import S3Settings

    if not have("torch"):
        print(f"persia-inc demo: the demo trains with PyTorch, which is not installed: "
              f"{install_hint('torch')}", file=sys.stderr)
        return 2
    if (args.shards < 1 or args.vocab < 100 or args.seconds <= 0 or args.warmup_seconds < 0
            or args.dense_every_seconds < 0 or args.replicas < 1 or args.chaos < 0
            or (args.chaos and args.replicas < 2) or not 0 < args.update_budget <= 1
            or args.max_staleness_s <= args.flush_interval_s):
        print("persia-inc demo: --shards >= 1, --vocab >= 100, --seconds > 0, "
              "--warmup-seconds >= 0, --dense-every-seconds >= 0, --replicas >= 1, "
              "--chaos only with --replicas >= 2, 0 < --update-budget <= 1 and "
              "--max-staleness-s > --flush-interval-s please", file=sys.stderr)
        return 2
    try:
        plan = plan_services(args.storage, args.announce, incremental_dir=args.incremental_dir,
                             s3_endpoint_url=args.s3_endpoint_url,
                             kafka_bootstrap=args.kafka_bootstrap)
    except DemoUsageError as exc:
        print(f"persia-inc demo: {exc}", file=sys.stderr)
        return 2
    to_start = [name for needed, name in ((plan.start_ceph, "Ceph with its S3 gateway"),
                                          (plan.start_kafka, "a Tansu Kafka broker")) if needed]
    missing = install_command(plan)
    if missing:
        print(f"persia-inc demo: no service configured and {' and '.join(to_start)} not "
              f"installed; install with: {missing}", file=sys.stderr)
        return 2
    workdir = args.workdir or default_workdir()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    _log_to_file(workdir / "logs" / "demo.log")  # keep the live display readable
    console = Console()
    frontend = args.frontend
    why = torchserve_missing() if frontend == "torchserve" else None
    if frontend == "kserve" and not have("model_archiver"):  # its .mar files
        why = f"torch-model-archiver is not installed: {install_hint('model_archiver')}"
    if why:
        frontend = "in-process"
    print_intro(console, workdir, args, why, have("matplotlib"))

    def render(progress: Progress) -> Table:
        table = Table(show_header=False, box=None)
        lag = progress.packets_stored - progress.packets_visible
        now = time.monotonic()
        for name, value in (
            ("phase", progress.phase),
            ("training steps", f"{progress.steps:,}"),
            ("packets stored / applied", f"{progress.packets_stored:,} / {progress.packets_visible:,}"),
            ("rows applied", f"{progress.rows_applied:,}"),
            ("freshness p50 / p99", f"{progress.percentile(50):.0f} ms / {progress.percentile(99):.0f} ms"),
            ("lag", f"{lag:,} packets"),
            ("requests/s (errors)", f"{progress.requests_per_s(now):.1f} ({progress.serving_errors})"),
            ("serving p50 / p99", f"{progress.serving_percentile(50):.1f} ms / "
                                  f"{progress.serving_percentile(99):.1f} ms"),
            ("dense versions published / activated (active)",
             f"{progress.dense_published} / {progress.dense_activated} ({progress.dense_active})"),
            ("AUC live / ckpt dense / frozen", f"{progress.auc_live:.3f} / "
                                               f"{progress.auc_checkpoint_dense:.3f} / "
                                               f"{progress.auc_frozen:.3f}"),
        ):
            table.add_row(f"[cyan]{name}[/]", value)
        return table

    services = StartedServices(workdir / "services", plan)
    report: DemoReport | None = None
    left: list[int] = []
    with _signals_stop_the_run():  # a signal while stopping only says "a moment please"
        try:
            try:
                if to_start:
                    with console.status(f"starting {' and '.join(to_start)} on 127.0.0.1 ..."):
                        services.start()
                    literal(console, services.describe())
                s3 = services.s3 or (S3Settings(endpoint_url=plan.s3_endpoint) if plan.s3_endpoint
                                     else None)
                options = DemoOptions(workdir=workdir, seconds=args.seconds,
                                      warmup_s=args.warmup_seconds, storage=args.storage,
                                      announce=args.announce, shards=args.shards, vocab=args.vocab,
                                      buffer_size=args.buffer_size,
                                      flush_interval_s=args.flush_interval_s,
                                      incremental_dir=args.incremental_dir, s3=s3,
                                      serving=ServingOptions(frontend=frontend),
                                      dense_every_s=args.dense_every_seconds,
                                      replicas=args.replicas, chaos_every_s=args.chaos,
                                      update_policy=args.update_policy,
                                      update_budget=args.update_budget,
                                      max_staleness_s=args.max_staleness_s,
                                      kafka_bootstrap=services.kafka_bootstrap or plan.kafka_bootstrap)
                with Live(render(Progress()), console=console, refresh_per_second=4) as live:
                    report = run_demo(options, on_progress=lambda p: live.update(render(p)))
            finally:
                left = services.close()
        except ServiceError as exc:
            log.error("a service did not start: %s", exc)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"persia-inc demo: {first} (details: {workdir / 'logs' / 'demo.log'}, "
                  f"{workdir / 'services'})", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, _Terminated, SystemError) as caught:
            # raised inside a C extension (numba), the signal's exception arrives wrapped in a
            # SystemError: it is still the signal
            signalled = _signal_behind(caught)
            if signalled is None:
                raise
            left = services.close()  # again, in case the signal came while stopping
            terminated = isinstance(signalled, _Terminated)
            why = "stopped by SIGTERM" if terminated else "interrupted (Ctrl-C)"
            print(f"persia-inc demo: {why}; {_stopped(services.pids, left)}", file=sys.stderr)
            return 143 if terminated else 130
    if report is None:  # run_demo returns a report or raises
        return 1
    if services.pids:
        report.services = services.as_report()
        report.services_left_running = left
        if left:
            report.problems.append(f"processes it started still run after stopping: {left}")
            report.verified = False
        (workdir / "report.json").write_text(report.to_json())

    summary = Table(title="persia-inc demo: summary")
    summary.add_column("check")
    summary.add_column("result", justify="right")
    fresh = report.freshness_ms
    serving = report.serving
    dense = report.dense
    publish = dense.get("publish_ms") or {}
    for name, value in (
        ("verified", "[green]yes[/]" if report.verified else "[red]NO[/]"),
        ("training steps", f"{report.steps:,} in {report.train_seconds:.0f} s"),
        ("objects stored / flushes", f"{report.objects_stored:,} / {report.flushes:,}"),
        (f"bytes / rows shipped ({report.update_policy})",
         f"{report.bytes_shipped / 1e6:,.1f} MB / {report.rows_shipped:,}"),
        ("packets applied", f"{report.packets:,}"),
        ("rows applied", f"{report.rows_applied:,}"),
        ("rows checked byte for byte", f"{report.checked_rows:,}"),
        ("mismatched rows", f"{report.mismatched_rows:,}"),
        ("evicted rows / still served", f"{report.evicted_rows:,} / {report.evicted_still_served:,}"),
        ("freshness p50 / p99 / max", f"{fresh.get('p50', 0):.0f} / {fresh.get('p99', 0):.0f} / "
                                      f"{fresh.get('max', 0):.0f} ms"),
        (f"serving ({serving.get('frontend', '-')}): requests / errors",
         f"{serving.get('requests', 0):,} / {serving.get('errors', 0):,}"),
        ("serving p50 / p99", f"{serving.get('p50_ms', 0):.1f} / {serving.get('p99_ms', 0):.1f} ms"),
        ("replicas per shard / kills / failovers",
         f"{serving.get('replicas', 1)} / {_count(serving.get('kills'))} / "
         f"{serving.get('failovers', 0):,}"),
        (f"{'kserve' if serving.get('frontend') == 'kserve' else 'TorchServe'} vs in process: "
         "checked / mismatched",
         f"{serving.get('checked', 0):,} / {serving.get('mismatched', 0):,}"),
        ("dense versions activated / published",
         f"{dense.get('activated', 0):,} / {dense.get('published', 0):,}" if dense else "off"),
        ("dense publish p50 / max (training waits)",
         f"{publish.get('p50', 0):.0f} / {publish.get('max', 0):.0f} ms" if publish else "-"),
        ("AUC live / live rows + ckpt dense / frozen",
         f"{_figure(serving.get('auc_live'))} / {_figure(serving.get('auc_checkpoint_dense'))} / "
         f"{_figure(serving.get('auc_frozen'))}"),
        ("log-loss live / live rows + ckpt dense / frozen",
         f"{_figure(serving.get('logloss_live'))} / "
         f"{_figure(serving.get('logloss_checkpoint_dense'))} / "
         f"{_figure(serving.get('logloss_frozen'))}"),
    ):
        summary.add_row(name, value)
    console.print(summary)
    for problem in report.problems:
        console.print(Text.assemble(("problem: ", "red"), problem))
    pictures = "".join(f"   picture: {workdir / name}" for name in report.pictures)
    literal(console, f"report: {workdir / 'report.json'}{pictures}   logs: {workdir / 'logs'}")
    if services.pids:
        literal(console, _stopped(services.pids, left))
    return 0 if report.verified else 1


def literal(console: Console, line: str) -> None:
    """Print `line` exactly: no markup (`[plot]` in a pip command is not a style), no
    highlighting, no wrapping inside a path or a command."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def print_intro(console: Console, workdir: Path, args: argparse.Namespace, torchserve_missing: str | None,
                have_matplotlib: bool) -> None:
    """The demo's first lines: where it runs and on what, and what it will do without."""
    from rich.text import Text

    from persia_inc.extras import install_hint

    console.print(Text.assemble(("persia-inc demo", "bold"),
                                f" in {workdir} ({args.storage} storage, {args.announce} "
                                f"announcements, {args.shards} embedding servers)"), soft_wrap=True)
    if torchserve_missing:
        through = "the kserve frontend" if args.frontend == "kserve" else "TorchServe"
        literal(console, f"serving the live arm in process, not through {through}: {torchserve_missing}")
    if not have_matplotlib:
        literal(console, "no freshness.png nor serving.png this time: matplotlib is not installed "
                         f"({install_hint('matplotlib')})")


def _figure(value: object) -> str:
    """A 4-decimal figure of the report, or "-" when absent (None)."""
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def _stopped(pids: dict[str, int], left: list[int]) -> str:
    """One line on the services the demo started: stopped, or which PIDs still run."""
    if not pids:
        return "it had started no services"
    named = ", ".join(f"{name} {pid}" for name, pid in pids.items())
    if left:
        return f"STILL RUNNING after stopping: pids {left} (of the services it started: {named})"
    return f"stopped the services it started ({named})"


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` runs and stops what we started."""


def _signal_behind(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or `_Terminated` that `exc` is or was caused by, or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt | _Terminated):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def _signals_stop_the_run() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM `_Terminated` in the main thread; a second
    signal while stopping only says to wait (stopping is bounded)."""

    def stopping(_signum: int, _frame: FrameType | None) -> None:
        print("persia-inc demo: stopping what it started; a moment please", file=sys.stderr)

    def first(signum: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, stopping)
        signal.signal(signal.SIGTERM, stopping)
        log.warning("got %s: stopping the run and every process it started",
                    signal.Signals(signum).name)
        if signum == signal.SIGTERM:
            raise _Terminated
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, first) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _log_to_file(path: Path) -> None:
    import logging

    root = logging.getLogger()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


def _count(items: object) -> int:
    """How many entries a report list holds (0 when absent)."""
    return len(items) if isinstance(items, list) else 0
