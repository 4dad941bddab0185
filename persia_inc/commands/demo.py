"""`persia-inc demo`: for now, a packet round trip through storage (the full pipeline demo
with training, loader and embedding servers replaces it once those parts land)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HELP = "run the demo (today: a verified packet round trip through local storage)"
DESCRIPTION = """\
Writes a stream of packets for one table to local storage the way a training job would,
lists them back in apply order, decodes and verifies each one, rebuilds the table from them,
and checks it equals what was written. Writes report.json into the workdir; exits 0 only if
the check passed.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="where packets and report.json go (default: a temp dir)")
    parser.add_argument("--packets", type=int, default=20, help="packets to write (default 20)")
    parser.add_argument("--rows", type=int, default=50_000, help="rows per packet (default 50000)")
    parser.add_argument("--dim", type=int, default=16, help="embedding dim (default 16)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from packet_format import PacketHeader, decode_packet, encode_packet, parse_packet_path
    from storage import open_store

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="persia-inc-demo-"))
    store = open_store(str(workdir / "incremental"))
    rng = np.random.default_rng(7)
    universe = np.unique(rng.integers(0, 2**63, args.rows * 4, dtype=np.uint64))
    truth = np.zeros((universe.size, args.dim), np.float32)

    started = time.perf_counter()
    written_bytes = 0
    for sequence in range(args.packets):
        picked = np.sort(rng.choice(universe.size, args.rows, replace=False))
        rows = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
        truth[picked] = rows
        header = PacketHeader(model="demo", table="emb", producer="trainer-0",
                              generation=1, sequence=sequence)
        data = encode_packet(header, universe[picked], rows)
        store.put(parse_key(header), data)
        written_bytes += len(data)
    write_s = time.perf_counter() - started

    rebuilt = np.zeros_like(truth)
    started = time.perf_counter()
    listed = store.list("demo/emb/")
    for info in listed:
        packet = decode_packet(store.get(info.key), where=store.uri(info.key))
        assert parse_packet_path(info.key).position == packet.header.position
        rebuilt[np.searchsorted(universe, packet.signs)] = packet.embeddings
    read_s = time.perf_counter() - started

    mismatched = int(np.any(rebuilt != truth, axis=1).sum())
    report = {
        "verified": mismatched == 0 and len(listed) == args.packets,
        "packets": len(listed),
        "rows_applied": args.packets * args.rows,
        "mismatched_rows": mismatched,
        "bytes": written_bytes,
        "write_mb_s": round(written_bytes / write_s / 1e6, 1),
        "read_mb_s": round(written_bytes / read_s / 1e6, 1),
        "workdir": str(workdir),
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["verified"] else 1


def parse_key(header) -> str:
    from packet_format import PacketId

    return PacketId.of(header).key
