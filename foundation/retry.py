"""The one place that decides whether and when to retry.

Errors say whether they are retriable (a `retriable` attribute: `StorageError`, kafka-python's
`KafkaError` subclasses, `ShardError`); `retry_delay_s` decides from the error, the attempt and
the time spent whether to try again and how long to wait first (capped, jittered exponential
backoff). `call_with_retry` and every retry loop of the project (packet writer, announcer,
loader) ask it, each with its own `RetryPolicy`.

A thread may also scope an event over every retry wait it makes (`stop_waits_on`): the packet
writer does, so closing it cuts short the waits of the store calls it makes, without stopping
a store it does not own.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Built-ins that mean "the other side did not answer", not "the request is wrong".
_RETRIABLE_BUILTINS = (ConnectionError, TimeoutError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped, jittered exponential backoff.

    max_attempts: tries in all (1 = no retry; None = no limit); initial_backoff_s is multiplied
    by `multiplier` per retry up to max_backoff_s; jitter is the fraction of each wait drawn at
    random (a wait lies in [base * (1 - jitter), base]); deadline_s bounds the whole call
    including waits (0 = no deadline).
    """

    max_attempts: int | None = 5
    """Tries in all (1: no retry; null: no limit)."""
    initial_backoff_s: float = 0.1
    """The wait before the first retry."""
    max_backoff_s: float = 5.0
    """The longest wait between two tries."""
    multiplier: float = 2.0
    """Each wait is this times the one before, up to `max_backoff_s`."""
    jitter: float = 0.5
    """The share of each wait drawn at random (a wait lies in [base * (1 - jitter), base])."""
    deadline_s: float = 60.0
    """Bounds the whole call including waits (0: no deadline)."""

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1 (None: no limit)")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("RetryPolicy needs 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1 or self.deadline_s < 0:
            raise ValueError("RetryPolicy needs multiplier >= 1, 0 <= jitter <= 1, deadline_s >= 0")

    def backoff_s(self, attempt: int) -> float:
        """Wait before retry number `attempt` (1-based): capped, then jittered downwards."""
        exponent = min(max(attempt, 1) - 1, 64)  # past 2**64 the cap has long applied
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** exponent)
        return base * (1 - self.jitter * random.random())


NO_RETRY = RetryPolicy(max_attempts=1)


def is_retriable(exc: BaseException) -> bool:
    """Whether `exc` is worth retrying: errors that say so (`exc.retriable is True`), and the
    built-in ConnectionError and TimeoutError, which say nothing but mean "no answer"."""
    retriable = getattr(exc, "retriable", None)
    if retriable is not None:
        return retriable is True
    return isinstance(exc, _RETRIABLE_BUILTINS)


def retry_delay_s(exc: BaseException, attempt: int, elapsed_s: float,
                  policy: RetryPolicy) -> float | None:
    """Seconds to wait before trying again after `attempt` (1-based) failed with `exc`, or
    None to give up: `exc` is not retriable, the attempts are spent, or the wait would end
    past the policy's deadline (`elapsed_s`: time since the first try, monotonic)."""
    if not is_retriable(exc):
        return None
    if policy.max_attempts is not None and attempt >= policy.max_attempts:
        return None
    wait = policy.backoff_s(attempt)
    if policy.deadline_s and elapsed_s + wait > policy.deadline_s:
        return None
    return wait


def daemon_delay_s(exc: BaseException, attempt: int, policy: RetryPolicy) -> float:
    """For a daemon, which never gives up on its work: the wait `retry_delay_s` decides for a
    retriable error (no deadline), and the longest wait (`max_backoff_s`) for any other, which
    only an operator can fix but which must not make the daemon spin."""
    wait = retry_delay_s(exc, attempt, 0.0, policy)
    return policy.max_backoff_s if wait is None else wait


_scoped_stop: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "persia_inc_retry_stop", default=None)


@contextlib.contextmanager
def stop_waits_on(event: threading.Event) -> Iterator[None]:
    """Within the block, every `call_with_retry` wait on this thread also ends when `event` is
    set (the call then re-raises its last failure). A thread that stops does not have to stop
    the shared objects it calls into."""
    token = _scoped_stop.set(event)
    try:
        yield
    finally:
        _scoped_stop.reset(token)


def wait_or_stop(wait_s: float, *events: threading.Event | None) -> bool:
    """Wait `wait_s` seconds, or less if one of `events` (None ignored) is set; True if one is."""
    present = [e for e in events if e is not None]
    if not present:
        time.sleep(wait_s)
        return False
    if len(present) == 1:
        return present[0].wait(wait_s)
    deadline = time.monotonic() + wait_s
    while True:  # no wait-for-any on threading.Event: look every 50 ms
        if any(e.is_set() for e in present):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        present[0].wait(min(left, 0.05))


def call_with_retry(
    operation: Callable[[], T],
    policy: RetryPolicy,
    describe: str,
    *,
    stop: threading.Event | None = None,
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> T:
    """Run `operation`, retrying as `retry_delay_s` decides under `policy`; re-raise the last
    failure when it gives up or a stop event (`stop`, or one scoped by `stop_waits_on`) is set.

    `describe` names the call in logs ("put s3://b/k"); `on_retry(exc, attempt)` lets callers
    count retries in a metric.
    """
    started = time.monotonic()
    attempt = 1
    while True:
        try:
            return operation()
        except Exception as exc:
            wait = retry_delay_s(exc, attempt, time.monotonic() - started, policy)
            if wait is None:
                raise
            log.warning("%s failed (attempt %d/%s): %s; retrying in %.2fs",
                        describe, attempt, policy.max_attempts or "unlimited", exc, wait)
            if on_retry is not None:
                on_retry(exc, attempt)
            if wait_or_stop(wait, stop, _scoped_stop.get()):
                raise
            attempt += 1
