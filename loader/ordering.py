"""Per-stream ordering and watermarks: pure logic, no I/O, no threads.

A stream is one (table, producer) of the model. Its packets apply in (generation, sequence)
order. The next packet after watermark (g, s) is (g, s + 1), or (g' > g, 0): a restarted
producer takes a new generation and starts at sequence 0 (producer/writer.py). A generation
start is applied only after a storage listing taken while it was the head confirmed nothing
older is missing. Anything else is a gap: the dispatcher re-lists storage and waits up to
`gap_timeout_s`, then the gap is passed (logged loudly and counted by the caller).

A *generation jump* is a generation start more than one above the highest generation known for
its producer (the newest watermark over the producer's streams): a stray file, or generations
lost from storage. It is held like a gap (listings look for the missing generations; in-order
packets of the old generation still apply first) and passed only after `gap_timeout_s`.

Every forward leap of the watermark (a generation start, a passed gap or jump) is remembered
(`StreamState.leaps`, the most recent `MAX_LEAPS`), so a packet that arrives later inside one
is known never to have been applied: `Offer.SKIPPED`, which the caller must report loudly.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

from persia_inc.packet_format import PacketId, Position

Stream = tuple[str, str]  # (table, producer) of one model: the unit of ordering
MAX_LEAPS = 64  # watermark leaps remembered per stream (to name skipped late packets)


class Offer(enum.Enum):
    """What became of a candidate offered to the ordering."""

    ACCEPTED = "accepted"  # new and above the watermark: pending
    DUPLICATE = "duplicate"  # already pending
    STALE = "stale"  # at or below the watermark (or known bad): nothing to do
    SKIPPED = "skipped"  # below the watermark, inside a leap of it: never applied, never will be


class Action(enum.Enum):
    APPLY = "apply"  # the head is next: fetch and apply it
    PASS_GAP = "pass_gap"  # the head follows a gap that timed out: apply it, count the gap
    LIST = "list"  # list storage after the watermark, then ask again
    WAIT = "wait"  # nothing to do now
    IDLE = "idle"  # nothing pending


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    head: PacketId | None = None
    missing_after: Position | None = None  # for PASS_GAP: the watermark the gap followed
    jump_from: int | None = None  # set when the head is a generation jump: the highest known
    # generation of its producer (the head is held on LIST/WAIT, passed on PASS_GAP)


@dataclass(slots=True)
class StreamState:
    """One stream: the applied watermark, pending candidates (a heap of positions)."""

    watermark: Position | None = None
    pending: list[Position] = field(default_factory=list)
    ids: dict[Position, PacketId] = field(default_factory=dict)
    bad: set[Position] = field(default_factory=set)
    listed_at: float = float("-inf")  # monotonic time of the last listing after the watermark
    head_since: float | None = None  # when the current head became the head
    gap_since: float | None = None  # when the current gap was first seen
    list_requested: bool = True  # a listing is owed (start, rewind, gap)
    # (after, to): the watermark moved from `after` straight to `to`, so every position strictly
    # between them was never applied by this loader; oldest first, at most MAX_LEAPS
    leaps: list[tuple[Position, Position]] = field(default_factory=list)

    def head(self) -> Position | None:
        return self.pending[0] if self.pending else None


def is_successor(watermark: Position | None, position: Position) -> bool:
    """Whether `position` directly follows `watermark` within the same generation."""
    return watermark is not None and position == (watermark[0], watermark[1] + 1)


def is_generation_start(watermark: Position | None, position: Position) -> bool:
    """Whether `position` starts a generation newer than the watermark's (sequence 0)."""
    return position[1] == 0 and (watermark is None or position[0] > watermark[0])


def is_generation_jump(known: int | None, position: Position) -> bool:
    """Whether `position` is in a generation more than one above `known` (the highest
    generation known for its producer; None: nothing known, so no jump)."""
    return known is not None and position[0] > known + 1


