"""Sparse checkpoints: every shard's tables as packet-format part files plus `manifest.json`.

Layout under the checkpoint URI (any storage backend):

    {table}/part-{shard:05d}-of-{num_shards:05d}-{i:05d}.arrow   packet v1, producer "checkpoint"
    manifest.json                                                 written last: its presence
                                                                  means the checkpoint is whole

The watermarks in the manifest are read from the servers *before* any row is dumped, so every
row change at or below them is in the parts; rows changed during the dump may be newer, which
is harmless because replaying packets after the watermark rewrites full rows.

Loading keeps the rows whose `shard_of(sign, N)` is this shard, so a checkpoint saved from M
servers loads into N. When M == N the parts of other shards are skipped unread.
"""

from __future__ import annotations

import io
import logging
import re
import time
from typing import TYPE_CHECKING

from embedding_server.sharding import shard_of
from embedding_server.table import EmbeddingTable
from packet_format import (
    DEFAULT_LIMITS,
    MANIFEST_NAME,
    CheckpointManifest,
    CorruptPacketError,
    ManifestPart,
    ManifestTable,
    PacketHeader,
    PacketLimits,
    decode_packet,
    write_packet,
)

if TYPE_CHECKING:
    from embedding_server.client import EmbeddingClient
    from storage import ObjectStore

log = logging.getLogger(__name__)

CHECKPOINT_PRODUCER = "checkpoint"
_PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})-(\d{5})\.arrow$")


def part_key(table: str, shard: int, num_shards: int, index: int) -> str:
    """The storage key of one part file, relative to the checkpoint folder."""
    return f"{table}/part-{shard:05d}-of-{num_shards:05d}-{index:05d}.arrow"


def save_checkpoint(client: EmbeddingClient, store: ObjectStore, *, model: str,
                    chunk_rows: int = 1_000_000) -> CheckpointManifest:
    """Dump every shard reachable through `client` into `store`; returns the manifest written.

    Parts go first, `manifest.json` last, so a reader never sees a half-written checkpoint.
    """
    started = time.monotonic()
    watermarks = client.watermarks()  # before any row: see the module docstring
    num_shards = len(client.servers)
    dims: dict[str, int] = {}
    parts: dict[str, list[ManifestPart]] = {}
    for shard in range(num_shards):
        for table in client.status(shard).tables:
            if dims.setdefault(table.name, table.dim) != table.dim:
                raise ValueError(f"table {table.name!r} has dim {dims[table.name]} on one shard "
                                 f"and {table.dim} on shard {shard}")
            table_parts = parts.setdefault(table.name, [])
            for index, (signs, rows) in enumerate(client.dump(shard, table.name, chunk_rows)):
                header = PacketHeader(model=model, table=table.name, producer=CHECKPOINT_PRODUCER,
                                      generation=shard, sequence=index, flush_reason="checkpoint",
                                      dim=table.dim)
                sink = io.BytesIO()
                written = write_packet(sink, header, signs, rows)
                key = part_key(table.name, shard, num_shards, index)
                data = sink.getbuffer()
                store.put(key, data)
                table_parts.append(ManifestPart(path=key, rows=int(signs.shape[0]),
                                                bytes=data.nbytes, checksum=written.checksum))
    manifest = CheckpointManifest(
        model=model,
        tables={name: ManifestTable(dim=dims[name], rows=sum(p.rows for p in parts[name]),
                                    parts=tuple(parts[name])) for name in dims},
        watermarks=tuple(watermarks),
    )
    store.put(MANIFEST_NAME, manifest.to_json())
    total = sum(t.rows for t in manifest.tables.values())
    log.info("checkpoint of %d tables, %d rows from %d shards written to %s in %.1f s",
             len(dims), total, num_shards, store.root_uri, time.monotonic() - started)
    return manifest


def load_shard(
    store: ObjectStore, shard: int, num_shards: int, *, capacity: int = 0,
    limits: PacketLimits = DEFAULT_LIMITS, log_interval_s: float = 5.0,
) -> tuple[dict[str, EmbeddingTable], dict[tuple[str, str], tuple[int, int]], int]:
    """Build shard `shard` of `num_shards` from the checkpoint in `store`, off to the side.

    Returns (tables, watermarks {(table, producer): (generation, sequence)}, rows loaded).
    Raises ManifestError / PacketError for a bad checkpoint, FileNotFoundError if absent.
    """
    started = last_log = time.monotonic()
    manifest = CheckpointManifest.from_json(store.get(MANIFEST_NAME),
                                            where=store.uri(MANIFEST_NAME))
    total_parts = sum(len(t.parts) for t in manifest.tables.values())
    log.info("loading checkpoint %s (model %s, %d tables, %d rows, %d parts) as shard %d/%d",
             store.root_uri, manifest.model, len(manifest.tables),
             sum(t.rows for t in manifest.tables.values()), total_parts, shard, num_shards)
    tables: dict[str, EmbeddingTable] = {}
    loaded = seen_parts = 0
    for name, entry in sorted(manifest.tables.items()):
        share = entry.rows // num_shards
        reserve = share + share // 20 + 1024
        table = EmbeddingTable(entry.dim, capacity=capacity,
                               reserve=min(reserve, capacity) if capacity else reserve)
        tables[name] = table
        for part in entry.parts:
            seen_parts += 1
            match = _PART_RE.match(part.path.rpartition("/")[2])
            if match and int(match[2]) == num_shards and int(match[1]) != shard:
                continue  # same sharding, another shard's rows
            where = store.uri(part.path)
            packet = decode_packet(store.get(part.path), where=where, limits=limits)
            if packet.header.checksum != part.checksum or packet.header.dim != entry.dim:
                raise CorruptPacketError(where, "part does not match its manifest entry "
                                         "(checksum or dim)")
            mine = shard_of(packet.signs, num_shards) == shard
            table.upsert(packet.signs[mine], packet.embeddings[mine])
            loaded += int(mine.sum())
            now = time.monotonic()
            if now - last_log >= log_interval_s:
                last_log = now
                log.info("checkpoint load: %d rows kept, part %d/%d, %.0f rows/s", loaded,
                         seen_parts, total_parts, loaded / max(now - started, 1e-9))
    marks = {(w.table, w.producer): (w.generation, w.sequence) for w in manifest.watermarks}
    elapsed = time.monotonic() - started
    log.info("checkpoint load done: %d rows in %d tables in %.1f s (%.0f rows/s)", loaded,
             len(tables), elapsed, loaded / max(elapsed, 1e-9))
    return tables, marks, loaded


