"""The one way to wait for a condition: `wait_until(condition, what, timeout_s=...)`.

A start-up, a test or a demo waiting for something to become true (a port to listen, a worker
to be READY, rows to arrive) calls `condition` every `interval_s` until it returns something
truthy, which it returns. The waits are `Event.wait`, so a `stop` event ends one at once; the
errors say what was awaited, for how long, and the last error the condition raised.
Retries of a failed call are not waits: they belong to `foundation.retry`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeoutError(TimeoutError):
    """`what` did not come true within `timeout_s`; `last_error`: what the condition last raised
    (one of the exceptions it was allowed to raise), or None."""

    def __init__(self, what: str, timeout_s: float, last_error: BaseException | None = None) -> None:
        detail = f" (last error: {last_error})" if last_error is not None else ""
        super().__init__(f"timed out after {timeout_s:g} s waiting for {what}{detail}")
        self.what = what
        self.timeout_s = timeout_s
        self.last_error = last_error


class WaitStoppedError(RuntimeError):
    """The `stop` event was set while waiting for `what`."""

    def __init__(self, what: str) -> None:
        super().__init__(f"stopped while waiting for {what}")
        self.what = what


def wait_until(condition: Callable[[], T], what: str, *, timeout_s: float,
               interval_s: float = 0.05, stop: threading.Event | None = None,
               ignore: tuple[type[Exception], ...] = ()) -> T:
    """Call `condition()` until it returns a truthy value, and return that value.

    what: the awaited thing, for the errors ("shard 0 to report SERVING"). timeout_s: how long
    in all (monotonic clock); interval_s: the pause between calls. stop: an event that ends
    the wait with WaitStoppedError. ignore: exceptions of `condition` that mean "not yet" (a
    refused connection); any other exception propagates at once (a process that exited).
    Raises WaitTimeoutError (a TimeoutError) naming `what` and the last ignored error.
    """
    pause = stop if stop is not None else threading.Event()
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        if stop is not None and stop.is_set():
            raise WaitStoppedError(what)
        try:
            value = condition()
        except ignore as exc:
            last_error = exc
        else:
            if value:
                return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeoutError(what, timeout_s, last_error)
        pause.wait(min(interval_s, left))


__all__ = ["WaitStoppedError", "WaitTimeoutError", "wait_until"]
