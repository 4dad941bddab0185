"""`persia-inc embedding-server --config CFG --shard I [--replica R]`: run one embedding-server
shard (one replica of it)."""

from __future__ import annotations

import argparse

HELP = "run one embedding-server shard (gRPC) from the configuration"
DESCRIPTION = """\
Runs shard I of the embedding servers listed in PersiaInferConfig.servers, bound to exactly
servers[I] (or, when that entry lists the shard's replicas, servers[I][R]). At start it loads
its share of initial_sparse_checkpoint (if set) and reports NOT_SERVING on the gRPC health
service until that is done; a replica of a shard with siblings stays NOT_SERVING (refusing
plain lookups) until it holds what they hold. SIGTERM or Ctrl-C stops it
gracefully (persia_inc.embedding_server.grace_s).

Exit status: 0 stopped cleanly, 1 the initial checkpoint could not be loaded or the address
could not be bound, 2 usage or configuration error.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="CFG", required=True, help="global_config.yaml")
    parser.add_argument("--shard", metavar="I", type=int, required=True,
                        help="which entry of PersiaInferConfig.servers this process serves")
    parser.add_argument("--replica", metavar="R", type=int, default=0,
                        help="which replica of that shard (an entry listing several addresses); "
                             "default 0")


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from persia_inc.config import load_config
    from persia_inc.foundation.memory import keep_freed_memory
    from persia_inc.wiring import serve_shard

    keep_freed_memory()  # apply messages of megabytes: reuse their buffers, no page faults
    config = load_config(args.config)
    try:
        return serve_shard(config, args.shard, replica=args.replica)
    except ValueError as exc:
        print(f"persia-inc embedding-server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        logging.getLogger(__name__).error("%s", exc)
        return 1
