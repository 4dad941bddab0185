"""A TorchServe worker starts at the lowest CPU priority and serves at its normal one.

Each dense version TorchServe registers gets a new worker process, which spends one to two
CPU seconds importing torch and loading the handler. With Linux's autogroup scheduling every
process TorchServe starts shares one group's share of the CPU, so on a small machine the worker
still serving and the frontend waited behind the starting one: requests during every version
switch took many times their usual time (bench/version_switch.py).

`LocalTorchServe` hands TorchServe a `--python` script that runs this file, which (importing
nothing of persia_inc, nothing heavy, before the start is lowered) puts the worker in a
session of its own, sets that session's autogroup to nice 19 and runs TorchServe's
`model_service_worker.py`. Where autogroup is off it lowers the worker's own nice instead, if
it may raise it again (root, or RLIMIT_NICE allows). Once the model is loaded (the handler's
`initialize` returned, whatever the handler), or after `LOW_START_MAX_S` if that comes first
(so a saturated machine delays a version by at most that), the worker takes its priority
back: an unprivileged process may raise its autogroup's nice to 0 again, but the kernel takes
one such change per 0.1 s machine-wide, so a busy moment is retried for up to two seconds. If
the kernel still refuses, the worker logs a warning and serves at the low priority.

In a session of its own the worker is out of reach of the process-group kill
`LocalTorchServe.stop` uses on a frontend that died without stopping its workers; TorchServe's
worker exits by itself when its frontend's socket closes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import runpy
import sys
import threading
from typing import Any

PRIORITY_ENV = "PERSIA_INC_WORKER_PRIORITY"  # how the worker was lowered: "autogroup:N" / "nice:N"
AUTOGROUP = "/proc/self/autogroup"
LOW_NICE = 19
LOW_START_MAX_S = 10.0  # a start still running then (a saturated machine) goes on at full priority
WORKER_SCRIPT = "model_service_worker.py"


def _autogroup_nice() -> int | None:
    """This process's autogroup nice, None where autogroup scheduling is off or absent."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as enabled:
            if enabled.read().strip() != "1":
                return None
        with open(AUTOGROUP) as group:  # "/autogroup-123 nice 0"
            return int(group.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _set_autogroup_nice(nice: int) -> None:
    with open(AUTOGROUP, "w") as group:
        group.write(str(nice))


def _may_raise_nice_to(nice: int) -> bool:
    """Whether this process may later lower its nice value back to `nice`."""
    if os.geteuid() == 0:
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or 20 - soft <= nice


def lower_priority() -> str:
    """Lower this process's CPU priority for its start; returns what `restore_priority` needs
    ('' if nothing was lowered)."""
    # the group this process started in; a process of the root group (init's, where CI and
    # daemons without a session of their own run) reads none, and runs as at nice 0
    started_in = _autogroup_nice() or 0
    with contextlib.suppress(OSError):  # fails only for a process group leader
        os.setsid()  # a session, so an autogroup, of its own
    if _autogroup_nice() is not None:
        try:
            _set_autogroup_nice(LOW_NICE)
            return f"autogroup:{started_in}"
        except OSError:
            pass
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    if nice < LOW_NICE and _may_raise_nice_to(nice):
        os.setpriority(os.PRIO_PROCESS, 0, LOW_NICE)
        return f"nice:{nice}"
    return ""


def restore_priority(timeout_s: float = 2.0) -> str:
    """Give the worker back the priority it was started with (see the module docstring);
    returns what was restored ('' when the worker was not lowered). OSError if the kernel
    refused; WaitTimeoutError if it stayed busy for `timeout_s`."""
    how = os.environ.pop(PRIORITY_ENV, "")
    if not how:
        return ""
    kind, _, value = how.partition(":")
    nice = int(value)
    if kind == "nice":
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        return how
    from persia_inc.foundation.wait import wait_until

    def restored() -> bool:
        try:
            _set_autogroup_nice(nice)
        except OSError as exc:  # EAGAIN: some autogroup changed within the last 0.1 s
            if exc.errno != errno.EAGAIN:
                raise
            return False
        return True

    wait_until(restored, "the kernel to take the worker's autogroup nice back", timeout_s=timeout_s,
               interval_s=0.1)
    return how


def _restore_logged() -> None:
    try:
        if restore_priority() and threading.current_thread().name == _TIMER_NAME:
            logging.info("worker %d: still starting after %g s, goes on at its normal priority",
                         os.getpid(), LOW_START_MAX_S)
    except (OSError, TimeoutError) as exc:
        logging.warning("worker %d serves at the low priority it started with: %s", os.getpid(), exc)


_TIMER_NAME = "persia-inc-worker-priority"


def _restore_once_loaded() -> None:
    """Restore the priority when TorchServe's model loader returns (the handler is
    initialized), for any handler, or after LOW_START_MAX_S, whichever comes first."""
    from ts import model_loader

    timer = threading.Timer(LOW_START_MAX_S, _restore_logged)
    timer.name, timer.daemon = _TIMER_NAME, True
    load = model_loader.TsModelLoader.load

    def load_then_restore(self: Any, *args: Any, **kwargs: Any) -> Any:
        service = load(self, *args, **kwargs)
        timer.cancel()
        _restore_logged()
        return service

    model_loader.TsModelLoader.load = load_then_restore
    timer.start()


def main(argv: list[str]) -> None:
    """argv: TorchServe's command line after the interpreter (its worker script and its
    arguments). Anything else runs as `python argv...` would."""
    if not argv or not argv[0].endswith(WORKER_SCRIPT):
        os.execv(sys.executable, [sys.executable, *argv])
    how = lower_priority()
    if how:
        os.environ[PRIORITY_ENV] = how
        _restore_once_loaded()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
