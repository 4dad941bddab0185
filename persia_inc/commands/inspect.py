"""`persia-inc inspect URI`: what a packet or manifest is, and whether it is valid."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "show a packet's or checkpoint manifest's identity and validate it"
DESCRIPTION = """\
Read one packet (.arrow) or checkpoint manifest (manifest.json, or a checkpoint folder) from
any storage URI (a path, file://, hdfs://, s3://), verify it fully (checksum, schema, limits,
duplicate signs; for a manifest, its JSON), and print what it is.

Exit status: 0 valid, 1 invalid or unreadable (the reason is also on stderr), 2 usage error.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uri", metavar="URI", help="packet or manifest path or URI")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--config", metavar="CFG",
                        help="global_config.yaml for S3/HDFS settings and packet limits")


def inspect_uri(uri: str, config_path: str | None = None) -> dict:
    """Inspect `uri`; returns the report (always with `valid`, `error`, `kind`, `uri`)."""
    from persia_inc.config import Config, load_config
    from persia_inc.packet_format import MANIFEST_NAME, CheckpointManifest, PacketError, decode_cut
    from persia_inc.storage import StorageError, open_store

    config = load_config(config_path) if config_path else Config()
    settings = config.persia_inc
    is_manifest = uri.rstrip("/").endswith(".json") or not uri.endswith(".arrow")
    if is_manifest and not uri.rstrip("/").endswith(".json"):
        uri = uri.rstrip("/") + "/" + MANIFEST_NAME
    kind = "manifest" if is_manifest else "packet"
    report: dict = {"uri": uri, "kind": kind, "valid": False, "error": None}
    folder, _, name = uri.rstrip("/").rpartition("/")
    try:
        with open_store(folder or ".", retry=settings.retry, s3=settings.s3,
                        hdfs=settings.hdfs) as store:
            data = store.get(name)
        report["bytes"] = len(data)
        if is_manifest:
            manifest = CheckpointManifest.from_json(data, where=uri)
            report.update(
                model=manifest.model,
                tables={t: {"dim": v.dim, "rows": v.rows, "parts": len(v.parts)}
                        for t, v in manifest.tables.items()},
                watermarks=[{"table": w.table, "producer": w.producer,
                             "generation": w.generation, "sequence": w.sequence}
                            for w in manifest.watermarks],
            )
        else:
            header = decode_cut(data, where=uri, limits=settings.limits).header
            report.update(
                model=header.model, lane=header.lane, producer=header.producer,
                generation=header.generation, sequence=header.sequence, rows=header.rows,
                deleted_rows=header.deleted_rows, dtype=header.dtype,
                tables={t.name: {"dim": t.dim, "rows": t.rows, "deleted_rows": t.deleted_rows,
                                 "state_dim": t.state_dim} for t in header.tables},
                flush_reason=header.flush_reason, created_at_ns=header.created_at_ns,
                checksum=header.checksum, format_version=header.format_version,
            )
        report["valid"] = True
    except (PacketError, StorageError, FileNotFoundError, PermissionError, ValueError) as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    return report


def run(args: argparse.Namespace) -> int:
    report = inspect_uri(args.uri, args.config)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for key in sorted(report):
            print(f"{key:>14}: {report[key]}")
    if not report["valid"]:
        print(f"invalid: {report['error']}", file=sys.stderr)
        return 1
    return 0
