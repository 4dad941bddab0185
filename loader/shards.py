"""Shard tracking: what the loader knows of each embedding-server shard (up or down, its
watermarks, why it is down), and the one reader of a shard's positions that the daemon,
replay and `persia-inc status` share.

A shard that does not answer (or is not the shard our list says) is counted every time,
logged with its address at most every `unreachable_log_interval_s`, and looked at again after
the one retry rule's backoff; the reachable shards are served meanwhile. What *every* shard
holds (the minimum, with the last known marks of the shards that are down) is what Kafka may
commit and what status reports. With replicas (a shard listed as several addresses) every
replica is tracked on its own, as one *target* of the client (`EmbeddingClient.targets`): its
own position, up or down, caught up on its own from storage; `shard` and `replica` say which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.embedding_server.errors import ShardError, ShardIdentityError
from persia_inc.foundation.retry import RetryPolicy, daemon_delay_s
from persia_inc.loader.metrics import LoaderMetrics
from persia_inc.loader.ordering import Ordering, Stream
from persia_inc.loader.reports import ShardReport
from persia_inc.loader.settings import LoaderSettings
from persia_inc.packet_format import Position

log = logging.getLogger(__name__)

_BACKOFF_CAP = 10  # the longest retry wait, in units of `retry_backoff_s`

# Server rejections that mean "this packet can never apply" (quarantine), not "try later".
# A ShardIdentityError (the server list is in the wrong order) is not the packet's fault: it is
# never quarantined, it waits (with the longest backoff) for the configuration to be fixed.
_PERMANENT_APPLY_CODES = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE"})


def refused_for_good(exc: ShardError) -> bool:
    """Whether a failed Apply means the packet itself can never apply (quarantine it)."""
    return exc.code in _PERMANENT_APPLY_CODES and not isinstance(exc, ShardIdentityError)


def loader_retry_policy(retry_backoff_s: float) -> RetryPolicy:
    """How the loader retries a failed listing, fetch or apply, and unreachable servers:
    never giving up (a daemon), waits doubling from `retry_backoff_s` up to ten times it."""
    return RetryPolicy(max_attempts=None, initial_backoff_s=retry_backoff_s,
                       max_backoff_s=_BACKOFF_CAP * retry_backoff_s, deadline_s=0)


class ShardNotReadyError(ConnectionError):
    """A shard answered but is not ready (still loading its checkpoint): retriable."""


@dataclass(frozen=True, slots=True)
class ShardReading:
    """One shard's answer: its watermark per stream, its tables' dims, and (a replica of a
    replicated shard) whether it holds what its siblings hold and how long it has not."""

    marks: dict[Stream, Position]
    dims: dict[str, int]
    current: bool = True
    behind_s: float = 0.0


def read_shard(client: EmbeddingClient, index: int) -> ShardReading:
    """Verify target `index` (shard `index`, with one replica per shard) is the server our
    list says and read its positions.

    Raises ShardError (unreachable; ShardIdentityError: another shard answers there) or
    ShardNotReadyError (still loading its checkpoint)."""
    client.verify((index,))  # cheap once checked; again after an outage
    status = client.status(index)
    if not status.ready:
        raise ShardNotReadyError(f"{target_name(client, index)}: not ready (still loading its "
                                 "checkpoint)")
    return ShardReading({(w.table, w.producer): (w.generation, w.sequence) for w in status.watermarks},
                        {t.name: t.dim for t in status.tables},
                        status.current or not status.num_replicas, status.behind_s)


def target_name(client: EmbeddingClient, index: int) -> str:
    """'shard S (address)', or 'shard S replica R (address)' when S has several replicas."""
    t = client.targets[index]
    several = len(client.replicas_of(t.shard)) > 1
    return f"shard {t.shard}" + (f" replica {t.replica}" if several else "") + f" ({t.address})"


def target_label(client: EmbeddingClient, index: int) -> str:
    """The metrics label of target `index`: 'S', or 'SrR' when shard S has several replicas."""
    t = client.targets[index]
    return str(t.shard) + (f"r{t.replica}" if len(client.replicas_of(t.shard)) > 1 else "")


def read_positions(client: EmbeddingClient
                   ) -> tuple[list[dict[Stream, Position] | None], dict[int, str]]:
    """Each target's watermarks (every replica of every shard; None for one that is
    unreachable, not the server our list says, or not ready), and why, per such target."""
    per_shard: list[dict[Stream, Position] | None] = []
    down: dict[int, str] = {}
    for index in range(len(client.targets)):
        try:
            per_shard.append(read_shard(client, index).marks)
        except (ShardError, ShardNotReadyError) as exc:
            per_shard.append(None)
            down[index] = str(exc)
    return per_shard, down


def lowest(positions: Iterable[Position | None]) -> Position | None:
    """What every shard holds: the minimum, None if any shard holds nothing (or none given)."""
    positions = list(positions)
    if not positions or any(p is None for p in positions):
        return None
    return min(positions)  # type: ignore[type-var]


def _freshest(positions: Iterable[Position | None]) -> Position | None:
    """What the freshest of a shard's replicas holds (None: none holds anything)."""
    held = [p for p in positions if p is not None]
    return max(held) if held else None


def held_by_all(per_shard: list[dict[Stream, Position]]) -> dict[Stream, Position | None]:
    """Per stream known to any of `per_shard`, what all of them hold."""
    streams: set[Stream] = set().union(*per_shard) if per_shard else set()
    return {stream: lowest(marks.get(stream) for marks in per_shard) for stream in streams}


@dataclass
class ShardState:
    """What the loader knows of one shard (one replica of it): whether it answered at the last
    look, its watermarks then (kept while it is down: the last known), and why it is down."""

    index: int  # the client's target index (the shard's, with one replica per shard)
    address: str
    replica: int = 0
    shard: int = -1  # the shard it is a replica of (-1: `index`)
    label: str = ""  # its metrics label ('S', or 'SrR' among replicas; empty: `index`)
    up: bool = False
    current: bool = False  # answered and said it holds what its siblings hold
    behind_s: float = 0.0
    lagging: int = 0  # streams where it holds less than its shard's freshest replica
    marks: dict[Stream, Position] = field(default_factory=dict)
    seen: bool = False  # answered (ready) at least once
    error: BaseException | None = None  # why it is down (None while up)
    failures: int = 0  # consecutive failed looks or applies
    retry_at: float = float("-inf")  # monotonic time of its next look while down
    logged_at: float = float("-inf")  # monotonic time of the last log line about it
    down_since: float | None = None

    def report(self) -> ShardReport:
        return ShardReport(self.index if self.shard < 0 else self.shard, self.address, self.up,
                           "" if self.error is None else str(self.error), self.failures,
                           self.replica, self.up and self.current, self.behind_s, self.lagging)


