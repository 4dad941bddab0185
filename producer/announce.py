"""Announcers: how a stored packet is made known. Storage is the truth; an announcement is a
doorbell, sent only after the packet is durably stored, so its failure never loses data.

* `DirectoryAnnouncer` (announce mode `dir`): the atomically published file is the
  announcement; loaders watch or list the directory. Nothing to send.
* `KafkaAnnouncer` (mode `kafka`): one JSON `Announcement` per packet, key = producer id,
  acks=all and idempotent where the broker supports it, sent from its own thread and re-sent
  until acknowledged (capped backoff, no deadline: `foundation.retry.daemon_delay_s`), so a
  broker outage never stalls the writer. An error kafka-python calls not retriable is retried
  too, after the longest wait and with a new client: after a broker restart the old client's
  producer id is unknown (`UnknownProducerIdError`), which a new client fixes.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from persia_inc.foundation.kafka import KafkaSettings, import_kafka
from persia_inc.foundation.retry import RetryPolicy, daemon_delay_s, is_retriable
from persia_inc.foundation.threads import ServiceThread
from persia_inc.packet_format import Announcement
from persia_inc.producer.metrics import ProducerMetrics

log = logging.getLogger(__name__)


class Announcer(Protocol):
    """What the writer needs from an announcer."""

    def announce(self, announcement: Announcement) -> None:
        """Queue `announcement` for delivery; never blocks on the network, never raises."""

    @property
    def pending(self) -> int:
        """Announcements queued and not yet acknowledged."""

    def close(self, timeout_s: float) -> int:
        """Deliver what is queued within `timeout_s`; returns how many remain undelivered."""


class DirectoryAnnouncer:
    """Announce mode `dir`: the packet file itself is the announcement."""

    def __init__(self, on_announced: Callable[[Announcement], None] | None = None) -> None:
        self._on_announced = on_announced

    def announce(self, announcement: Announcement) -> None:
        log.debug("stored %s", announcement.uri)
        if self._on_announced is not None:
            self._on_announced(announcement)

    @property
    def pending(self) -> int:
        return 0

    def close(self, timeout_s: float) -> int:
        return 0


class KafkaAnnouncer:
    """Sends announcements to `topic` from a background thread; keeps each until acked.

    settings: `persia_inc.kafka` (KafkaSettings); max_queued: announcements kept while the
    broker is down before the oldest are dropped (logged and counted: the packets stay in
    storage, where a loader finds them by listing). Failed sends are retried as the retry rule
    decides for a daemon under `retry` (forever, 0.2 s doubling to max_backoff_s).
    """

    def __init__(self, settings: KafkaSettings, topic: str, *, max_queued: int = 1_000_000,
                 max_backoff_s: float = 5.0, metrics: ProducerMetrics | None = None) -> None:
        self.settings = settings
        self.topic = topic
        self.max_queued = max_queued
        self.max_backoff_s = max_backoff_s
        self.retry = RetryPolicy(max_attempts=None, initial_backoff_s=min(0.2, max_backoff_s),
                                 max_backoff_s=max_backoff_s, deadline_s=0)
        self.metrics = metrics
        self.delivered = 0
        self.dropped = 0
        self._queue: collections.deque[Announcement] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._client: Any = None
        self._topic_ready = False
        import_kafka()  # here, on the caller's thread: fail early if it is missing
        self._thread = ServiceThread("announcer", self._run, wake=self._wake)
        self._abort = self._thread.stop  # set at close when time is up: stop retrying
        self._thread.start()

    # --- public ----------------------------------------------------------------------------

    def announce(self, announcement: Announcement) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queued:
                lost = self._queue.popleft()
                self.dropped += 1
                log.error("announcement queue full (%d): dropped the announcement of %s; the "
                          "packet is stored and a listing loader will find it",
                          self.max_queued, lost.uri)
            self._queue.append(announcement)
            self._gauge()
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout_s: float) -> int:
        """Deliver what is queued within `timeout_s`, then stop; safe to call twice."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(max(0.0, timeout_s))  # delivering what is queued
        self._thread.close(max(5.0, self.settings.request_timeout_ms / 1000 + 1))
        left = self.pending
        if left:
            log.warning("%d announcement(s) to %s not acknowledged at close; their packets are "
                        "stored and a listing loader will find them", left, self.topic)
        self._drop_client()
        return left

    # --- the thread ------------------------------------------------------------------------

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.of(self.metrics.announce_pending).set(len(self._queue))

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        failures = 0
        try:  # connect now: the first announcement then costs what the others do
            self._client = self._connect()
        except Exception as exc:  # the first send connects again, under the retry rule
            log.info("connecting to Kafka %s ahead of the first announcement: %s: %s",
                     ",".join(self.settings.bootstrap_servers), type(exc).__name__, exc)
            self._drop_client()
        while not self._abort.is_set():
            with self._cond:
                while not self._queue and not self._closing and not self._abort.is_set():
                    self._cond.wait()
                if not self._queue or self._abort.is_set():
                    return  # closing and drained, or out of time
                batch = list(self._queue)[:1000]
            try:
                self._send(batch)
            except Exception as exc:  # one failed round never kills the thread
                self._drop_client()
                failures += 1
                wait = daemon_delay_s(exc, failures, self.retry)
                log.log(logging.WARNING if is_retriable(exc) else logging.ERROR,
                        "announcing %d packet(s) to %s failed (%s: %s); retrying in %.2fs with a "
                        "new client", len(batch), self.topic, type(exc).__name__, exc, wait)
                if self.metrics is not None:
                    self.metrics.of(self.metrics.retries, what="announce").inc()
                self._abort.wait(wait)
                continue
            failures = 0
            self._delivered(batch)
            if self.metrics is not None:
                m = self.metrics
                m.of(m.announced).inc(len(batch))
                now_ns = time.time_ns()
                for announcement in batch:
                    m.of(m.stage_latency, stage="announced").observe(
                        max(0.0, (now_ns - announcement.created_at_ns) / 1e9))

    def _delivered(self, batch: list[Announcement]) -> None:
        with self._cond:
            for _ in batch:  # only this thread removes from the left
                self._queue.popleft()
            self.delivered += len(batch)
            self._gauge()

    def _connect(self) -> Any:
        if not self._topic_ready:
            self._ensure_topic()
        s = self.settings
        return import_kafka().KafkaProducer(
            bootstrap_servers=list(s.bootstrap_servers),
            client_id=s.client_id,
            acks="all",  # idempotence stays on (kafka-python's default) where the broker has it
            security_protocol=s.security_protocol,
            request_timeout_ms=s.request_timeout_ms,
            delivery_timeout_ms=s.delivery_timeout_ms,
            max_block_ms=s.request_timeout_ms,
            reconnect_backoff_max_ms=int(self.max_backoff_s * 1000),
        )

    def _ensure_topic(self) -> None:
        kafka = import_kafka()
        s = self.settings
        admin = kafka.admin.KafkaAdminClient(
            bootstrap_servers=list(s.bootstrap_servers), client_id=s.client_id,
            security_protocol=s.security_protocol, request_timeout_ms=s.request_timeout_ms,
        )
        try:
            if self.topic not in admin.list_topics():
                admin.create_topics([kafka.admin.NewTopic(self.topic, s.num_partitions, 1)])
                log.info("created topic %s (%d partitions)", self.topic, s.num_partitions)
        except kafka.errors.TopicAlreadyExistsError:
            pass
        finally:
            admin.close()
        self._topic_ready = True

    def _send(self, batch: list[Announcement]) -> None:
        if self._client is None:
            self._client = self._connect()
        futures = [self._client.send(self.topic, key=a.key, value=a.to_json()) for a in batch]
        deadline = time.monotonic() + self.settings.delivery_timeout_ms / 1000 + 1
        for future in futures:
            future.get(timeout=max(0.1, deadline - time.monotonic()))

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._topic_ready = False  # a restarted broker may have lost the topic
        if client is not None:
            try:
                client.close(timeout=1)
            except Exception as exc:  # closing a broken client must not mask the real error
                log.debug("closing the Kafka producer: %s", exc)
