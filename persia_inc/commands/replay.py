"""`persia-inc replay`: rebuild or roll back the embedding servers from storage."""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "load a checkpoint (or start at the servers' watermarks) and apply every later packet"
DESCRIPTION = """\
Applies every stored packet after the servers' watermarks (or after --checkpoint, which every
shard loads first), per (table, producer) in (generation, sequence) order, with a progress bar.
--until GENERATION:SEQUENCE stops each stream after that point; --until-time T (ISO 8601 or
seconds since the epoch) at its first packet created after T. --dry-run lists what it would
apply. A rollback is a replay onto fresh servers with --until an earlier point.

Exit status: 0 done, 1 failed (the reason is on stderr), 2 usage or configuration error.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="CFG", required=True, help="global_config.yaml")
    parser.add_argument("--checkpoint", metavar="URI", default="",
                        help="checkpoint folder every shard loads first")
    until = parser.add_mutually_exclusive_group()
    until.add_argument("--until", metavar="GENERATION:SEQUENCE", type=_position, default=None,
                       help="apply nothing after this position of each stream")
    until.add_argument("--until-time", metavar="T", type=_time_ns, default=None,
                       help="apply nothing created after T (ISO 8601 or epoch seconds)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be applied")


def _position(text: str) -> tuple[int, int]:
    generation, sep, sequence = text.partition(":")
    if not sep or not generation.isdigit() or not sequence.isdigit():
        raise argparse.ArgumentTypeError(f"expected GENERATION:SEQUENCE, got {text!r}")
    return int(generation), int(sequence)


def _time_ns(text: str) -> int:
    from datetime import datetime

    try:
        return int(float(text) * 1e9)
    except ValueError:
        pass
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1e9)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected ISO 8601 or epoch seconds, got {text!r}") from exc


def run(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from persia_inc.config import load_config
    from persia_inc.embedding_server.errors import ShardError
    from persia_inc.loader.replay import plan_replay, replay, servers_start, trim_plan_until_time
    from persia_inc.packet_format import PacketError
    from persia_inc.storage import StorageError
    from persia_inc.wiring import embedding_client

    config = load_config(args.config, need_servers=True)
    model = config.persia_inc.model
    try:
        with embedding_client(config) as client, config.open_store() as store:
            client.wait_ready(config.persia_inc.embedding_server.request_timeout_s)
            if args.dry_run:
                start = {} if args.checkpoint else servers_start(client)
                if args.checkpoint:
                    start = _checkpoint_start(config, args.checkpoint)
                plan = plan_replay(store, model, start, until=args.until)
                if args.until_time is not None:
                    plan = trim_plan_until_time(store, plan, args.until_time,
                                                limits=config.persia_inc.limits)
                for planned in plan.ordered():
                    print(f"{store.uri(planned.key)}\t{planned.size}")
                print(f"{plan.total} packets, {plan.total_bytes} bytes; {len(plan.gaps)} gaps",
                      file=sys.stderr)
                return 0
            if args.checkpoint:
                client.load_checkpoint(args.checkpoint)
            plan = plan_replay(store, model, servers_start(client), until=args.until)
            columns = [TextColumn("{task.description}"), BarColumn(),
                       TextColumn("{task.completed}/{task.total} packets"),
                       TextColumn("{task.fields[rows]} rows"), TransferSpeedColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn()]
            with Progress(*columns, transient=False) as bar:
                task = bar.add_task("replay", total=plan.total, rows=0)
                sizes = [0]

                def progress(packets: int, rows: int, nbytes: int) -> None:
                    sizes[0] = nbytes
                    bar.update(task, completed=packets, rows=rows)

                result = replay(client, store, model, until_time_ns=args.until_time,
                                limits=config.persia_inc.limits,
                                prefetch=config.persia_inc.loader.prefetch, progress=progress,
                                plan=plan,
                                allow_non_finite=config.persia_inc.loader.allow_non_finite)
    except (ShardError, StorageError, PacketError, FileNotFoundError, PermissionError,
            RuntimeError, TimeoutError) as exc:
        print(f"persia-inc replay: {exc}", file=sys.stderr)
        return 1
    rate = result.rows / max(result.seconds, 1e-9)
    print(f"replayed {result.packets} packets ({result.skipped} already held), {result.rows} rows, "
          f"{result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s ({rate:,.0f} rows/s)")
    return 0


def _checkpoint_start(config: Any, uri: str) -> dict:
    """The watermarks a checkpoint's manifest says it contains."""
    from persia_inc.packet_format import MANIFEST_NAME, CheckpointManifest

    with config.open_store(uri) as store:
        manifest = CheckpointManifest.from_json(store.get(MANIFEST_NAME), where=store.uri(MANIFEST_NAME))
    return {(w.table, w.producer): (w.generation, w.sequence) for w in manifest.watermarks}
