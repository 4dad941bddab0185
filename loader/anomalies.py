"""Anomalies per stream, kept until an operator clears them.

A quarantined packet, a passed gap, a passed generation jump and a packet skipped below its
stream's watermark each leave rows on the servers that may be stale or missing. A later clean
apply does not repair them (the missing packet's rows stay as they were), so each stays a flag
on its stream (in `/streams`, `/healthz` and `persia-inc status`, which then exits 3) until an
operator has looked and clears it: `persia-inc status --clear TABLE/PRODUCER` (or `all`),
which POSTs `/clear` to the loader's metrics port. Thread-safe: the dispatcher records, the
metrics server's threads read and clear.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from persia_inc.loader.metrics import LoaderMetrics
from persia_inc.loader.ordering import Decision, Stream
from persia_inc.loader.reports import GAP_PASSED, JUMP_PASSED, SKIPPED_BELOW, AnomalyReport
from persia_inc.packet_format import PacketId, Position

log = logging.getLogger(__name__)


class Anomalies:
    """Per stream and kind (`reports.ANOMALY_KINDS`): a count, the last key and reason. Also
    says each one out loud: an ERROR naming the packet (`uri(key)`) and a metric of `model`."""

    def __init__(self, model: str, metrics: LoaderMetrics, uri: Callable[[str], str], *,
                 gap_timeout_s: float, wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.model = model
        self.metrics = metrics
        self.uri = uri
        self.gap_timeout_s = gap_timeout_s
        self._lock = threading.Lock()
        self._flags: dict[Stream, dict[str, AnomalyReport]] = {}
        self._wall_ns = wall_ns
        self._jump_logged: dict[Stream, Position] = {}  # the held jump already logged

    def skipped_below(self, stream: Stream, packet_id: PacketId, source: str,
                      watermark: Position | None) -> None:
        """A packet below the watermark inside a leap of it: it was never applied and never
        will be (applying it over newer rows would be worse). Loud: an ERROR, a metric, a flag;
        the same late packet offered again (another event, a redelivery) counts once."""
        if self.is_last_skipped(stream, packet_id.key):
            self.metrics.skipped.labels(self.model, "watermark").inc()
            return
        self.record(stream, SKIPPED_BELOW, packet_id.key, f"below the watermark {watermark}")
        self.metrics.skipped_below.labels(self.model, stream[0]).inc()
        log.error("SKIPPED %s: it arrived (from %s) below the watermark %s of %s/%s/%s, which had "
                  "already leapt past it (a gap or generation jump passed); it was never applied "
                  "and will not be: its rows on the servers may be stale", self.uri(packet_id.key),
                  source or "a source", watermark, self.model, *stream)

    def held_jump(self, stream: Stream, head: PacketId, known: int,
                  watermark: Position | None) -> bool:
        """Log (once per held packet) and count a generation jump being held; True if new."""
        if not self.first_time_held(stream, head):
            return False
        self.metrics.generation_jumps.labels(self.model, stream[0], "held").inc()
        log.error("GENERATION JUMP in %s/%s/%s: %s is generation %d, but the highest known "
                  "generation of producer %s is %d (watermark %s): held, not applied, while "
                  "storage is listed for generations %d..%d; passed after %.1f s if none shows",
                  self.model, *stream, self.uri(head.key), head.generation, stream[1], known,
                  watermark, known + 1, head.generation - 1, self.gap_timeout_s)
        return True

    def passed(self, stream: Stream, decision: Decision) -> None:
        """A gap (or a generation jump) passed after the gap timeout: an ERROR, metrics, a flag."""
        head = decision.head
        if head is None:
            return
        self.metrics.gaps.labels(self.model, stream[0]).inc()
        if decision.jump_from is not None:
            log.error("GENERATION JUMP in %s/%s/%s passed: no generation between %d and %d "
                      "showed within %.1f s; applying %s over watermark %s", self.model, *stream,
                      decision.jump_from, head.generation, self.gap_timeout_s, self.uri(head.key),
                      decision.missing_after)
            self.metrics.generation_jumps.labels(self.model, stream[0], "passed").inc()
            self.record(stream, JUMP_PASSED, head.key, f"from generation {decision.jump_from}")
        else:
            log.error("GAP in %s/%s/%s: nothing after %s arrived within %.1f s; passing it and "
                      "applying %s", self.model, *stream, decision.missing_after,
                      self.gap_timeout_s, head.position)
            self.record(stream, GAP_PASSED, head.key, f"nothing after {decision.missing_after}")

    def record(self, stream: Stream, kind: str, key: str, reason: str = "") -> None:
        """One more anomaly of `kind` on `stream`, about the packet at `key`."""
        with self._lock:
            kinds = self._flags.setdefault(stream, {})
            before = kinds.get(kind)
            kinds[kind] = AnomalyReport(kind, 1 if before is None else before.count + 1, key,
                                        self._wall_ns(), reason)

    def is_last_skipped(self, stream: Stream, key: str) -> bool:
        """Whether `key` is the packet last recorded as skipped below the watermark (the same
        late packet offered again: counted once)."""
        with self._lock:
            found = self._flags.get(stream, {}).get(SKIPPED_BELOW)
            return found is not None and found.last_key == key

    def first_time_held(self, stream: Stream, head: PacketId) -> bool:
        """True once per packet held as a generation jump (it is logged once, not per pass)."""
        if self._jump_logged.get(stream) == head.position:
            return False
        self._jump_logged[stream] = head.position
        return True

    def of(self, stream: Stream) -> tuple[AnomalyReport, ...]:
        with self._lock:
            return tuple(self._flags.get(stream, {}).values())

    def flagged(self) -> list[str]:
        """Every stream still flagged, as `table/producer kind=count ...`."""
        with self._lock:
            return [f"{t}/{p} " + " ".join(a.flag for a in kinds.values())
                    for (t, p), kinds in sorted(self._flags.items()) if kinds]

    def clear(self, streams: Iterable[Stream] | None = None) -> list[Stream]:
        """Clear the flags of `streams` (None: every stream); returns those that had flags."""
        with self._lock:
            chosen = list(self._flags) if streams is None else [s for s in streams if s in self._flags]
            cleared = [s for s in chosen if self._flags.pop(s, None)]
        for stream in cleared:
            log.warning("anomaly flags of %s/%s cleared by the operator", *stream)
        return cleared
