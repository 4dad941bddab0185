"""Replay: load a checkpoint (or start from the servers' watermarks) and apply every later
packet in storage, in order, up to an optional point. Also the planning `status` uses."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.embedding_server.errors import ShardError
from persia_inc.foundation.threads import thread_name
from persia_inc.loader.daemon import lowest, server_positions
from persia_inc.loader.fetch import Fetched, fetch_packet
from persia_inc.loader.ordering import Stream, is_generation_start, is_successor
from persia_inc.loader.sources import packet_id_of_key
from persia_inc.packet_format import (
    DEFAULT_LIMITS,
    PacketId,
    PacketLimits,
    Position,
    read_packet_header,
    stream_prefix,
)
from persia_inc.storage import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PlannedPacket:
    packet_id: PacketId
    key: str
    size: int


@dataclass
class ReplayPlan:
    """Per stream, the servers' watermark and the stored packets after it, in apply order."""

    start: dict[Stream, Position | None] = field(default_factory=dict)
    packets: dict[Stream, list[PlannedPacket]] = field(default_factory=dict)
    gaps: list[tuple[Stream, Position | None, Position]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(len(p) for p in self.packets.values())

    @property
    def total_bytes(self) -> int:
        return sum(p.size for ps in self.packets.values() for p in ps)

    def ordered(self) -> Iterator[PlannedPacket]:
        for stream in sorted(self.packets):
            yield from self.packets[stream]


def list_streams(store: ObjectStore, model: str) -> dict[Stream, list[tuple[PacketId, ObjectInfo]]]:
    """Every stored packet of `model`, grouped by stream, in apply order."""
    streams: dict[Stream, list[tuple[PacketId, ObjectInfo]]] = {}
    for info in store.list(stream_prefix(model)):
        packet_id = packet_id_of_key(info.key, model)
        if packet_id is not None:
            streams.setdefault((packet_id.table, packet_id.producer), []).append((packet_id, info))
    return streams


def plan_replay(store: ObjectStore, model: str, start: dict[Stream, Position | None], *,
                until: Position | None = None) -> ReplayPlan:
    """What to apply: per stream, the stored packets after `start[stream]` and at or below
    `until` (generation, sequence). Gaps are recorded (and still passed, as the daemon does)."""
    plan = ReplayPlan(start=dict(start))
    for stream, found in sorted(list_streams(store, model).items()):
        mark = start.get(stream)
        plan.start.setdefault(stream, mark)
        chosen = []
        for packet_id, info in found:
            position = packet_id.position
            if (mark is not None and position <= mark) or (until is not None and position > until):
                continue
            if not (is_successor(mark, position) or is_generation_start(mark, position)):
                plan.gaps.append((stream, mark, position))
            chosen.append(PlannedPacket(packet_id, info.key, info.size))
            mark = position
        plan.packets[stream] = chosen
    return plan


def trim_plan_until_time(store: ObjectStore, plan: ReplayPlan, until_time_ns: int, *,
                         limits: PacketLimits = DEFAULT_LIMITS) -> ReplayPlan:
    """`plan` cut, per stream, before its first packet created after `until_time_ns`, which is
    where `replay(until_time_ns=...)` stops. Reads the header of each packet it keeps and of
    the first one it cuts (for a dry run: a replay reads them as it goes)."""
    trimmed = ReplayPlan(start=dict(plan.start))
    for stream, planned in plan.packets.items():
        kept = []
        for packet in planned:
            header = read_packet_header(store.get(packet.key), where=store.uri(packet.key),
                                        limits=limits)
            if header.created_at_ns > until_time_ns:
                break
            kept.append(packet)
        trimmed.packets[stream] = kept
    kept_positions = {(s, p.packet_id.position) for s, ps in trimmed.packets.items() for p in ps}
    trimmed.gaps = [gap for gap in plan.gaps if (gap[0], gap[2]) in kept_positions]
    return trimmed


@dataclass
class ReplayResult:
    packets: int = 0
    rows: int = 0
    bytes: int = 0
    skipped: int = 0
    seconds: float = 0.0


def replay(client: EmbeddingClient, store: ObjectStore, model: str, *, checkpoint: str = "",
           until: Position | None = None, until_time_ns: int | None = None,
           limits: PacketLimits = DEFAULT_LIMITS, prefetch: int = 4,
           progress: Callable[[int, int, int], None] | None = None,
           plan: ReplayPlan | None = None) -> ReplayResult:
    """Load `checkpoint` (if given) into every shard, then apply every later packet in order.

    until: stop each stream after this (generation, sequence); until_time_ns: stop each stream
    at its first packet created after this time. progress(packets, rows, bytes) after each
    packet. A packet that fails verification stops the replay (PacketError): a replay is run by
    a human who must know."""
    started = time.monotonic()
    if checkpoint:
        rows = client.load_checkpoint(checkpoint)
        log.info("loaded checkpoint %s: %d rows", checkpoint, rows)
    if plan is None:
        plan = plan_replay(store, model, servers_start(client), until=until)
    for stream, mark, position in plan.gaps:
        log.error("GAP in %s/%s/%s: after %s the next stored packet is %s", model, *stream, mark,
                  position)
    result = ReplayResult()
    stopped: set[Stream] = set()
    with ThreadPoolExecutor(prefetch, thread_name_prefix=thread_name("replay-fetch")) as pool:
        todo = list(plan.ordered())
        futures = [pool.submit(fetch_packet, store, p.key, p.packet_id, limits=limits)
                   for p in todo[:prefetch]]
        for index, planned in enumerate(todo):
            if index + prefetch < len(todo):
                nxt = todo[index + prefetch]
                futures.append(pool.submit(fetch_packet, store, nxt.key, nxt.packet_id, limits=limits))
            fetched: Fetched = futures[index].result()
            futures[index] = None  # type: ignore[call-overload]  # let the packet go
            stream = (planned.packet_id.table, planned.packet_id.producer)
            h = fetched.packet.header
            if stream in stopped or (until_time_ns is not None and h.created_at_ns > until_time_ns):
                stopped.add(stream)
                continue
            applied = client.apply_cut(fetched.packet)
            result.packets += 1
            result.skipped += int(applied.skipped)
            result.rows += h.rows + h.deleted_rows
            result.bytes += fetched.nbytes
            if progress is not None:
                progress(result.packets, result.rows, result.bytes)
    result.seconds = time.monotonic() - started
    return result


def servers_start(client: EmbeddingClient) -> dict[Stream, Position | None]:
    """Per stream, what every shard holds (None: some shard holds nothing of it)."""
    marks = server_positions(client)
    if marks is None:
        raise RuntimeError("an embedding server is not ready (still loading its checkpoint?)")
    return {stream: lowest(positions) for stream, positions in marks.items()}


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """One stream: the servers' watermark, the newest stored packet, the lag, and the flags.

    watermark: what every reachable shard holds; shards_unreachable: shards that did not answer
    (here, or to the loader); generation_jump: the next stored packet after the watermark, when
    it is a generation more than one above the producer's highest generation on the servers;
    from the loader's report (None: no loader report was read): skipped_below_watermark (packets
    it never applied because they arrived after the watermark leapt past them) and
    generation_jump_held (the key of the packet it holds as a generation jump, or "")."""

    table: str
    producer: str
    watermark: Position | None
    newest: Position | None
    lag_packets: int
    lag_s: float
    shards_unreachable: tuple[int, ...] = ()
    generation_jump: Position | None = None
    skipped_below_watermark: int | None = None
    generation_jump_held: str | None = None

    @property
    def flags(self) -> list[str]:
        """The anomalies, as short words for a table: empty when all is well."""
        out = []
        if self.skipped_below_watermark:
            out.append(f"skipped-below-watermark={self.skipped_below_watermark}")
        if self.generation_jump_held:
            out.append("generation-jump-held")
        elif self.generation_jump is not None:
            out.append(f"generation-jump={self.generation_jump[0]}:{self.generation_jump[1]}")
        if self.shards_unreachable:
            out.append("shard-unreachable=" + ",".join(map(str, self.shards_unreachable)))
        return out


def shard_positions(client: EmbeddingClient
                    ) -> tuple[list[dict[Stream, Position] | None], dict[int, str]]:
    """Each shard's watermarks (None for a shard that is unreachable, not the shard our list
    says, or not ready), and why, per such shard."""
    per_shard: list[dict[Stream, Position] | None] = []
    down: dict[int, str] = {}
    for shard in range(len(client.servers)):
        try:
            client.verify((shard,))
            status = client.status(shard)
        except ShardError as exc:
            per_shard.append(None)
            down[shard] = str(exc)
            continue
        if not status.ready:
            per_shard.append(None)
            down[shard] = f"shard {shard} ({client.servers[shard]}): not ready"
            continue
        per_shard.append({(w.table, w.producer): (w.generation, w.sequence)
                          for w in status.watermarks})
    return per_shard, down


def stream_status(client: EmbeddingClient, store: ObjectStore, model: str,
                  now_ns: int | None = None, loader: dict[str, Any] | None = None
                  ) -> list[StreamStatus]:
    """Status of every stream known to the servers or storage. lag_s: how long the oldest
    packet the servers do not hold has been waiting (now minus its created-at). Shards that do
    not answer are flagged, not fatal (RuntimeError when none answers). `loader`: the loader's
    `/streams` report (`Loader.streams()`), whose flags are merged in."""
    from persia_inc.packet_format import read_packet_header

    now_ns = time.time_ns() if now_ns is None else now_ns
    per_shard, down = shard_positions(client)
    reachable = [marks for marks in per_shard if marks is not None]
    if not reachable:
        raise RuntimeError("no embedding server answers: " + "; ".join(down.values()))
    start = {stream: lowest([marks.get(stream) for marks in reachable])
             for stream in set().union(*reachable)}
    known: dict[str, int] = {}  # producer -> its highest generation on the servers
    for (_, producer), mark in start.items():
        if mark is not None:
            known[producer] = max(known.get(producer, mark[0]), mark[0])
    reported = {(r["table"], r["producer"]): r for r in (loader or {}).get("streams", [])}
    loader_down = {int(sh["shard"]) for sh in (loader or {}).get("shards", []) if not sh["up"]}
    stored = list_streams(store, model)
    out = []
    for stream in sorted(set(start) | set(stored)):
        mark = start.get(stream)
        found = stored.get(stream, [])
        behind = [(p, i) for p, i in found if mark is None or p.position > mark]
        lag_s = 0.0
        jump = None
        if behind:
            with store.open(behind[0][1].key) as source:
                header = read_packet_header(source, where=store.uri(behind[0][1].key))
            lag_s = max(0.0, (now_ns - header.created_at_ns) / 1e9)
            first = behind[0][0].position
            if stream[1] in known and first[0] > known[stream[1]] + 1:
                jump = first
        row = reported.get(stream)
        out.append(StreamStatus(
            stream[0], stream[1], mark, found[-1][0].position if found else None, len(behind),
            lag_s, tuple(sorted(set(down) | loader_down)), jump,
            None if loader is None else int(row["skipped_below_watermark"]) if row else 0,
            None if loader is None else (row["generation_jump_held"] or "") if row else ""))
    return out
