"""The demo's child processes: `persia-inc` subcommands, each logging to a file."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

from persia_inc.local_services import ServiceError

log = logging.getLogger(__name__)


class ChildProcess:
    """A `persia-inc` subcommand in its own process, logging to a file, stopped by its PID."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "persia_inc.cli", *args],
                                         stdout=out, stderr=subprocess.STDOUT)
        log.info("started %s (pid %d), log %s", name, self.proc.pid, log_path)

    def check_alive(self) -> None:
        """ServiceError (naming the process, its exit status and its log's tail) if it exited."""
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ServiceError(f"{self.name} exited with {self.proc.returncode} (log "
                               f"{self.log_path}):\n{tail}")

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout_s)
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode
