"""Closing the producer when the process ends: at interpreter exit, and on SIGTERM.

A SIGTERM that lands while the training thread is inside a producer call or an optimizer step
is held until that call ends (`leave_busy`), so a packet never holds a row the optimizer is
half-way through updating. The previous SIGTERM handler runs after the close.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class ShutdownHooks:
    """Run `close` at exit (`at_exit`) and on SIGTERM (`on_sigterm`, main thread only);
    `busy()` says whether the training thread is inside a producer call right now."""

    def __init__(self, close: Callable[[], None], busy: Callable[[], bool], *,
                 at_exit: bool, on_sigterm: bool) -> None:
        self._close = close
        self._busy = busy
        self._deferred: tuple[int, FrameType | None] | None = None
        self._previous: Any = None
        self._sigterm_installed = False
        self._at_exit = at_exit
        if at_exit:
            atexit.register(self._close_at_exit)
        if on_sigterm:
            self._install_sigterm()

    def leave_busy(self) -> None:
        """The training thread left its last producer call: run a SIGTERM that waited."""
        if self._deferred is not None and not self._busy():
            signum, frame = self._deferred
            self._deferred = None
            self._terminate(signum, frame)

    def uninstall(self) -> None:
        """Forget both hooks (the producer closed); safe to call twice."""
        if self._at_exit:
            atexit.unregister(self._close_at_exit)
            self._at_exit = False
        if (self._sigterm_installed and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == self._on_sigterm):
            signal.signal(signal.SIGTERM, self._previous)
        self._sigterm_installed = False

    def _close_at_exit(self) -> None:
        try:
            self._close()
        except Exception:  # at exit there is no caller left to raise to
            log.exception("closing the incremental producer at exit failed")

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.info("not on the main thread: SIGTERM will not close the producer")
            return
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._busy():  # inside record/flush or an optimizer step: finish it first
            self._deferred = (signum, frame)
            return
        self._terminate(signum, frame)

    def _terminate(self, signum: int, frame: FrameType | None) -> None:
        log.info("SIGTERM: closing the incremental producer")
        previous = self._previous
        self._close_at_exit()
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
