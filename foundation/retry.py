"""The one place that decides whether and when to retry: errors say whether they are
retriable (a `retriable` attribute), and `retry_delay_s` decides from the error, the attempt
and the deadline."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped, jittered exponential backoff.

    max_attempts: tries in all (1 = no retry); initial_backoff_s doubles (times `multiplier`)
    per retry up to max_backoff_s; jitter is the fraction of each wait drawn at random;
    deadline_s bounds the whole call including waits (0 = no deadline).
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    deadline_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("RetryPolicy needs 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1 or self.deadline_s < 0:
            raise ValueError("RetryPolicy needs multiplier >= 1, 0 <= jitter <= 1, deadline_s >= 0")

    def backoff_s(self, attempt: int) -> float:
        """Wait before retry number `attempt` (1-based)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return base * (1 - self.jitter * random.random())


NO_RETRY = RetryPolicy(max_attempts=1)


def is_retriable(exc: BaseException) -> bool:
    """Whether `exc` is worth retrying: only errors that say so (`exc.retriable is True`)."""
    return getattr(exc, "retriable", False) is True


def call_with_retry(
    operation: Callable[[], T],
    policy: RetryPolicy,
    describe: str,
    *,
    stop: threading.Event | None = None,
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> T:
    """Run `operation`, retrying retriable failures under `policy`; re-raise the last failure.

    `describe` names the call in logs ("put s3://b/k"); `stop` cuts waits short on shutdown;
    `on_retry(exc, attempt)` lets callers count retries in a metric.
    """
    started = time.monotonic()
    attempt = 1
    while True:
        try:
            return operation()
        except Exception as exc:
            elapsed = time.monotonic() - started
            wait = policy.backoff_s(attempt)
            out_of_time = policy.deadline_s and elapsed + wait > policy.deadline_s
            if not is_retriable(exc) or attempt >= policy.max_attempts or out_of_time:
                raise
            log.warning(
                "%s failed (attempt %d/%d): %s; retrying in %.2fs",
                describe, attempt, policy.max_attempts, exc, wait,
            )
            if on_retry is not None:
                on_retry(exc, attempt)
            if stop is not None:
                if stop.wait(wait):
                    raise
            else:
                time.sleep(wait)
            attempt += 1