class ShardTracker:
    """Every shard of `client`, as the dispatcher last saw it. Not thread-safe: the dispatcher
    owns it (reports go out through `reports()` snapshots)."""

    def __init__(self, client: EmbeddingClient, model: str, metrics: LoaderMetrics,
                 settings: LoaderSettings, *, clock: Callable[[], float]) -> None:
        self.client = client
        self.model = model
        self.metrics = metrics
        self.clock = clock
        self.policy = loader_retry_policy(settings.retry_backoff_s)
        self.watermark_poll_s = settings.watermark_poll_s
        self.unreachable_log_interval_s = settings.unreachable_log_interval_s
        self.shards = [ShardState(t.index, t.address, t.replica, t.shard,
                                  target_label(client, t.index)) for t in client.targets]
        self.dims: dict[str, int] = {}  # table -> dim, as the servers know it
        self.must_check = True  # read the watermarks before the next apply
        self.ok = False  # some shard answered at the last look
        self.catching_up: set[int] = set()  # replicas caught up by their own thread, not live
        self.catch_up_packets: dict[int, int] = {}  # by the running (or last) catch-up
        self._last_poll = float("-inf")

    @property
    def up(self) -> list[ShardState]:
        return [shard for shard in self.shards if shard.up]

    @property
    def down(self) -> list[int]:
        return [shard.index for shard in self.shards if not shard.up]

    def look(self, *, force: bool = False) -> list[ShardState] | None:
        """Look at every shard that is up (and at a shard that is down, when its retry is due)
        if a look is due; returns the shards that are up, or None when no look was due."""
        now = self.clock()
        if not force and not self.must_check and now - self._last_poll < self.watermark_poll_s:
            return None
        self._last_poll = now
        for shard in self.shards:
            if shard.up or force or now >= shard.retry_at:
                self.look_at(shard, now)
        up = self.up
        self.ok = bool(up)
        self.must_check = not up
        self._count_lagging()
        return up

    def _count_lagging(self) -> None:
        """Per replica, the streams where it holds less than the freshest replica of its
        shard (down replicas count with their last known marks)."""
        by_shard: dict[int, list[ShardState]] = {}
        for shard in self.shards:
            by_shard.setdefault(shard.shard, []).append(shard)
        for siblings in by_shard.values():
            freshest: dict[Stream, Position] = {}
            for shard in siblings:
                for stream, position in shard.marks.items():
                    freshest[stream] = max(freshest.get(stream, position), position)
            for shard in siblings:
                shard.lagging = sum(1 for stream, position in freshest.items()
                                    if shard.marks.get(stream, (-1, -1)) < position)
                label = shard.label or str(shard.index)
                self.metrics.shard_lagging_streams.labels(self.model, label).set(shard.lagging)
                self.metrics.shard_current.labels(self.model, label).set(
                    1 if shard.up and shard.current else 0)

    def refresh(self, ordering: Ordering, *, follow_servers: bool, force: bool = False,
                on_moved: Callable[[Stream, bool], None]) -> bool:
        """Look at the shards (when due) and set each stream's watermark to what the reachable
        shards hold. A stream where a reachable shard fell behind (restarted empty or from an
        older checkpoint, or back after an outage) is rewound, so it replays from storage.
        follow_servers: also take up streams only the servers know; on_moved(stream, rewound)
        after a stream's watermark was set. Returns False when no shard is reachable."""
        up = self.look(force=force)
        if up is None:
            return self.ok
        if not up:
            return False
        now = self.clock()
        streams = set(ordering.streams)
        if follow_servers:
            for shard in up:
                streams |= set(shard.marks)
        # what each shard's freshest replica holds: a replica behind its siblings (restarted,
        # or back after an outage) is caught up on its own and does not rewind the stream
        by_shard: dict[int, list[ShardState]] = {}
        for shard in up:
            by_shard.setdefault(shard.shard, []).append(shard)
        for stream in streams:
            held = lowest(_freshest(sh.marks.get(stream) for sh in siblings)
                          for siblings in by_shard.values())
            ours = ordering.watermark(stream)
            fresh = stream not in ordering.streams
            if not fresh and held == ours:
                continue
            rewound = not fresh and (held is None or (ours is not None and held < ours))
            if rewound:
                behind = [f"{sh.index} ({sh.address})" for sh in up
                          if sh.marks.get(stream) is None
                          or (ours is not None and sh.marks[stream] < ours)]
                log.warning("stream %s/%s: shard %s holds only up to %s, not %s (restarted, or "
                            "back after it was unreachable): replaying from storage", *stream,
                            ", ".join(behind), held, ours)
                self.metrics.replays.labels(self.model).inc()
            ordering.set_watermark(stream, held, now=now)
            on_moved(stream, rewound)
        return True

    def look_at(self, shard: ShardState, now: float) -> None:
        """Read one shard's positions, or mark it down with why."""
        try:
            reading = read_shard(self.client, shard.index)
        except (ShardError, ShardNotReadyError) as exc:
            self.shard_down(shard, exc, now)
            return
        shard.marks = reading.marks
        shard.current, shard.behind_s = reading.current, reading.behind_s
        self.dims.update(reading.dims)
        if not shard.up and shard.down_since is not None:
            log.warning("%s answers again after %.1f s: catching up from storage",
                        target_name(self.client, shard.index), now - shard.down_since)
        shard.up, shard.seen, shard.error, shard.failures = True, True, None, 0
        shard.down_since = None
        self.metrics.shard_up.labels(self.model, shard.label or str(shard.index)).set(1)

    def shard_down(self, shard: ShardState, exc: BaseException, now: float) -> None:
        """Mark `shard` down after `exc` (a failed look or apply): counted every time, logged
        with its address at most every `unreachable_log_interval_s`, looked at again after a
        backoff. A ShardIdentityError (the server list is in the wrong order) is an ERROR."""
        shard.up = False
        shard.error = exc
        shard.failures += 1
        if shard.down_since is None:
            shard.down_since = now
        shard.retry_at = now + daemon_delay_s(exc, shard.failures, self.policy)
        self.must_check = True
        why = "wrong_shard" if isinstance(exc, ShardIdentityError) else "unreachable"
        self.metrics.shard_unreachable.labels(self.model, shard.label or str(shard.index),
                                              shard.address, why).inc()
        self.metrics.shard_up.labels(self.model, shard.label or str(shard.index)).set(0)
        if now - shard.logged_at >= self.unreachable_log_interval_s:
            shard.logged_at = now
            log.error("SHARD %s %s for %.1f s (%d failures): %s; the other shards (replicas) still "
                      "get their slices, this one catches up from storage when it is back (logged "
                      "at most every %.0f s)", target_name(self.client, shard.index).removeprefix("shard "),
                      "refuses its identity" if why == "wrong_shard" else "unreachable",
                      now - shard.down_since, shard.failures, exc, self.unreachable_log_interval_s)

    def lacking(self, stream: Stream, position: Position) -> list[int]:
        """The targets that are up and do not hold `position` of `stream` yet (one that holds
        it already is not sent it again: a replica catching up does not cost the others)."""
        return [shard.index for shard in self.shards if shard.up
                and shard.index not in self.catching_up
                and (shard.marks.get(stream) is None or shard.marks[stream] < position)]

    def behind(self, ordering: Ordering) -> list[int]:
        """The replicas up, in live dispatch, holding less of some stream than the stream's
        watermark (their siblings hold more): they need a catch-up of their own."""
        return [shard.index for shard in self.shards if shard.up
                and shard.index not in self.catching_up and len(self.client.replicas_of(
                    shard.shard if shard.shard >= 0 else shard.index)) > 1
                and any(mark is not None and (shard.marks.get(stream) is None
                                              or shard.marks[stream] < mark)
                        for stream, mark in ((s, ordering.watermark(s)) for s in ordering.streams))]

    def serving_shards(self) -> set[int]:
        """The shards with a replica that answered and is current (or is the only one)."""
        return {shard.index if shard.shard < 0 else shard.shard for shard in self.shards
                if shard.up and shard.current}

    def applied(self, stream: Stream, position: Position, indices: Iterable[int]) -> None:
        """The shards `indices` acked `position` of `stream`."""
        for index in indices:
            marks = self.shards[index].marks
            marks[stream] = max(marks.get(stream, position), position)

    def held_everywhere(self, stream: Stream) -> Position | None:
        """What every shard holds of `stream` (shards that are down count with their last
        known marks; None if some shard was never seen or holds nothing of it)."""
        if not all(shard.seen for shard in self.shards):
            return None
        return lowest(shard.marks.get(stream) for shard in self.shards)

    def identity_error(self) -> ShardIdentityError | None:
        """The first shard that is not the shard our list says (a configuration error)."""
        for shard in self.shards:
            if isinstance(shard.error, ShardIdentityError):
                return shard.error
        return None

    def reports(self) -> list[ShardReport]:
        return [replace(shard.report(), catch_up=shard.index in self.catching_up,
                        catch_up_packets=self.catch_up_packets.get(shard.index, 0))
                for shard in self.shards]
