"""What `persia-inc status` shows per stream: the servers' watermark, the newest stored packet,
the lag, and the flags (from the servers, storage and the loader's `/streams` report)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.loader.ordering import Stream
from persia_inc.loader.replay import list_streams
from persia_inc.loader.reports import LoaderReport, StreamReport
from persia_inc.loader.shards import held_by_all, read_positions
from persia_inc.packet_format import DEFAULT_LIMITS, PacketLimits, Position, read_cut_header
from persia_inc.storage import ObjectStore


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """One stream: the servers' watermark, the newest stored packet, the lag, and the flags.

    watermark: what every reachable shard holds; shards_unreachable: shards that did not answer
    (here, or to the loader); generation_jump: the next stored packet after the watermark, when
    it is a generation more than one above the producer's highest generation on the servers;
    loader: the loader's report of this stream (None: no loader report was read, or the loader
    does not know the stream)."""

    table: str
    producer: str
    watermark: Position | None
    newest: Position | None
    lag_packets: int
    lag_s: float
    shards_unreachable: tuple[int, ...] = ()
    generation_jump: Position | None = None
    loader: StreamReport | None = None
    loader_read: bool = False  # a loader report was read (its flags are known)

    @property
    def skipped_below_watermark(self) -> int | None:
        """Packets the loader never applied (they arrived after the watermark leapt past them);
        None without a loader report."""
        if not self.loader_read:
            return None
        return 0 if self.loader is None else self.loader.skipped_below_watermark

    @property
    def generation_jump_held(self) -> str | None:
        """The key of the packet the loader holds as a generation jump ("" none; None without a
        loader report)."""
        if not self.loader_read:
            return None
        return (self.loader.generation_jump_held or "") if self.loader is not None else ""

    @property
    def flags(self) -> list[str]:
        """The anomalies, as short words for a table: empty when all is well."""
        out = [] if self.loader is None else list(self.loader.flags)
        if self.generation_jump_held:
            out.append("generation-jump-held")
        elif self.generation_jump is not None:
            out.append(f"generation-jump={self.generation_jump[0]}:{self.generation_jump[1]}")
        if self.shards_unreachable:
            out.append("shard-unreachable=" + ",".join(map(str, self.shards_unreachable)))
        return out


def stream_status(client: EmbeddingClient, store: ObjectStore, model: str,
                  now_ns: int | None = None, loader: LoaderReport | None = None,
                  limits: PacketLimits = DEFAULT_LIMITS) -> list[StreamStatus]:
    """Status of every stream known to the servers, storage or the loader. lag_s: how long the
    oldest packet the servers do not hold has been waiting (now minus its created-at, read
    from its header, v1 or v2, by the reader the loader uses). Shards that do not answer are
    flagged, not fatal (RuntimeError when none answers). `loader`: its `/streams` report."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    per_shard, down = read_positions(client)
    reachable = [marks for marks in per_shard if marks is not None]
    if not reachable:
        raise RuntimeError("no embedding server answers: " + "; ".join(down.values()))
    start = held_by_all(reachable)
    known: dict[str, int] = {}  # producer -> its highest generation on the servers
    for (_, producer), mark in start.items():
        if mark is not None:
            known[producer] = max(known.get(producer, mark[0]), mark[0])
    reported: dict[Stream, StreamReport] = {} if loader is None else {
        (r.table, r.producer): r for r in loader.streams}
    loader_down = set() if loader is None else {  # as target indices, as `down` has them
        client.replicas_of(sh.shard)[sh.replica] for sh in loader.shards
        if not sh.up and sh.shard < client.num_shards
        and sh.replica < len(client.replicas_of(sh.shard))}
    stored = list_streams(store, model)
    out = []
    for stream in sorted(set(start) | set(stored) | set(reported)):
        mark = start.get(stream)
        found = stored.get(stream, [])
        behind = [(p, i) for p, i in found if mark is None or p.position > mark]
        lag_s = 0.0
        jump = None
        if behind:
            key = behind[0][1].key
            with store.open(key) as source:
                header = read_cut_header(source, where=store.uri(key), limits=limits)
            lag_s = max(0.0, (now_ns - header.created_at_ns) / 1e9)
            first = behind[0][0].position
            if stream[1] in known and first[0] > known[stream[1]] + 1:
                jump = first
        out.append(StreamStatus(
            stream[0], stream[1], mark, found[-1][0].position if found else None, len(behind),
            lag_s, tuple(sorted(set(down) | loader_down)), jump, reported.get(stream),
            loader is not None))
    return out
