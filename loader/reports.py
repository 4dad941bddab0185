"""What the loader reports, as typed records: `Loader.health()` (`/healthz`), `Loader.streams()`
(`/streams`), read back by `persia-inc status`. Each record goes to JSON with `to_json()` and
comes back with `from_json()`, so the daemon and the status command share one shape.
Positions are (generation, sequence) tuples here and two-element lists in JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from persia_inc.packet_format import Position

# the kinds of anomaly that stay flagged on a stream until an operator clears them
QUARANTINED = "quarantined"
GAP_PASSED = "gap-passed"
JUMP_PASSED = "generation-jump-passed"
SKIPPED_BELOW = "skipped-below-watermark"
ANOMALY_KINDS = (QUARANTINED, GAP_PASSED, JUMP_PASSED, SKIPPED_BELOW)


def _position(value: Any) -> Position | None:
    return None if value is None else (int(value[0]), int(value[1]))


def _listed(position: Position | None) -> list[int] | None:
    return None if position is None else [position[0], position[1]]


@dataclass(frozen=True, slots=True)
class AnomalyReport:
    """One kind of anomaly on one stream since it was last cleared: how many, the last
    packet key it concerned, when it was last seen (wall ns), and the last reason."""

    kind: str
    count: int
    last_key: str
    last_at_ns: int
    reason: str = ""

    @property
    def flag(self) -> str:
        return f"{self.kind}={self.count}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.count, "last_key": self.last_key,
                "last_at_ns": self.last_at_ns, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AnomalyReport:
        return cls(str(data["kind"]), int(data["count"]), str(data.get("last_key", "")),
                   int(data.get("last_at_ns", 0)), str(data.get("reason", "")))


@dataclass(frozen=True, slots=True)
class ShardReport:
    """One shard (one replica of it) as the loader last saw it. current: it said it holds
    what its sibling replicas hold (serving; always so for a shard of one replica); behind_s:
    how long it has lacked a position a sibling holds; lagging_streams: streams where it holds
    less than the freshest replica of its shard; catch_up: the loader is catching it up from
    storage on a thread of its own (loader/catchup.py); catch_up_packets: packets that catch-up
    (running, or the last one) applied."""

    shard: int
    address: str
    up: bool
    error: str = ""
    failures: int = 0
    replica: int = 0
    current: bool = False
    behind_s: float = 0.0
    lagging_streams: int = 0
    catch_up: bool = False
    catch_up_packets: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "address": self.address, "up": self.up, "error": self.error,
                "failures": self.failures, "replica": self.replica, "current": self.current,
                "behind_s": self.behind_s, "lagging_streams": self.lagging_streams,
                "catch_up": self.catch_up, "catch_up_packets": self.catch_up_packets}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardReport:
        return cls(int(data["shard"]), str(data["address"]), bool(data["up"]),
                   str(data.get("error", "")), int(data.get("failures", 0)),
                   int(data.get("replica", 0)), bool(data.get("current", data["up"])),
                   float(data.get("behind_s", 0.0)), int(data.get("lagging_streams", 0)),
                   bool(data.get("catch_up", False)), int(data.get("catch_up_packets", 0)))


@dataclass(frozen=True, slots=True)
class StreamReport:
    """One stream as of the dispatcher's last pass.

    watermark: what every shard holds (the last known marks counting for shards that are
    down); reachable_watermark: what the reachable shards hold; pending: packets known, not
    applied; generation_jump_held: key of the packet held as a generation jump, or None;
    shards_unreachable: indices; anomalies: what stays flagged until cleared (by kind)."""

    table: str
    producer: str
    watermark: Position | None
    reachable_watermark: Position | None
    pending: int = 0
    generation_jump_held: str | None = None
    shards_unreachable: tuple[int, ...] = ()
    anomalies: tuple[AnomalyReport, ...] = ()

    def anomaly(self, kind: str) -> AnomalyReport | None:
        return next((a for a in self.anomalies if a.kind == kind), None)

    def count(self, kind: str) -> int:
        found = self.anomaly(kind)
        return 0 if found is None else found.count

    @property
    def skipped_below_watermark(self) -> int:
        return self.count(SKIPPED_BELOW)

    @property
    def flags(self) -> list[str]:
        """The stream's anomalies as short words (`kind=count`), in a fixed order."""
        return [a.flag for kind in ANOMALY_KINDS for a in self.anomalies if a.kind == kind]

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "producer": self.producer,
                "watermark": _listed(self.watermark),
                "reachable_watermark": _listed(self.reachable_watermark),
                "pending": self.pending, "generation_jump_held": self.generation_jump_held,
                "shards_unreachable": list(self.shards_unreachable),
                "skipped_below_watermark": self.skipped_below_watermark,
                "anomalies": [a.to_json() for a in self.anomalies], "flags": self.flags}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamReport:
        return cls(str(data["table"]), str(data["producer"]), _position(data.get("watermark")),
                   _position(data.get("reachable_watermark")), int(data.get("pending", 0)),
                   data.get("generation_jump_held") or None,
                   tuple(int(i) for i in data.get("shards_unreachable", [])),
                   tuple(AnomalyReport.from_json(a) for a in data.get("anomalies", [])))


