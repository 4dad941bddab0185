"""Replay: load a checkpoint (or start from the servers' watermarks) and apply every later
packet in storage, in order, up to an optional point."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.foundation.threads import thread_name
from persia_inc.loader.fetch import Fetched, fetch_packet
from persia_inc.loader.ordering import Stream, is_generation_start, is_successor
from persia_inc.loader.shards import held_by_all, read_positions
from persia_inc.loader.sources import packet_id_of_key
from persia_inc.packet_format import (
    DEFAULT_LIMITS,
    PacketId,
    PacketLimits,
    Position,
    read_cut_header,
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
            streams.setdefault((packet_id.lane, packet_id.producer), []).append((packet_id, info))
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
            header = read_cut_header(store.get(packet.key), where=store.uri(packet.key),
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
           plan: ReplayPlan | None = None, allow_non_finite: bool = False) -> ReplayResult:
    """Load `checkpoint` (if given) into every shard, then apply every later packet in order.

    until: stop each stream after this (generation, sequence); until_time_ns: stop each stream
    at its first packet created after this time. progress(packets, rows, bytes) after each
    packet. A packet that fails verification stops the replay (PacketError): a replay is run by
    a human who must know. allow_non_finite: apply rows holding NaN or Inf, as the loader does
    with `loader.allow_non_finite` (false: such a packet stops the replay, naming it)."""
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
        def fetch(planned: PlannedPacket) -> Future[Fetched]:
            return pool.submit(fetch_packet, store, planned.key, planned.packet_id, limits=limits,
                               allow_non_finite=allow_non_finite)

        futures = [fetch(p) for p in todo[:prefetch]]
        for index, planned in enumerate(todo):
            if index + prefetch < len(todo):
                nxt = todo[index + prefetch]
                futures.append(fetch(nxt))
            fetched: Fetched = futures[index].result()
            futures[index] = None  # type: ignore[call-overload]  # let the packet go
            stream = (planned.packet_id.lane, planned.packet_id.producer)
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
    """Per stream, what every shard holds (None: some shard holds nothing of it). Raises
    RuntimeError naming the shards that are unreachable or not ready."""
    per_shard, down = read_positions(client)
    if down:
        raise RuntimeError("cannot replay while a shard is down: " + "; ".join(down.values()))
    return held_by_all([marks for marks in per_shard if marks is not None])
