"""An embedding server's Prometheus metrics, in a registry of its own per shard."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from persia_inc.embedding_server.shard import Shard

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class _LookupCounters(Collector):
    """The shard's own per-table lookup counts (`Shard.stats`), read when Prometheus scrapes:
    a lookup then pays no metric call per table (three `.labels().inc()` per table were
    about 0.3 ms of a 26-table LookupTables, a quarter of the handler)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    def collect(self) -> Iterator[CounterMetricFamily]:
        families = (CounterMetricFamily("persia_inc_embedding_lookups", "Lookup calls", labels=["table"]),
                    CounterMetricFamily("persia_inc_embedding_lookup_rows", "Signs looked up",
                                        labels=["table"]),
                    CounterMetricFamily("persia_inc_embedding_lookup_misses",
                                        "Signs looked up that had no row (answered with zeros)",
                                        labels=["table"]))
        for stats in self.shard.stats():
            for family, value in zip(families, (stats.lookups, stats.lookup_rows, stats.misses),
                                     strict=True):
                family.add_metric([stats.name], value)
        yield from families


class Metrics:
    """Prometheus metrics of one shard, in their own registry (the lookup counts are the
    shard's own, read at scrape time)."""

    def __init__(self, shard: int, replica: int = 0, lookups: Shard | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if lookups is not None:
            r.register(_LookupCounters(lookups))
        Gauge("persia_inc_embedding_replica", "This process's replica index in its shard",
              registry=r).set(replica)
        self.current = Gauge("persia_inc_embedding_current",
                             "1 while this replica holds what its siblings hold (serving), 0 "
                             "while it catches up", registry=r)
        self.behind_seconds = Gauge("persia_inc_embedding_behind_seconds",
                                    "How long this replica has lacked a position a sibling holds",
                                    registry=r)
        self.behind_lookups = Counter("persia_inc_embedding_behind_lookups",
                                      "Lookups answered while catching up (every replica of the "
                                      "shard was behind), or refused so a sibling answers",
                                      ["outcome"], registry=r)
        self.apply_rows = Counter("persia_inc_embedding_apply_rows",
                                  "Rows upserted by Apply (rate: apply rows/s)", ["table"],
                                  registry=r)
        self.apply_deletes = Counter("persia_inc_embedding_apply_deletes", "Signs deleted by Apply",
                                     ["table"], registry=r)
        self.applies = Counter("persia_inc_embedding_applies", "Apply calls by outcome",
                               ["table", "outcome"], registry=r)
        self.latency = Histogram("persia_inc_embedding_rpc_seconds", "Server-side RPC latency",
                                 ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.errors = Counter("persia_inc_embedding_rpc_errors", "RPCs answered with an error",
                              ["method", "code"], registry=r)
        self.rows = Gauge("persia_inc_embedding_table_rows", "Live rows", ["table"], registry=r)
        self.bytes = Gauge("persia_inc_embedding_table_bytes", "Bytes held by a table", ["table"],
                           registry=r)
        self.watermark_generation = Gauge("persia_inc_embedding_watermark_generation",
                                          "Newest applied generation", ["table", "producer"],
                                          registry=r)
        self.watermark_sequence = Gauge("persia_inc_embedding_watermark_sequence",
                                        "Newest applied sequence", ["table", "producer"],
                                        registry=r)
        self.ready = Gauge("persia_inc_embedding_ready", "1 once the checkpoint is loaded",
                           registry=r)
        self.misrouted = Counter("persia_inc_embedding_misrouted",
                                 "Requests refused or signs counted because they belong to another "
                                 "shard (a client routing by another server list)",
                                 ["method"], registry=r)
        regions = Counter("persia_inc_embedding_region_lookups",
                          "LookupBlocks calls that lent a lookup region (regions.py), by where "
                          "the rows went: in_region, or in_message when it was too small "
                          "(refused regions count as FAILED_PRECONDITION errors)",
                          ["rows"], registry=r)
        self.region_lookups = {True: regions.labels("in_region"), False: regions.labels("in_message")}
        Gauge("persia_inc_embedding_shard", "This process's shard index", registry=r).set(shard)


__all__ = ["Metrics"]
