"""`persia-inc status`: how far behind storage the embedding servers are, per stream."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "per (table, producer): the servers' watermark, the newest stored packet, the lag"
DESCRIPTION = """\
For each (table, producer) of the model: the watermark every shard holds, the newest packet in
storage, and the lag in packets and seconds (how long the oldest packet the servers miss has
been stored). --json prints one JSON object.

Exit status: 0 done, 1 failed (the reason is on stderr), 2 usage or configuration error.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="CFG", required=True, help="global_config.yaml")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _fmt(position: tuple[int, int] | None) -> str:
    return "-" if position is None else f"{position[0]}:{position[1]}"


def run(args: argparse.Namespace) -> int:
    from persia_inc.config import load_config
    from persia_inc.embedding_server.errors import ShardError
    from persia_inc.loader.replay import stream_status
    from persia_inc.packet_format import PacketError
    from persia_inc.storage import StorageError
    from persia_inc.wiring import embedding_client

    config = load_config(args.config, need_servers=True)
    try:
        with embedding_client(config) as client, config.open_store() as store:
            rows = stream_status(client, store, config.persia_inc.model)
    except (ShardError, StorageError, PacketError, FileNotFoundError, PermissionError,
            RuntimeError) as exc:
        print(f"persia-inc status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"model": config.persia_inc.model, "streams": [
            {"table": r.table, "producer": r.producer,
             "watermark": list(r.watermark) if r.watermark else None,
             "newest": list(r.newest) if r.newest else None,
             "lag_packets": r.lag_packets, "lag_s": round(r.lag_s, 3)} for r in rows]}))
        return 0
    print(f"{'table':<20} {'producer':<20} {'servers':>16} {'storage':>16} {'lag':>6} {'lag_s':>9}")
    for r in rows:
        print(f"{r.table:<20} {r.producer:<20} {_fmt(r.watermark):>16} {_fmt(r.newest):>16} "
              f"{r.lag_packets:>6} {r.lag_s:>9.1f}")
    return 0