@dataclass(frozen=True, slots=True)
class LoaderReport:
    """The loader's `/streams`: every stream and shard, and the dense sync's status (its
    own JSON shape, `DenseSync.status()`) when it runs."""

    model: str
    shards: tuple[ShardReport, ...] = ()
    streams: tuple[StreamReport, ...] = ()
    dense: dict[str, Any] | None = None

    def stream(self, table: str, producer: str) -> StreamReport | None:
        return next((s for s in self.streams if (s.table, s.producer) == (table, producer)), None)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "shards": [s.to_json() for s in self.shards],
                "streams": [s.to_json() for s in self.streams], "dense": self.dense}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoaderReport:
        return cls(str(data["model"]), tuple(ShardReport.from_json(s) for s in data.get("shards", [])),
                   tuple(StreamReport.from_json(s) for s in data.get("streams", [])),
                   data.get("dense"))


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The loader's `/healthz`.

    healthy: the dispatcher loops, every source's threads run and every shard answers
    (`problems` names what is wrong otherwise; `/healthz` answers 503); ready: healthy and
    every source sees packets (`waiting` names those that cannot yet); flags: the anomalies
    still flagged, as `table/producer kind=count` (they do not make the loader unhealthy: a
    restart would not clear them; `persia-inc status --clear` does)."""

    healthy: bool
    ready: bool
    dispatcher: bool
    servers: bool
    sources: dict[str, bool] = field(default_factory=dict)
    waiting: tuple[str, ...] = ()
    shards: tuple[ShardReport, ...] = ()
    problems: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    applied: int = 0
    queue: int = 0
    source: str = ""
    other_models: tuple[str, ...] = ()
    dense: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "ready": self.ready, "dispatcher": self.dispatcher,
                "servers": self.servers, "sources": dict(self.sources),
                "waiting": list(self.waiting), "shards": [s.to_json() for s in self.shards],
                "problems": list(self.problems), "flags": list(self.flags),
                "applied": self.applied, "queue": self.queue, "source": self.source,
                "other_models": list(self.other_models), "dense": self.dense}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HealthReport:
        return cls(bool(data["healthy"]), bool(data["ready"]), bool(data["dispatcher"]),
                   bool(data["servers"]), {str(k): bool(v) for k, v in data.get("sources", {}).items()},
                   tuple(data.get("waiting", [])),
                   tuple(ShardReport.from_json(s) for s in data.get("shards", [])),
                   tuple(data.get("problems", [])), tuple(data.get("flags", [])),
                   int(data.get("applied", 0)), int(data.get("queue", 0)), str(data.get("source", "")),
                   tuple(data.get("other_models", [])), data.get("dense"))
