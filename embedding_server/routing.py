"""Which replica of a shard a read goes to: spread over the healthy ones, around the others.

A *target* is one replica of one shard, named by its index in the client's flat target list
(shard 0's replicas first, then shard 1's, ...; with one address per shard, target i is shard
i). Reads of a shard try its replicas in the order `ReplicaRouter.order` gives: round-robin
over those that answered last time (the load spreads), then those that were catching up, then
those that were down, each left out of the front for `retry_s` after it failed. A replica
whose health stream (`health_watch.HealthWatch`) last said it does not serve goes behind all
of those until it says SERVING again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from persia_inc.embedding_server.sharding import replica_sets


@dataclass(frozen=True, slots=True)
class Target:
    """One replica of one shard: index in the client's target list, shard, replica, address."""

    index: int
    shard: int
    replica: int
    address: str


def targets_of_servers(servers: Sequence[str | Sequence[str]]
                       ) -> tuple[tuple[Target, ...], tuple[tuple[int, ...], ...]]:
    """The flat target list of `servers` (PersiaInferConfig.servers) and, per shard, the
    indices of its targets."""
    targets: list[Target] = []
    by_shard = []
    for shard, replicas in enumerate(replica_sets(servers)):
        by_shard.append(tuple(range(len(targets), len(targets) + len(replicas))))
        targets += [Target(len(targets) + r, shard, r, a) for r, a in enumerate(replicas)]
    return tuple(targets), tuple(by_shard)


class ReplicaRouter:
    """Per shard, the order to try its replicas in, from what the last calls saw; counts
    failovers and answers from a replica that was behind. Thread-safe."""

    def __init__(self, by_shard: Sequence[Sequence[int]], retry_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.by_shard = tuple(tuple(t) for t in by_shard)
        self.retry_s, self._clock = retry_s, clock
        self._next = [0] * len(self.by_shard)
        self._down_until: dict[int, float] = {}
        self._behind_until: dict[int, float] = {}
        self._not_serving: set[int] = set()  # by their health stream
        self._lock = threading.Lock()
        self.failovers = 0  # reads that went on to another replica after one failed
        self.behind_answers = 0  # answers read from a catching-up replica (every one was)
        self.failovers_by_target: dict[int, int] = {}

    def order(self, shard: int) -> list[int]:
        """The targets of `shard` in the order to try them."""
        replicas = self.by_shard[shard]
        if len(replicas) == 1:
            return list(replicas)
        now = self._clock()
        with self._lock:
            start = self._next[shard]
            self._next[shard] = (start + 1) % len(replicas)
            rotated = replicas[start:] + replicas[:start]
            return sorted(rotated, key=lambda t: (t in self._not_serving,
                                                  self._down_until.get(t, 0.0) > now,
                                                  self._behind_until.get(t, 0.0) > now))

    @property
    def not_serving(self) -> tuple[int, ...]:
        """The targets whose health stream last said they do not serve (sorted)."""
        with self._lock:
            return tuple(sorted(self._not_serving))

    def health(self, target: int, serving: bool) -> None:
        """`target`'s health stream says it serves (True) or not (False: loading, catching
        up, draining before a stop, or its stream ended)."""
        with self._lock:
            if serving:  # it says so itself: no need to wait out an earlier failure
                self._not_serving.discard(target)
                self._down_until.pop(target, None)
                self._behind_until.pop(target, None)
            else:
                self._not_serving.add(target)

    def failed(self, target: int, catching_up: bool) -> None:
        """`target` did not answer (down, or catching up): try it last for `retry_s`."""
        with self._lock:
            until = self._clock() + self.retry_s
            (self._behind_until if catching_up else self._down_until)[target] = until

    def failed_over(self, target: int) -> None:
        """A read went on to another replica after `target` failed."""
        with self._lock:
            self.failovers += 1
            self.failovers_by_target[target] = self.failovers_by_target.get(target, 0) + 1

    def answered(self, target: int, behind: bool = False) -> None:
        """`target` answered (`behind`: while catching up, asked with allow_behind)."""
        if self._down_until or self._behind_until or behind:
            with self._lock:
                self._down_until.pop(target, None)
                if behind:
                    self.behind_answers += 1
                else:
                    self._behind_until.pop(target, None)
