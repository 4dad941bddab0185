"""One base for the project's long-lived threads: start, close (idempotent, bounded), `with`.

Every thread is a daemon named `persia-inc-<role>` (`THREAD_PREFIX`), so a test can tell our
threads from the interpreter's and the libraries' and fail when one outlives its owner
(`leaked_threads`, used by tests/conftest.py). Loops watch `stop` and sleep with
`stop.wait(t)`; a loop blocked elsewhere (a condition, a queue) is woken by the `wake`
callback that `close` calls after setting `stop`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

THREAD_PREFIX = "persia-inc-"


def thread_name(role: str) -> str:
    """The name of a thread (or the prefix of a pool's threads) of ours: `persia-inc-<role>`."""
    return role if role.startswith(THREAD_PREFIX) else THREAD_PREFIX + role


class ServiceThread:
    """A named daemon thread running `target()` (or an override of `run`) until `stop` is set.

    start() returns self; close(timeout_s) sets `stop`, calls `wake` (to end a wait that is
    not on `stop`), joins for at most `timeout_s`, logs when the thread is still running, and
    returns whether it stopped; it is safe to call twice and from the thread itself. A closed
    thread does not restart. An exception escaping `target` is logged and kept in `error`.
    `stop`: an event of the owner's to use as this thread's stop (default: a new one).
    """

    def __init__(self, role: str, target: Callable[[], None] | None = None, *,
                 wake: Callable[[], None] | None = None,
                 stop: threading.Event | None = None) -> None:
        self.name = thread_name(role)
        self.stop = stop if stop is not None else threading.Event()
        self.error: BaseException | None = None
        self._target = target
        self._wake = wake
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)

    def run(self) -> None:
        """The loop: `target()` unless a subclass overrides it."""
        if self._target is not None:
            self._target()

    def _main(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # a loop should catch per item; this is the last net
            self.error = exc
            log.exception("thread %s died", self.name)

    def start(self) -> ServiceThread:
        """Start the thread (once); RuntimeError after close."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"thread {self.name} is closed; it does not restart")
            if not self._started:
                self._started = True
                self._thread.start()
        return self

    @property
    def started(self) -> bool:
        return self._started

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    @property
    def native_id(self) -> int | None:
        return self._thread.native_id

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the thread to end (without asking it to); True if it is not running."""
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        return not self._thread.is_alive() or self._thread is threading.current_thread()

    def close(self, timeout_s: float = 10.0) -> bool:
        """Ask the thread to stop and wait at most `timeout_s`; True if it stopped."""
        with self._lock:
            self._closed = True
        self.stop.set()
        if self._wake is not None:
            self._wake()
        if not self._started or self._thread is threading.current_thread():
            return True
        self._thread.join(max(0.0, timeout_s))
        if self._thread.is_alive():
            log.warning("thread %s did not stop within %.1f s; leaving it (daemon)",
                        self.name, timeout_s)
            return False
        return True

    def __enter__(self) -> ServiceThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else "closed" if self._closed else "idle"
        return f"<ServiceThread {self.name} {state}>"


def is_ours(thread: threading.Thread) -> bool:
    """Whether `thread` is one of the project's (named with `THREAD_PREFIX`)."""
    return thread.name.startswith(THREAD_PREFIX)


def leaked_threads(before: Iterable[threading.Thread], *, grace_s: float = 5.0,
                   extra: Callable[[threading.Thread], bool] | None = None) -> list[str]:
    """Names of threads started since `before` still running after `grace_s`: non-daemon
    threads, and daemon threads that are ours (`is_ours`, or `extra(thread)`)."""
    known = set(before)

    def suspect(thread: threading.Thread) -> bool:
        if thread in known or not thread.is_alive() or thread is threading.current_thread():
            return False
        return not thread.daemon or is_ours(thread) or (extra is not None and extra(thread))

    deadline = time.monotonic() + grace_s
    for thread in [t for t in threading.enumerate() if suspect(t)]:
        thread.join(max(0.0, deadline - time.monotonic()))
    return sorted(t.name for t in threading.enumerate() if suspect(t))


def run_here(fn: Callable[..., Any], *args: Any) -> Future:
    """`fn(*args)` run on the calling thread, as a finished future holding its result or its
    exception: with futures of calls sent to a pool, the caller's own share among them, one
    thread hand-off fewer."""
    done: Future = Future()
    try:
        done.set_result(fn(*args))
    except Exception as exc:
        done.set_exception(exc)
    return done


__all__ = ["THREAD_PREFIX", "ServiceThread", "is_ours", "leaked_threads", "lower_thread_priority",
           "run_here", "thread_name"]


def lower_thread_priority(increment: int) -> None:
    """Run the calling thread `increment` nicer (Linux nice, 0-19). Linux gives each thread its
    own priority; elsewhere this would renice the whole process, so it does nothing there.
    Background work (the packet writer, the servers' applies) uses it so that the work people
    wait for comes first. SCHED_IDLE was tried for the writer and dropped: it made packets
    later for no measurable gain in step time (bench/results/producer.json)."""
    if sys.platform != "linux" or increment <= 0:
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except OSError as exc:  # a sandbox may forbid it: run at normal priority
        log.info("could not lower the CPU priority of thread %s: %s", threading.current_thread().name, exc)
