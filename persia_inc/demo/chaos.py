"""The demo's live embedding servers, one process per replica, and `--chaos`: every few
seconds one replica is killed with SIGKILL and started again (empty: the loader catches it
up from storage, and it serves once it holds what its sibling holds)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persia_inc.demo.processes import ChildProcess
from persia_inc.foundation.threads import thread_name

log = logging.getLogger(__name__)


class ReplicaProcesses:
    """`embedding-server` children for every replica of every shard of `config_path`
    (`replicas[s]`: how many shard s has); with `chaos_every_s` > 0, `start_chaos` kills one
    replica (round-robin) with SIGKILL that often and starts it again. `kills` lists them
    (t_s: `clock()` at the kill, shard, replica)."""

    def __init__(self, name: str, config_path: Path, replicas: list[int], logs: Path) -> None:
        self.name, self.config_path, self.logs = name, config_path, logs
        self.procs: dict[tuple[int, int], ChildProcess] = {}
        self.kills: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for shard, count in enumerate(replicas):
            for replica in range(count):
                self._start(shard, replica)

    def _start(self, shard: int, replica: int) -> None:
        suffix = f"{shard}" + (f"r{replica}" if replica else "")
        self.procs[(shard, replica)] = ChildProcess(
            f"{self.name} {suffix}",
            ["embedding-server", "--config", str(self.config_path), "--shard", str(shard),
             "--replica", str(replica)], self.logs / f"{self.name}-{suffix}.log")

    def start_chaos(self, every_s: float, clock: Callable[[], float]) -> None:
        """Kill one replica every `every_s` seconds (round-robin over shards, then replicas)
        and start it again at once, until `stop`."""
        victims = sorted(self.procs, key=lambda key: (key[1], key[0]))

        def run() -> None:
            k = 0
            while not self._stop.wait(every_s):
                key = victims[k % len(victims)]
                k += 1
                with self._lock:
                    self.procs[key].proc.send_signal(signal.SIGKILL)
                    self.procs[key].proc.wait(10)
                    self.kills.append({"t_s": round(clock(), 2), "shard": key[0],
                                       "replica": key[1], "signal": "SIGKILL"})
                    log.info("chaos: killed %s shard %d replica %d (SIGKILL); starting it again",
                             self.name, *key)
                    self._start(*key)

        self._thread = threading.Thread(target=run, name=thread_name("chaos"), daemon=True)
        self._thread.start()

    def check_alive(self) -> None:
        """Raise RuntimeError naming a replica that exited on its own (not killed by chaos)."""
        with self._lock:
            for child in self.procs.values():
                child.check_alive()

    def stop(self) -> list[str]:
        """Stop the chaos, then every replica (SIGTERM); returns the problems (exit codes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        problems = []
        with self._lock:
            for child in self.procs.values():
                code = child.stop()
                if code not in (0, None):
                    problems.append(f"{child.name} exited with {code} on SIGTERM")
        return problems

