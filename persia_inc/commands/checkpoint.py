"""`persia-inc checkpoint save|load`: sparse checkpoints of the running embedding servers."""

from __future__ import annotations

import argparse
import sys

HELP = "save the embedding servers' tables to a checkpoint, or make them load one"
DESCRIPTION = """\
save: dump every shard's tables as packet-format part files plus manifest.json (with the
      per-producer watermarks they contain) to URI (a path, file://, hdfs://, s3://).
      manifest.json is written last: a checkpoint without it is incomplete.
load: make every running shard replace its tables with its share of the checkpoint at URI
      (re-sharding when it was saved from a different number of servers).

Exit status: 0 done, 1 failed (the reason is on stderr), 2 usage or configuration error.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    save = sub.add_parser(
        "save", help="write a checkpoint of the running servers",
        description="Dump every shard's tables as packet-format part files plus manifest.json "
                    "(with the per-producer watermarks they contain) to the folder URI --to (a "
                    "path, file://, hdfs://, s3://). manifest.json is written last: a checkpoint "
                    "without it is incomplete. Exit status: 0 done, 1 failed, 2 usage or "
                    "configuration error.")
    save.add_argument("--config", metavar="CFG", required=True, help="global_config.yaml")
    save.add_argument("--to", metavar="URI", required=True, help="checkpoint folder URI")
    load = sub.add_parser(
        "load", help="make the running servers load a checkpoint",
        description="Make every running shard replace its tables with its share of the "
                    "checkpoint at --from (re-sharding when it was saved from a different number "
                    "of servers). Exit status: 0 done, 1 failed, 2 usage or configuration error.")
    load.add_argument("--config", metavar="CFG", required=True, help="global_config.yaml")
    load.add_argument("--from", dest="source", metavar="URI", required=True,
                      help="checkpoint folder URI")


def run(args: argparse.Namespace) -> int:
    from persia_inc.config import load_config
    from persia_inc.embedding_server.checkpoint import save_checkpoint
    from persia_inc.embedding_server.errors import ShardError
    from persia_inc.packet_format import PacketError
    from persia_inc.storage import StorageError
    from persia_inc.wiring import embedding_client

    config = load_config(args.config, need_servers=True)
    try:
        with embedding_client(config) as client:
            if args.action == "save":
                with config.open_store(args.to) as store:
                    manifest = save_checkpoint(
                        client, store, model=config.persia_inc.model,
                        chunk_rows=config.persia_inc.embedding_server.dump_chunk_rows)
                rows = sum(t.rows for t in manifest.tables.values())
                print(f"saved {rows} rows of {len(manifest.tables)} tables to {args.to}")
            else:
                rows = client.load_checkpoint(args.source)
                print(f"loaded {rows} rows from {args.source} into {len(client.servers)} shards")
    except (ShardError, StorageError, PacketError, FileNotFoundError, PermissionError) as exc:
        print(f"persia-inc checkpoint {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0
