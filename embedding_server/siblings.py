"""Whether a replica is current: its positions against its sibling replicas'.

A shard listed as several addresses has replicas, each a full copy fed by the loader under its
own position. A replica that lacks a position one of its siblings holds must not answer
lookups while that sibling can: a (re)started replica is *catching up* until it holds every
position each sibling that answers holds; a serving replica that lacks one for longer than
`max_lag_s` stops serving until it has caught up again. Each replica watches its siblings
itself (their Status, every `poll_s`), so the rule holds with or without a loader running.

Positions a sibling was seen holding are remembered while it is down: a replica that lacked
them stays catching up when the fresher sibling dies (its answers are then flagged, never
silently stale). A replica that started with no sibling answering has nothing to be behind: it
is current (as a shard of one replica always is). The state drives the gRPC health status
(SERVING only when current) and the refusal of lookups that do not say `allow_behind`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from persia_inc.embedding_server.protos import embedding_pb2 as pb
from persia_inc.embedding_server.protos import embedding_pb2_grpc as pb_grpc
from persia_inc.foundation.threads import thread_name

log = logging.getLogger(__name__)

Position = tuple[int, int]


def missing(mine: dict[tuple[str, str], Position], theirs: dict[tuple[str, str], Position]
            ) -> list[tuple[str, str]]:
    """The streams where `theirs` holds a position `mine` lacks (sorted)."""
    return sorted(k for k, p in theirs.items() if mine.get(k) is None or mine[k] < p)


class SiblingWatch:
    """The current/catching-up state of one replica, from its siblings' positions.

    marks(): this replica's positions ((table, producer) -> (generation, sequence));
    siblings: the other replicas' addresses; on_change(current) is called on every change
    (and once by `start`). Thread-safe reads of `current`, `behind_s`, `siblings_up`.
    """

    def __init__(self, marks: Callable[[], dict[tuple[str, str], Position]],
                 siblings: Sequence[str], *, max_lag_s: float, poll_s: float,
                 on_change: Callable[[bool], None], label: str,
                 credentials: grpc.ChannelCredentials | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._marks, self._on_change, self._clock = marks, on_change, clock
        self.max_lag_s, self.poll_s, self.label = max_lag_s, poll_s, label
        self.siblings = tuple(siblings)
        self._channels = [grpc.secure_channel(a, credentials) if credentials is not None
                          else grpc.insecure_channel(a) for a in self.siblings]
        self._stubs = [pb_grpc.EmbeddingServiceStub(c) for c in self._channels]
        self.current = not self.siblings  # a (re)started replica catches up first
        self.siblings_up = 0
        self.lacking: list[tuple[str, str]] = []
        self._behind_since: float | None = None
        self._head: dict[tuple[str, str], Position] = {}  # the newest seen on any sibling
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def behind_s(self) -> float:
        """How long this replica has lacked a position a sibling holds (0: it lacks none)."""
        since = self._behind_since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def look(self) -> bool:
        """Read every sibling's positions once and update the state; returns `current`."""
        theirs: list[dict[tuple[str, str], Position]] = []
        for stub in self._stubs:
            try:
                reply = stub.Status(pb.StatusRequest(), timeout=max(0.5, 2 * self.poll_s))
            except grpc.RpcError:
                continue  # down: nothing to compare with
            if reply.ready:  # one still loading its checkpoint is no reference yet
                theirs.append({(w.table, w.producer): (w.generation, w.sequence)
                               for w in reply.watermarks})
        for marks in theirs:
            for key, position in marks.items():
                if position > self._head.get(key, (-1, -1)):
                    self._head[key] = position
        lacking = missing(self._marks(), self._head)
        with self._lock:
            now = self._clock()
            self.siblings_up, self.lacking = len(theirs), lacking
            if not lacking:
                self._behind_since = None
            elif self._behind_since is None:
                self._behind_since = now
            was = self.current
            if not was:
                self.current = not lacking
            elif lacking and now - self._behind_since > self.max_lag_s:  # type: ignore[operator]
                self.current = False
            changed = self.current != was
        if changed:
            if self.current:
                log.info("%s caught up with its %d sibling(s): serving", self.label, len(theirs))
            else:
                log.warning("%s lacks %s held by a sibling for over %.1f s: not serving until "
                            "caught up", self.label, ", ".join("/".join(k) for k in lacking[:4]),
                            self.max_lag_s)
            self._on_change(self.current)
        return self.current

    def start(self) -> SiblingWatch:
        """Look once now, then every `poll_s` on a thread of its own until `close`."""
        self.look()
        self._on_change(self.current)
        if self.siblings:
            self._thread = threading.Thread(target=self._run, name=thread_name("sibling-watch"),
                                            daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.look()
            except Exception:  # one bad look never ends the watch
                log.exception("%s: looking at its siblings failed", self.label)

    def close(self) -> None:
        """Stop watching; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        for channel in self._channels:
            channel.close()
        self._channels = []
