"""Catch-up of one replica on its own: a replica that restarted (empty, or from an older
checkpoint) or was down while its siblings took new cuts is brought up to date from storage
by its own thread, applying at that replica's own positions only, while the dispatcher keeps
sending new cuts to the replicas that are current. The dispatcher leaves a replica out of live
dispatch while its catch-up runs, and takes it back once it holds what the others hold."""

from __future__ import annotations

import logging
import threading
from typing import Any

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.embedding_server.errors import ShardError
from persia_inc.foundation.retry import RetryPolicy, daemon_delay_s
from persia_inc.foundation.threads import ServiceThread
from persia_inc.loader.fetch import PacketError, fetch_packet
from persia_inc.loader.replay import plan_replay
from persia_inc.loader.shards import read_shard, refused_for_good, target_name
from persia_inc.storage import ObjectStore

log = logging.getLogger(__name__)


class CatchUp(ServiceThread):
    """Apply to target `index` every stored packet after what it holds, pass after pass, until
    a pass finds nothing left (then `done` is set and the thread ends). A failure waits the one
    retry rule's backoff and starts the pass again from what the replica holds; a packet that
    can never apply (it fails verification, or the server refuses it for good) is skipped, as
    the dispatcher quarantines it."""

    def __init__(self, client: EmbeddingClient, store: ObjectStore, model: str, index: int, *,
                 policy: RetryPolicy, fetch_kwargs: dict[str, Any]) -> None:
        super().__init__(f"catch-up-{index}")
        self.client, self.store, self.model, self.index = client, store, model, index
        self.policy, self.fetch_kwargs = policy, fetch_kwargs
        self.done = threading.Event()
        self.applied = 0

    def run(self) -> None:
        name = target_name(self.client, self.index)
        attempt = 0
        while not self.stop.is_set():
            try:
                if self._pass() == 0:
                    log.info("%s caught up from storage (%d packets): back in live dispatch",
                             name, self.applied)
                    self.done.set()
                    return
                attempt = 0
            except Exception as exc:  # never dies on one failure: back off, look again
                attempt += 1
                wait = daemon_delay_s(exc, attempt, self.policy)
                log.warning("catching up %s failed (retry in %.2fs): %s", name, wait, exc)
                self.stop.wait(wait)

    def _pass(self) -> int:
        """Apply what the replica lacks of what storage holds now; returns how many packets."""
        marks: dict = dict(read_shard(self.client, self.index).marks)
        plan = plan_replay(self.store, self.model, marks)
        count = 0
        for planned in plan.ordered():
            if self.stop.is_set():
                break
            stream = (planned.packet_id.lane, planned.packet_id.producer)
            try:
                packet = fetch_packet(self.store, planned.key, planned.packet_id,
                                      **self.fetch_kwargs).packet
            except PacketError as exc:
                log.warning("catch-up of target %d skips %s: %s", self.index, planned.key, exc)
                continue
            outcome = self.client.apply_cut_shards(packet, [self.index],
                                                   {self.index: marks.get(stream)})[self.index]
            if isinstance(outcome, ShardError):
                if not refused_for_good(outcome):
                    raise outcome
                log.warning("catch-up of target %d skips %s: %s", self.index, planned.key, outcome)
                continue
            marks[stream] = planned.packet_id.position
            count += 1
            self.applied += 1
        return count
