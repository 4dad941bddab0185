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
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from persia_inc.embedding_server.sharding import shard_of
from persia_inc.embedding_server.table import EmbeddingTable
from persia_inc.packet_format import (
    DEFAULT_LIMITS,
    MANIFEST_NAME,
    CheckpointManifest,
    CorruptPacketError,
    ManifestPart,
    ManifestTable,
    PacketHeader,
    PacketLimits,
    Watermark,
    decode_packet,
    write_packet,
)

if TYPE_CHECKING:
    from persia_inc.embedding_server.client import EmbeddingClient
    from persia_inc.storage import ObjectStore

log = logging.getLogger(__name__)

CHECKPOINT_PRODUCER = "checkpoint"
_PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})-(\d{5})\.arrow$")


def part_key(table: str, shard: int, num_shards: int, index: int) -> str:
    """The storage key of one part file, relative to the checkpoint folder."""
    return f"{table}/part-{shard:05d}-of-{num_shards:05d}-{index:05d}.arrow"


class CheckpointWriter:
    """Writes part files, then `manifest.json` last (its presence means the checkpoint is whole)."""

    def __init__(self, store: ObjectStore, model: str) -> None:
        self.store = store
        self.model = model
        self.dims: dict[str, int] = {}
        self.parts: dict[str, list[ManifestPart]] = {}

    def add_part(self, table: str, dim: int, signs: np.ndarray, rows: np.ndarray, *,
                 shard: int = 0, num_shards: int = 1) -> None:
        """Store one part: signs uint64[n], rows float32[n, dim], from `shard` of `num_shards`."""
        if self.dims.setdefault(table, dim) != dim:
            raise ValueError(f"table {table!r} has dim {self.dims[table]} in one part and {dim} "
                             f"in another")
        table_parts = self.parts.setdefault(table, [])
        index = sum(1 for p in table_parts if p.path.startswith(f"{table}/part-{shard:05d}-"))
        header = PacketHeader(model=self.model, table=table, producer=CHECKPOINT_PRODUCER,
                              generation=shard, sequence=index, flush_reason="checkpoint", dim=dim)
        sink = io.BytesIO()
        written = write_packet(sink, header, signs, rows)
        key = part_key(table, shard, num_shards, index)
        data = sink.getbuffer()
        self.store.put(key, data)
        table_parts.append(ManifestPart(path=key, rows=int(signs.shape[0]), bytes=data.nbytes,
                                        checksum=written.checksum))

    def finish(self, watermarks: Iterable[Watermark] = ()) -> CheckpointManifest:
        manifest = CheckpointManifest(
            model=self.model,
            tables={name: ManifestTable(dim=self.dims[name],
                                        rows=sum(p.rows for p in self.parts[name]),
                                        parts=tuple(self.parts[name])) for name in self.dims},
            watermarks=tuple(watermarks),
        )
        self.store.put(MANIFEST_NAME, manifest.to_json())
        return manifest


def write_checkpoint(store: ObjectStore, *, model: str,
                     tables: dict[str, tuple[np.ndarray, np.ndarray]],
                     watermarks: Iterable[Watermark] = (),
                     chunk_rows: int = 1_000_000) -> CheckpointManifest:
    """Write a checkpoint from arrays held by the caller (e.g. a training job's initial tables):
    tables maps name -> (signs uint64[n], rows float32[n, dim]). Any number of servers loads it."""
    writer = CheckpointWriter(store, model)
    for name, (signs, rows) in tables.items():
        for start in range(0, max(len(signs), 1), chunk_rows):
            writer.add_part(name, int(rows.shape[1]), signs[start:start + chunk_rows],
                            rows[start:start + chunk_rows])
    return writer.finish(watermarks)


def save_checkpoint(client: EmbeddingClient, store: ObjectStore, *, model: str,
                    chunk_rows: int = 1_000_000) -> CheckpointManifest:
    """Dump every shard reachable through `client` into `store`; returns the manifest written.

    Parts go first, `manifest.json` last, so a reader never sees a half-written checkpoint.
    """
    started = time.monotonic()
    watermarks = client.watermarks()  # before any row: see the module docstring
    num_shards = len(client.servers)
    writer = CheckpointWriter(store, model)
    for shard in range(num_shards):
        for table in client.status(shard).tables:
            for signs, rows in client.dump(shard, table.name, chunk_rows):
                writer.add_part(table.name, table.dim, signs, rows, shard=shard,
                                num_shards=num_shards)
    manifest = writer.finish(watermarks)
    total = sum(t.rows for t in manifest.tables.values())
    log.info("checkpoint of %d tables, %d rows from %d shards written to %s in %.1f s",
             len(manifest.tables), total, num_shards, store.root_uri, time.monotonic() - started)
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


