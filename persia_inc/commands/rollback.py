"""`persia-inc rollback --to VERSION` / `--unpin`: make an older dense version TorchServe's
default again, pinned, and release the pin."""

from __future__ import annotations

import argparse
import sys

HELP = "make an older dense version the one TorchServe serves (--sparse: how to rebuild the sparse part)"
DESCRIPTION = """\
Dense only (the default): makes dense version VERSION the default version of the TorchServe
model again, whether TorchServe still holds it (it is then only made the default) or not (it
is registered first from incremental_dir, checked against its manifest). Use it when a new
dense part is bad and the sparse rows are fine: the embedding servers keep their rows (newer
than that version's sparse positions).

The rollback pins VERSION ({model}/_dense/pin.json in incremental_dir, written before the
default changes): the loader's dense sync then makes no other version the default, however
many newer ones are published, until `persia-inc rollback --unpin` removes the pin; then the
newest version the servers are ready for becomes the default at the sync's next round.
`persia-inc status` shows the pin (flag pinned=VERSION).

--sparse also prints how to bring the sparse part back to the version's positions: rebuild
fresh embedding servers with `persia-inc replay --until GENERATION:SEQUENCE` (from a
checkpoint older than those positions), then point serving at them. Use it when the sparse
updates themselves are bad: the dense version and the rows it was trained with go back together.

Exit status: 0 done, 1 failed (the reason is on stderr), 2 usage or configuration error.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="CFG", required=True, help="global_config.yaml")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--to", metavar="VERSION", type=int, help="the dense version (pinned)")
    which.add_argument("--unpin", action="store_true",
                       help="remove the rollback's pin: the newest ready version becomes the default")
    parser.add_argument("--sparse", action="store_true",
                        help="also print the replay command that rebuilds the sparse part")
    parser.add_argument("--management", metavar="HOST:PORT", default=None,
                        help="TorchServe's gRPC management API, or the kserve frontend's REST "
                             "host:port with --frontend kserve (default: "
                             "persia_inc.loader.dense_sync.management_address)")
    parser.add_argument("--frontend", choices=["torchserve", "kserve"], default=None,
                        help="the server --management names (default: dense_sync.frontend)")
    parser.add_argument("--model-name", default=None,
                        help="TorchServe model name (default: dense_sync.model_name or persia_inc.model)")
    parser.add_argument("--model-store", default=None,
                        help="TorchServe's model_store folder (default: dense_sync.model_store)")


def run(args: argparse.Namespace) -> int:
    from persia_inc.config import load_config
    from persia_inc.dense import management_client, rollback_dense, unpin_dense
    from persia_inc.packet_format import PacketError
    from persia_inc.packet_format.dense_manifest import DenseManifest, dense_manifest_key
    from persia_inc.storage import StorageError

    config = load_config(args.config)
    dense = config.persia_inc.loader.dense_sync
    model = config.persia_inc.model
    if args.unpin:
        if args.sparse:
            print("persia-inc rollback: --sparse goes with --to", file=sys.stderr)
            return 2
        try:
            with config.open_store() as store:
                print(unpin_dense(store, model))
        except (PacketError, StorageError, PermissionError) as exc:
            print(f"persia-inc rollback: {exc}", file=sys.stderr)
            return 1
        return 0
    model_name = args.model_name or dense.model_name or model
    model_store = args.model_store or dense.model_store
    if not model_store:
        print("persia-inc rollback: TorchServe's model_store is unknown: pass --model-store or set "
              "persia_inc.loader.dense_sync.model_store", file=sys.stderr)
        return 2
    try:
        with config.open_store() as store, \
                management_client(args.management or dense.management_address,
                                  args.frontend or dense.frontend,
                                  timeout_s=dense.register_timeout_s) as management:
            print(rollback_dense(store, model, args.to, management, model_name=model_name,
                                 model_store=model_store))
            if args.sparse:
                key = dense_manifest_key(model, args.to)
                manifest = DenseManifest.from_json(store.get(key), where=store.location(key))
                for mark in manifest.sparse_positions:
                    print(f"sparse: rebuild fresh servers with `persia-inc replay --config {args.config} "
                          f"--checkpoint URI --until {mark.generation}:{mark.sequence}` "
                          f"(stream {mark.table}/{mark.producer})")
    except (PacketError, StorageError, FileNotFoundError, PermissionError, ValueError,
            RuntimeError) as exc:
        print(f"persia-inc rollback: {exc}", file=sys.stderr)
        return 1
    return 0
