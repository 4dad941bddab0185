"""A private TorchServe on 127.0.0.1 for tests, benchmarks and the demo, stopped by its PID.

`torchserve --start` keeps one PID file for the whole machine (in the temp dir) and, in the
foreground, waits on a Java child it does not forward signals to. This starts TorchServe's
Java frontend directly (the same command line `torchserve` builds), so the process we signal
is the server itself; its shutdown hook stops the Python workers. Every address is on
127.0.0.1 with free ports, token authorization is off and the model API on (the local
settings of `infra/torchserve/config.properties`), and logs go to `workdir/logs`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import requests

from persia_inc.foundation.net import free_port


def local_properties(model_store: Path, ports: Mapping[str, int], **extra: str) -> dict[str, str]:
    """config.properties for a local TorchServe: loopback only, no token, model API on."""
    props = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": str(ports["grpc_management"]),
        "disable_token_authorization": "true",
        "enable_model_api": "true",
        "model_store": str(model_store),
        "default_workers_per_model": "1",
        "install_py_dep_per_model": "false",
        "disable_system_metrics": "true",
        "vmargs": "-Xmx512m -XX:+UseG1GC",
    }
    props.update(extra)
    return props


class TorchServeError(RuntimeError):
    """TorchServe did not start or stop; carries the tail of its log."""


class LocalTorchServe:
    """One TorchServe frontend (Java) under `workdir`; `start()`, `stop()`, or `with`.

    env: extra environment for the server and its workers (e.g. PERSIA_INC_CONFIG).
    """

    def __init__(self, workdir: str | Path, *, env: Mapping[str, str] | None = None,
                 **properties: str) -> None:
        self.workdir = Path(workdir)
        self.model_store = self.workdir / "model-store"
        self.ports = {name: free_port() for name in
                      ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
        self.env = dict(env or {})
        self.properties = local_properties(self.model_store, self.ports, **properties)
        self._proc: subprocess.Popen | None = None

    # addresses
    @property
    def inference_url(self) -> str:
        return self.properties["inference_address"]

    @property
    def management_url(self) -> str:
        return self.properties["management_address"]

    @property
    def grpc_inference_target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc_inference']}"

    @property
    def grpc_management_target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc_management']}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in (self.workdir / "frontend.out", self.workdir / "logs" / "model_log.log"):
            if path.exists():
                out += [f"--- {path.name}", *path.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(out)

    def _command(self, config: Path) -> list[str]:
        spec = importlib.util.find_spec("ts")
        if spec is None or not spec.submodule_search_locations:
            raise TorchServeError("TorchServe is not installed: pip install -e '.[serve]'")
        ts_home = Path(next(iter(spec.submodule_search_locations))).parent
        java_home = os.environ.get("JAVA_HOME")
        java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
        if not java:
            raise TorchServeError("java not found: install OpenJDK 17 or set JAVA_HOME")
        return [java, f"-Dmodel_server_home={ts_home}", *self.properties["vmargs"].split(),
                "-cp", f".:{ts_home / 'ts' / 'frontend' / '*'}", "org.pytorch.serve.ModelServer",
                "--python", sys.executable, "-f", str(config), "-s", str(self.model_store), "-ncs"]

    def start(self, timeout_s: float = 60.0) -> LocalTorchServe:
        if self._proc is not None:
            raise TorchServeError("already started")
        self.model_store.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        config = self.workdir / "config.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in self.properties.items()))
        env = {**os.environ, **self.env, "LOG_LOCATION": str(self.workdir / "logs"),
               "METRICS_LOCATION": str(self.workdir / "logs")}
        # the workers must find this interpreter's packages (inference, persia_inc ...)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        with (self.workdir / "frontend.out").open("ab") as out:
            self._proc = subprocess.Popen(self._command(config), cwd=self.workdir, env=env,
                                          stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TorchServeError(f"TorchServe exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.inference_url}/ping", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise TorchServeError(f"TorchServe not answering after {timeout_s} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM our Java process (its shutdown hook stops the workers), then wait; SIGKILL
        the process group we started if it lingers. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the server and its workers
            proc.wait(timeout=10)

    def __enter__(self) -> LocalTorchServe:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


__all__ = ["LocalTorchServe", "TorchServeError", "free_port", "local_properties"]
