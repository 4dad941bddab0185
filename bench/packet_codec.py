"""Packet codec throughput against raw I/O of the same bytes, measured in the same run.

Local disk: encode + atomic put (temp file, fsync, rename, fsync folder) of 1M-row packets,
dim 16 and 64, against writing the encoded bytes to a file with fsync; get + full decode
(checksum, schema, duplicates) against reading the same bytes. Ratio = raw time / our time
(1.0 = as fast as raw I/O). Bar: both at least 0.8x.

Ceph (S3 gateway): the same for 8 to 64 MB packets through our S3 store against plain boto3
put_object/get_object of the same bytes. Bar: at least 0.9x. Uses the gateway in
S3_ENDPOINT_URL (with AWS_* credentials) if set, else starts a throwaway cluster.

Packet v2 (cuts), in memory: bytes per row and max absolute error of float32 / float16 / int8
cuts of 1M rows, dim 16 and 64 (ratio = bytes against float32's); and encode / decode time of
one 26-table cut of mixed dims against 26 v1 packets of the same rows, each written to an Arrow
output buffer (no copy into `bytes`: a 100 MB copy into fresh pages would dominate) and decoded
from it (ratio = v1 time / cut time, above 1.0 the cut is faster).

    .venv/bin/python bench/packet_codec.py [--repeat 5] [--no-ceph]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from persia_inc.packet_format import (
    CutHeader,
    PacketHeader,
    TableRows,
    decode_cut,
    decode_packet,
    encode_cut,
    encode_packet,
    write_cut,
    write_packet,
)
from persia_inc.storage import open_store

REPO = Path(__file__).resolve().parent.parent


def paired_medians(raw: Callable[[], object], ours: Callable[[], object], repeat: int
                   ) -> tuple[float, float]:
    """Median seconds of `raw` and `ours`, run alternately in ABBA order, so drift of the disk
    or the gateway, and any advantage of going first or second, hit both alike."""
    raw(), ours()  # warm up caches, connections and lazy imports
    raw_times: list[float] = []
    our_times: list[float] = []
    for i in range(repeat):
        pair = [(raw, raw_times), (ours, our_times)]
        for fn, times in pair if i % 2 == 0 else reversed(pair):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(raw_times), statistics.median(our_times)


def make_packet(rows: int, dim: int, seed: int = 0, *, shuffled: bool = False
                ) -> tuple[PacketHeader, np.ndarray, np.ndarray]:
    """Signs ascending, as the producer writes them; `shuffled` for a writer that does not sort
    (then both sides pay a sort to prove the signs unique)."""
    rng = np.random.default_rng(seed)
    signs = np.unique(rng.integers(0, 2**63, int(rows * 1.01), dtype=np.uint64))[:rows]
    if shuffled:
        rng.shuffle(signs)
    header = PacketHeader(model="bench", table="emb", producer="p0", generation=1, sequence=0)
    return header, signs, rng.standard_normal((rows, dim), dtype=np.float32)


def raw_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def bench_local(repeat: int) -> list[tuple[str, float, float, float]]:
    results = []
    with tempfile.TemporaryDirectory(dir=REPO) as folder:
        store = open_store(folder)
        for dim, shuffled in ((16, False), (64, False), (16, True)):
            header, signs, rows = make_packet(1_000_000, dim, shuffled=shuffled)
            order = "shuffled" if shuffled else "sorted"
            data = encode_packet(header, signs, rows)
            mb = len(data) / 1e6

            def ours_write(header=header, signs=signs, rows=rows) -> None:
                with store.writer("p.arrow") as sink:
                    write_packet(sink, header, signs, rows)

            def ours_read() -> None:
                with store.open("p.arrow") as source:
                    decode_packet(source, where="p.arrow")

            raw_path = Path(folder) / "raw.bin"
            t_raw_w, t_ours_w = paired_medians(
                lambda data=data, raw_path=raw_path: raw_write(raw_path, data), ours_write, repeat)
            t_raw_r, t_ours_r = paired_medians(
                lambda raw_path=raw_path: raw_path.read_bytes(), ours_read, repeat)
            results.append((f"local write 1M x {dim} {order} ({mb:.0f} MB)", mb / t_ours_w,
                            mb / t_raw_w, t_raw_w / t_ours_w))
            results.append((f"local read  1M x {dim} {order} ({mb:.0f} MB)", mb / t_ours_r,
                            mb / t_raw_r, t_raw_r / t_ours_r))
    return results


def bench_ceph(repeat: int) -> list[tuple[str, float, float, float]]:
    from persia_inc.local_services import CephCluster
    from persia_inc.storage.s3 import S3Settings

    cluster = None
    if not os.environ.get("S3_ENDPOINT_URL"):
        cluster = CephCluster(Path(tempfile.mkdtemp(prefix="bench-ceph-"))).start()
        os.environ.update(cluster.env)
    try:
        import boto3
        import botocore.config

        client = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"],
                              config=botocore.config.Config(s3={"addressing_style": "path"}))
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        store = open_store(f"s3://{bucket}/inc",
                           s3=S3Settings(endpoint_url=os.environ["S3_ENDPOINT_URL"]))
        results = []
        for rows, dim in ((110_000, 16), (220_000, 64)):  # about 8 MB and 57 MB
            header, signs, values = make_packet(rows, dim)
            data = encode_packet(header, signs, values)
            mb = len(data) / 1e6

            def ours_write(header=header, signs=signs, values=values) -> None:
                with store.writer("p.arrow") as sink:
                    write_packet(sink, header, signs, values)

            def ours_read() -> None:
                decode_packet(store.get("p.arrow"), where="p.arrow")

            def raw_put(data=data) -> None:
                client.put_object(Bucket=bucket, Key="raw.bin", Body=data)

            def raw_get() -> None:
                client.get_object(Bucket=bucket, Key="raw.bin")["Body"].read()

            # the gateway's latency varies far more than local disk: twice the samples
            t_raw_w, t_ours_w = paired_medians(raw_put, ours_write, 2 * repeat)
            t_raw_r, t_ours_r = paired_medians(raw_get, ours_read, 2 * repeat)
            results.append((f"ceph  write {rows} x {dim} ({mb:.0f} MB)", mb / t_ours_w, mb / t_raw_w,
                            t_raw_w / t_ours_w))
            results.append((f"ceph  read  {rows} x {dim} ({mb:.0f} MB)", mb / t_ours_r, mb / t_raw_r,
                            t_raw_r / t_ours_r))
        return results
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.workdir, ignore_errors=True)  # its 10 GB sparse disk file


def bench_dtypes() -> list[dict[str, object]]:
    """Bytes per row and max absolute error of a 1M-row one-table cut per dtype."""
    results: list[dict[str, object]] = []
    for dim in (16, 64):
        _, signs, rows = make_packet(1_000_000, dim)
        base = 0.0
        for dtype in ("float32", "float16", "int8"):
            header = CutHeader(model="bench", producer="p0", generation=1, sequence=0,
                               dtype=dtype)  # type: ignore[arg-type]
            data = encode_cut(header, [TableRows("emb", signs, rows, np.empty(0, np.uint64))])
            decoded = decode_cut(data).tables[0].embeddings
            per_row = len(data) / rows.shape[0]
            base = base or per_row
            error = float(np.abs(decoded - rows).max())
            results.append({"case": f"cut 1M x {dim} {dtype}", "bytes_per_row": round(per_row, 2),
                            "ratio_to_float32": round(per_row / base, 3), "max_abs_error": error})
            del data, decoded
    return results


def cut_tables(rows_per_table: int, seed: int = 0) -> list[TableRows]:
    """26 tables (Criteo's sparse features) of mixed dims 4 to 64, some rows deleted."""
    dims = (4, 8, 16, 32, 64)
    tables = []
    for i in range(26):
        _, signs, rows = make_packet(rows_per_table, dims[i % len(dims)], seed=seed + i)
        deletes = rows_per_table // 20
        tables.append(TableRows(f"C{i + 1}", signs[deletes:], rows[deletes:], signs[:deletes]))
    return tables


def bench_cut_vs_v1(repeat: int) -> list[dict[str, object]]:
    """Encode and decode one 26-table cut against 26 v1 packets of the same rows (in memory)."""
    tables = cut_tables(40_000)
    rows = sum(t.row_count for t in tables)
    headers = [PacketHeader(model="bench", table=t.name, producer="p0", generation=1, sequence=0)
               for t in tables]

    def v1_encode() -> list[pa.Buffer]:
        buffers = []
        for h, t in zip(headers, tables, strict=True):
            sink = pa.BufferOutputStream()
            write_packet(sink, h, t.signs, t.embeddings, deleted=t.deleted)
            buffers.append(sink.getvalue())
        return buffers

    def cut_encode(header: CutHeader) -> pa.Buffer:
        sink = pa.BufferOutputStream()
        write_cut(sink, header, tables)
        return sink.getvalue()

    packets = v1_encode()

    def v1_decode() -> None:
        for data in packets:
            decode_packet(data)

    results: list[dict[str, object]] = []
    for dtype in ("float32", "float16", "int8"):
        header = CutHeader(model="bench", producer="p0", generation=1, sequence=0,
                           dtype=dtype)  # type: ignore[arg-type]
        cut = cut_encode(header)
        for step, v1, ours in (("encode", v1_encode, lambda h=header: cut_encode(h)),
                               ("decode", v1_decode, lambda c=cut: decode_cut(c))):
            t_v1, t_cut = paired_medians(v1, ours, repeat)
            results.append({
                "case": f"{step} 26 tables, {rows} rows, cut {dtype} vs 26 v1 float32",
                "cut_ms": round(t_cut * 1e3, 2), "v1_ms": round(t_v1 * 1e3, 2),
                "ratio": round(t_v1 / t_cut, 3), "cut_bytes": cut.size,
                "v1_bytes": sum(p.size for p in packets)})
    return results


def record(results: list[tuple[str, float, float, float]], dtypes: list[dict[str, object]],
           cut_vs_v1: list[dict[str, object]]) -> None:
    """Merge into bench/results/packet_codec.json: figures of this run replace those of the same
    case; cases not run (Ceph under --no-ceph) keep their last figures."""
    out = REPO / "bench" / "results" / "packet_codec.json"
    out.parent.mkdir(exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    if isinstance(old, list):  # the layout before packet v2: only the codec figures
        old = {"codec": old}
    codec = {entry["case"]: entry for entry in old.get("codec", [])}
    codec.update({name: {"case": name, "ours_mb_s": round(ours, 1), "raw_mb_s": round(raw, 1),
                         "ratio": round(ratio, 3)} for name, ours, raw, ratio in results})
    old.update(codec=list(codec.values()), cut_dtypes=dtypes, cut_vs_v1=cut_vs_v1)
    out.write_text(json.dumps(old, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15, help="runs per figure; the median is kept")
    parser.add_argument("--no-ceph", action="store_true", help="local disk only")
    args = parser.parse_args()
    results = bench_local(args.repeat)
    if not args.no_ceph:
        results += bench_ceph(args.repeat)
    print(f"{'case':<43} {'ours MB/s':>10} {'raw MB/s':>10} {'ratio':>7}")
    for name, ours, raw, ratio in results:
        print(f"{name:<43} {ours:>10.0f} {raw:>10.0f} {ratio:>6.2f}x")
    dtypes = bench_dtypes()
    print(f"\n{'case':<28} {'bytes/row':>10} {'vs float32':>11} {'max abs error':>14}")
    for entry in dtypes:
        print(f"{entry['case']:<28} {entry['bytes_per_row']:>10.2f} {entry['ratio_to_float32']:>10.3f}x"
              f" {entry['max_abs_error']:>14.3g}")
    cut_vs_v1 = bench_cut_vs_v1(args.repeat)
    print(f"\n{'case':<62} {'cut ms':>8} {'v1 ms':>8} {'ratio':>7}")
    for entry in cut_vs_v1:
        print(f"{entry['case']:<62} {entry['cut_ms']:>8.1f} {entry['v1_ms']:>8.1f} "
              f"{entry['ratio']:>6.2f}x")
    record(results, dtypes, cut_vs_v1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
