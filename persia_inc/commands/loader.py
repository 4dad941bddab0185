"""`persia-inc loader`: the daemon that hot-applies packets to the embedding servers."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("persia_inc.loader")

HELP = "watch storage or Kafka and hot-apply new packets to the embedding servers, in order"
DESCRIPTION = """\
Runs until SIGTERM (or Ctrl-C): then it finishes the packet in flight, commits Kafka offsets
and exits 0.

Sources (persia_inc.loader.source): a local incremental_dir through watchdog plus a rescan
every rescan_interval_s; HDFS and S3 by listing after each stream's watermark every
list_interval_s; Kafka announcements through the consumer group (offsets committed only after
every shard acked). On start, and after an embedding server comes back, it reads the servers'
watermarks and replays what they miss from storage. A shard that does not answer is logged
(at most every unreachable_log_interval_s), counted and shown in /healthz and `persia-inc
status`; the other shards still get their slices. /streams on the metrics port reports each
stream's watermarks and flags (packets skipped below the watermark, a generation jump held).

Exit status: 0 stopped cleanly, 1 failed to start, 2 usage or configuration error.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="CFG", required=True, help="global_config.yaml")
    parser.add_argument("--source", choices=["auto", "watch", "list", "kafka"], default=None,
                        help="override persia_inc.loader.source")


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from persia_inc.config import load_config
    from persia_inc.foundation.memory import keep_freed_memory
    from persia_inc.wiring import embedding_client, loader_from_config

    keep_freed_memory()  # apply messages of megabytes: reuse their buffers, no page faults
    config = load_config(args.config, need_servers=True)
    stop = threading.Event()
    got: list[str] = []

    def stopping(signum: int, _frame: object) -> None:
        got.append(signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stopping)
    with embedding_client(config) as client:
        try:
            loader = loader_from_config(config, client, source=args.source).start()
        except (ValueError, OSError, RuntimeError) as exc:  # RuntimeError: ShardIdentityError,
            # LoaderStartError (a source failed to start); what had started is closed
            print(f"persia-inc loader: cannot start: {exc}", file=sys.stderr)
            return 1
        try:
            while not stop.wait(0.5):
                pass
            log.info("loader for model %s: stopping on %s (finishing the packet in flight, "
                     "committing)", config.persia_inc.model, got[0] if got else "request")
        finally:
            loader.close()
        log.info("loader for model %s stopped: %d packets applied", config.persia_inc.model,
                 loader.applied)
    return 0