class Ordering:
    """Pending packets and watermarks of every stream of one model.

    gap_timeout_s: how long a gap is waited for; list_interval_s: least time between two
    listings a gap asks for. Times are monotonic seconds passed in by the caller.
    """

    def __init__(self, gap_timeout_s: float, list_interval_s: float = 0.5) -> None:
        self.gap_timeout_s = gap_timeout_s
        self.list_interval_s = list_interval_s
        self.streams: dict[Stream, StreamState] = {}

    def state(self, stream: Stream) -> StreamState:
        state = self.streams.get(stream)
        if state is None:
            state = self.streams[stream] = StreamState()
        return state

    def watermark(self, stream: Stream) -> Position | None:
        state = self.streams.get(stream)
        return None if state is None else state.watermark

    def set_watermark(self, stream: Stream, position: Position | None, *, now: float) -> None:
        """Set the applied watermark (from the servers, or after an apply); drops pending
        packets at or below it. Moving it backwards (a server restarted) owes a listing."""
        state = self.state(stream)
        if position is not None and state.watermark is not None and position >= state.watermark:
            state.watermark = position
        else:
            state.watermark = position
            state.list_requested = True
            state.listed_at = float("-inf")
            # leaps above the new watermark are replayed (and remembered again if taken again)
            state.leaps = [] if position is None else [lp for lp in state.leaps if lp[1] <= position]
        while state.pending and position is not None and state.pending[0] <= position:
            state.ids.pop(heapq.heappop(state.pending), None)
        self._new_head(state, now)

    def offer(self, packet: PacketId, *, now: float) -> Offer:
        state = self.state((packet.lane, packet.producer))
        position = packet.position
        if position in state.bad:
            return Offer.STALE
        if state.watermark is not None and position <= state.watermark:
            if any(after < position < to for after, to in state.leaps):
                return Offer.SKIPPED
            return Offer.STALE
        if position in state.ids:
            return Offer.DUPLICATE
        old_head = state.head()
        heapq.heappush(state.pending, position)
        state.ids[position] = packet
        if state.head() != old_head:
            self._new_head(state, now)
        return Offer.ACCEPTED

    def listed(self, stream: Stream, found: Iterable[PacketId], *, at: float, now: float) -> None:
        """Record a listing of `stream` after its watermark taken at time `at` (started then):
        offers what it found and marks the stream as listed."""
        positions = set()
        for packet in found:
            self.offer(packet, now=now)
            positions.add(packet.position)
        state = self.state(stream)
        if state.head() in positions and state.head_since is not None:
            state.head_since = min(state.head_since, at)  # this very listing saw the head
        state.listed_at = max(state.listed_at, at)
        state.list_requested = False

    def known_generation(self, producer: str) -> int | None:
        """The highest generation of `producer` any of its streams' watermarks has reached."""
        marks = [state.watermark[0] for (_, p), state in self.streams.items()
                 if p == producer and state.watermark is not None]
        return max(marks, default=None)

    def decide(self, stream: Stream, *, now: float) -> Decision:
        """What to do next for `stream`."""
        state = self.state(stream)
        head = state.head()
        if state.list_requested:
            return Decision(Action.LIST)
        if head is None:
            return Decision(Action.IDLE)
        packet = state.ids[head]
        if is_successor(state.watermark, head):
            return Decision(Action.APPLY, packet)
        if state.head_since is None:
            state.head_since = now
        known = self.known_generation(stream[1])
        jump_from = known if is_generation_jump(known, head) else None
        start = is_generation_start(state.watermark, head) and jump_from is None
        if start and state.listed_at >= state.head_since:
            return Decision(Action.APPLY, packet)  # nothing older was in storage
        if state.gap_since is None:
            state.gap_since = state.head_since  # the wait starts when the gap showed
        if start and state.listed_at < state.head_since:
            return Decision(Action.LIST)
        if now - state.gap_since >= self.gap_timeout_s:
            return Decision(Action.PASS_GAP, packet, missing_after=state.watermark,
                            jump_from=jump_from)
        if state.listed_at < state.head_since or now - state.listed_at >= self.list_interval_s:
            # the missing packet (or generation) may be stored, just not announced
            return Decision(Action.LIST, packet, jump_from=jump_from)
        return Decision(Action.WAIT, packet, jump_from=jump_from)

    def held_jump(self, stream: Stream) -> PacketId | None:
        """The head of `stream` if it is a generation jump waiting (not applied yet)."""
        state = self.streams.get(stream)
        head = None if state is None else state.head()
        if state is None or head is None or is_successor(state.watermark, head):
            return None
        return state.ids[head] if is_generation_jump(self.known_generation(stream[1]), head) else None

    def applied(self, packet: PacketId, *, now: float) -> None:
        """The head was applied (every reachable shard acked, or all held it): advance the
        watermark, remembering a leap over positions never applied."""
        stream = (packet.lane, packet.producer)
        state = self.state(stream)
        before, position = state.watermark, packet.position
        if before is not None and before < position and not is_successor(before, position):
            state.leaps.append((before, position))
            del state.leaps[:-MAX_LEAPS]
        self.set_watermark(stream, position, now=now)

    def reject(self, packet: PacketId, *, now: float) -> None:
        """Drop a pending packet for good (quarantined, or missing from storage)."""
        state = self.state((packet.lane, packet.producer))
        position = packet.position
        state.bad.add(position)
        if position in state.ids:
            del state.ids[position]
            state.pending.remove(position)
            heapq.heapify(state.pending)
            self._new_head(state, now)

    def pending(self, stream: Stream) -> list[PacketId]:
        """Pending packets of `stream` in apply order."""
        state = self.state(stream)
        return [state.ids[p] for p in sorted(state.pending)]

    def request_listing(self, stream: Stream) -> None:
        self.state(stream).list_requested = True

    @staticmethod
    def _new_head(state: StreamState, now: float) -> None:
        state.head_since = now if state.pending else None
        state.gap_since = None
